"""`pacs restore`: studies back from a backup archive into the running Orthanc, each verified.

The archive holds Orthanc's storage files (complete DICOM) but not its index, so a restore stores
every file again through Orthanc's REST API: Orthanc rebuilds its index as it goes, nothing has
to stop, and modalities keep storing meanwhile. Each file is checked twice: borg authenticates
every chunk it extracts, and Orthanc's MD5 of what it stored must be the extracted file's. An
instance already here with the same content is left as it is; one here with other content is
never overwritten, only reported. Orthanc's partial "until pixel data" attachments are skipped,
and an archive path that would lead out of the scratch folder is refused.

Files are extracted into a folder on the images' own disk (so the room checked is the room
used), at most a batch at a time, and removed as soon as they are stored. The sync service sees
restored instances as new: its holdings question confirms at once those HQ already holds. The
declared modalities come back from the archive's snapshot; pacs.env is not touched (a new box
has its own, made by the image or the playbook).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..checksums import md5_of
from ..config import Settings
from ..orphans import is_fragment
from ..orthanc import Orthanc, OrthancError, OrthancUnreachable
from .borgmatic import BackupError, Backups

log = logging.getLogger(__name__)

BATCH_BYTES = 512 * 2**20  # extracted at once: room for this much is enough to restore
STORERS = 3  # files stored at once: Orthanc parses and writes one while its index takes another
ROOM_MARGIN = 256 * 2**20  # left free on the images' disk (Orthanc needs room to store)
ORTHANC_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{8}-[0-9a-f-]{27}")
SNAPSHOT_MODALITIES = ("backup", "snapshot", "modalities.json")
MODALITY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def orthanc_files(contents: dict[Path, int]) -> dict[Path, int]:
    """The archive's Orthanc storage files, by the shape of Orthanc's storage layout, not by
    this box's paths (the archive may come from a box whose STORAGE_PATH differed); never a
    path with a `..` in it (an archive made elsewhere is not trusted to stay in scratch)."""
    return {path: size for path, size in contents.items()
            if ".." not in path.parts and ORTHANC_FILE.fullmatch("/".join(path.parts[-3:]))}


@dataclass
class Restored:
    archive: str
    restored: list[str] = field(default_factory=list)   # SOP Instance UIDs stored again
    present: list[str] = field(default_factory=list)    # here already, the same content
    differs: list[str] = field(default_factory=list)    # here already with other content
    failed: list[dict] = field(default_factory=list)    # {"file", "reason"}
    skipped: list[str] = field(default_factory=list)    # partial attachments, not instances
    modalities: list[str] = field(default_factory=list)  # declared again
    seconds: float = 0.0

    def public(self) -> dict:
        return {"archive": self.archive, "restored": len(self.restored),
                "present": len(self.present), "differs": self.differs,
                "failed": self.failed, "skipped": len(self.skipped),
                "modalities": self.modalities,
                "seconds": round(self.seconds, 1)}


class Restore:
    def __init__(self, settings: Settings, backups: Backups, orthanc: Orthanc) -> None:
        self.settings = settings
        self.backups = backups
        self.orthanc = orthanc
        self.staging = settings.storage_path / "restore-staging"
        self._local = threading.local()

    def _client(self) -> Orthanc:
        """One Orthanc session per storing thread (a session is not shared)."""
        if not hasattr(self._local, "orthanc"):
            self._local.orthanc = Orthanc(self.orthanc.url, self.orthanc.session.auth,
                                          self.orthanc.timeout)
        return self._local.orthanc

    def run(self, archive: str | None = None) -> Restored:
        with self.backups.locked():
            return self._run(archive)

    def _run(self, archive: str | None) -> Restored:
        started = time.monotonic()
        name = self.backups.resolve(archive)
        report = Restored(name)
        contents = self.backups.contents(name)
        files = orthanc_files(contents)
        total = sum(files.values())
        largest = max(files.values(), default=0)
        # Orthanc's copies, plus one batch extracted beside them, plus room to keep working.
        need = total + max(min(BATCH_BYTES, total), largest) + ROOM_MARGIN
        free = shutil.disk_usage(self.settings.storage_path).free
        if free < need:
            raise BackupError(
                f"not enough room on the images' disk to restore: {need // 2**20} MB needed "
                f"(the archive holds {total // 2**20} MB of images), {free // 2**20} MB free; "
                "make room, or restore onto a larger disk")
        shutil.rmtree(self.staging, ignore_errors=True)  # a restore that died left it
        try:
            for batch in self._batches(files):
                self.backups.extract(name, batch, self.staging)
                with ThreadPoolExecutor(STORERS) as pool:
                    list(pool.map(lambda path: self._store(path, report), batch))
            self._modalities(name, contents, report)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        report.seconds = time.monotonic() - started
        log.info("restore from %s: %d restored, %d present, %d differ, %d failed", name,
                 len(report.restored), len(report.present), len(report.differs),
                 len(report.failed))
        return report

    @staticmethod
    def _batches(files: dict[Path, int]):
        batch, size = [], 0
        for path, length in sorted(files.items()):
            if batch and size + length > BATCH_BYTES:
                yield batch
                batch, size = [], 0
            batch.append(path)
            size += length
        if batch:
            yield batch

    def _store(self, path: Path, report: Restored) -> None:
        extracted = self.staging / str(path).lstrip("/")
        try:
            if not extracted.is_file():
                raise BackupError("not extracted from the archive")
            if is_fragment(extracted):
                report.skipped.append(str(path))
                return
            md5 = md5_of(extracted)
            orthanc = self._client()
            with open(extracted, "rb") as handle:
                answer = orthanc.post("/instances", data=handle,
                                      headers={"Content-Type": "application/dicom"})
            instance = answer["ID"]
            here = orthanc.request(
                "GET", f"/instances/{instance}/attachments/dicom/md5").text.strip()
            uid = orthanc.get(f"/instances/{instance}")["MainDicomTags"].get(
                "SOPInstanceUID", instance)
            if answer.get("Status") == "AlreadyStored":
                (report.present if here == md5 else report.differs).append(uid)
            elif here == md5:
                report.restored.append(uid)
            else:
                raise BackupError(f"Orthanc stored MD5 {here}, not {md5}")
        except OrthancUnreachable:
            raise  # Orthanc down: stop here rather than fail every file
        except OrthancError as exc:
            report.failed.append({"file": str(path), "reason": f"Orthanc refused it: {exc}"})
        except BackupError as exc:
            report.failed.append({"file": str(path), "reason": str(exc)})
        finally:
            extracted.unlink(missing_ok=True)

    def _modalities(self, archive: str, contents: dict, report: Restored) -> None:
        """The modalities the archive's snapshot declares and this Orthanc does not."""
        exported = [path for path in contents
                    if path.parts[-3:] == SNAPSHOT_MODALITIES and ".." not in path.parts]
        if not exported:
            return
        snapshot = exported[0]
        self.backups.extract(archive, [snapshot], self.staging)
        try:
            declared = json.loads((self.staging / str(snapshot).lstrip("/")).read_text())
        except ValueError:
            log.warning("the archive's modalities.json is not JSON; modalities not restored")
            return
        here = self.orthanc.modalities()
        for name, modality in declared.items():
            if not MODALITY_NAME.fullmatch(name):
                log.warning("modality %r in the archive not declared again: not a plain name",
                            name)
                continue
            if name not in here:
                self.orthanc.put_modality(name, modality["AET"], modality["Host"],
                                          int(modality["Port"]))
                report.modalities.append(name)


DRILL_BYTES = 256 * 2**20  # extracted per drill: enough to prove the path, light on a Pi


class Drill:
    """A restore rehearsed, touching nothing: images picked at random from the newest archive
    are extracted to a scratch folder, each checked against the MD5 the repository recorded
    and parsed as DICOM, and found (or not) in Orthanc. Monthly by timer: a backup nobody ever
    restored from is a hope, not a backup."""

    def __init__(self, settings: Settings, backups: Backups, orthanc: Orthanc,
                 budget: int = DRILL_BYTES) -> None:
        self.settings = settings
        self.backups = backups
        self.orthanc = orthanc
        self.budget = budget
        self.staging = settings.storage_path / "drill-staging"

    def run(self) -> dict:
        with self.backups.locked():
            return self._run()

    def _run(self) -> dict:
        import random

        import pydicom

        started = time.monotonic()
        name = self.backups.resolve(None)
        files = list(orthanc_files(self.backups.contents(name)).items())
        random.shuffle(files)
        chosen, size = [], 0
        for path, length in files:
            if chosen and size + length > self.budget:
                continue
            chosen.append(path)
            size += length
        recorded = self.backups.held(chosen, name)  # MD5s of the chosen files only
        sample = [(path, recorded.get(path, "")) for path in chosen]
        outcome = {"archive": name, "files": len(sample), "bytes": size, "held_here": 0,
                   "failures": []}
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            self.backups.extract(name, chosen, self.staging)
            for path, md5 in sample:
                extracted = self.staging / str(path).lstrip("/")
                try:
                    if md5_of(extracted) != md5:
                        raise ValueError("MD5 differs from the one recorded at backup")
                    uid = str(pydicom.dcmread(extracted, defer_size="1 MB",
                                              stop_before_pixels=True).SOPInstanceUID)
                except (OSError, ValueError, AttributeError) as exc:
                    outcome["failures"].append({"file": str(path), "reason": str(exc)})
                    continue
                if self.orthanc.find_instance(uid):
                    outcome["held_here"] += 1
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        outcome["seconds"] = round(time.monotonic() - started, 1)
        return outcome
