"""The sites' audit trails, kept at HQ where a site cannot reach them once sent.

Each site sends its events in order with the byte offset they start at in its own log; HQ
appends them as sent (each keeps its hash chain, so `audit.verify` works on HQ's copy too) and
answers how far it now holds. A retry of a batch HQ already took, or a gap, is answered with
409 and the offset HQ holds, and the site sends again from there: nothing twice, nothing lost.
"""

from __future__ import annotations

import json
from pathlib import Path

from flask import Flask, Response, abort, g, jsonify, request

from .. import durable

MAX_EVENTS = 1000


class Trails:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _offset_file(self, site: str) -> Path:
        return self.folder / f"{site}.offset"

    def log(self, site: str) -> Path:
        return self.folder / f"{site}.jsonl"

    def held(self, site: str) -> int:
        try:
            return int(self._offset_file(site).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def append(self, site: str, start: int, end: int, events: list[dict]) -> int:
        """Keep events that start exactly where HQ's copy ends; the new end."""
        lines = "".join(json.dumps(event, sort_keys=True, ensure_ascii=True) + "\n"
                        for event in events)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable.append(self.log(site), lines.encode())
        # The offset after the events: a crash between the two writes resends the batch,
        # which HQ then holds twice; never once less.
        durable.replace_text(self._offset_file(site), str(end), mode=0o600)
        return end


def register(app: Flask, trails: Trails) -> None:
    @app.post("/api/v1/audit")
    def receive() -> Response:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400, "a JSON object: start, end, events")
        start, end, events = body.get("start"), body.get("end"), body.get("events")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end
                and isinstance(events, list) and len(events) <= MAX_EVENTS
                and all(isinstance(event, dict) for event in events)):
            abort(400, f"start <= end (byte offsets) and at most {MAX_EVENTS} events")
        held = trails.held(g.site)
        if start != held:
            return jsonify({"held": held}), 409
        return jsonify({"held": trails.append(g.site, start, end, events)})
