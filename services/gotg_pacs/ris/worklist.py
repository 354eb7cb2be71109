"""Orders as DICOM Modality Worklist items, in the folder Orthanc's worklists plugin answers from.

Orthanc answers a modality's worklist C-FIND on the appliance's own AE title and port, from one
DICOM file per item (`<name>.wl`). The orders database is the truth; the folder is derived from
it: each item is written atomically (a query never reads half a file), and the whole folder is
made to match the database when the bridge starts, so a crash between the two heals itself.
File names are hashes of the Accession Number, never header values.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .. import durable
from .orders import LISTED, Orders
from .values import Order

log = logging.getLogger(__name__)

FIND_SOP_CLASS = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND


def file_name(accession: str) -> str:
    return hashlib.sha256(accession.encode()).hexdigest()[:32] + ".wl"


def item(order: Order) -> Dataset:
    """The worklist item a modality gets for `order` (PS3.4 K.6, IHE SWF's required keys)."""
    step = Dataset()
    step.Modality = order.modality
    step.ScheduledStationAETitle = order.station_aet
    step.ScheduledProcedureStepStartDate = order.scheduled_date
    step.ScheduledProcedureStepStartTime = order.scheduled_time
    step.ScheduledPerformingPhysicianName = ""
    step.ScheduledProcedureStepDescription = order.description
    step.ScheduledProcedureStepID = order.step_id
    step.ScheduledProcedureStepStatus = "SCHEDULED"
    found = Dataset()
    found.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: any name the RIS sends
    found.AccessionNumber = order.accession
    found.ReferringPhysicianName = order.referring
    found.PatientName = order.patient_name
    found.PatientID = order.patient_id
    found.IssuerOfPatientID = order.issuer
    found.PatientBirthDate = order.birth_date
    found.PatientSex = order.sex
    found.StudyInstanceUID = order.study_uid
    found.RequestedProcedureDescription = order.description
    found.RequestedProcedureID = order.requested_procedure_id
    if order.code[0]:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = order.code
        found.RequestedProcedureCodeSequence = Sequence([code])
        step.ScheduledProtocolCodeSequence = Sequence([code])
    found.ScheduledProcedureStepSequence = Sequence([step])
    found.file_meta = FileMetaDataset()
    found.file_meta.MediaStorageSOPClassUID = FIND_SOP_CLASS
    # Derived from the order: the same order renders the same bytes (match() rewrites none).
    found.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=[json.dumps(asdict(order), sort_keys=True)])
    found.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return found


def rendered(order: Order) -> bytes:
    out = io.BytesIO()
    item(order).save_as(out, enforce_file_format=True)
    return out.getvalue()


def write(folder: Path, order: Order) -> None:
    durable.replace_bytes(folder / file_name(order.accession), rendered(order), mode=0o644)


def remove(folder: Path, accession: str) -> None:
    (folder / file_name(accession)).unlink(missing_ok=True)


def follow(folder: Path, orders: Orders, accessions: list[str]) -> None:
    """Each order's item as the database now says (listed or gone). A failure is logged: the
    folder is matched to the database at the next start."""
    for accession in accessions:
        try:
            # Under the store's lock: the HL7 listener and the MPPS threads may change the same
            # order at once, and the last state read must be the last file written.
            with orders.lock:
                found = orders.get(accession)
                if found is not None and found[0] in LISTED:
                    write(folder, found[1])
                else:
                    remove(folder, accession)
        except OSError as exc:
            log.error("worklist item for %s not written: %s", accession, exc)


def match(folder: Path, scheduled: list[Order]) -> tuple[int, int]:
    """Make the folder hold exactly `scheduled`'s items; (written, removed). An item already
    as it should be is left alone: a start writes (and fsyncs) only what differs."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {file_name(order.accession): order for order in scheduled}
    removed = 0
    for path in folder.glob("*.wl"):
        if path.name not in wanted:
            path.unlink(missing_ok=True)
            removed += 1
    for path in folder.glob(".*.wl.*"):  # a write a crash interrupted
        path.unlink(missing_ok=True)
    written = 0
    for name, order in wanted.items():
        content = rendered(order)
        try:
            if (folder / name).read_bytes() == content:
                continue
        except OSError:
            pass  # missing or unreadable: written again
        durable.replace_bytes(folder / name, content, mode=0o644)
        written += 1
    return written, removed
