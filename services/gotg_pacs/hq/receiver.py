"""pacs-hq: the receiver clinics upload to, speaking the open tus 1.0 resumable-upload protocol.

Stateless apart from a shared folder: an upload in progress is a `.part` file (its size is the
tus offset) and a `.json` sidecar, so several receivers can serve one HQ behind the proxy and a
receiver killed mid-upload loses at most the chunk in flight. When the last byte arrives the
receiver unpacks the payload, checks it against the hashes the clinic sent, stores it in HQ's
Orthanc, reads back what Orthanc serves, and only then answers with the confirmation header. The
clinic counts an instance as "at HQ" on that header alone.

Routes (all need `Authorization: Bearer <site token>`):
  POST  /files              create an upload (Upload-Length, Upload-Metadata)
  HEAD  /files/<id>         its offset, to resume
  PATCH /files/<id>         append at Upload-Offset; the last one answers Gotg-Confirmed
  POST  /api/v1/holdings    which of these (SOP Instance UID, original MD5) HQ already holds
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import uuid
from pathlib import Path

import pydicom
from flask import Flask, Response, abort, g, jsonify, request

from ..config import Settings
from ..orthanc import Orthanc, OrthancError, OrthancUnreachable
from ..sync import codecs
from .sites import Sites

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
MAX_UPLOAD = 4 * 2**30
REQUIRED_METADATA = ("sop_uid", "codec", "payload_md5", "original_md5")


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


def held_instance(orthanc: Orthanc, sop_uid: str, original_md5: str, site: str) -> str | None:
    """HQ's instance holding exactly this site's original (by the MD5 recorded at confirm)."""
    for item in orthanc.post("/tools/lookup", data=sop_uid.encode()) or []:
        if item.get("Type") != "Instance":
            continue
        try:
            recorded = orthanc.request(
                "GET", f"/instances/{item['ID']}/metadata/GotgOriginalMd5").text.strip()
            sender = orthanc.request(
                "GET", f"/instances/{item['ID']}/metadata/GotgSite").text.strip()
        except OrthancError:
            continue
        if recorded == original_md5 and sender == site:
            return item["ID"]
    return None


def _write_json(path: Path, data: dict) -> None:
    """Replace a sidecar whole or not at all (a reader never sees it half-written)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def create_app(settings: Settings) -> Flask:
    app = Flask("gotg_pacs.hq")
    uploads = settings.hq_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
    sites = Sites(settings.hq_dir / "sites.json")
    orthanc = Orthanc.from_settings(settings, timeout=120)

    def paths(upload_id: str) -> tuple[Path, Path]:
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
            abort(404)
        return uploads / f"{upload_id}.part", uploads / f"{upload_id}.json"

    def load(upload_id: str) -> tuple[Path, Path, dict]:
        part, sidecar = paths(upload_id)
        try:
            meta = json.loads(sidecar.read_text())
        except FileNotFoundError:
            abort(404)
        except ValueError:
            abort(410)  # unreadable: the clinic starts a new upload
        if meta["site"] != g.site:
            abort(404)  # another site's upload does not exist for this one
        return part, sidecar, meta

    @app.before_request
    def authenticate() -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        site = sites.site_of(token) if scheme == "Bearer" and token else None
        if site is None:
            abort(401)
        g.site = site

    @app.after_request
    def tus_header(response: Response) -> Response:
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
        missing = [key for key in REQUIRED_METADATA if key not in meta]
        if missing:
            abort(400, f"Upload-Metadata lacks {', '.join(missing)}")
        upload_id = uuid.uuid4().hex
        part, sidecar = paths(upload_id)
        part.touch(mode=0o600)
        _write_json(sidecar, {"site": g.site, "length": length, "received": 0,
                              **{k: meta[k] for k in REQUIRED_METADATA}})
        response = Response(status=201)
        response.headers["Location"] = f"/files/{upload_id}"
        return response

    @app.route("/files/<upload_id>", methods=["HEAD"])
    def offset(upload_id: str) -> Response:
        part, _, meta = load(upload_id)
        response = Response(status=200)
        response.headers["Upload-Offset"] = str(part.stat().st_size)
        response.headers["Upload-Length"] = str(meta["length"])
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.patch("/files/<upload_id>")
    def append(upload_id: str) -> Response:
        if request.headers.get("Content-Type") != "application/offset+octet-stream":
            abort(415)
        part, sidecar, meta = load(upload_id)
        with open(part, "ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # one writer per upload, whatever the receiver
            current = handle.seek(0, os.SEEK_END)
            body = request.get_data(cache=False)
            meta = json.loads(sidecar.read_text())
            meta["received"] += len(body)  # every byte that crossed the link, even refused ones
            _write_json(sidecar, meta)
            if int(request.headers.get("Upload-Offset", -1)) != current:
                return Response(status=409, headers={"Upload-Offset": str(current)})
            if current + len(body) > meta["length"]:
                abort(400, "more bytes than Upload-Length")
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
            new_offset = current + len(body)
        response = Response(status=204)
        response.headers["Upload-Offset"] = str(new_offset)
        if new_offset == meta["length"]:
            response.headers["Gotg-Confirmed"] = finalize(part, sidecar, meta)
        return response

    def finalize(part: Path, sidecar: Path, meta: dict) -> str:
        payload = part.read_bytes()
        try:
            dicom = codecs.unpack(meta["codec"], payload, meta["payload_md5"],
                                  meta["original_md5"])
            header = pydicom.dcmread(io.BytesIO(dicom), stop_before_pixels=True)
        except (codecs.CodecError, pydicom.errors.InvalidDicomError) as exc:
            part.unlink()
            sidecar.unlink()
            abort(422, f"refused: {exc}")
        if str(header.SOPInstanceUID) != meta["sop_uid"]:
            part.unlink()
            sidecar.unlink()
            abort(422, "refused: SOP Instance UID differs from the announced one")
        try:
            answer = orthanc.post("/instances", data=dicom,
                                  headers={"Content-Type": "application/dicom"})
        except OrthancError as exc:
            if isinstance(exc, OrthancUnreachable):
                raise  # HQ's archive is down: a 500, the clinic retries later
            part.unlink()
            sidecar.unlink()
            abort(422, f"refused by HQ's archive: {exc}")
        instance = answer["ID"]
        served = hashlib.md5(orthanc.request(
            "GET", f"/instances/{instance}/attachments/dicom/data").content).hexdigest()
        if served != hashlib.md5(dicom).hexdigest():
            # HQ already holds another version under this UID: never overwritten, never
            # confirmed; the revision and audit handling of conflicts decides (not yet built).
            log.error("site %s sent %s, HQ holds other content under that UID", meta["site"],
                      meta["sop_uid"])
            abort(409, "HQ holds different content under this SOP Instance UID")
        recorded = {"GotgOriginalMd5": meta["original_md5"], "GotgSite": meta["site"],
                    "GotgCodec": meta["codec"]}
        for name, value in recorded.items():
            orthanc.request("PUT", f"/instances/{instance}/metadata/{name}", data=value.encode())
        with open(settings.hq_dir / "transfers.jsonl", "a") as journal:
            # Bytes that crossed the link against bytes needed: what outages really cost.
            journal.write(json.dumps({"site": meta["site"], "sop_uid": meta["sop_uid"],
                                      "codec": meta["codec"], "length": meta["length"],
                                      "received": meta["received"], "hq_id": instance}) + "\n")
        part.unlink()
        sidecar.unlink()
        log.info("site %s: %s confirmed as %s (%s)", meta["site"], meta["sop_uid"], instance,
                 meta["codec"])
        return instance

    @app.post("/api/v1/holdings")
    def holdings() -> Response:
        # One answer per question, in order: the same SOP Instance UID can be asked twice with
        # different content (a corrected version), and only the exact pair may be confirmed.
        asked = (request.get_json(silent=True) or {}).get("instances", [])
        if len(asked) > 1000:
            abort(413, "at most 1000 instances per question")
        return jsonify({"held": [held_instance(orthanc, str(item.get("sop_uid", "")),
                                               str(item.get("original_md5", "")), g.site)
                                 for item in asked]})

    @app.get("/api/v1/uploads/<upload_id>")
    def upload_info(upload_id: str) -> Response:
        part, _, meta = load(upload_id)
        return jsonify({"offset": part.stat().st_size, **meta})

    return app
