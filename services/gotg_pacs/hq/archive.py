"""HQ's side of a confirmation: unpack, verify, store in HQ's Orthanc, read back, record.

The receiver (tus) hands over a finished payload: one packed instance, or a batch of small ones
(a tar of packed instances with a manifest, so a 2G link pays one round trip for many CT slices).
Each instance is unpacked into a scratch file (streamed: memory stays flat), checked against the
hashes the clinic sent and the SOP Instance UID it announced, stored in Orthanc, and read back:
only when Orthanc serves exactly the original bytes is HQ's instance ID returned, and only that
ID ever makes the clinic count an instance as "at HQ". Every outcome goes to a journal of bytes
needed against bytes that crossed the link.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import BinaryIO

import pydicom

from ..orthanc import Orthanc, OrthancError, OrthancUnreachable
from ..sync import codecs

log = logging.getLogger(__name__)

BATCH_CODEC = codecs.BATCH
MAX_BATCH_MEMBERS = 1000


class Refused(Exception):
    """This payload will never be stored as sent (status: the HTTP answer for the clinic)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Archive:
    def __init__(self, orthanc: Orthanc, journal: Path) -> None:
        self.orthanc = orthanc
        self.journal = journal

    def _record(self, entry: dict) -> None:
        with open(self.journal, "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def store(self, payload: BinaryIO, announced: dict, site: str, scratch: Path) -> str:
        """HQ's instance ID for one packed instance; raises Refused, or OrthancUnreachable
        (HQ's archive down: nothing decided, the clinic asks again later)."""
        try:
            with open(scratch, "wb") as out:
                codecs.unpack_to(announced["codec"], payload, out, announced["payload_md5"],
                                 announced["original_md5"])
                out.flush()
                os.fsync(out.fileno())
            try:
                header = pydicom.dcmread(scratch, stop_before_pixels=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable header is a refusal
                raise Refused(422, f"refused: not a readable DICOM file ({exc})") from None
            if str(header.get("SOPInstanceUID", "")) != announced["sop_uid"]:
                raise Refused(422, "refused: SOP Instance UID differs from the announced one")
            original = hashlib.md5()
            with open(scratch, "rb") as handle:
                while block := handle.read(codecs.BLOCK):
                    original.update(block)
                handle.seek(0)
                try:
                    answer = self.orthanc.post("/instances", data=handle,
                                               headers={"Content-Type": "application/dicom"})
                except OrthancUnreachable:
                    raise
                except OrthancError as exc:
                    raise Refused(422, f"refused by HQ's archive: {exc}") from None
        except (codecs.CodecError, pydicom.errors.InvalidDicomError) as exc:
            raise Refused(422, f"refused: {exc}") from None
        finally:
            scratch.unlink(missing_ok=True)
        instance = answer["ID"]
        served = hashlib.md5()
        with self.orthanc.request("GET", f"/instances/{instance}/attachments/dicom/data",
                                  stream=True) as response:
            for block in response.iter_content(codecs.BLOCK):
                served.update(block)
        if served.hexdigest() != original.hexdigest():
            # HQ already holds another version under this UID: never overwritten, never
            # confirmed; the revision and audit handling of conflicts decides (not yet built).
            raise Refused(409, "HQ holds different content under this SOP Instance UID")
        for name, value in {"GotgOriginalMd5": announced["original_md5"], "GotgSite": site,
                            "GotgCodec": announced["codec"]}.items():
            self.orthanc.request("PUT", f"/instances/{instance}/metadata/{name}",
                                 data=value.encode())
        log.info("site %s: %s confirmed as %s (%s)", site, announced["sop_uid"], instance,
                 announced["codec"])
        return instance

    def store_upload(self, part: Path, meta: dict) -> dict:
        """The outcome of a finished upload: {"hq_id"} for one instance, {"batch": [...]} with
        one {"sop_uid", "hq_id"} or {"sop_uid", "status", "message"} per member. Raises Refused
        for an upload refused whole, OrthancUnreachable when nothing could be decided."""
        site, scratch = meta["site"], part.with_suffix(".dcm")
        transfer = {"site": site, "received": meta["received"],
                    "max_chunk": meta.get("max_chunk", 0)}
        if meta["codec"] != BATCH_CODEC:
            try:
                with open(part, "rb") as payload:
                    hq_id = self.store(payload, meta, site, scratch)
            except Refused as exc:
                log.error("site %s: %s refused: %s", site, meta["sop_uid"], exc)
                raise
            self._record({**transfer, "sop_uid": meta["sop_uid"], "codec": meta["codec"],
                          "length": meta["length"], "hq_id": hq_id})
            return {"hq_id": hq_id}
        with open(part, "rb") as handle:
            if hashlib.file_digest(handle, "md5").hexdigest() != meta["payload_md5"]:
                raise Refused(422, "refused: batch damaged in transit (MD5 differs)")
        results, member_bytes = [], 0
        try:
            with tarfile.open(part, "r:") as batch:
                manifest = json.load(batch.extractfile(codecs.BATCH_MANIFEST))
                if not isinstance(manifest, list) or len(manifest) > MAX_BATCH_MEMBERS:
                    raise Refused(422, "refused: a batch manifest lists 1-1000 instances")
                for member in manifest:
                    # Members are read by name from the archive, never extracted to a path.
                    payload = batch.extractfile(member["name"])
                    size = batch.getmember(member["name"]).size
                    member_bytes += size
                    try:
                        hq_id = self.store(payload, member, site, scratch)
                    except Refused as exc:
                        log.error("site %s: %s refused: %s", site, member["sop_uid"], exc)
                        results.append({"sop_uid": member["sop_uid"], "status": exc.status,
                                        "message": str(exc)})
                        continue
                    results.append({"sop_uid": member["sop_uid"], "hq_id": hq_id})
                    self._record({"site": site, "sop_uid": member["sop_uid"],
                                  "codec": member["codec"], "length": size, "received": size,
                                  "max_chunk": 0, "hq_id": hq_id})
        except (tarfile.TarError, KeyError, TypeError, ValueError) as exc:
            raise Refused(422, f"refused: not a readable batch ({exc})") from None
        # The batch's own bytes (headers, manifest, and whatever an outage made cross twice).
        self._record({**transfer, "sop_uid": None, "codec": BATCH_CODEC,
                      "length": meta["length"] - member_bytes,
                      "received": meta["received"] - member_bytes, "members": len(manifest)})
        return {"batch": results}
