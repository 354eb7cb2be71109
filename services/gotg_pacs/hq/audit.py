"""The sites' audit trails, kept at HQ where a site cannot reach them once sent.

Each site sends its events in order, naming their trail (one per log a box began, see
gotg_pacs.audit) and the byte offset they start at in it; HQ appends them as sent to that trail's
copy (each keeps its hash chain, so `audit.verify` works on HQ's copy too) and answers how far it
now holds. A retry of a batch HQ already took, or a gap, is answered with 409 and the offset HQ
holds, and the site sends again from there: nothing twice, nothing lost. HQ_STATE/audit/SITE/
holds one TRAIL.jsonl per trail the site ever began.
"""

from __future__ import annotations

import json
from pathlib import Path

from flask import Flask, Response, abort, g, jsonify, request

from .. import durable
from ..audit import TRAIL_ID

MAX_EVENTS = 1000


class Trails:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _offset_file(self, site: str, trail: str) -> Path:
        return self.folder / site / f"{trail}.offset"

    def log(self, site: str, trail: str) -> Path:
        return self.folder / site / f"{trail}.jsonl"

    def of(self, site: str) -> list[Path]:
        """Every trail HQ holds of `site` (with the one file HQ kept per site before trails
        were named, if there is one)."""
        before = self.folder / f"{site}.jsonl"
        return [*([before] if before.exists() else []),
                *sorted((self.folder / site).glob("*.jsonl"))]

    def held(self, site: str, trail: str) -> int:
        try:
            return int(self._offset_file(site, trail).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def append(self, site: str, trail: str, start: int, end: int, events: list[dict]) -> int:
        """Keep events that start exactly where HQ's copy ends; the new end."""
        lines = "".join(json.dumps(event, sort_keys=True, ensure_ascii=True) + "\n"
                        for event in events)
        (self.folder / site).mkdir(parents=True, exist_ok=True, mode=0o700)
        durable.append(self.log(site, trail), lines.encode())
        # The offset after the events: a crash between the two writes resends the batch,
        # which HQ then holds twice; never once less.
        durable.replace_text(self._offset_file(site, trail), str(end), mode=0o600)
        return end


def _offset(value: object) -> bool:
    """A byte offset: a JSON integer (true and false are ints to Python, not offsets)."""
    return isinstance(value, int) and not isinstance(value, bool)


def register(app: Flask, trails: Trails) -> None:
    @app.post("/api/v1/audit")
    def receive() -> Response:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400, "a JSON object: start, end, events")
        trail, start, end, events = (body.get("trail"), body.get("start"), body.get("end"),
                                     body.get("events"))
        if not (isinstance(trail, str) and TRAIL_ID.fullmatch(trail)):
            abort(400, "trail: the 32 hexadecimal digits naming the log")
        if not (_offset(start) and _offset(end) and 0 <= start <= end
                and isinstance(events, list) and len(events) <= MAX_EVENTS
                and all(isinstance(event, dict) for event in events)):
            abort(400, f"start <= end (byte offsets) and at most {MAX_EVENTS} events")
        held = trails.held(g.site, trail)
        if start != held:
            return jsonify({"held": held}), 409
        return jsonify({"held": trails.append(g.site, trail, start, end, events)})
