"""Patient demographics from the RIS (HL7 ADT^A08/A31 and A40, or an appointment's patient
edited in the RIS) carried into the worklist and into the images, with an audit trail.

An update (A08, A31, an edit) changes a patient's name, birth date or sex under the same Patient
ID. It is applied as it comes: the orders and worklist items of that patient, then every stored
instance of that patient rewritten with the new values, its UIDs kept (IHE Patient Information
Reconciliation: the same images, corrected). A merge (A40: the prior Patient ID is the surviving
one's) moves one patient's images under another's identity: a wrong merge files one person's
images under another's name, so a merge waits for a person (`pacs ris demographics`,
`pacs ris merge SEQ --confirm|--decline`), never applied silently.

Each rewritten instance goes through a durable staging file: written and fsynced before Orthanc's
copy is replaced, put back at the next start if the box lost power between the two, so no
instance is ever only in memory. Orthanc's own index is rebuilt from the files afterwards
(`/patients/{id}/reconstruct`). Every study changed is a line in the audit trail (action
`modify`). The rewritten instances reach HQ with the next sync as new versions of instances it
holds: HQ keeps them as revisions and opens a reconciliation entry (hq/conflicts.py), so HQ's
record changes only when a person there agrees.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from .. import durable
from ..audit import AuditLog
from ..orthanc import Orthanc, OrthancError
from ..sqlite_tx import immediate
from . import worklist
from .orders import Orders
from .values import Change

log = logging.getLogger(__name__)

ORTHANC_ID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")
DICOM_NAMES = {"patient_name": "PatientName", "birth_date": "PatientBirthDate",
               "sex": "PatientSex"}


@dataclass(frozen=True)
class Demographics:
    """A patient as the RIS now knows them (values checked as for an order). None: the source
    did not say, so the value stays as it is (HL7: an empty field changes nothing, `""` clears
    it)."""
    patient_id: str
    issuer: str | None
    patient_name: str | None   # DICOM PN
    birth_date: str | None     # YYYYMMDD, or "" (cleared)
    sex: str | None            # M, F, O, or "" (cleared, unknown)

    def said(self) -> dict[str, str]:
        """The values the source gave (to change), by field."""
        return {name: value for name, value in asdict(self).items()
                if value is not None and name != "patient_id"}


@dataclass(frozen=True)
class PatientChange:
    kind: str                  # "update", "merge", or "reconcile" (a study given its order)
    patient: Demographics      # as it is to be (a merge: the surviving patient)
    prior_id: str = ""         # a merge, a reconciled study: the Patient ID the images have
    study_uid: str = ""        # reconcile: the one study
    accession: str = ""        # reconcile: the order's Accession Number
    orthanc_id: str = ""       # reconcile: that study as Orthanc held it when it was decided


class Unrewritable(Exception):
    """Applied to every instance but some pydicom cannot read: those are left as they were."""

    def __init__(self, count: int, text: str) -> None:
        super().__init__(text)
        self.count = count


class DemographicsQueue:
    """The `demographics` table of the orders database."""

    def __init__(self, orders: Orders) -> None:
        self.orders = orders

    def add(self, changes: list[PatientChange], source: str,
            message: tuple[str, str] | None = None) -> int:
        """Keep these changes durably, in order (an update waits to be applied, a merge for a
        person); how many were kept (0: a message already kept)."""
        now, orders = time.time(), self.orders
        with orders.lock, immediate(orders.db) as db:
            if message and db.execute("SELECT 1 FROM messages WHERE sender = ? AND "
                                      "control_id = ?", message).fetchone():
                return 0
            self.insert(db, changes, source)
            if message:
                db.execute("INSERT INTO messages (sender, control_id, received, orders) "
                           "VALUES (?, ?, ?, 0)", (*message, now))
        return len(changes)

    @staticmethod
    def insert(db: sqlite3.Connection, changes: list[PatientChange], source: str) -> None:
        """The changes, into a transaction the caller holds (an order's, so that an order
        refused keeps none of the patient edits it carried)."""
        for change in changes:
            db.execute(
                "INSERT INTO demographics (kind, patient_id, prior_id, study_uid, accession, "
                "orthanc_id, fields, source, received, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (change.kind, change.patient.patient_id,
                 change.prior_id or change.patient.patient_id, change.study_uid,
                 change.accession, change.orthanc_id, json.dumps(asdict(change.patient)),
                 source, time.time(), "held" if change.kind == "merge" else "waiting"))

    def waiting(self) -> list[tuple[int, PatientChange]]:
        with self.orders.lock:
            rows = self.orders.db.execute(
                "SELECT seq, kind, prior_id, study_uid, accession, orthanc_id, fields "
                "FROM demographics WHERE state = 'waiting' ORDER BY seq").fetchall()
        return [(row["seq"], PatientChange(
            row["kind"], Demographics(**json.loads(row["fields"])),
            row["prior_id"] if row["kind"] != "update" else "", row["study_uid"],
            row["accession"], row["orthanc_id"])) for row in rows]

    def updated_since(self, patient_id: str, seq: int) -> dict[str, str]:
        """What updates applied after change `seq` said of this patient (a merge confirmed
        late must not bring back the name its message carried)."""
        with self.orders.lock:
            rows = self.orders.db.execute(
                "SELECT fields FROM demographics WHERE kind = 'update' AND state = 'applied' "
                "AND patient_id = ? AND seq > ? ORDER BY seq", (patient_id, seq)).fetchall()
        said: dict[str, str] = {}
        for row in rows:
            said.update(Demographics(**json.loads(row["fields"])).said())
        return said

    def decide(self, seq: int, confirm: bool, who: str, note: str) -> None:
        """A person's word on a held merge. KeyError: no such merge waiting for one."""
        with self.orders.lock, immediate(self.orders.db) as db:
            changed = db.execute(
                "UPDATE demographics SET state = ?, decided = ? WHERE seq = ? AND "
                "state = 'held'", ("waiting" if confirm else "declined",
                                   json.dumps({"confirmed": confirm, "by": who, "note": note,
                                               "at": time.time()}), seq)).rowcount
        if not changed:
            raise KeyError(f"no merge {seq} waiting for a decision")

    def applied(self, seq: int, instances: int) -> None:
        with self.orders.lock, immediate(self.orders.db) as db:
            db.execute("UPDATE demographics SET state = 'applied', applied = ?, instances = ?, "
                       "last_error = '' WHERE seq = ?", (time.time(), instances, seq))

    def failed(self, seq: int, error: str) -> None:
        with self.orders.lock, immediate(self.orders.db) as db:
            db.execute("UPDATE demographics SET last_error = ? WHERE seq = ?", (error, seq))

    def counts(self) -> dict[str, int]:
        return self.orders.counts("demographics")

    def listing(self, limit: int = 200) -> list[dict]:
        rows = self.orders.newest("demographics", limit)
        return [{**{name: row[name] for name in ("seq", "kind", "patient_id", "prior_id",
                                                  "study_uid", "accession", "source",
                                                  "received", "state", "applied",
                                                  "instances", "last_error")},
                 "patient": json.loads(row["fields"]),
                 "decided": json.loads(row["decided"]) if row["decided"] else None}
                for row in rows]


def edits(orders: Orders, changes: list[Change]) -> list[PatientChange]:
    """The patients whose name, birth date or sex these orders give otherwise than the orders
    kept here: edits made in the RIS, to carry into the images too."""
    found: dict[str, PatientChange] = {}
    with orders.lock:
        for change in changes:
            new = change.order
            row = orders.db.execute("SELECT fields FROM orders WHERE patient_id = ? AND "
                                    "issuer = ? ORDER BY updated DESC LIMIT 1",
                                    (new.patient_id, new.issuer)).fetchone()
            if row is None or change.action != "schedule":
                continue
            kept = json.loads(row["fields"])
            # An order that leaves a value out says nothing of it: only what it gives counts.
            patient = Demographics(new.patient_id, None, new.patient_name or None,
                                   new.birth_date or None, new.sex or None)
            if any(kept[name] != value for name, value in patient.said().items()):
                found[new.patient_id] = PatientChange("update", patient)
    return list(found.values())


def update_orders(orders: Orders, change: PatientChange) -> list[str]:
    """The orders of the patient as the images have them now (a merge: the prior patient's)
    carry the new identity; the accessions whose worklist items change."""
    patient, old = change.patient, change.prior_id or change.patient.patient_id
    now, moved = time.time(), []
    with orders.lock, immediate(orders.db) as db:
        for row in db.execute("SELECT accession, issuer, fields FROM orders "
                              "WHERE patient_id = ?", (old,)).fetchall():
            fields = {**json.loads(row["fields"]), **patient.said(),
                      "patient_id": patient.patient_id}
            issuer = row["issuer"] if patient.issuer is None else patient.issuer
            fields["issuer"] = issuer
            db.execute("UPDATE orders SET patient_id = ?, issuer = ?, fields = ?, updated = ? "
                       "WHERE accession = ?", (patient.patient_id, issuer,
                                               json.dumps(fields), now, row["accession"]))
            moved.append(row["accession"])
    return moved


def rewrite(source: Path, target: Path, change: PatientChange) -> bool:
    """`source` (one instance) written to `target` with the patient's new identity (and a
    reconciled study's Accession Number), everything else as it was (transfer syntax, pixel
    data, UIDs); False, and nothing written, when it carries them already. A value its
    character set cannot hold moves it to UTF-8. File to file: a large instance is never held
    twice in pacs-ris's memory."""
    ds = pydicom.dcmread(source)
    values = {DICOM_NAMES[name]: value for name, value in change.patient.said().items()
              if name in DICOM_NAMES}
    if change.kind != "update":
        values["PatientID"] = change.patient.patient_id
        if change.patient.issuer:
            values["IssuerOfPatientID"] = change.patient.issuer
    if change.kind == "reconcile":
        values["AccessionNumber"] = change.accession
    if all(str(ds.get(keyword, "") or "") == value for keyword, value in values.items()):
        return False  # already so (a change applied again after a power cut): untouched
    if not all(value.isascii() for value in values.values()) and \
            "ISO_IR 192" not in ds.get("SpecificCharacterSet", ""):
        for element in ds.iterall():  # decoded now, written again in UTF-8
            _ = element.value
        ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(target, enforce_file_format=True)
    return True


class Applier:
    """Applies waiting changes to the orders, the worklist and the images, in order."""

    def __init__(self, orthanc: Orthanc, queue: DemographicsQueue, worklists: Path,
                 staging: Path, audit_file: Path) -> None:
        self.orthanc = orthanc
        self.queue = queue
        self.worklists = worklists
        self.staging = staging
        self.audit = AuditLog(audit_file)

    def resume(self) -> int:
        """Instances staged when the box stopped between removing Orthanc's copy and storing
        the rewritten one: stored now; how many."""
        resumed = 0
        for leftover in sorted(self.staging.glob("*.orig")) if self.staging.exists() else []:
            leftover.unlink()  # a download interrupted: Orthanc still holds that instance
        for staged in sorted(self.staging.glob("*.dcm")) if self.staging.exists() else []:
            self._store(staged)
            staged.unlink()
            resumed += 1
        return resumed

    def apply_waiting(self) -> int:
        done = 0
        self.resume()
        for seq, change in self.queue.waiting():
            if change.kind == "merge":  # confirmed late: what the RIS said since stands
                later = self.queue.updated_since(change.patient.patient_id, seq)
                change = replace(change, patient=replace(change.patient, **later))
            try:
                count = self._apply(change)
            except OrthancError as exc:
                self.queue.failed(seq, str(exc))
                raise
            except Unrewritable as exc:
                self.queue.applied(seq, exc.count)
                self.queue.failed(seq, str(exc))
                continue
            self.queue.applied(seq, count)
            done += 1
        return done

    def _apply(self, change: PatientChange) -> int:
        moved = [] if change.kind == "reconcile" else update_orders(self.queue.orders, change)
        worklist.follow(self.worklists, self.queue.orders, moved)
        old = change.prior_id or change.patient.patient_id
        studies = self._studies(change, old)
        count, patients, unreadable = 0, set(), 0
        for study in studies:
            for instance in self.orthanc.get(f"/studies/{study['ID']}/instances"):
                if not ORTHANC_ID.fullmatch(instance["ID"]):
                    continue
                try:
                    patients.add(self._replace(instance["ID"], change))
                except (InvalidDicomError, ValueError, TypeError, OverflowError) as exc:
                    log.error("instance %s left as it was: pydicom cannot rewrite it (%s)",
                              instance["ID"], exc)
                    unreadable += 1
                    continue
                count += 1
            self.audit.record(
                "modify", "ris", "pacs-ris", kind="study",
                resource=study["MainDicomTags"].get("StudyInstanceUID", ""),
                change=f"demographics {change.kind}", patient=change.patient.patient_id,
                **({"prior_patient": old} if old != change.patient.patient_id else {}),
                **({"order": change.accession} if change.accession else {}))
        for patient in patients:
            self.orthanc.post(f"/patients/{patient}/reconstruct", json={})
        log.info("patient %s: %s applied to %d order(s), %d instance(s) in %d stud%s",
                 change.patient.patient_id, change.kind, len(moved), count, len(studies),
                 "y" if len(studies) == 1 else "ies")
        if unreadable:
            raise Unrewritable(count, f"{unreadable} instance(s) could not be rewritten and "
                                      "were left as they were (see the log)")
        return count

    def _studies(self, change: PatientChange, patient_id: str) -> list[dict]:
        """The studies to rewrite: the patient's, or the one study a person reconciled (by
        Orthanc's ID: the same Study Instance UID may be held under other patients too)."""
        if change.kind == "reconcile":
            if not ORTHANC_ID.fullmatch(change.orthanc_id):
                return []
            try:
                return [self.orthanc.get(f"/studies/{change.orthanc_id}")]
            except OrthancError as exc:
                if exc.status == 404:  # all moved already (applied again after a power cut)
                    return []
                raise
        return [study for study in self.orthanc.post("/tools/find", json={
            "Level": "Study", "Expand": True, "Query": {"PatientID": patient_id}}) or []
            if str(study.get("PatientMainDicomTags", {}).get("PatientID", "")).strip()
            == patient_id]

    def _replace(self, instance: str, change: PatientChange) -> str:
        """Orthanc's copy replaced by the rewritten one; the patient it is now under."""
        self.staging.mkdir(parents=True, exist_ok=True, mode=0o700)
        original, staged = self.staging / f"{instance}.orig", self.staging / f"{instance}.dcm"
        with self.orthanc.request("GET", f"/instances/{instance}/file", stream=True) as got, \
                open(original, "wb") as out:
            for block in got.iter_content(1 << 20):
                out.write(block)
        try:
            before = pydicom.dcmread(original, stop_before_pixels=True,
                                     specific_tags=["PatientID"]).get("PatientID", "")
            writing = staged.with_suffix(".part")
            if not rewrite(original, writing, change):
                return self.orthanc.get(f"/instances/{instance}/patient")["ID"]
            with open(writing, "rb+") as written:
                os.fsync(written.fileno())
            os.replace(writing, staged)
            durable.fsync_dir(self.staging)
        finally:
            original.unlink(missing_ok=True)
        # Orthanc names an instance by its Patient ID and UIDs, and keeps the first copy of a
        # name: under the same Patient ID the old copy must go first (the staged file covers
        # that moment); under another, the new one is stored first.
        if before != change.patient.patient_id:
            stored = self._store(staged)
            if stored["ID"] != instance:  # never remove what the new copy did not replace
                self.orthanc.delete(f"/instances/{instance}")
        else:
            self.orthanc.delete(f"/instances/{instance}")
            stored = self._store(staged)
        staged.unlink()
        return stored["ParentPatient"]

    def _store(self, path: Path) -> dict:
        with open(path, "rb") as content:  # streamed: never the whole file in memory
            return self.orthanc.post("/instances", data=content,
                                     headers={"Content-Type": "application/dicom"})
