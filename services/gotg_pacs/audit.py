"""The audit trail, in the spirit of IHE ATNA: who viewed, exported, changed or deleted which
study, who signed in or failed to, and who changed accounts or blocked a device; when, and from
where.

One JSON line per event in STATE_PATH/audit/audit.jsonl, opened only for appending and fsynced
before the request it records is answered. Each line carries the SHA-256 of the line before it,
so a line removed or edited afterwards breaks the chain (`verify`), and the sync service ships
the lines to HQ in order (`ship`), where the site cannot reach them. Viewing is recorded once
per person and resource every VIEW_WINDOW, not per image tile.

A log begins with a `trail-start` event naming a random trail. HQ keeps each trail apart, so a
box rebuilt for the same site starts a trail of its own instead of colliding with the old box's
at HQ; the old trail, restored from a backup, waits in `earlier/` and is shipped too, for what
HQ never received of it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path

from . import durable

VIEW_WINDOW = 600.0
GENESIS = "0" * 64
TRAIL_START = "trail-start"
TRAIL_ID = re.compile(r"[0-9a-f]{32}")
# What a request to a backend does to which resource (method, path pattern, action).
RESOURCE = re.compile(r"/(?:orthanc/(patients|studies|series|instances)|dicom-web/(studies))"
                      r"/([^/]+)(/.*)?")


def action_of(method: str, path: str) -> tuple[str, str, str] | None:
    """(action, resource kind, resource id) for a request worth recording, else None."""
    match = RESOURCE.fullmatch(path)
    if not match:
        if method == "POST" and path in ("/orthanc/instances", "/dicom-web/studies"):
            return "import", "instances", ""
        return None
    kind = match.group(1) or match.group(2)
    ident, rest = match.group(3), match.group(4) or ""
    if method == "DELETE":
        return "delete", kind, ident
    if method == "POST" and rest in ("/archive", "/media"):
        return "export", kind, ident
    if method in ("POST", "PUT"):
        return "modify", kind, ident
    if method in ("GET", "HEAD"):
        return "view", kind, ident
    return None


class AuditLog:
    """One writer per process (the web service's threads share one); processes that write the
    same log (the web service, a restore run by hand) take turns under an exclusive lock, each
    chaining to the event the file ends with."""

    def __init__(self, path: Path, clock=time.time) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._end: tuple[int, str] | None = None  # (file size, last hash) after our last write
        self._recent: dict[tuple[str, str, str], float] = {}

    @staticmethod
    def _tail_hash(log: int, size: int) -> str:
        """The last complete event's hash; a line a power cut left unfinished is closed first,
        so the next event never joins it (verify then reports the cut line)."""
        tail = os.pread(log, 65536, max(0, size - 65536)) if size else b""
        if tail and not tail.endswith(b"\n"):
            os.write(log, b"\n")
        for line in reversed([line for line in tail.splitlines() if line.strip()]):
            try:
                return json.loads(line)["hash"]
            except (ValueError, KeyError):
                continue  # a line cut by a power cut: chained over, `verify` reports it
        return GENESIS

    def record(self, action: str, user: str, address: str, **details: str) -> bool:
        """Append one event; False when it repeats a view of the same thing just recorded."""
        now = self.clock()
        with self._lock:
            if action == "view":
                key = (user, details.get("kind", ""), details.get("resource", ""))
                if now - self._recent.get(key, -VIEW_WINDOW) < VIEW_WINDOW:
                    return False
                self._recent[key] = now
                if len(self._recent) > 10000:
                    self._recent = {k: t for k, t in self._recent.items()
                                    if now - t < VIEW_WINDOW}
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            log = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(log, fcntl.LOCK_EX)
                size = os.fstat(log).st_size
                last = self._end[1] if self._end and self._end[0] == size else \
                    self._tail_hash(log, size)
                events = []
                if size == 0:  # a new log begins a trail of its own
                    events.append({"time": round(now, 3), "action": TRAIL_START,
                                   "user": "system", "address": "",
                                   "trail": secrets.token_hex(16), "host": socket.gethostname()})
                events.append({"time": round(now, 3), "action": action, "user": user,
                               "address": address, **details})
                lines = []
                for event in events:
                    event["previous"] = last
                    body = json.dumps(event, sort_keys=True, ensure_ascii=True)
                    last = event["hash"] = hashlib.sha256(body.encode()).hexdigest()
                    lines.append(json.dumps(event, sort_keys=True, ensure_ascii=True) + "\n")
                data = "".join(lines).encode()
                while data:  # a short write (a full disk) raises rather than half an event
                    data = data[os.write(log, data):]
                os.fsync(log)
                if size == 0:  # a new file: its name too must survive a power cut
                    durable.fsync_dir(self.path.parent)
                self._end = (os.fstat(log).st_size, last)
            except BaseException:
                self._end = None  # what the file ends with is read again next time
                raise
            finally:
                os.close(log)  # and with it the lock
        return True


def read(path: Path, offset: int = 0, limit: int | None = None) -> tuple[list[dict], int]:
    """Complete events from byte `offset` on (at most `limit` lines), and the offset after the
    last one returned. Reads only as far as it returns: the sync service asks every second."""
    events, end = [], offset
    try:
        with open(path, "rb") as log:
            if offset >= os.fstat(log.fileno()).st_size:  # nothing there (nor seekable so far)
                return [], offset
            log.seek(offset)
            for line in log:
                if limit is not None and len(events) >= limit:
                    break
                if not line.endswith(b"\n"):
                    break  # being written, or cut by a power cut: not complete yet
                end += len(line)
                if not line.strip():
                    continue
                try:
                    events.append(json.loads(line))
                except ValueError:
                    events.append({"action": "unreadable-line"})
    except FileNotFoundError:
        pass
    return events, end


def verify(events: list[dict]) -> list[str]:
    """Breaks in the chain: an event edited, removed or put in between (empty: intact)."""
    problems, previous = [], GENESIS
    for number, event in enumerate(events, 1):
        if event.get("action") == "unreadable-line":
            problems.append(f"event {number} is unreadable (cut short by a power cut?)")
            continue
        claimed = event.get("hash", "")
        body = json.dumps({k: v for k, v in event.items() if k != "hash"}, sort_keys=True,
                          ensure_ascii=True)
        if hashlib.sha256(body.encode()).hexdigest() != claimed:
            problems.append(f"event {number} was altered")
        elif event.get("previous") != previous:
            problems.append(f"events are missing before event {number}")
        previous = claimed
    return problems


def trail_of(log: Path) -> str | None:
    """The trail a log holds, from its first line alone; None while it holds none. The first
    event names it; a log begun before trails were named is named by its first event's hash,
    and one whose first line a power cut spoilt by that line's bytes, so it ships all the same."""
    try:
        with open(log, "rb") as handle:
            first = handle.readline()
    except FileNotFoundError:
        return None
    if not first.endswith(b"\n"):
        return None  # not one complete line yet
    try:
        event = json.loads(first)
    except ValueError:
        event = None
    if isinstance(event, dict):
        trail = event.get("trail") if event.get("action") == TRAIL_START else None
        if isinstance(trail, str) and TRAIL_ID.fullmatch(trail):
            return trail
        if isinstance(event.get("hash"), str) and len(event["hash"]) >= 32:
            return event["hash"][:32]
    return hashlib.sha256(first.rstrip(b"\n")).hexdigest()[:32]


def earlier_folder(log: Path) -> Path:
    """Trails this box holds but no longer writes: the box's own before a restore."""
    return log.parent / "earlier"


def trails(log: Path) -> list[Path]:
    """The log written now, then every earlier trail, oldest file name first."""
    return [log, *sorted(earlier_folder(log).glob("*.jsonl"))]


def keep_earlier(log: Path, copy: Path) -> str | None:
    """Keep `copy` (another log, from a backup) as an earlier trail to ship; its trail, or None
    when it holds nothing, or is this log itself (nothing to keep)."""
    trail = trail_of(copy)
    if trail is None or trail == trail_of(log):
        return None
    kept = earlier_folder(log) / f"{trail}.jsonl"
    if not kept.exists() or kept.stat().st_size < copy.stat().st_size:
        kept.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable.replace_bytes(kept, copy.read_bytes(), mode=0o600)
    return trail


def shipped_file(log: Path) -> Path:
    return log.with_name(log.name.removesuffix(".jsonl") + ".shipped")


def ship(log: Path, client, batch: int = 500) -> int:
    """Send HQ what it does not hold yet of every trail here, each in order; how many events
    went. `client` is the site's HQClient (HQUnreachable and HQRefused pass through: the next
    round tries again)."""
    return sum(_ship_trail(path, client, batch) for path in trails(log))


def _ship_trail(log: Path, client, batch: int) -> int:
    trail = trail_of(log)
    if trail is None:
        return 0
    marker = shipped_file(log)
    try:
        shipped = json.loads(marker.read_text())
        start = int(shipped["offset"]) if shipped["trail"] == trail else 0
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        start = 0
    for _ in range(2):  # a second time from where HQ says it is (a marker lost or restored)
        events, end = read(log, start, limit=batch)
        if end == start:
            return 0
        held, took = client.ship_audit(trail, start, end, events)
        if took:
            break
        # HQ may hold more of an earlier trail than its copy here (a backup older than the
        # box's last shipment): then this copy has nothing HQ lacks.
        start = max(0, min(held, log.stat().st_size))
        durable.replace_text(marker, json.dumps({"trail": trail, "offset": start}), mode=0o600)
    else:
        return 0
    durable.replace_text(marker, json.dumps({"trail": trail, "offset": held}), mode=0o600)
    return len(events)
