"""HQ to clinic: reports and prior studies a site should have, on a durable, resumable channel.

HQ staff queue instances for a site (`pacs hq send --site CODE STUDY...`): a radiologist's report
stored in HQ's Orthanc (Basic Text SR, Encapsulated PDF), or a prior study the clinic needs. The
queue is one small SQLite file per HQ (WAL, `synchronous=FULL`), one row per (site, instance,
content), shared by every receiver. The clinic pulls: it lists what waits for it, downloads each
instance in byte ranges (an outage costs at most the bytes in flight), checks the MD5, stores it
in its own Orthanc, reads it back, and only then acknowledges. Only that acknowledgement marks the
row delivered at HQ; until then the instance waits for the site, for as long as it takes.

The clinic's outbox later owes these instances to HQ like anything stored there. The holdings
question answers "HQ holds it" for exactly what HQ queued for that site (`sent_to`), so an
instance coming back costs one entry of a holdings question, never an upload.

Orthanc 1.10 serves `/instances/{id}/file` whole (no HTTP Range), and a 2G site fetches a large
prior in hundreds of ranges: so the first request copies the file out of HQ's Orthanc once into
a staging folder beside the queue (checked against the queued MD5, replaced atomically, so
several receivers may race harmlessly), ranges are served from there by seeking, and the copy is
removed when the site acknowledges.

Routes (the site's own bearer token; a site sees only its own rows, others' do not exist):
  GET   /api/v1/outbound?after=SEQ&limit=N   what waits for this site, after SEQ
  GET   /api/v1/outbound/<seq>/file          the instance; `Range: bytes=START-[END]` answers 206
  POST  /api/v1/outbound/<seq>/ack           {"md5", "clinic_id"}: stored and verified there
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from flask import Blueprint, Flask, Response, abort, g, jsonify, request

from ..orthanc import Orthanc, OrthancError, OrthancUnreachable
from ..sqlite_tx import immediate

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
MAX_LIST = 500
MAX_SEQ = 2**63 - 1  # SQLite's largest INTEGER: a queue number beyond it names nothing

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    site         TEXT NOT NULL,
    hq_id        TEXT NOT NULL,     -- HQ's Orthanc instance
    sop_uid      TEXT NOT NULL,
    study_uid    TEXT NOT NULL,
    size         INTEGER NOT NULL,  -- bytes of the DICOM file
    md5          TEXT NOT NULL,     -- of the DICOM file, as HQ's Orthanc took it at ingest
    urgent       INTEGER NOT NULL DEFAULT 0,
    queued_at    REAL NOT NULL,
    delivered_at REAL,              -- the site's acknowledgement: stored and verified there
    clinic_id    TEXT,              -- the site's Orthanc instance
    served       INTEGER NOT NULL DEFAULT 0,  -- bytes written toward the site, every attempt
    fetches      INTEGER NOT NULL DEFAULT 0,  -- download requests answered
    UNIQUE (site, hq_id, md5)
);
CREATE INDEX IF NOT EXISTS items_waiting ON items (site, delivered_at, seq);
"""

COLUMNS = ("seq", "site", "hq_id", "sop_uid", "study_uid", "size", "md5", "urgent", "queued_at",
           "delivered_at", "clinic_id", "served", "fetches")


class Outbound:
    """The queue. A connection per call: receivers serve requests on many threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=FULL")
            yield db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db() as db, immediate(db):
            yield db

    def queue(self, site: str, instances: list[dict], urgent: bool = False,
              again: bool = False, now: float | None = None) -> dict[str, int]:
        """Queue instances ({hq_id, sop_uid, study_uid, size, md5}) for `site`, all at once.
        What already waits is left as is; what was delivered is sent again only with `again`
        (the site lost it: a restore from an old backup)."""
        now = time.time() if now is None else now
        counts = {"queued": 0, "waiting": 0, "delivered": 0, "requeued": 0}
        with self._transaction() as db:
            for item in instances:
                row = db.execute("SELECT seq, delivered_at FROM items WHERE site = ? AND "
                                 "hq_id = ? AND md5 = ?",
                                 (site, item["hq_id"], item["md5"])).fetchone()
                if row is None:
                    db.execute("INSERT INTO items (site, hq_id, sop_uid, study_uid, size, md5, "
                               "urgent, queued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (site, item["hq_id"], item["sop_uid"], item["study_uid"],
                                item["size"], item["md5"], int(urgent), now))
                    counts["queued"] += 1
                elif row["delivered_at"] is None:
                    if urgent:
                        db.execute("UPDATE items SET urgent = 1 WHERE seq = ?", (row["seq"],))
                    counts["waiting"] += 1
                elif again:
                    db.execute("UPDATE items SET delivered_at = NULL, clinic_id = NULL, "
                               "queued_at = ?, urgent = ? WHERE seq = ?",
                               (now, int(urgent), row["seq"]))
                    counts["requeued"] += 1
                else:
                    counts["delivered"] += 1
        return counts

    def waiting(self, site: str, after: int = 0, limit: int = 100) -> list[dict]:
        with self._db() as db:
            return [dict(row) for row in db.execute(
                "SELECT seq, sop_uid, study_uid, size, md5, urgent, queued_at FROM items "
                "WHERE site = ? AND delivered_at IS NULL AND seq > ? ORDER BY seq LIMIT ?",
                (site, after, limit))]

    def item(self, site: str, seq: int) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM items WHERE site = ? AND seq = ?",
                             (site, seq)).fetchone()
        return dict(row) if row else None

    def served(self, seq: int, size: int) -> None:
        """Bytes written toward the site by one download request (whether they arrived or not)."""
        with self._transaction() as db:
            db.execute("UPDATE items SET served = served + ?, fetches = fetches + 1 "
                       "WHERE seq = ?", (size, seq))

    def delivered(self, site: str, seq: int, clinic_id: str, now: float | None = None) -> float:
        """The site stored and verified it; when that was first said (a repeat changes nothing)."""
        with self._transaction() as db:
            db.execute("UPDATE items SET delivered_at = ?, clinic_id = ? "
                       "WHERE site = ? AND seq = ? AND delivered_at IS NULL",
                       (time.time() if now is None else now, clinic_id[:64], site, seq))
            return db.execute("SELECT delivered_at FROM items WHERE seq = ?",
                              (seq,)).fetchone()[0]

    def sent_to(self, site: str, hq_id: str, md5: str) -> bool:
        """Did HQ queue exactly this content of its instance for `site`? (Then the site's copy
        came from HQ, and HQ holds it: the site never needs to upload it back.)"""
        with self._db() as db:
            return db.execute("SELECT 1 FROM items WHERE site = ? AND hq_id = ? AND md5 = ?",
                              (site, hq_id, md5)).fetchone() is not None

    def listing(self, site: str | None = None, limit: int = 100) -> list[dict]:
        """For HQ staff: newest first, waiting and delivered."""
        with self._db() as db:
            return [dict(row) for row in db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM items WHERE ? IS NULL OR site = ? "
                "ORDER BY seq DESC LIMIT ?", (site, site, limit))]


# --- what HQ staff name: a study, series or instance, by UID or Orthanc ID ------------------

LEVELS = {"Study": "studies", "Series": "series", "Instance": "instances"}


def resolve(orthanc: Orthanc, ref: str) -> list[dict]:
    """The instances HQ holds under `ref` (a Study/Series/SOP Instance UID or an Orthanc ID),
    each {hq_id, sop_uid, study_uid, size, md5}; empty if HQ holds nothing by that name."""
    found = [(item["Type"], item["ID"]) for item in orthanc.post("/tools/lookup",
                                                                 data=ref.encode()) or []
             if item.get("Type") in LEVELS]
    if not found and re.fullmatch(r"[0-9a-f-]{44}", ref):
        for level, plural in LEVELS.items():
            try:
                orthanc.get(f"/{plural}/{ref}")
            except OrthancError as exc:
                if exc.status != 404:
                    raise
                continue
            found.append((level, ref))
            break
    instances: list[dict] = []
    study_uids: dict[str, str] = {}
    for level, resource in found:
        ids = [resource] if level == "Instance" else [
            item["ID"] for item in orthanc.get(f"/{LEVELS[level]}/{resource}/instances")]
        for hq_id in ids:
            info = orthanc.get(f"/instances/{hq_id}")
            series = info["ParentSeries"]
            if series not in study_uids:
                study_uids[series] = orthanc.get(f"/series/{series}/study")[
                    "MainDicomTags"].get("StudyInstanceUID", "")
            attachment = f"/instances/{hq_id}/attachments/dicom"
            instances.append({
                "hq_id": hq_id, "sop_uid": info["MainDicomTags"].get("SOPInstanceUID", ""),
                "study_uid": study_uids[series],
                "size": int(orthanc.request("GET", f"{attachment}/size").text),
                "md5": orthanc.request("GET", f"{attachment}/md5").text.strip()})
    return instances


# --- the routes the clinic uses --------------------------------------------------------------

def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte asked for by `Range: bytes=FIRST-[LAST]`; None for the whole file.
    A range starting at or past the end aborts 416, as HTTP says."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes=(\d+)-(\d*)\s*", header)
    if not match:
        return None  # a form we do not serve (suffix, several ranges): the whole file
    first = int(match[1])
    last = min(int(match[2]), size - 1) if match[2] else size - 1
    if first >= size or last < first:
        abort(Response(status=416, headers={"Content-Range": f"bytes */{size}"}))
    return first, last


def ranged_file(path: Path, size: int, md5: str,
                counted: Callable[[int], None] | None = None) -> Response:
    """`path` (`size` bytes, `md5` whole) as the request's Range asks: 206 for a range, 200
    whole. `counted(bytes)` hears what went toward the site, cut off or not."""
    asked = byte_range(request.headers.get("Range"), size)
    first, last = asked or (0, size - 1)

    def body() -> Iterator[bytes]:
        written = 0
        try:
            with open(path, "rb") as handle:
                handle.seek(first)
                while written <= last - first and (block := handle.read(
                        min(BLOCK, last - first + 1 - written))):
                    written += len(block)
                    yield block
        finally:
            if counted is not None:
                counted(written)

    response = Response(body(), status=206 if asked else 200,
                        mimetype="application/dicom", direct_passthrough=True)
    response.headers["Content-Length"] = str(last - first + 1)
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["ETag"] = f'"{md5}"'
    response.headers["Gotg-Md5"] = md5  # of the whole instance
    response.headers["Cache-Control"] = "no-store"
    if asked:
        response.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return response


def register(app: Flask, orthanc: Orthanc, path: Path) -> Outbound:
    """Add the outbound routes to the receiver; the queue, for the holdings question."""
    outbound = Outbound(path)
    routes = Blueprint("outbound", __name__, url_prefix="/api/v1/outbound")

    staging = path.parent / "outbound"
    staging.mkdir(exist_ok=True, mode=0o700)

    def staged_path(item: dict) -> Path:
        return staging / f"{int(item['seq'])}-{item['md5']}.dcm"

    def stage(item: dict) -> Path:
        """HQ's file for this item, copied out of Orthanc once and checked; aborts 410 if HQ
        no longer holds exactly what was queued, 503 if its Orthanc does not answer."""
        staged = staged_path(item)
        if staged.exists():
            return staged
        scratch = staging / f"{uuid.uuid4().hex}.tmp"
        digest = hashlib.md5()
        try:
            with orthanc.request("GET", f"/instances/{item['hq_id']}/file",
                                 stream=True) as upstream, open(scratch, "wb") as out:
                for block in upstream.iter_content(BLOCK):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != item["md5"] or scratch.stat().st_size != item["size"]:
                abort(410, "HQ no longer holds what was queued (its content differs)")
            os.replace(scratch, staged)
        except OrthancUnreachable:
            abort(503, "HQ's archive is not answering")
        except OrthancError as exc:
            if exc.status == 404:
                abort(410, "HQ no longer holds this instance")
            raise
        finally:
            scratch.unlink(missing_ok=True)
        return staged

    def mine(seq: int) -> dict:
        item = outbound.item(g.site, seq)
        if item is None:
            abort(404)  # another site's item does not exist for this one
        return item

    @routes.get("")
    def waiting() -> Response:
        after = request.args.get("after", "0")
        limit = request.args.get("limit", "100")
        # isdigit() alone also takes digits int() cannot read ("²").
        if not (after.isascii() and after.isdigit() and limit.isascii() and limit.isdigit()):
            abort(400, "after and limit are whole numbers")
        items = outbound.waiting(g.site, min(int(after), MAX_SEQ),
                                 min(int(limit) or 1, MAX_LIST) + 1)
        more = len(items) > min(int(limit) or 1, MAX_LIST)
        return jsonify({"items": items[:-1] if more else items, "more": more})

    @routes.get(f"/<int(max={MAX_SEQ}):seq>/file")
    def download(seq: int) -> Response:
        item = mine(seq)
        byte_range(request.headers.get("Range"), item["size"])  # a 416 before any staging
        return ranged_file(stage(item), item["size"], item["md5"],
                           lambda written: outbound.served(seq, written))

    @routes.post(f"/<int(max={MAX_SEQ}):seq>/ack")
    def acknowledge(seq: int) -> Response:
        item = mine(seq)
        said = request.get_json(silent=True)
        said = said if isinstance(said, dict) else {}  # then no MD5: not what HQ sent
        if said.get("md5") != item["md5"]:
            abort(409, "the site holds other content than HQ sent")
        clinic_id = str(said.get("clinic_id", ""))
        try:
            clinic_id.encode()
        except UnicodeEncodeError:  # JSON can carry a lone surrogate; no Orthanc ID holds one
            abort(400, "clinic_id: the site's Orthanc instance ID")
        delivered_at = outbound.delivered(g.site, seq, clinic_id)
        staged_path(item).unlink(missing_ok=True)
        if item["delivered_at"] is None:
            log.info("site %s: %s delivered (%d bytes, %d served in %d requests)", g.site,
                     item["sop_uid"], item["size"], item["served"], item["fetches"])
        return jsonify({"seq": seq, "delivered_at": delivered_at})

    app.register_blueprint(routes)
    return outbound
