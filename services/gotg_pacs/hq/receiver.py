"""pacs-hq: the receiver clinics upload to, speaking the open tus 1.0 resumable-upload protocol.

Stateless apart from a shared folder: an upload in progress is a `.part` file (its size is the
tus offset) and a `.json` sidecar, so several receivers can serve one HQ behind the proxy and a
receiver killed mid-upload loses at most the chunk in flight. When the last byte arrives the
upload goes to `archive.Archive` (unpack, verify, store in HQ's Orthanc, read back), and only
then does the receiver answer with the confirmation header. The clinic counts an instance as "at
HQ" on that header alone (or, for a batch of small instances, on its per-instance outcome).

An upload is locked (flock on its `.part`) from its first byte to its outcome, and the outcome
(HQ's instance, or why it was refused) is kept for a week as `.done`: a last chunk retried
because its answer was lost, or sent while a slow finalization runs, gets the same answer and
never stores the instance twice. Uploads idle for a week are forgotten. A clinic whose link
dropped mid-chunk sends no FIN, so its stale request would hold the lock until the socket
timeout; the clinic's next request for that upload cuts the stale one off instead (`Readers`).

Routes for sites (`Authorization: Bearer <site token>`):
  POST  /files              create an upload (Upload-Length, Upload-Metadata)
  HEAD  /files/<id>         its offset, to resume
  PATCH /files/<id>         append at Upload-Offset; the last one answers Gotg-Confirmed
                            (HQ's instance ID, a revision's "rev-..." ID, or "batch")
  GET   /files/<id>/outcome how a finished upload ended, per instance for a batch
  POST  /api/v1/holdings    which of these (SOP Instance UID, original MD5) HQ already holds
  ...   /api/v1/outbound    what HQ sends back to the site (`outbound`)
  PUT/GET /api/v1/escrow    the site's backup passphrase, kept at HQ (`escrow`); /key(s)
                            its backup disks' keys; PUT /disk its data disk's recovery
                            passphrase (never read back by a site)
  POST /api/v1/audit        the site's audit trail, in order (`audit`)

Routes for HQ operators (`Authorization: Bearer <operator token>`, `pacs hq operator add`; a
site's token gets 403: the list holds every site's patients; see conflicts.py):
  GET   /api/v1/reconciliation[?state=open|resolved|all]   the reconciliation list
  GET   /api/v1/reconciliation/<id>                        one entry
  POST  /api/v1/reconciliation/<id>/resolve                {"decision", "note"}: recorded only
  GET   /api/v1/revisions/<id>                             a kept revision: who, when, what differs
  GET   /api/v1/revisions/<id>/file                        its bytes, exactly as the site sent them
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flask import Flask, Response, abort, g, jsonify, request, send_file

from ..config import Settings
from ..orthanc import Orthanc
from ..sync import codecs
from . import audit, escrow, originals, outbound
from .archive import BATCH_CODEC, Archive, Refused
from .conflicts import DECISIONS, Ledger
from .sites import Sites

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
MAX_UPLOAD = 4 * 2**30
MAX_CHUNK = 64 * 2**20
UPLOAD_EXPIRY = 7 * 86400  # an upload idle this long is forgotten (the clinic starts it again)
SWEEP_EVERY = 3600.0
OPERATOR_ROUTES = ("/api/v1/reconciliation", "/api/v1/revisions")
REVISION_ID = re.compile(r"rev-[0-9a-f]{32}")
MAX_ROWID = 2**63 - 1  # SQLite's largest INTEGER: an entry number beyond it names nothing
REQUIRED_METADATA = ("sop_uid", "codec", "payload_md5", "original_md5")
BATCH_METADATA = ("codec", "payload_md5")


class Readers:
    """The connection of each request still reading a chunk, by upload.

    After an outage the clinic's old connection is dead without a FIN, and the request reading
    from it would hold the upload's lock for the socket timeout (a minute of the clinic waiting
    with its link back). Its next HEAD or PATCH for the same upload (the same site: `load`
    checks) cuts the stale reader off instead; what had arrived is kept, and the offset says
    so. The registry is per receiver process; between receivers the socket timeout still ends
    a stale request. A request storing a finished upload is no longer reading and is never cut.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reading: dict[str, socket.socket] = {}

    @contextmanager
    def reading(self, upload_id: str, connection: socket.socket | None) -> Iterator[None]:
        if connection is None:  # a server that does not expose its socket: nothing to cut
            yield
            return
        with self._lock:
            self._reading[upload_id] = connection
        try:
            yield
        finally:
            with self._lock:
                if self._reading.get(upload_id) is connection:
                    del self._reading[upload_id]

    def cut_off(self, upload_id: str) -> bool:
        """End the read of a stale request for this upload, if one is reading."""
        with self._lock:
            connection = self._reading.pop(upload_id, None)
        if connection is None:
            return False
        try:
            connection.shutdown(socket.SHUT_RD)  # its blocked read returns at once
        except OSError:
            pass  # closed meanwhile
        return True


def _lock_soon(handle, seconds: float) -> bool:
    """The upload's lock within `seconds`, polling; False if another request keeps it (a
    finished upload being stored, say)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _tus(response: Response) -> Response:
    response.headers["Tus-Resumable"] = TUS_VERSION
    return response


def _metadata(header: str) -> dict[str, str]:
    result = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        key, _, value = pair.partition(" ")
        try:
            result[key] = base64.b64decode(value, validate=True).decode() if value else ""
        except (ValueError, UnicodeDecodeError):
            abort(400, f"Upload-Metadata value of {key!r} is not base64 text")
    return result


def _write_json(path: Path, data: dict) -> None:
    """Replace a sidecar whole or not at all (a reader never sees it half-written)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        abort(410)  # unreadable: the clinic starts a new upload


def sweep(uploads: Path, now: float, expiry: float = UPLOAD_EXPIRY) -> int:
    """Forget uploads untouched for `expiry` (a site that never came back) and old outcomes.

    Every append rewrites the sidecar, so its age is the upload's idleness. A clinic that comes
    back later simply starts its upload again: the outbox still owes the instance.
    """
    removed = 0
    for sidecar in list(uploads.glob("*.json")) + list(uploads.glob("*.done")):
        try:
            if now - sidecar.stat().st_mtime < expiry:
                continue
            sidecar.unlink()
        except FileNotFoundError:
            continue
        for leftover in (".part", ".dcm", ".tmp"):
            sidecar.with_suffix(leftover).unlink(missing_ok=True)
        removed += 1
    return removed


def create_app(settings: Settings) -> Flask:
    app = Flask("gotg_pacs.hq", static_folder=None)  # no static files: no route for them
    app.config["MAX_CONTENT_LENGTH"] = MAX_CHUNK  # one request never fills HQ's memory
    uploads = settings.hq_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
    sites = Sites(settings.hq_dir / "sites.json")
    operators = Sites(settings.hq_dir / "operators.json")
    orthanc = Orthanc.from_settings(settings, timeout=120)
    ledger = Ledger(settings.hq_dir)
    archive = Archive(orthanc, settings.hq_dir / "transfers.jsonl", ledger)
    outgoing = outbound.register(app, orthanc, settings.hq_dir / "outbound.sqlite")
    originals.register(app, orthanc, archive, ledger, outgoing, settings.hq_dir)
    escrow.register(app, escrow.Escrow(settings.hq_dir / "escrow"))
    audit.register(app, audit.Trails(settings.hq_dir / "audit"))
    readers = Readers()
    swept = {"at": 0.0}

    def paths(upload_id: str) -> tuple[Path, Path, Path]:
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
            abort(404)
        return (uploads / f"{upload_id}.part", uploads / f"{upload_id}.json",
                uploads / f"{upload_id}.done")

    def outcome(done: Path) -> dict | None:
        """How a finished upload ended (confirmed or refused), for this site only."""
        result = _read_json(done)
        if result is None:
            return None
        if result["site"] != g.site:
            abort(404)  # another site's upload does not exist for this one
        return result

    def confirmation(result: dict) -> str:
        """HQ's instance, or "batch": the per-instance answers are at /files/<id>/outcome."""
        return result["hq_id"] if "hq_id" in result else BATCH_CODEC

    def replay(result: dict) -> Response:
        """The same answer again: a retried last chunk never stores an instance twice."""
        if "status" in result:
            abort(result["status"], result["message"])
        response = Response(status=204)
        response.headers["Upload-Offset"] = str(result["length"])
        response.headers["Gotg-Confirmed"] = confirmation(result)
        return response

    def load(upload_id: str, answer) -> tuple[Path, Path, dict]:
        """The upload in progress; if it finished meanwhile, `answer(outcome)` is the reply."""
        part, sidecar, done = paths(upload_id)
        meta = _read_json(sidecar)
        if meta is None:
            finished(done, answer)
        if meta["site"] != g.site:
            abort(404)
        return part, sidecar, meta

    def finished(done: Path, answer) -> None:
        """Reply with how the upload ended (it finished while we looked), or 404."""
        result = outcome(done)
        abort(404 if result is None else answer(result))

    @app.before_request
    def authenticate() -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token if scheme == "Bearer" else ""
        if request.path.startswith(OPERATOR_ROUTES):
            g.operator = operators.site_of(token) if token else None
            if g.operator is None:
                abort(403 if token and sites.site_of(token) else 401)
            return
        site = sites.site_of(token) if token else None
        if site is None:
            abort(401)
        g.site = site
        if time.time() - swept["at"] > SWEEP_EVERY:
            swept["at"] = time.time()
            if removed := sweep(uploads, swept["at"]):
                log.info("forgot %d uploads idle for over %d days", removed,
                         UPLOAD_EXPIRY // 86400)

    @app.after_request
    def tus_header(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"  # header values stay data
        response.headers["Cache-Control"] = response.headers.get("Cache-Control", "no-store")
        return _tus(response)

    @app.post("/files")
    def create() -> Response:
        try:
            length = int(request.headers["Upload-Length"])
        except (KeyError, ValueError):
            abort(400, "Upload-Length required")
        if not 0 < length <= MAX_UPLOAD:
            abort(413)
        meta = _metadata(request.headers.get("Upload-Metadata", ""))
        required = BATCH_METADATA if meta.get("codec") == BATCH_CODEC else REQUIRED_METADATA
        missing = [key for key in required if key not in meta]
        if missing:
            abort(400, f"Upload-Metadata lacks {', '.join(missing)}")
        upload_id = uuid.uuid4().hex
        part, sidecar, _ = paths(upload_id)
        part.touch(mode=0o600)
        _write_json(sidecar, {"site": g.site, "length": length, "received": 0,
                              "sop_uid": None, **{k: meta[k] for k in required}})
        response = Response(status=201)
        response.headers["Location"] = f"/files/{upload_id}"
        return response

    @app.route("/files/<upload_id>", methods=["HEAD"])
    def offset(upload_id: str) -> Response:
        def ended(result: dict) -> Response:
            if "status" in result:
                abort(410)  # refused: the clinic starts over and hears why
            response = Response(status=200)
            response.headers["Cache-Control"] = "no-store"
            response.headers["Upload-Offset"] = response.headers["Upload-Length"] = \
                str(result["length"])
            response.headers["Gotg-Confirmed"] = confirmation(result)
            return response

        if (result := outcome(paths(upload_id)[2])) is not None:
            return ended(result)
        part, _, meta = load(upload_id, ended)
        # A stale request still reading this upload would grow it after we answer: cut it off
        # and let it write what it has, so the offset given is the one to resume from.
        readers.cut_off(upload_id)
        try:
            with open(part, "rb") as handle:
                _lock_soon(handle, 2.0)  # held longer only while storing: the size is final
                size = handle.seek(0, os.SEEK_END)
        except FileNotFoundError:
            finished(paths(upload_id)[2], ended)
        response = Response(status=200)
        response.headers["Cache-Control"] = "no-store"
        response.headers["Upload-Offset"] = str(size)
        response.headers["Upload-Length"] = str(meta["length"])
        return response

    @app.patch("/files/<upload_id>")
    def append(upload_id: str) -> Response:
        if request.headers.get("Content-Type") != "application/offset+octet-stream":
            abort(415)
        done = paths(upload_id)[2]
        if (result := outcome(done)) is not None:
            return replay(result)
        part, sidecar, meta = load(upload_id, replay)
        try:
            handle = open(part, "r+b")  # noqa: SIM115 - never created here: see below
        except FileNotFoundError:  # finished (and removed) since we looked
            finished(done, replay)
        with handle:
            # One writer per upload, whatever the receiver, from the first byte to the
            # confirmation: a retried last chunk waits here and then gets the same answer.
            readers.cut_off(upload_id)
            fcntl.flock(handle, fcntl.LOCK_EX)
            if (result := outcome(done)) is not None:
                return replay(result)
            meta = _read_json(sidecar)
            if meta is None:
                abort(404)
            current = handle.seek(0, os.SEEK_END)
            try:
                stale = int(request.headers.get("Upload-Offset", -1)) != current
            except ValueError:  # not a number: like a missing one, the answer says where to go on
                stale = True
            written = 0
            try:
                with readers.reading(upload_id, request.environ.get("werkzeug.socket")):
                    while block := request.stream.read(codecs.BLOCK):
                        written += len(block)
                        if not stale and current + written <= meta["length"]:
                            handle.write(block)
            finally:  # a clinic cut off mid-chunk keeps what arrived: the offset says so
                meta["received"] += written  # every byte that crossed the link, even refused
                meta["max_chunk"] = max(meta.get("max_chunk", 0), written)
                if sys.exc_info()[0] is not None:
                    handle.flush()
                    _write_json(sidecar, meta)
            if stale:
                _write_json(sidecar, meta)
                return Response(status=409, headers={"Upload-Offset": str(current)})
            if current + written > meta["length"]:
                handle.truncate(current)
                _write_json(sidecar, meta)
                abort(400, "more bytes than Upload-Length")
            handle.flush()
            os.fsync(handle.fileno())
            _write_json(sidecar, meta)
            new_offset = current + written
            if new_offset == meta["length"]:
                started = time.monotonic()
                response = replay(finalize(part, sidecar, done, meta))
                # The clinic measures its link by chunk times: tell it what was HQ's own work.
                response.headers["Gotg-Store-Seconds"] = f"{time.monotonic() - started:.3f}"
                return response
        response = Response(status=204)
        response.headers["Upload-Offset"] = str(new_offset)
        return response

    def finalize(part: Path, sidecar: Path, done: Path, meta: dict) -> dict:
        """Store what arrived, then record the outcome and drop the upload: a retry finds the
        outcome, never a gap. HQ's Orthanc down raises (a 500): the upload stays for later."""
        try:
            result = archive.store_upload(part, meta)
        except Refused as exc:
            result = {"status": exc.status, "message": str(exc)}
        result = {"site": meta["site"], "length": meta["length"], **result}
        _write_json(done, result)
        for path in (part, sidecar, part.with_suffix(".dcm")):
            path.unlink(missing_ok=True)
        return result

    @app.post("/api/v1/holdings")
    def holdings() -> Response:
        # One answer per question, in order: the same SOP Instance UID can be asked twice with
        # different content (a corrected version), and only the exact pair may be confirmed.
        body = request.get_json(silent=True)
        if body is None:  # not JSON at all: nothing asked
            body = {}
        asked = body.get("instances", []) if isinstance(body, dict) else None
        if not isinstance(asked, list) or not all(isinstance(item, dict) for item in asked):
            abort(400, "a JSON object: instances, a list of {sop_uid, original_md5}")
        if len(asked) > 1000:
            abort(413, "at most 1000 instances per question")
        return jsonify({"held": [held(str(item.get("sop_uid", "")),
                                      str(item.get("original_md5", ""))) for item in asked]})

    def held(sop_uid: str, original_md5: str) -> str | None:
        try:
            (sop_uid + original_md5).encode()
        except UnicodeEncodeError:  # JSON can carry a lone surrogate; no UID or MD5 holds one
            return None
        return archive.held(sop_uid, original_md5, g.site, outgoing.sent_to)

    @app.get("/files/<upload_id>/outcome")
    def upload_outcome(upload_id: str) -> Response:
        """How a finished upload ended, per instance for a batch (kept a week)."""
        result = outcome(paths(upload_id)[2])
        if result is None:
            abort(404)
        return jsonify(result)

    @app.get("/api/v1/reconciliation")
    def reconciliation() -> Response:
        state = request.args.get("state", "open")
        if state not in ("open", "resolved", "all"):
            abort(400, "state is open, resolved or all")
        return jsonify({"entries": ledger.entries(None if state == "all" else state)})

    @app.get(f"/api/v1/reconciliation/<int(max={MAX_ROWID}):entry_id>")
    def reconciliation_entry(entry_id: int) -> Response:
        entry = ledger.entry(entry_id)
        if entry is None:
            abort(404)
        return jsonify(entry)

    @app.post(f"/api/v1/reconciliation/<int(max={MAX_ROWID}):entry_id>/resolve")
    def reconciliation_resolve(entry_id: int) -> Response:
        asked = request.get_json(silent=True)
        asked = asked if isinstance(asked, dict) else {}
        decision, note = asked.get("decision"), asked.get("note", "")
        if decision not in DECISIONS or not isinstance(note, str) or len(note) > 2000:
            abort(400, f"decision is one of {', '.join(DECISIONS)}; note is text")
        entry = ledger.resolve(entry_id, decision, note, g.operator)
        if entry is None:
            abort(404)
        return jsonify(entry)

    @app.get("/api/v1/revisions/<revision_id>")
    def revision(revision_id: str) -> Response:
        found = ledger.revision(revision_id) if REVISION_ID.fullmatch(revision_id) else None
        if found is None:
            abort(404)
        return jsonify(found)

    @app.get("/api/v1/revisions/<revision_id>/file")
    def revision_file(revision_id: str) -> Response:
        if not REVISION_ID.fullmatch(revision_id) or ledger.revision(revision_id) is None:
            abort(404)
        return send_file(ledger.revision_path(revision_id), mimetype="application/dicom",
                         as_attachment=True, download_name=f"{revision_id}.dcm")

    return app
