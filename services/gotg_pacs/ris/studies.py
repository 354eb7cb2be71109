"""Studies as Orthanc completes them, against the orders: "images available", and the
reconciliation list (DICOM PS3.17 Annex J: a modality that lost its worklist sends studies no
order names).

Orthanc's `/changes` are read from a cursor kept in the orders database. A stable study is
matched once, by Accession Number and Patient ID (`Orders.study_arrived`): its order has its
images and, if no modality reported MPPS, is done and leaves the worklist. Anything else waits
for a person (`pacs ris unmatched`, `pacs ris resolve`); nothing is merged by guesswork.

Orthanc tracks stability in memory: a restart within StableAge of a study's last image writes no
StableStudy change. New studies are therefore noted as arriving, and asked about (IsStable)
until they are stable. If Orthanc's changes go back below the cursor (a restored index), they
are read again from the start: each study is matched only once.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..orthanc import Orthanc, OrthancError
from . import worklist
from .orders import Orders

log = logging.getLogger(__name__)

BATCH = 200
PATIENT_TAGS = ("PatientID", "PatientName", "PatientBirthDate")
NOT_IMAGES = {"SR", "DOC", "KO", "PR"}


class Studies:
    def __init__(self, orthanc: Orthanc, orders: Orders, worklists: Path) -> None:
        self.orthanc = orthanc
        self.orders = orders
        self.worklists = worklists

    def step(self) -> bool:
        """Read one batch of changes and act on it; True when caught up."""
        cursor = self.orders.changes_cursor()
        answer = self.orthanc.get("/changes", params={"since": cursor, "limit": BATCH})
        if answer["Last"] < cursor:
            log.warning("Orthanc's changes end at %d, before %d: read again from the start",
                        answer["Last"], cursor)
            self.orders.follow_changes(0, [], [])
            return False
        new, stable = [], []
        for change in answer["Changes"]:
            if change["ChangeType"] == "NewStudy":
                new.append(change["ID"])
            elif change["ChangeType"] == "StableStudy":
                self._stable(change["ID"])
                stable.append(change["ID"])
        self.orders.follow_changes(max(answer["Last"], cursor), new, stable)
        return bool(answer["Done"])

    def check_stability(self) -> int:
        """Studies noted as arriving that Orthanc now holds complete (a StableStudy change
        an Orthanc restart swallowed); how many."""
        done = []
        for study in self.orders.arriving():
            try:
                if self.orthanc.get(f"/studies/{study}").get("IsStable"):
                    self._stable(study)
                    done.append(study)
            except OrthancError as exc:
                if exc.status != 404:
                    raise
                done.append(study)  # deleted since: nothing to match
        if done:
            self.orders.follow_changes(self.orders.changes_cursor(), [], done)
        return len(done)

    def _stable(self, study: str) -> None:
        try:
            found = self.orthanc.get(f"/studies/{study}")
        except OrthancError as exc:
            if exc.status == 404:  # deleted since
                return
            raise
        main, patient = found.get("MainDicomTags", {}), found.get("PatientMainDicomTags", {})
        tags = {"AccessionNumber": str(main.get("AccessionNumber", "")).strip(),
                "StudyDate": str(main.get("StudyDate", "")),
                **{name: str(patient.get(name, "")).strip() for name in PATIENT_TAGS}}
        uid = str(main.get("StudyInstanceUID", ""))
        matched, moved = self.orders.study_arrived(uid, study, tags, self._performed(study))
        worklist.follow(self.worklists, self.orders, moved)
        if matched:
            log.info("study %s: images available for order %s", uid, matched)
        else:
            log.warning("study %s (accession %r) matches no order: on the reconciliation list",
                        uid, tags["AccessionNumber"])


    def _performed(self, study: str) -> dict:
        """The study's counts as billed: its image series and images, and their modalities
        (reports, key images and presentation states are not images)."""
        series = [found for found in self.orthanc.get(f"/studies/{study}/series")
                  if found.get("MainDicomTags", {}).get("Modality") not in NOT_IMAGES]
        return {"series": len(series),
                "images": sum(len(found.get("Instances", [])) for found in series),
                "modalities": sorted({str(found["MainDicomTags"].get("Modality", ""))
                                      for found in series} - {""})}


async def follow(studies: Studies, every: float = 5.0, stability_every: float = 60.0) -> None:
    """Keep up with Orthanc until cancelled; Orthanc down only delays it."""
    checked = 0.0
    loop = asyncio.get_running_loop()
    while True:
        caught_up = True
        try:
            caught_up = await asyncio.to_thread(studies.step)
            if loop.time() - checked > stability_every:
                await asyncio.to_thread(studies.check_stability)
                checked = loop.time()
        except OrthancError as exc:
            log.warning("Orthanc's changes not read (%s): again in %.0f s", exc, every)
        await asyncio.sleep(0 if not caught_up else every)
