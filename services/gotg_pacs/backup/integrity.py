"""`pacs integrity check [--repair]`: every stored instance against Orthanc's MD5 and a parse.

Orthanc takes each file's MD5 when it stores it. A file since gone, or whose bytes differ (a
failing SD card, bit rot), is damaged; one that matches but no longer parses as DICOM was
received so (nothing to repair: the backup holds the same). With `--repair`, each damaged file is
taken from the newest archive that holds exactly the bytes Orthanc recorded, extracted beside the
storage area, checked, and moved into place under its own name, so Orthanc's index needs no
change; Orthanc then verifies it again. What no archive holds is reported, saying whether HQ
confirmed a copy of it.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from .. import durable, storage_area
from ..checksums import md5_of
from ..config import Settings
from ..orthanc import Orthanc, OrthancError
from .borgmatic import BackupError, Backups

log = logging.getLogger(__name__)
PAGE = 500


@dataclass
class Finding:
    instance_id: str
    sop_uid: str
    path: str
    problem: str  # "missing", "corrupt" (MD5 differs) or "unparsable" (as received)
    detail: str = ""
    repaired_from: str | None = None  # the archive it came back from
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
                 confirmed=None) -> None:
        """`confirmed(instance_ids)`: what HQ confirmed, {id: original MD5} (the outbox)."""
        self.settings = settings
        self.orthanc = orthanc
        self.backups = backups
        self.confirmed = confirmed
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
        """Damaged files back from the newest archive holding exactly Orthanc's bytes."""
        wanted = {Path(f.path): f for f in findings if f.damaged}
        if not wanted:
            return
        if self.backups is None:
            raise BackupError("no backup to repair from: set BACKUP_PATH or REMOTE_BACKUP_URL")
        with self.backups.locked():
            self._repair(wanted)

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
