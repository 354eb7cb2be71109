"""Final reports from the RIS (HL7 ORU^R01 or its REST API) put beside the images they report on.

A report is kept on disk first (the orders database, `reports`), then attached to its study in
Orthanc as DICOM: a Basic Text SR holding the text, and an Encapsulated PDF when the RIS sent
one. From there it is in every viewer that reads the study, and it goes to HQ like any image.

The same report sent twice (a lost ACK, a RIS re-reading its feed) is kept and stored once: it is
known by a digest of what it says, and its DICOM UIDs are derived from that digest. A corrected
report is another report: the earlier one stays (what a clinician was told is never rewritten)
and the new SR names it as its predecessor.

A report waits until its study is here (reports often arrive before the images are stable, or
for studies still on a modality). It is attached only to the one study that carries its
Accession Number and, when the report names one, the same Patient ID: a report is never put
under another patient's images. Anything else waits, with the reason shown in
`pacs ris reports`, for the study to arrive or for a person to put the RIS right.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from .. import __version__
from ..orthanc import Orthanc
from ..sqlite_tx import immediate
from . import values
from .orders import Orders
from .values import Rejected

log = logging.getLogger(__name__)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
UID_ROOT = uuid.UUID("0b8e5a0e-7d1f-4a2b-9c57-3e4f6a9d2c81")  # names a report's DICOM UIDs
MAX_TEXT = 1 << 20        # characters: a report is a few thousand
MAX_PDF = 16 << 20        # bytes
STATUSES = ("final", "corrected")
# Where a report goes in its study: series numbers no modality uses for images.
SR_SERIES, PDF_SERIES = 9001, 9002


@dataclass(frozen=True)
class Report:
    accession: str
    patient_id: str            # "" when the source does not say (then the accession decides)
    status: str                # final or corrected
    text: str
    author: str                # DICOM PN, "" when unknown
    signed_date: str           # YYYYMMDD
    signed_time: str           # HHMMSS
    title: str = ""            # the procedure, as the RIS names it
    pdf: bytes = b""

    @property
    def key(self) -> str:
        """What the report says, as a digest: the same report sent again has the same key."""
        fields = asdict(self)
        fields["pdf"] = hashlib.sha256(self.pdf).hexdigest()
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def checked_text(value: str, where: str) -> str:
    """Report text as DICOM's UT holds it: lines kept, other control characters refused."""
    value = value.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    if len(value) > MAX_TEXT:
        raise Rejected(f"{len(value)} characters of report: at most {MAX_TEXT}", where)
    if any((ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) < 0xA0 for c in value):
        raise Rejected("a control character in the report text", where)
    return value


def checked_pdf(encoded: str, where: str) -> bytes:
    try:
        pdf = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected("not base64", where) from None
    if len(pdf) > MAX_PDF:
        raise Rejected(f"a PDF of {len(pdf)} bytes: at most {MAX_PDF}", where)
    if not pdf.startswith(b"%PDF-"):
        raise Rejected("not a PDF document (no %PDF- header)", where)
    return pdf


def report(*, accession: str, patient_id: str, status: str, text: str, author: str,
           signed: tuple[str, str], title: str = "", pdf: bytes = b"") -> Report:
    """A Report from values each source has read, with the checks both sources share."""
    if status not in STATUSES:
        raise Rejected(f"{status!r} is not a final or corrected report", "status")
    if not text and not pdf:
        raise Rejected("a report with neither text nor a PDF", "text")
    return Report(accession=values.text(accession, 16, "Accession Number", required=True),
                  patient_id=values.text(patient_id, 64, "Patient ID"), status=status,
                  text=text, author=author, signed_date=signed[0], signed_time=signed[1],
                  title=values.text(title, 64, "title"), pdf=pdf)


# --- as DICOM -------------------------------------------------------------------------------

def _uid(key: str, what: str) -> str:
    return f"2.25.{uuid.uuid5(UID_ROOT, f'{key}/{what}').int}"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _common(report: Report, study: dict, sop_class: str, what: str, series: int,
            modality: str) -> Dataset:
    """What both documents share: the study's patient and study attributes, as Orthanc holds
    them, so the document lands in that very study."""
    main, patient = study.get("MainDicomTags", {}), study.get("PatientMainDicomTags", {})
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(report.key, what)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    for name in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, name, str(patient.get(name, "")))
    for name in ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                 "ReferringPhysicianName", "StudyDescription"):
        setattr(ds, name, str(main.get(name, "")))
    ds.Modality, ds.SeriesNumber = modality, series
    ds.SeriesInstanceUID = _uid(report.key, f"{what}-series")
    ds.SeriesDescription = f"Report ({report.status})"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = report.signed_date, report.signed_time
    ds.InstanceCreationDate, ds.InstanceCreationTime = report.signed_date, report.signed_time
    ds.Manufacturer = "GOTG PACS"
    ds.SoftwareVersions = __version__
    return ds


def text_sr(report: Report, study: dict, predecessors: list[dict]) -> Dataset:
    """A Basic Text SR: the report's text under "Findings", its author as the observer."""
    ds = _common(report, study, BASIC_TEXT_SR, "sr", SR_SERIES, "SR")
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED" if report.author else "UNVERIFIED"
    if report.author:
        observer = Dataset()
        observer.VerifyingObserverName = report.author
        observer.VerifyingOrganization = "RIS"
        observer.VerificationDateTime = report.signed_date + report.signed_time
        observer.VerifyingObserverIdentificationCodeSequence = Sequence()
        ds.VerifyingObserverSequence = Sequence([observer])
    if predecessors:
        ds.PredecessorDocumentsSequence = Sequence([_reference(ds.StudyInstanceUID,
                                                               predecessors)])
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN",
                                                 "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    items = []
    if report.author:
        person = Dataset()
        person.RelationshipType, person.ValueType = "HAS OBS CONTEXT", "PNAME"
        person.ConceptNameCodeSequence = Sequence([_code("121008", "DCM",
                                                         "Person Observer Name")])
        person.PersonName = report.author
        items.append(person)
    if report.text:
        finding = Dataset()
        finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
        finding.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
        finding.TextValue = report.text
        items.append(finding)
    ds.ContentSequence = Sequence(items)
    return ds


def _reference(study_uid: str, documents: list[dict]) -> Dataset:
    study = Dataset()
    study.StudyInstanceUID = study_uid
    series = []
    for document in documents:
        item, instance = Dataset(), Dataset()
        instance.ReferencedSOPClassUID = document["class"]
        instance.ReferencedSOPInstanceUID = document["sop"]
        item.SeriesInstanceUID = document["series"]
        item.ReferencedSOPSequence = Sequence([instance])
        series.append(item)
    study.ReferencedSeriesSequence = Sequence(series)
    return study


def encapsulated_pdf(report: Report, study: dict) -> Dataset:
    ds = _common(report, study, ENCAPSULATED_PDF, "pdf", PDF_SERIES, "DOC")
    ds.ConversionType = "WSD"  # workstation: the RIS made it
    ds.BurnedInAnnotation = "YES"  # a report names its patient
    ds.DocumentTitle = report.title or "Report"
    ds.ConceptNameCodeSequence = Sequence()
    ds.AcquisitionDateTime = ""
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(report.pdf)
    ds.EncapsulatedDocument = report.pdf + (b"\0" if len(report.pdf) % 2 else b"")
    return ds


def as_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# --- kept until attached ------------------------------------------------------------------

class ReportQueue:
    """The `reports` table of the orders database (one store, one lock, one backup)."""

    def __init__(self, orders: Orders) -> None:
        self.orders = orders

    def add(self, found: list[Report], source: str,
            message: tuple[str, str] | None = None) -> int:
        """Keep these reports durably (each once, however often sent); how many were new."""
        now, orders = time.time(), self.orders
        with orders.lock, immediate(orders.db) as db:
            if message and db.execute("SELECT 1 FROM messages WHERE sender = ? AND "
                                      "control_id = ?", message).fetchone():
                return 0
            new = 0
            for one in found:
                fields = {**asdict(one), "pdf": len(one.pdf)}
                new += db.execute(
                    "INSERT OR IGNORE INTO reports (key, accession, fields, pdf, source, "
                    "received) VALUES (?, ?, ?, ?, ?, ?)",
                    (one.key, one.accession, json.dumps(fields), one.pdf or None, source,
                     now)).rowcount
            if message:
                db.execute("INSERT INTO messages (sender, control_id, received, orders) "
                           "VALUES (?, ?, ?, 0)", (*message, now))
        return new

    def waiting(self) -> list[tuple[int, str, str, str]]:
        """(seq, accession, patient_id, why it waits) of each waiting report: what finding
        its study needs, without its text or PDF."""
        with self.orders.lock:
            rows = self.orders.db.execute(
                "SELECT seq, accession, fields, last_error FROM reports WHERE state = 'waiting' "
                "ORDER BY seq").fetchall()
        return [(row["seq"], row["accession"], json.loads(row["fields"])["patient_id"],
                 row["last_error"]) for row in rows]

    def report(self, seq: int) -> Report:
        """One report whole, its PDF included (read only once its study is here)."""
        with self.orders.lock:
            row = self.orders.db.execute("SELECT fields, pdf FROM reports WHERE seq = ?",
                                         (seq,)).fetchone()
        return Report(**{**json.loads(row["fields"]), "pdf": bytes(row["pdf"] or b"")})

    def attached_before(self, accession: str) -> list[dict]:
        """The documents earlier reports of this accession became (a correction's
        predecessors)."""
        with self.orders.lock:
            rows = self.orders.db.execute(
                "SELECT documents FROM reports WHERE accession = ? AND state = 'attached' "
                "ORDER BY seq", (accession,)).fetchall()
        return [doc for row in rows for doc in json.loads(row["documents"])
                if doc["class"] == BASIC_TEXT_SR]

    def attached(self, seq: int, documents: list[dict]) -> None:
        """In Orthanc: the PDF's bytes are Orthanc's to keep from now on."""
        with self.orders.lock, immediate(self.orders.db) as db:
            db.execute("UPDATE reports SET state = 'attached', documents = ?, pdf = NULL, "
                       "last_error = '', attached = ? WHERE seq = ?",
                       (json.dumps(documents), time.time(), seq))

    def waits(self, seq: int, reason: str) -> None:
        """Why it still waits (written only when the reason changes: an SD card wears with
        every write, and reports may wait for weeks)."""
        with self.orders.lock, immediate(self.orders.db) as db:
            db.execute("UPDATE reports SET last_error = ? WHERE seq = ? AND last_error != ?",
                       (reason, seq, reason))

    def listing(self, limit: int = 200) -> list[dict]:
        rows = self.orders.newest("reports", limit)
        listed = []
        for row in rows:
            fields = json.loads(row["fields"])
            listed.append({**{name: row[name] for name in (
                "seq", "accession", "source", "received", "state", "last_error", "attached")},
                "status": fields["status"], "author": fields["author"],
                "signed": fields["signed_date"] + fields["signed_time"],
                "pdf_bytes": fields["pdf"], "documents": json.loads(row["documents"])})
        return listed

    def counts(self) -> dict[str, int]:
        return self.orders.counts("reports")


# --- attached to the study ----------------------------------------------------------------

class Attacher:
    def __init__(self, orthanc: Orthanc, queue: ReportQueue) -> None:
        self.orthanc = orthanc
        self.queue = queue

    def attach_waiting(self) -> int:
        """Every waiting report whose study is here, into it; how many."""
        done = 0
        for seq, accession, patient_id, said in self.queue.waiting():
            study, reason = self._study(accession, patient_id)
            if study is None:
                if reason != said:
                    self.queue.waits(seq, reason)
                continue
            one = self.queue.report(seq)
            try:
                documents = [text_sr(one, study, self.queue.attached_before(one.accession))]
                if one.pdf:
                    documents.append(encapsulated_pdf(one, study))
                encoded = [as_bytes(document) for document in documents]
            except (ValueError, TypeError, OverflowError) as exc:  # a study value pydicom refuses
                self.queue.waits(seq, f"not made into DICOM: {exc}"[:300])
                continue
            for content in encoded:
                self.orthanc.post("/instances", data=content,
                                  headers={"Content-Type": "application/dicom"})
            self.queue.attached(seq, [{"class": d.SOPClassUID, "sop": d.SOPInstanceUID,
                                       "series": d.SeriesInstanceUID} for d in documents])
            log.info("report for %s (%s) attached to study %s", one.accession, one.status,
                     study["MainDicomTags"].get("StudyInstanceUID"))
            done += 1
        return done

    def _study(self, accession: str, patient_id: str) -> tuple[dict | None, str]:
        """The one study a report belongs to, or None and why it waits."""
        found = self.orthanc.post("/tools/find", json={
            "Level": "Study", "Expand": True, "Query": {"AccessionNumber": accession}})
        # Orthanc's find reads * and ? as wildcards: only the exact accession counts.
        found = [study for study in found or []
                 if str(study.get("MainDicomTags", {}).get("AccessionNumber", "")).strip()
                 == accession]
        if not found:
            return None, "no study with this Accession Number here yet"
        if patient_id:
            theirs = {str(s.get("PatientMainDicomTags", {}).get("PatientID", "")).strip()
                      for s in found}
            found = [s for s in found if str(s.get("PatientMainDicomTags", {})
                                             .get("PatientID", "")).strip() == patient_id]
            if not found:
                return None, (f"the study with this Accession Number belongs to Patient ID "
                              f"{', '.join(sorted(theirs))[:80]}, the report names "
                              f"{patient_id}: not attached")
        if len(found) > 1:
            return None, f"{len(found)} studies carry this Accession Number: not attached"
        return found[0], ""


