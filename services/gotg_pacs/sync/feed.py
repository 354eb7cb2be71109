"""Orthanc's `/changes` feed into the outbox, from a cursor that survives anything.

The feed is read in batches after the outbox's cursor; each batch is resolved through the REST API
(which study an instance belongs to, its size and SOP Instance UID) and then written to the outbox
together with the new cursor in one transaction. A crash before that commit means the batch is
read again; after it, never. No full rescans: the archive is walked only through its changes.

If Orthanc's index went back in time (a power cut rolled back its last transactions, or it was
restored from a backup), its last change number is below our cursor and new changes would reuse
numbers we already passed. The feed then starts over from change 0: re-reading costs only time,
the outbox ignores what it already holds, and nothing is skipped.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from ..orthanc import Orthanc, OrthancError
from .outbox import NewInstance, Outbox

log = logging.getLogger(__name__)

BATCH = 200


def _change_time(change: dict) -> float:
    return datetime.strptime(change["Date"], "%Y%m%dT%H%M%S").replace(tzinfo=UTC).timestamp()


class Feed:
    def __init__(self, client: Orthanc, outbox: Outbox) -> None:
        self.client = client
        self.outbox = outbox
        self._series_study: dict[str, str] = {}  # series ID -> study ID (never changes)
        self._study_uid: dict[str, str] = {}

    def _study_of(self, series_id: str) -> tuple[str, str]:
        if series_id not in self._series_study:
            self._series_study[series_id] = self.client.get(f"/series/{series_id}")["ParentStudy"]
        study_id = self._series_study[series_id]
        if study_id not in self._study_uid:
            tags = self.client.get(f"/studies/{study_id}")["MainDicomTags"]
            self._study_uid[study_id] = tags.get("StudyInstanceUID", "")
        return study_id, self._study_uid[study_id]

    def _instance(self, change: dict) -> NewInstance | None:
        try:
            info = self.client.get(f"/instances/{change['ID']}")
            study_id, study_uid = self._study_of(info["ParentSeries"])
        except OrthancError as exc:
            if exc.status == 404:  # deleted since (Orthanc then drops its changes too)
                return None
            raise
        return NewInstance(orthanc_id=change["ID"], study_id=study_id, study_uid=study_uid,
                           sop_uid=info["MainDicomTags"].get("SOPInstanceUID", ""),
                           size=int(info.get("FileSize", 0)), change_seq=change["Seq"],
                           changed_at=_change_time(change))

    def step(self) -> bool:
        """Read and record one batch; True when the feed is caught up."""
        cursor = self.outbox.cursor
        answer = self.client.get("/changes", params={"since": cursor, "limit": BATCH})
        if answer["Last"] < cursor:
            log.warning("Orthanc's changes end at %d, before our cursor %d: its index went back "
                        "in time; reading its changes again from the start", answer["Last"], cursor)
            self.outbox.restart_feed()
            return False
        instances, stable = [], []
        for change in answer["Changes"]:
            kind = change["ChangeType"]
            if kind == "NewInstance":
                item = self._instance(change)
                if item:
                    instances.append(item)
            elif kind == "StableStudy":
                stable.append(change["ID"])
        new_cursor = answer["Changes"][-1]["Seq"] if answer["Changes"] else cursor
        if new_cursor != cursor:
            self.outbox.record(instances, stable, new_cursor)
        return bool(answer["Done"])

    def check_stability(self) -> int:
        """Ask Orthanc about studies still arriving; mark those it now holds complete.

        Orthanc tracks stability in memory: if it restarts within StableAge of a study's last
        image, no StableStudy change is ever written and the study would wait forever.
        """
        done = []
        for study_id in self.outbox.arriving_studies():
            try:
                if self.client.get(f"/studies/{study_id}").get("IsStable"):
                    done.append(study_id)
            except OrthancError as exc:
                if exc.status != 404:
                    raise
        if done:
            self.outbox.mark_stable(done)
        return len(done)
