"""`pacs restore`: studies back from a backup archive, each verified, in one of two ways.

- **Whole** (Orthanc stopped, its index empty: a new box, a replaced disk). The archive's copy of
  Orthanc's index and its storage files go back in place as the pair they were; every attachment
  the index records is checked against the MD5 Orthanc recorded for it before Orthanc sees it. As
  fast as borg extracts: the disk writes each file once. Files the index does not know (stored
  while the backup ran) wait in the power-cut inbox, which Orthanc's start stores again. Under
  systemd, a restore into an empty running Orthanc stops it (and the sync service) for this and
  starts them again.
- **Merge** (Orthanc running with studies of its own): every file is stored again through
  Orthanc's REST API, which indexes it beside what is there; modalities keep storing meanwhile.
  borg authenticates every chunk it extracts, and Orthanc's MD5 of what it stored must be the
  extracted file's. An instance already here with the same content is left as it is; one with
  other content is never overwritten, only reported. Files are extracted at most a batch at a
  time and removed once stored. The declared modalities come back from the archive's snapshot.

Either way: files are extracted into a folder on the images' own disk (the room checked is the
room used); Orthanc's partial "until pixel data" attachments are never stored as instances; an
archive path leading out of the scratch folder is refused; pacs.env is not touched (a new box has
its own). The sync service sees restored instances as new: its holdings question confirms at
once those HQ already holds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from .. import durable, orphans, storage_area, units
from ..checksums import md5_of
from ..config import Settings
from ..orphans import is_fragment
from ..orthanc import Orthanc, OrthancError, OrthancUnreachable
from . import appliance_state
from .borgmatic import INDEX_SNAPSHOT, BackupError, Backups, Contents
from .index_copy import INDEX_FILE

log = logging.getLogger(__name__)

BATCH_BYTES = 512 * 2**20  # extracted at once: room for this much is enough to restore
STORERS = 3  # files stored at once: Orthanc parses and writes one while its index takes another
ROOM_MARGIN = 256 * 2**20  # left free on the images' disk (Orthanc needs room to store)
ORTHANC_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{8}-[0-9a-f-]{27}")
SNAPSHOT_MODALITIES = ("backup", "snapshot", "modalities.json")
SNAPSHOT_INDEX = ("backup", "snapshot", INDEX_SNAPSHOT)
EXTRACTORS = 4  # borg processes extracting at once in a whole restore (one per core)
VERIFIERS = 4  # attachments hashed at once in a whole restore (hashlib lets go of the GIL)
DICOM = 1  # Orthanc's attachment type of the DICOM file itself
# Every attachment Orthanc's index records, with what a report names it by.
ATTACHMENTS = """
SELECT a.uuid, a.fileType, a.compressedMD5, a.compressedSize, r.publicId,
       (SELECT value FROM DicomIdentifiers d
         WHERE d.id = r.internalId AND d.tagGroup = 8 AND d.tagElement = 24)
  FROM AttachedFiles a JOIN Resources r ON r.internalId = a.id
"""
MODALITY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def orthanc_files(contents: dict[Path, int]) -> dict[Path, int]:
    """The archive's Orthanc storage files, by the shape of Orthanc's storage layout, not by
    this box's paths (the archive may come from a box whose STORAGE_PATH differed); never a
    path with a `..` in it (an archive made elsewhere is not trusted to stay in scratch)."""
    return {path: size for path, size in contents.items()
            if ".." not in path.parts and ORTHANC_FILE.fullmatch("/".join(path.parts[-3:]))}


def _snapshot_file(contents: dict[Path, int], parts: tuple[str, ...]) -> Path | None:
    found = [path for path in contents if path.parts[-3:] == parts and ".." not in path.parts]
    return found[0] if found else None


def _regular(path: Path) -> bool:
    """A regular file itself (a symlink is not followed: an archive may carry one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


INSTANCES = "SELECT COUNT(*) FROM Resources WHERE resourceType = 3"  # Orthanc's own schema


def _indexed_instances(index: Path) -> int:
    """Instances in an Orthanc index on disk (Orthanc stopped); 0 when there is none yet."""
    if not index.exists():
        return 0
    with closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=15)) as db:
        return db.execute(INSTANCES).fetchone()[0]


def _checked_index(index: Path) -> int:
    """The instances an extracted copy of Orthanc's index holds, once SQLite finds it sound."""
    with closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as db:
        verdict = db.execute("PRAGMA quick_check").fetchall()
        if verdict != [("ok",)]:
            raise ValueError("Orthanc's index failed SQLite's check: "
                             + "; ".join(row[0] for row in verdict[:5]))
        return db.execute(INSTANCES).fetchone()[0]


@dataclass
class Restored:
    archive: str
    mode: str = "merge"  # or "whole": index and files put back as a pair
    restored: list[str] = field(default_factory=list)   # SOP Instance UIDs stored again
    present: list[str] = field(default_factory=list)    # here already, the same content
    differs: list[str] = field(default_factory=list)    # here already with other content
    failed: list[dict] = field(default_factory=list)    # {"file", "reason"}
    skipped: list[str] = field(default_factory=list)    # partial attachments, not instances
    modalities: list[str] = field(default_factory=list)  # declared again
    state: dict[str, str] = field(default_factory=dict)  # accounts, site CA, audit trail
    missing: list[dict] = field(default_factory=list)   # in the index, file not in the archive
    waiting: int = 0  # files the index did not know, stored again when Orthanc starts
    stopped: list[str] = field(default_factory=list)    # systemd units stopped and started
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step (whole restore)
    seconds: float = 0.0

    def public(self) -> dict:
        return {"archive": self.archive, "mode": self.mode, "restored": len(self.restored),
                "present": len(self.present), "differs": self.differs,
                "failed": self.failed, "skipped": len(self.skipped),
                "modalities": self.modalities, "state": self.state, "missing": self.missing,
                "waiting": self.waiting, "stopped": self.stopped, "phases": self.phases,
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
        """Whole when Orthanc is stopped (or, under systemd, running with nothing stored: then
        stopped for it), merged through Orthanc when it runs with studies of its own."""
        with self.backups.locked():
            started = time.monotonic()
            name = self.backups.resolve(archive)
            contents = self.backups.contents(name)
            report = self._dispatch(name, contents)
            report.state = self._appliance_state(name, contents, report.mode == "whole")
            report.seconds = time.monotonic() - started
        log.info("%s restore from %s: %d restored, %d present, %d differ, %d failed, "
                 "%d missing", report.mode, name, len(report.restored), len(report.present),
                 len(report.differs), len(report.failed), len(report.missing))
        return report

    def _dispatch(self, name: str, contents: Contents) -> Restored:
        try:
            lock = orphans.lock_storage(self.settings)
        except orphans.IndexBusy:  # Orthanc runs on this storage
            if not (units.active(units.ORTHANC) and _snapshot_file(contents, SNAPSHOT_INDEX)
                    and self.orthanc.statistics()["CountInstances"] == 0):
                return self._merge(name, contents)
            with units.stopped([units.SYNC, units.ORTHANC]) as stopped:
                report = self._locked_whole(name, contents)
            report.stopped = stopped.units
            if stopped.start_error:
                report.failed.append({"file": "(services)", "reason": "restored, but they did "
                                      f"not start again: {stopped.start_error}"})
            return report
        try:
            return self._whole(name, contents)
        finally:
            os.close(lock)

    def _locked_whole(self, name: str, contents: Contents) -> Restored:
        try:
            lock = orphans.lock_storage(self.settings)
        except orphans.IndexBusy:
            raise BackupError("Orthanc still holds its storage after it was stopped") from None
        try:
            return self._whole(name, contents)
        finally:
            os.close(lock)

    def _appliance_state(self, name: str, contents: Contents, whole: bool) -> dict[str, str]:
        """Accounts, site CA and audit trails from the archive's snapshot (appliance_state)."""
        found = appliance_state.snapshot_paths(contents)
        if not found:
            return {}
        staging = self.settings.state_path / "restore-state"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self.backups.extract(name, list(found.values()), staging)
            name_in_snapshot, path = next(iter(found.items()))
            snapshot = (staging / str(path).lstrip("/")).parents[name_in_snapshot.count("/")]
            return appliance_state.put_back(self.settings, snapshot, name, whole,
                                            self.backups.site)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _room(self, total: int, extra: int) -> None:
        need = total + extra + ROOM_MARGIN
        free = shutil.disk_usage(self.settings.storage_path).free
        if free < need:
            raise BackupError(
                f"not enough room on the images' disk to restore: {need // 2**20} MB needed "
                f"(the archive holds {total // 2**20} MB of images), {free // 2**20} MB free; "
                "make room, or restore onto a larger disk")

    # --- whole: Orthanc stopped, its storage locked -------------------------------------------

    def _whole(self, name: str, contents: Contents) -> Restored:
        index = _snapshot_file(contents, SNAPSHOT_INDEX)
        if index is None:
            raise BackupError(f"archive {name} holds no copy of Orthanc's index (made before "
                              "backups held one): start Orthanc, and `pacs restore` stores its "
                              "files through it")
        if self.settings.orthanc_index != "sqlite":
            raise BackupError("Orthanc's index is in PostgreSQL here: start Orthanc, and "
                              "`pacs restore` stores the archive's files through it")
        try:
            here = _indexed_instances(self.settings.orthanc_index_dir / INDEX_FILE)
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"Orthanc's index here ({self.settings.orthanc_index_dir}) cannot "
                              f"be read ({exc}): move it aside, then restore") from None
        if here:
            raise BackupError(f"Orthanc's index here already holds {here} instance(s) and a "
                              "whole restore would replace it: start Orthanc, and `pacs restore` "
                              "merges the archive into what is here")
        files = orthanc_files(contents)
        roots = {path.parents[2] for path in files}
        if len(roots) > 1:
            raise BackupError(f"archive {name} holds Orthanc files under {len(roots)} folders")
        root = roots.pop() if roots else None
        irregular = [path for path in contents.irregular
                     if ".." in path.parts or (root is not None and path.is_relative_to(root))]
        if irregular:  # a link or a device where Orthanc keeps files: never extracted there
            raise BackupError(f"archive {name} holds {len(irregular)} link(s) or special "
                              f"file(s) in Orthanc's storage ({irregular[0]}): not restored")
        kept = {path: size for path, size in contents.items() if root is not None
                and ".." not in path.parts and path.is_relative_to(root / orphans.RECOVERED)}
        self._room(sum(files.values()) + sum(kept.values()) + contents[index], 0)
        report = Restored(name, mode="whole")
        shutil.rmtree(self.staging, ignore_errors=True)  # a restore that died left it
        # From here files may move into the storage before the index names them: a stop now
        # (a failure, a power cut) must lead to the scan that takes them back at the next start.
        self._like_storage_path(self.settings.orthanc_storage_dir)
        marker = self.settings.orthanc_storage_dir / orphans.CLEAN_MARKER
        if marker.exists():
            marker.unlink()
            durable.fsync_dir(marker.parent)
        try:
            phase = time.monotonic()
            self._extract_in_parallel(name, [index], files, kept, root)
            report.phases["extract_s"] = round(time.monotonic() - phase, 1)
            staged_index = self.staging / str(index).lstrip("/")
            staged = self.staging / str(root).lstrip("/") if root is not None else self.staging
            known = self._put_attachments(staged_index, staged, report)
            for path in sorted(set(files) | set(kept)):
                extracted = self.staging / str(path).lstrip("/")
                if not _regular(extracted) or path.name in known:
                    continue
                if path in kept:  # the power-cut inbox and what was kept aside: as they were
                    self._move_aside(extracted, self.settings.orthanc_storage_dir
                                     / path.parent.relative_to(root))
                else:
                    self._move_aside(extracted, orphans.inbox(self.settings))
                    report.waiting += 1
            self._put_index(staged_index)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        return report

    def _extract_in_parallel(self, name: str, first: list[Path], files: dict[Path, int],
                             kept: dict[Path, int], root: Path | None) -> None:
        """`first` and the storage area's folders, split among one borg process per core (at
        most EXTRACTORS): one borg decrypts and decompresses on one core, and a Pi has four."""
        folders = sorted({path.parents[1] for path in files}) if root is not None else []
        if kept:
            folders.append(root / orphans.RECOVERED)
        sizes = dict.fromkeys(folders, 0)
        for path, size in files.items():
            sizes[path.parents[1]] += size
        count = max(1, min(EXTRACTORS, os.cpu_count() or 1, len(folders)))
        groups: list[list[Path]] = [[] for _ in range(count)]
        groups[0] += first
        loads = [0] * len(groups)
        for folder in sorted(folders, key=lambda folder: -sizes[folder]):  # even shares
            lightest = loads.index(min(loads))
            groups[lightest].append(folder)
            loads[lightest] += sizes[folder]
        with ThreadPoolExecutor(len(groups)) as pool:
            list(pool.map(lambda group: self.backups.extract(name, group, self.staging),
                          groups))

    def _put_attachments(self, staged_index: Path, staged: Path, report: Restored) -> set[str]:
        """Every attachment the index records, checked against Orthanc's MD5 and moved into
        place; returns the UUIDs the index knows."""
        with closing(sqlite3.connect(staged_index)) as db:
            attachments = db.execute(ATTACHMENTS).fetchall()

        def verdict(attachment: tuple) -> str:
            uuid, _, md5, size = attachment[:4]
            extracted = staged / uuid[:2] / uuid[2:4] / uuid
            if not _regular(extracted):
                return "missing"
            if extracted.stat().st_size != size or (md5 and md5_of(extracted) != md5):
                return "differs"
            return "ok"

        phase = time.monotonic()
        with ThreadPoolExecutor(VERIFIERS) as pool:
            verdicts = list(pool.map(verdict, attachments))
        report.phases["verify_s"] = round(time.monotonic() - phase, 1)
        for (uuid, kind, _, _, instance, sop), outcome in zip(attachments, verdicts, strict=True):
            extracted = staged / uuid[:2] / uuid[2:4] / uuid
            if outcome == "missing":  # deleted while the backup ran, or never backed up
                report.missing.append({"instance": instance, "sop": sop, "attachment": uuid})
            elif outcome == "differs":  # never in place: Orthanc would serve other bytes
                kept = self._move_aside(extracted, orphans.unresolved_dir(self.settings))
                report.failed.append({"file": str(kept), "reason": "its MD5 is not the one "
                                      f"Orthanc recorded for instance {instance}"})
            else:
                target = storage_area.file_path(self.settings, uuid)
                storage_area.make_folders(self.settings, target.parent)
                os.replace(extracted, target)
                if kind == DICOM:
                    report.restored.append(sop or instance)
        phase = time.monotonic()
        os.sync()  # every file on disk before the index that names them
        report.phases["sync_s"] = round(time.monotonic() - phase, 1)
        return {attachment[0] for attachment in attachments}

    def _move_aside(self, path: Path, folder: Path) -> Path:
        """Into a folder of the storage area Orthanc's user can empty (it stores the inbox
        again at its start), never over a file already there."""
        storage_area.make_folders(self.settings, folder)
        return orphans.move_aside(path, folder)

    def _put_index(self, staged_index: Path) -> None:
        """The archive's index in Orthanc's place (empty until now), owned as Orthanc's own."""
        folder = self.settings.orthanc_index_dir
        self._like_storage_path(folder)
        for stale in ("-wal", "-shm"):  # the empty index's log must not be replayed onto it
            (folder / (INDEX_FILE + stale)).unlink(missing_ok=True)
        durable.own_like(staged_index, folder)
        os.chmod(staged_index, 0o600)
        os.replace(staged_index, folder / INDEX_FILE)
        os.sync()

    def _like_storage_path(self, folder: Path) -> None:
        """Orthanc's folder (storage area, index) made if missing, owned like STORAGE_PATH
        (Orthanc's user's, as the role makes it), not by root running the restore."""
        if folder.exists():
            return
        folder.mkdir(parents=True, mode=0o700)
        durable.own_like(folder, self.settings.storage_path)

    # --- merge: through the running Orthanc ---------------------------------------------------

    def _merge(self, name: str, contents: Contents) -> Restored:
        report = Restored(name)
        files = orthanc_files(contents)
        total = sum(files.values())
        largest = max(files.values(), default=0)
        # Orthanc's copies, plus one batch extracted beside them.
        self._room(total, max(min(BATCH_BYTES, total), largest))
        shutil.rmtree(self.staging, ignore_errors=True)  # a restore that died left it
        try:
            for batch in self._batches(files):
                self.backups.extract(name, batch, self.staging)
                with ThreadPoolExecutor(STORERS) as pool:
                    list(pool.map(lambda path: self._store(path, report), batch))
            self._modalities(name, contents, report)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
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
        snapshot = _snapshot_file(contents, SNAPSHOT_MODALITIES)
        if snapshot is None:
            return
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
    and parsed as DICOM, and found (or not) in Orthanc; the archive's copy of Orthanc's index is
    extracted too and checked by SQLite. Monthly by timer: a backup nobody ever restored from is
    a hope, not a backup."""

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
        contents = self.backups.contents(name)
        files = list(orthanc_files(contents).items())
        index = _snapshot_file(contents, SNAPSHOT_INDEX)
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
                   "index_instances": None, "failures": []}
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            self.backups.extract(name, chosen + ([index] if index else []), self.staging)
            if index is not None:
                try:
                    outcome["index_instances"] = _checked_index(
                        self.staging / str(index).lstrip("/"))
                except (sqlite3.DatabaseError, ValueError) as exc:
                    outcome["failures"].append({"file": str(index), "reason": str(exc)})
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
