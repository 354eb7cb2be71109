"""HQ's side of a confirmation: unpack, verify, store in HQ's Orthanc, read back, record.

The receiver (tus) hands over a finished payload: one packed instance, or a batch of small ones
(a tar of packed instances with a manifest, so a 2G link pays one round trip for many CT slices).
Each instance is unpacked into a scratch file (streamed: memory stays flat), checked against the
hashes the clinic sent and the SOP Instance UID it announced, stored in Orthanc, and read back:
only when Orthanc serves exactly the bytes checked is HQ's instance ID returned, and only that
ID ever makes the clinic count an instance as "at HQ". Every outcome goes to a journal of bytes
needed against bytes that crossed the link.

What HQ stores is the original with the patient's identity qualified by the sending site, and
other content under an instance HQ already holds is kept as a revision, never overwritten: the
decisions, and what "verified" then means exactly, are in `conflicts.py`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import BinaryIO

import pydicom

from ..orthanc import Orthanc, OrthancError, OrthancUnreachable
from ..sync import codecs
from . import conflicts, originals

log = logging.getLogger(__name__)

BATCH_CODEC = codecs.BATCH
MAX_BATCH_MEMBERS = 1000
LOOKUP_WILDCARDS = ("*", "?")  # Orthanc's /tools/lookup refuses a UID holding one


class Refused(Exception):
    """This payload will never be stored as sent (status: the HTTP answer for the clinic)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Archive:
    def __init__(self, orthanc: Orthanc, journal: Path, ledger: conflicts.Ledger) -> None:
        self.orthanc = orthanc
        self.journal = journal
        self.ledger = ledger

    def _record(self, entry: dict) -> None:
        with open(self.journal, "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def held(self, sop_uid: str, original_md5: str, site: str, sent_to=None) -> str | None:
        """HQ's instance (or kept revision) holding exactly this site's original, or exactly
        what HQ itself sent this site (`sent_to(site, instance, md5)`: a report, a prior)."""
        try:
            holders = self._holders(sop_uid)
        except OrthancUnreachable:
            raise
        except OrthancError as exc:
            if exc.status != 400:
                raise
            return None  # Orthanc looks up no UID with a wildcard in it (* or ?): none is held
        for holder in holders:
            if sent_to is not None and sent_to(site, holder["hq_id"], original_md5):
                return holder["hq_id"]
            if holder["site"] == site and holder["md5"] == original_md5:
                return holder["hq_id"]
        return self.ledger.held_revision(site, sop_uid, original_md5)

    def _metadata(self, instance: str, name: str) -> str | None:
        try:
            return self.orthanc.request("GET", f"/instances/{instance}/metadata/{name}"
                                        ).text.strip()
        except OrthancUnreachable:
            raise
        except OrthancError:  # never recorded (not sent by a site, or not confirmed yet)
            return None

    def _holders(self, sop_uid: str) -> list[dict]:
        """Every instance HQ's Orthanc holds under this SOP Instance UID: its ID, the site that
        sent it and the original's MD5 (None for what no site sent)."""
        return [{"hq_id": instance, "site": self._metadata(instance, "GotgSite"),
                 "md5": self._metadata(instance, "GotgOriginalMd5")}
                for instance in self.orthanc.find_instance(sop_uid)]

    def store(self, payload: BinaryIO, announced: dict, site: str, scratch: Path) -> str:
        """HQ's instance ID (or revision ID) for one packed instance; raises Refused, or
        OrthancUnreachable (HQ's archive down: nothing decided, the clinic asks again later)."""
        qualified = scratch.with_suffix(".qualified")
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
            if any(wildcard in announced["sop_uid"] for wildcard in LOOKUP_WILDCARDS):
                # HQ could never tell whether it holds it (a modality's bug, not a UID)
                raise Refused(422, "refused: a SOP Instance UID with * or ? cannot be looked "
                                   "up at HQ")
            return self._place(scratch, qualified, header, announced, site)
        except (codecs.CodecError, pydicom.errors.InvalidDicomError) as exc:
            raise Refused(422, f"refused: {exc}") from None
        finally:
            scratch.unlink(missing_ok=True)
            qualified.unlink(missing_ok=True)

    def _place(self, scratch: Path, qualified: Path, header: pydicom.Dataset, announced: dict,
               site: str) -> str:
        """Where this site's instance goes: already held, a revision, or a new qualified copy
        in Orthanc (see conflicts.py for why)."""
        sop_uid, original_md5 = announced["sop_uid"], announced["original_md5"]
        original_id = str(header.get("PatientID", "") or "")
        original_issuer = str(header.get("IssuerOfPatientID", "") or "")
        holders = self._holders(sop_uid)
        for holder in holders:
            if holder["site"] == site and holder["md5"] == original_md5:
                # Sent again (its confirmation was lost): the same answer, nothing stored twice.
                self.ledger.observe(site, header, sop_uid, holder["hq_id"], original_id,
                                    original_issuer)
                return holder["hq_id"]
        if revision := self.ledger.held_revision(site, sop_uid, original_md5):
            return revision
        if mine := [holder for holder in holders if holder["site"] == site]:
            return self._revision(scratch, announced, site, mine[0])
        try:
            dataset = pydicom.dcmread(scratch)
            conflicts.qualify(dataset, site)
            dataset.save_as(qualified, enforce_file_format=False)
            del dataset
            exact = conflicts.same_but_identity(pydicom.dcmread(scratch),
                                                pydicom.dcmread(qualified), site)
        except Exception as exc:  # noqa: BLE001 - a file pydicom cannot rewrite is refused
            raise Refused(422, f"refused: the patient's identity cannot be qualified ({exc})"
                          ) from None
        if not exact:
            raise Refused(422, "refused: qualifying the patient's identity changed more than "
                               "the identity")
        with open(qualified, "rb") as handle:
            written = hashlib.file_digest(handle, "md5").hexdigest()
            handle.seek(0)
            try:
                answer = self.orthanc.post("/instances", data=handle,
                                           headers={"Content-Type": "application/dicom"})
            except OrthancUnreachable:
                raise
            except OrthancError as exc:
                raise Refused(422, f"refused by HQ's archive: {exc}") from None
        instance = answer["ID"]
        served = hashlib.md5()
        with self.orthanc.request("GET", f"/instances/{instance}/attachments/dicom/data",
                                  stream=True) as response:
            for block in response.iter_content(codecs.BLOCK):
                served.update(block)
        if served.hexdigest() != written:
            # HQ's Orthanc holds other content as this very instance (same qualified patient,
            # study, series and SOP Instance UIDs), sent by no site: kept as a revision.
            return self._revision(scratch, announced, site, {
                "hq_id": instance, "site": self._metadata(instance, "GotgSite"),
                "md5": self._metadata(instance, "GotgOriginalMd5")})
        kept = {"GotgOriginalMd5": original_md5, "GotgSite": site, "GotgCodec": announced["codec"]}
        # The way back to the exact bytes for a repair (originals.py); a transcoding has none.
        if announced["codec"] in codecs.EXACT and (made := originals.patch(scratch, qualified)):
            kept[originals.PATCH_METADATA] = made
        for name, value in kept.items():
            self.orthanc.request("PUT", f"/instances/{instance}/metadata/{name}",
                                 data=value.encode())
        self.ledger.note_same_uid(site, sop_uid, original_md5,
                                  [h for h in holders if h["hq_id"] != instance])
        self.ledger.observe(site, header, sop_uid, instance, original_id, original_issuer)
        log.info("site %s: %s confirmed as %s (%s)", site, sop_uid, instance, announced["codec"])
        return instance

    def _revision(self, scratch: Path, announced: dict, site: str, held: dict) -> str:
        """Keep other content under an instance HQ already serves as a revision, byte for
        byte; never overwrite, never refuse for ever."""
        current = pydicom.dcmread(io.BytesIO(self.orthanc.request(
            "GET", f"/instances/{held['hq_id']}/file").content))
        new = pydicom.dcmread(scratch)
        if held["site"]:  # compare like with like: HQ's copy is qualified
            conflicts.qualify(new, held["site"])
        differs = conflicts.differing(current, new)
        revision = self.ledger.keep_revision(site, announced["sop_uid"],
                                             announced["original_md5"], scratch, held, differs)
        log.warning("site %s: %s differs from HQ's %s (%s): kept as revision %s", site,
                    announced["sop_uid"], held["hq_id"], ", ".join(differs) or "encoding",
                    revision)
        return revision

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
