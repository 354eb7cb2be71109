"""An order as the worklist holds it, and the checks every value passes on its way in, from
HL7 or from the RIS's REST API alike.

A value goes into a DICOM worklist item only if it fits the attribute's value representation as
sent. Nothing is cut short (a shortened Patient ID or Accession Number could attach images to
someone else), no control character and no backslash (DICOM's value separator) gets through,
dates must be real dates.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

UID_ROOT = uuid.UUID("6f0c6a57-2d5b-4c53-9a55-4f2b0c4e7a10")  # names a derived Study UID


class Rejected(Exception):
    """Refused: an HL7 message (answered AR) or a RIS appointment (left off the worklist),
    nothing of it kept. `where`: the field at fault."""

    def __init__(self, text: str, where: str = "") -> None:
        super().__init__(f"{where}: {text}" if where else text)
        self.text = text
        self.where = where


@dataclass(frozen=True)
class Order:
    accession: str
    patient_id: str
    issuer: str
    patient_name: str          # DICOM PN: family^given^middle
    birth_date: str            # YYYYMMDD or ""
    sex: str                   # M, F, O or ""
    modality: str
    station_aet: str
    scheduled_date: str        # YYYYMMDD
    scheduled_time: str        # HHMMSS
    study_uid: str
    requested_procedure_id: str
    step_id: str
    description: str
    code: tuple[str, str, str]  # (value, scheme, meaning), or three empty strings
    referring: str             # DICOM PN
    placer: str = ""           # ORC-2, the RIS's own order number (status goes back by it)


@dataclass(frozen=True)
class Change:
    action: str                # "schedule", "cancel", or "complete" (the RIS says it is done)
    order: Order


def derived_study_uid(site: str, accession: str) -> str:
    """The Study Instance UID of an order that names none: the same for the same order sent
    again, another at another site."""
    return f"2.25.{uuid.uuid5(UID_ROOT, f'{site}/{accession}').int}"


def text(value: str, most: int, where: str, required: bool = False) -> str:
    if required and not value:
        raise Rejected("missing", where)
    if len(value) > most:
        raise Rejected(f"{len(value)} characters, DICOM holds at most {most} (never cut short)",
                       where)
    if "\\" in value or any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in value):
        raise Rejected("a backslash or a control character", where)
    return value


def person_name(parts: tuple[str, ...], where: str, required: bool = False) -> str:
    """A DICOM PN from its components (family, given, middle, prefix, suffix)."""
    if any("^" in part or "=" in part for part in parts):
        raise Rejected("a name component holding ^ or =", where)
    return text("^".join(parts).rstrip("^"), 64, where, required=required)


def date(value: str, where: str) -> str:
    if not value:
        return ""
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise Rejected(f"{value[:20]!r} is not a date (YYYYMMDD)", where) from None
    return value


def sex(value: str) -> str:
    value = value.upper()
    return value if value in ("M", "F", "O") else ""  # U, A, N...: unknown to DICOM's CS


def modality(value: str, where: str) -> str:
    value = value.upper()
    if value and not re.fullmatch(r"[A-Z0-9_ ]{1,16}", value):
        raise Rejected(f"{value[:30]!r} is not a DICOM modality", where)
    return value


def ae_title(value: str, where: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9_.\- ]{1,16}", value):
        raise Rejected(f"{value[:30]!r} is not a DICOM AE title", where)
    return value


def dicom_uid(value: str, where: str) -> str:
    if value and (len(value) > 64 or not re.fullmatch(r"[0-9]+(\.[0-9]+)*", value)):
        raise Rejected(f"{value[:70]!r} is not a DICOM UID", where)
    return value
