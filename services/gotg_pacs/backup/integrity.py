"""`pacs integrity check [--repair]`: every stored instance against Orthanc's MD5 and a parse.

Orthanc takes each file's MD5 when it stores it. A file since gone, or whose bytes differ (a
failing SD card, bit rot), is damaged; one that matches but no longer parses as DICOM was
received so (nothing to repair: the backup holds the same). With `--repair`, each damaged file is
taken from the newest archive that holds exactly the bytes Orthanc recorded, extracted beside the
storage area, checked, and moved into place under its own name, so Orthanc's index needs no
change; Orthanc then verifies it again. What no archive holds but HQ confirmed is fetched back
from HQ: HQ rebuilds the exact original from its site-qualified copy (hq/originals.py), sent in
byte ranges that a later run resumes, and put back only under the MD5 Orthanc recorded. What
neither gives back is reported with why (HQ holding only a lossless transcoding, say).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
import requests
from pydicom.errors import InvalidDicomError

from .. import durable, storage_area
from ..checksums import md5_of
from ..config import Settings
from ..orthanc import Orthanc, OrthancError
from ..sync.transport import HQClient, HQRefused, HQUnreachable
from .borgmatic import BackupError, Backups

log = logging.getLogger(__name__)
BLOCK = 64 * 1024
PAGE = 500
FROM_HQ = "HQ"  # `repaired_from` for a file fetched back from HQ
SPAN = 1 << 20  # bytes per range asked of HQ: an outage costs at most this much again


@dataclass
class Finding:
    instance_id: str
    sop_uid: str
    path: str
    problem: str  # "missing", "corrupt" (MD5 differs) or "unparsable" (as received)
    detail: str = ""
    repaired_from: str | None = None  # the archive it came back from, or "HQ"
    at_hq: bool = False  # HQ confirmed exactly this instance

    @property
    def damaged(self) -> bool:
        return self.problem in ("missing", "corrupt")


@dataclass(frozen=True)
class _Stored:
    instance_id: str
    sop_uid: str
    md5: str  # of the file as stored (Orthanc's CompressedMD5: the same without compression)
    path: Path


class Integrity:
    def __init__(self, settings: Settings, orthanc: Orthanc, backups: Backups | None = None,
                 confirmed=None, hq: HQClient | None = None) -> None:
        """`confirmed(instance_ids)`: what HQ confirmed, {id: original MD5} (the outbox);
        `hq`: where a file no archive holds is fetched back from."""
        self.settings = settings
        self.orthanc = orthanc
        self.backups = backups
        self.confirmed = confirmed
        self.hq = hq
        self.checked = 0

    def _stored(self):
        since = 0
        while True:
            page = self.orthanc.get("/instances", params={"expand": "", "since": since,
                                                           "limit": PAGE})
            for item in page:
                try:
                    info = self.orthanc.get(f"/instances/{item['ID']}/attachments/dicom/info")
                except OrthancError as exc:
                    if exc.status == 404:  # deleted meanwhile (a cleanup): nothing to check
                        continue
                    raise
                uuid = info["Uuid"]
                yield _Stored(item["ID"], item["MainDicomTags"].get("SOPInstanceUID", ""),
                              info["CompressedMD5"],
                              storage_area.file_path(self.settings, uuid))
            if len(page) < PAGE:
                return
            since += len(page)

    def check(self) -> list[Finding]:
        """What is wrong with the stored files, instance by instance (nothing when all is well)."""
        findings = []
        self.checked = 0
        for stored in self._stored():
            self.checked += 1
            if (problem := self._problem(stored)) is not None:
                findings.append(problem)
        if findings and self.confirmed is not None:
            at_hq = self.confirmed([finding.instance_id for finding in findings])
            for finding in findings:
                finding.at_hq = finding.instance_id in at_hq
        return findings

    def _problem(self, stored: _Stored) -> Finding | None:
        def finding(problem: str, detail: str) -> Finding:
            return Finding(stored.instance_id, stored.sop_uid, str(stored.path), problem, detail)

        try:
            md5 = md5_of(stored.path)
        except FileNotFoundError:
            return finding("missing", "the stored file is gone")
        except OSError as exc:  # an unreadable sector: as good as gone
            return finding("missing", f"the stored file cannot be read ({exc.strerror})")
        if md5 != stored.md5:
            return finding("corrupt", f"MD5 {md5}, Orthanc recorded {stored.md5}")
        try:  # the structure to its end; large values skipped, not loaded
            pydicom.dcmread(stored.path, defer_size="1 MB")
        except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
            return finding("unparsable", f"as received, it does not parse as DICOM: {exc}")
        return None

    def repair(self, findings: list[Finding]) -> None:
        """Damaged files back from the newest archive holding exactly Orthanc's bytes, then
        what is still damaged and HQ confirmed, from HQ."""
        wanted = {Path(f.path): f for f in findings if f.damaged}
        if not wanted:
            return
        if self.backups is None and self.hq is None:
            raise BackupError("nothing to repair from: set BACKUP_PATH or REMOTE_BACKUP_URL "
                              "(or HQ_URL, for what HQ confirmed)")
        if self.backups is not None:
            try:
                with self.backups.locked():
                    self._repair(wanted)
            except BackupError as exc:
                if self.hq is None:
                    raise
                for finding in wanted.values():  # HQ may still have it: said, not fatal
                    finding.detail += f"; the backup could not be read ({exc})"
        if self.hq is not None:
            self._from_hq(wanted)

    def _repair(self, wanted: dict[Path, Finding]) -> None:
        expected = {}
        for path, finding in list(wanted.items()):
            if (md5 := self._expected_md5(finding)) is None:
                finding.detail += "; deleted here since the check"
                del wanted[path]
            else:
                expected[path] = md5
        staging = self.settings.storage_path / "repair-staging"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            # The repository read from only (the disk, or HQ's copy without one).
            reading = self.backups.reading_repository().label
            archives = sorted(self.backups.archives(only=reading), key=lambda item: item["time"],
                              reverse=True)
            for archive in (item["name"] for item in archives):
                if not wanted:
                    break
                held = self.backups.held(list(wanted), archive)
                good = [path for path in wanted if held.get(path) == expected[path]]
                if not good:
                    continue
                self.backups.extract(archive, good, staging)
                for path in good:
                    self._put_back(path, staging / str(path).lstrip("/"), expected[path],
                                   wanted.pop(path), archive)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _from_hq(self, wanted: dict[Path, Finding]) -> None:
        """Each damaged file HQ confirmed, fetched back into a folder beside the storage area
        (the same disk: moved into place atomically). A partial file waits there for the next
        run when the link drops; it is named by the MD5, so it can only ever become that."""
        folder = self.settings.storage_path / "fetch-back"
        folder.mkdir(exist_ok=True, mode=0o700)
        asked = {}
        for path, finding in wanted.items():
            if finding.at_hq and (md5 := self._expected_md5(finding)) is not None:
                asked[path] = md5
        for part in folder.iterdir():  # parts for files repaired or deleted since
            if part.name not in {f"{md5}.part" for md5 in asked.values()}:
                part.unlink()
        for done, (path, md5) in enumerate(asked.items()):
            finding, part = wanted[path], folder / f"{md5}.part"
            try:
                self._fetch(finding.sop_uid, md5, part)
            except HQRefused as exc:
                part.unlink(missing_ok=True)
                finding.detail += f"; {exc}"
                continue
            except HQUnreachable as exc:
                for left in list(asked)[done:]:
                    wanted[left].detail += f"; HQ not reached, fetched on the next run ({exc})"
                return
            self._put_back(path, part, md5, finding, FROM_HQ)
            part.unlink(missing_ok=True)  # moved into place, or not the bytes: never kept
        if not any(folder.iterdir()):
            folder.rmdir()

    def _fetch(self, sop_uid: str, md5: str, part: Path) -> None:
        """The whole original into `part`, resuming what an earlier run received."""
        have, size = (part.stat().st_size if part.exists() else 0), None
        while size is None or have < size:
            try:
                response = self.hq.original(sop_uid, md5, have, have + SPAN - 1)
            except HQRefused as exc:
                if exc.status != 416 or not have:
                    raise
                part.unlink()  # a whole part left by a run that stopped: fetched again
                have = 0
                continue
            try:
                whole = response.status_code == 200
                if response.headers.get("Gotg-Md5") != md5:
                    raise HQUnreachable("HQ answered for other content than asked")
                if whole:
                    have, size = 0, int(response.headers.get("Content-Length", 0))
                else:
                    answered = re.fullmatch(r"bytes (\d+)-\d+/(\d+)",
                                            response.headers.get("Content-Range", ""))
                    if not answered or int(answered[1]) != have:
                        raise HQUnreachable("HQ answered another range than asked")
                    size = int(answered[2])
                got = 0
                with open(part, "wb" if whole else "ab") as out:
                    for block in response.iter_content(BLOCK):
                        self.hq.cap.wait_for(len(block))
                        out.write(block)
                        got += len(block)
            except (requests.RequestException, ValueError) as exc:  # cut off: keep what came
                raise HQUnreachable(f"fetch from HQ cut off ({exc.__class__.__name__})") \
                    from exc
            finally:
                response.close()
            if not got:
                raise HQUnreachable("HQ sent no bytes of a range it answered")
            have += got

    def _expected_md5(self, finding: Finding) -> str | None:
        """The MD5 Orthanc recorded for the instance's file; None once the instance is gone
        (a file put back for it would be an orphan, stored again after the next power cut)."""
        try:
            return self.orthanc.get(
                f"/instances/{finding.instance_id}/attachments/dicom/info")["CompressedMD5"]
        except OrthancError as exc:
            if exc.status == 404:
                return None
            raise

    def _put_back(self, path: Path, extracted: Path, md5: str, finding: Finding,
                  archive: str) -> None:
        if not extracted.is_file() or md5_of(extracted) != md5:
            finding.detail += f"; {archive} did not give back the recorded bytes"
            return
        if self._expected_md5(finding) != md5:  # deleted or replaced while we extracted
            finding.detail += "; changed here during the repair, left as it is"
            return
        storage_area.make_folders(self.settings, path.parent)
        with open(extracted, "rb") as handle:  # its bytes on disk before its name is in place
            os.fsync(handle.fileno())
        os.replace(extracted, path)  # the same disk: atomic, never half a file in place
        durable.fsync_dir(path.parent)
        if self.orthanc.verify_md5(finding.instance_id):
            finding.repaired_from = archive
            log.info("repaired %s from %s", finding.sop_uid, archive)
        else:
            finding.detail += f"; Orthanc still rejects the copy from {archive}"

    @staticmethod
    def public(finding: Finding) -> dict:
        return asdict(finding)
