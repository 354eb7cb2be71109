"""Removing local copies of old studies, only where nothing can be lost.

A study older than the limit is removed from this box only when, for every one of its
instances, all of these hold at the time of the cleanup:

1. the sync outbox has HQ's confirmation of exactly this content (the MD5 Orthanc holds now);
2. the newest backup archive holds the stored file, with the same MD5 read back from the
   repository (the backup is asked, not assumed);
3. HQ, asked again now, still holds it (HQ may have lost data since it confirmed).

Anything uncertain keeps the study: HQ unreachable, no backup disk, an instance that arrived
later. Only the instances that were checked are deleted, one by one, so one arriving during the
cleanup is never removed with its study. Storage pressure never removes anything by itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import storage_area
from .backup.borgmatic import BackupError, Backups
from .config import Settings
from .orthanc import Orthanc, OrthancError
from .sync.outbox import Outbox
from .sync.transport import HQClient, HQRefused, HQUnreachable

log = logging.getLogger(__name__)
HOLDINGS_BATCH = 200


class CleanupError(Exception):
    """Cleanup cannot run at all here, worded for site IT."""


@dataclass
class Instance:
    orthanc_id: str
    sop_uid: str
    md5: str  # of the DICOM file as Orthanc received it
    stored_md5: str  # of the file on disk (the same unless Orthanc compresses its storage)
    path: Path
    size: int


@dataclass
class Verdict:
    study_id: str
    study_uid: str
    study_date: str
    last_update: str
    instances: int
    bytes: int
    removable: bool = False
    reason: str = ""
    removed: int = 0
    _checked: list[Instance] = field(default_factory=list, repr=False)

    def public(self) -> dict:
        return {key: value for key, value in asdict(self).items() if not key.startswith("_")}


def _age_limit(older_than_days: float, now: float) -> str:
    """Orthanc's LastUpdate format (UTC), for a plain string comparison."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now - older_than_days * 86400))


class Cleanup:
    def __init__(self, settings: Settings, orthanc: Orthanc, outbox: Outbox,
                 backups: Backups, hq: HQClient | None) -> None:
        self.settings, self.orthanc, self.outbox = settings, orthanc, outbox
        self.backups, self.hq = backups, hq

    def candidates(self, older_than_days: float, now: float | None = None) -> list[Verdict]:
        """Studies not changed for `older_than_days`, oldest first."""
        limit = _age_limit(older_than_days, time.time() if now is None else now)
        found, since = [], 0
        while True:
            page = self.orthanc.get("/studies", params={"expand": "", "since": since,
                                                        "limit": 500})
            for study in page:
                if study["LastUpdate"] <= limit:
                    tags = study.get("MainDicomTags", {})
                    found.append(Verdict(study["ID"], tags.get("StudyInstanceUID", ""),
                                         tags.get("StudyDate", ""), study["LastUpdate"], 0, 0))
            if len(page) < 500:
                break
            since += len(page)
        return sorted(found, key=lambda verdict: verdict.last_update)

    def _instances(self, study_id: str) -> list[Instance]:
        listed = []
        for item in self.orthanc.get(f"/studies/{study_id}/instances", params={"expand": ""}):
            info = self.orthanc.get(f"/instances/{item['ID']}/attachments/dicom/info")
            uuid = info["Uuid"]
            listed.append(Instance(
                item["ID"], item["MainDicomTags"].get("SOPInstanceUID", ""),
                info["UncompressedMD5"], info["CompressedMD5"],
                storage_area.file_path(self.settings, uuid),
                info["CompressedSize"]))
        return listed

    def judge(self, verdict: Verdict, archive: str) -> Verdict:
        """Decide for one study against one backup archive, cheapest question first (HQ, over
        the network, last)."""
        instances = self._instances(verdict.study_id)
        verdict.instances = len(instances)
        verdict.bytes = sum(instance.size for instance in instances)
        if not instances:
            verdict.reason = "no instances"
            return verdict
        confirmed = self.outbox.confirmations(i.orthanc_id for i in instances)
        unconfirmed = [i for i in instances if i.orthanc_id not in confirmed]
        if unconfirmed:
            verdict.reason = f"{len(unconfirmed)} instance(s) not confirmed by HQ yet"
            return verdict
        changed = [i for i in instances if confirmed[i.orthanc_id] != i.md5]
        if changed:
            verdict.reason = f"{len(changed)} instance(s) differ from what HQ confirmed"
            return verdict
        held = self.backups.held([i.path for i in instances], archive)
        unbacked = [i for i in instances if held.get(i.path) != i.stored_md5]
        if unbacked:
            verdict.reason = (f"the newest backup does not hold {len(unbacked)} instance(s) "
                              "as stored")
            return verdict
        assert self.hq is not None
        for first in range(0, len(instances), HOLDINGS_BATCH):
            batch = instances[first:first + HOLDINGS_BATCH]
            answer = self.hq.holdings([{"sop_uid": i.sop_uid, "original_md5": i.md5}
                                       for i in batch])
            lost = sum(1 for hq_id in answer if not hq_id)
            if lost:
                verdict.reason = f"HQ no longer holds {lost} instance(s): they will be sent again"
                return verdict
        verdict.removable = True
        verdict.reason = "confirmed at HQ, asked again, and held by the newest backup"
        verdict._checked = instances
        return verdict

    def run(self, older_than_days: float, dry_run: bool, now: float | None = None
            ) -> list[Verdict]:
        if self.hq is None:
            raise CleanupError("HQ_URL is not set: no study is confirmed at HQ, none is removed")
        if not self.backups.repositories():
            raise CleanupError("BACKUP_PATH is not set: no backup holds any study, "
                               "none is removed")
        candidates = self.candidates(older_than_days, now)
        if not candidates:
            return []
        try:
            archive = self.backups.newest()
        except BackupError as exc:
            for verdict in candidates:
                verdict.reason = f"kept: {exc}"
            return candidates
        if archive is None:
            for verdict in candidates:
                verdict.reason = "kept: no backup has been made yet"
            return candidates
        unreachable = None
        for verdict in candidates:
            if unreachable:  # the link is down: ask about the rest another time
                verdict.reason = f"not checked: HQ could not be asked again ({unreachable})"
                continue
            try:
                self.judge(verdict, archive)
                if verdict.removable and not dry_run:
                    # Pruning would drop this archive within a day; it is now the backup of a
                    # study that leaves this box, so it is kept out of pruning first.
                    archive = self.backups.keep(archive)
                    self._remove(verdict)
            except HQUnreachable as exc:
                unreachable = str(exc)
                verdict.removable = False
                verdict.reason = f"HQ could not be asked again ({exc})"
            except (HQRefused, BackupError, OrthancError) as exc:
                verdict.removable = False
                verdict.reason = (f"{verdict.removed} of {verdict.instances} instances removed, "
                                  f"then: {exc}" if verdict.removed
                                  else f"could not be checked: {exc}")
        return candidates

    def _remove(self, verdict: Verdict) -> None:
        """Delete exactly the instances checked, each only if it is still the file checked
        (an instance deleted and received again meanwhile has the same ID, not the same file)."""
        for instance in verdict._checked:
            try:
                info = self.orthanc.get(f"/instances/{instance.orthanc_id}/attachments/dicom/info")
            except OrthancError as exc:
                if exc.status == 404:  # already gone is what was wanted
                    continue
                raise
            if (info["Uuid"], info["UncompressedMD5"]) != (instance.path.name, instance.md5):
                verdict.reason += f"; {instance.sop_uid} changed during the cleanup and is kept"
                continue
            self.orthanc.delete(f"/instances/{instance.orthanc_id}")
            verdict.removed += 1
        log.info("removed %d instances of study %s (%d bytes): %s", verdict.removed,
                 verdict.study_uid, verdict.bytes, verdict.reason)
