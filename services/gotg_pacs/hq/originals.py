"""Fetch-back: a clinic's original file, rebuilt byte for byte from HQ's copy, for a repair.

A clinic whose SD card lost a file that no backup holds asks HQ for it, by SOP Instance UID and
the MD5 the clinic's Orthanc recorded (`pacs integrity check --repair`). HQ stores the clinic's
original with the patient's identity qualified (conflicts.py), so the exact original must be
rebuilt. At ingest HQ keeps a patch: the qualified and the original file share all bytes but a
few dozen around the patient's identity, so the patch is the count of bytes they share at each
end and the original's differing middle (`GotgOriginalPatch`; 18 to 40 bytes over the test
corpus, a few KB at most). No patch is kept beyond PATCH_MAX, nor for a lossless transcoding
(JPEG-LS, JPEG 2000), which holds the same pixels in other bytes: such an instance can only be
reported, never put back under the clinic's MD5.

What HQ serves is always checked first: the rebuilt file's MD5 must be the one asked for. A
revision (other content a site sent under a UID HQ holds) is kept byte for byte as sent, and
what HQ itself sent the site (a prior, a report) is HQ's file as it is.

Route (the site's own bearer token; another site's instances do not exist for it):
  GET  /api/v1/originals/<md5>?sop_uid=UID   `Range: bytes=START-[END]` answers 206
The rebuilt file is staged once (ranges for a 2G site come from it) and forgotten after
STAGED_DAYS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from flask import Blueprint, Flask, Response, abort, g, request

from ..orthanc import Orthanc, OrthancError, OrthancUnreachable
from ..sync import codecs
from .outbound import BLOCK, byte_range, ranged_file

if TYPE_CHECKING:  # archive.py keeps the patch at ingest: it imports this module
    from .archive import Archive
    from .conflicts import Ledger
    from .outbound import Outbound

log = logging.getLogger(__name__)

PATCH_METADATA = "GotgOriginalPatch"
PATCH_MAX = 16 * 1024  # bytes of the original's middle; a larger difference keeps no patch
STAGED_DAYS = 7


# --- the patch, made at ingest and applied for a fetch-back --------------------------------

def _prefix(a: BinaryIO, b: BinaryIO) -> int:
    shared = 0
    while True:
        x, y = a.read(BLOCK), b.read(BLOCK)
        if x != y or not x:
            n = min(len(x), len(y))
            return shared + next((i for i in range(n) if x[i] != y[i]), n)
        shared += len(x)


def _suffix(a: BinaryIO, b: BinaryIO, a_size: int, b_size: int, most: int) -> int:
    shared = 0
    while shared < most:
        step = min(BLOCK, most - shared)
        a.seek(a_size - shared - step)
        b.seek(b_size - shared - step)
        x, y = a.read(step), b.read(step)
        if x != y:
            return shared + next(i for i in range(step) if x[-1 - i] != y[-1 - i])
        shared += step
    return shared


def patch(original: Path, qualified: Path) -> str | None:
    """How to get `original` back from `qualified` (JSON), None when they differ too much.
    Streamed: memory stays at a few blocks whatever the file's size."""
    a_size, b_size = original.stat().st_size, qualified.stat().st_size
    with open(original, "rb") as a, open(qualified, "rb") as b:
        prefix = _prefix(a, b)
        suffix = _suffix(a, b, a_size, b_size, min(a_size, b_size) - prefix)
        middle = a_size - prefix - suffix
        if middle > PATCH_MAX:
            return None
        a.seek(prefix)
        kept = a.read(middle)
    return json.dumps({"prefix": prefix, "suffix": suffix,
                       "middle": base64.b64encode(kept).decode()})


def rebuild(qualified: BinaryIO, size: int, made: str, out: BinaryIO) -> None:
    """Write the original: `qualified`'s shared start, the kept middle, its shared end.
    ValueError for a patch that does not fit this file."""
    try:
        found = json.loads(made)
        prefix, suffix = int(found["prefix"]), int(found["suffix"])
        middle = base64.b64decode(found["middle"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a patch ({exc})") from None
    if prefix < 0 or suffix < 0 or prefix + suffix > size:
        raise ValueError("the patch does not fit HQ's file")
    for start, length in ((0, prefix), (None, 0), (size - suffix, suffix)):
        if start is None:
            out.write(middle)
            continue
        qualified.seek(start)
        while length > 0 and (block := qualified.read(min(BLOCK, length))):
            out.write(block)
            length -= len(block)


# --- the route ----------------------------------------------------------------------------

def register(app: Flask, orthanc: Orthanc, archive: Archive, ledger: Ledger,
             outgoing: Outbound, hq_dir: Path) -> None:
    routes = Blueprint("originals", __name__, url_prefix="/api/v1/originals")
    staging = hq_dir / "originals"
    staging.mkdir(exist_ok=True, mode=0o700)

    def forget_old() -> None:
        old = time.time() - STAGED_DAYS * 86400
        for path in staging.iterdir():
            try:
                if path.stat().st_mtime < old:
                    path.unlink()
            except FileNotFoundError:  # another receiver forgot it first
                pass

    def metadata(instance: str, name: str) -> str | None:
        try:
            return orthanc.request("GET", f"/instances/{instance}/metadata/{name}").text
        except OrthancError as exc:
            if exc.status == 404:
                return None
            raise

    def write_original(held: str, md5: str, out: BinaryIO, scratch: Path) -> None:
        """The site's original into `out`; aborts 409 when HQ cannot give those bytes back."""
        if held.startswith("rev-"):  # kept byte for byte as the site sent it
            with open(ledger.revision_path(held), "rb") as source:
                shutil.copyfileobj(source, out, BLOCK)
            return
        sent_by_hq = outgoing.sent_to(g.site, held, md5)  # the site holds HQ's file as it is
        made = None if sent_by_hq else metadata(held, PATCH_METADATA)
        if not sent_by_hq and made is None:
            codec = metadata(held, "GotgCodec") or ""
            abort(409, f"HQ holds this instance as a lossless {codec} transcoding: the same "
                       "pixels, not the bytes stored at the site" if codec in codecs.TRANSCODERS
                  else "HQ keeps no way back to the exact bytes of this instance")
        # Streamed straight through when it is the original already; the patch needs the
        # whole file at hand (its ends are counted from both sides).
        with orthanc.request("GET", f"/instances/{held}/file", stream=True) as upstream:
            if sent_by_hq:
                for block in upstream.iter_content(BLOCK):
                    out.write(block)
                return
            with open(scratch, "wb") as copy:
                for block in upstream.iter_content(BLOCK):
                    copy.write(block)
        with open(scratch, "rb") as source:
            try:
                rebuild(source, scratch.stat().st_size, made, out)
            except ValueError as exc:
                abort(409, f"HQ's copy does not rebuild the original: {exc}")

    def stage(sop_uid: str, md5: str) -> Path:
        name = hashlib.sha256(f"{g.site}\0{sop_uid}\0{md5}".encode()).hexdigest()[:32]
        staged = staging / f"{name}.dcm"
        if staged.exists():
            return staged
        forget_old()
        try:
            held = archive.held(sop_uid, md5, g.site, outgoing.sent_to)
        except OrthancUnreachable:
            abort(503, "HQ's archive is not answering")
        if held is None:
            abort(404)  # not this site's, or HQ never confirmed it
        scratch = staging / f"{uuid.uuid4().hex}.tmp"
        upstream = scratch.with_suffix(".held")
        try:
            with open(scratch, "wb") as out:
                write_original(held, md5, out, upstream)
                out.flush()
                os.fsync(out.fileno())
            with open(scratch, "rb") as made:
                if hashlib.file_digest(made, "md5").hexdigest() != md5:
                    abort(409, "HQ's copy does not rebuild the original (MD5 differs)")
            os.replace(scratch, staged)  # several receivers may race: the same bytes win
        except OrthancUnreachable:
            abort(503, "HQ's archive is not answering")
        finally:
            scratch.unlink(missing_ok=True)
            upstream.unlink(missing_ok=True)
        log.info("site %s: original of %s rebuilt for a repair", g.site, sop_uid)
        return staged

    @routes.get("/<md5>")
    def original(md5: str) -> Response:
        sop_uid = request.args.get("sop_uid", "")
        if not re.fullmatch(r"[0-9a-f]{32}", md5) or not sop_uid:
            abort(404)
        staged = stage(sop_uid, md5)
        size = staged.stat().st_size
        byte_range(request.headers.get("Range"), size)
        return ranged_file(staged, size, md5)

    app.register_blueprint(routes)
