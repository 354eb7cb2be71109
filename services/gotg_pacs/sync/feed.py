"""Orthanc's `/changes` feed into the outbox, from a cursor that survives anything.

The feed is read in batches after the outbox's cursor; each batch is resolved through the REST API
(which study an instance belongs to, its size and SOP Instance UID) and then written to the outbox
together with the new cursor in one transaction. A crash before that commit means the batch is
read again; after it, never. No full rescans: the archive is walked only through its changes.

If Orthanc's index went back in time (a power cut rolled back its last transactions, or it was
restored from a backup), new changes reuse numbers we already passed. The feed notices (the
changes end before our cursor, or another change sits under the cursor's number) and starts over
from change 0: re-reading costs only time, the outbox ignores what it already holds, and nothing
is skipped.
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

    def _went_back(self, answer: dict, cursor: int) -> bool:
        """Did Orthanc's index go back in time below our cursor?

        Either its changes now end before the cursor, or the change it shows under the cursor's
        number is not the one we recorded there (new changes reused the numbers: a power cut
        rolled the index back and images arrived before we looked). A missing change under that
        number is no sign: Orthanc drops the changes of deleted resources.
        """
        if answer["Last"] < cursor:
            return True
        changes = answer["Changes"]
        if cursor and changes and changes[0]["Seq"] == cursor and self.outbox.cursor_change:
            return f"{changes[0]['ChangeType']} {changes[0]['ID']}" != self.outbox.cursor_change
        return False

    def step(self) -> bool:
        """Read and record one batch; True when the feed is caught up."""
        cursor = self.outbox.cursor
        # From one before the cursor: the cursor's own change comes back as a check.
        answer = self.client.get("/changes", params={"since": max(0, cursor - 1),
                                                     "limit": BATCH})
        if self._went_back(answer, cursor):
            log.warning("Orthanc's index went back in time (its changes end at %d, our cursor "
                        "is %d): reading its changes again from the start", answer["Last"],
                        cursor)
            self.outbox.restart_feed()
            return False
        changes = [change for change in answer["Changes"] if change["Seq"] > cursor]
        instances, stable = [], []
        for change in changes:
            kind = change["ChangeType"]
            if kind == "NewInstance":
                item = self._instance(change)
                if item:
                    instances.append(item)
            elif kind == "StableStudy":
                stable.append(change["ID"])
        if changes:
            last = changes[-1]
            self.outbox.record(instances, stable, last["Seq"],
                               f"{last['ChangeType']} {last['ID']}")
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
