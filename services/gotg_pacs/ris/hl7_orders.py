"""HL7 v2 orders (ORM^O01, OMI^O23) read into `Order`s, or refused with the reason.

Everything in a message is untrusted: a value goes into a DICOM worklist item only if it fits
the attribute's value representation as sent. Nothing is cut short (a shortened Patient ID or
Accession Number could attach images to someone else), no control character and no backslash
(DICOM's value separator) gets through, dates must be real dates. A message refused is refused
whole: none of its orders is kept, and the sender gets the reason in its acknowledgement.

Where each value is read from (IHE Scheduled Workflow, and what RIS in the field send):
  Patient ID, issuer      PID-3.1, PID-3.4          Patient name     PID-5 (family^given^middle)
  Birth date, sex         PID-7 (first 8), PID-8    Referring        PV1-8, else OBR-16
  Order control           ORC-1: NW/XO/SC schedule (again), CA/DC/OC/OD cancel
  Accession Number        IPC-1, else OBR-18, else ORC-3 (filler order number)
  Requested Procedure ID  IPC-2, else OBR-19, else the Accession Number
  Study Instance UID      IPC-3, else ZDS-1, else one derived from site and accession
  Procedure step ID       IPC-4, else OBR-20, else the Requested Procedure ID
  Modality                IPC-5, else OBR-24
  Station AE title        IPC-9 (empty: any station)
  Procedure code          OBR-4 (code^text^scheme)
  Scheduled start         TQ1-7, else ORC-7.4, else OBR-7, else the message's time (MSH-7)
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime

import hl7

ACCEPTED = {("ORM", "O01"), ("OMI", "O23")}
SCHEDULE = {"NW", "XO", "SC"}          # new, changed, status changed: (still) to be done
CANCEL = {"CA", "DC", "OC", "OD"}      # cancelled or discontinued: off the worklist
# MSH-18 as HL7 names them; an empty MSH-18 means ASCII (HL7 2.5.1, 2.15.9.18).
CHARSETS = {"": "ascii", "ASCII": "ascii", "UNICODE UTF-8": "utf-8", "UNICODE": "utf-8",
            "8859/1": "latin-1", "8859/15": "iso8859-15"}
UID_ROOT = uuid.UUID("6f0c6a57-2d5b-4c53-9a55-4f2b0c4e7a10")  # names a derived Study UID
MAX_MESSAGE = 1 << 20  # bytes; an order is a few hundred


class Rejected(Exception):
    """The message is refused (HL7 AR): nothing of it is kept. `where`: the field at fault."""

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
    action: str                # "schedule" or "cancel"
    order: Order


@dataclass
class Received:
    """One message as read: who sent it, its control ID (a resent message is known by it),
    and the orders it changes, in order."""
    message: hl7.Message
    sender: str
    control_id: str
    changes: list[Change] = field(default_factory=list)


# --- decoding -----------------------------------------------------------------------------

def decode(raw: bytes) -> str:
    """The message's text in the character set MSH-18 names; Rejected for any other."""
    if len(raw) > MAX_MESSAGE:
        raise Rejected(f"a message of {len(raw)} bytes: at most {MAX_MESSAGE}")
    first = raw.split(b"\r", 1)[0].decode("latin-1")  # MSH itself is ASCII in every charset
    if not first.startswith("MSH") or len(first) < 8:
        raise Rejected("not an HL7 v2 message (it must start with MSH and its separators)")
    fields = first.split(first[3])
    named = fields[17].split(first[4])[0].strip().upper() if len(fields) > 17 else ""
    charset = CHARSETS.get(named)
    if charset is None:
        raise Rejected(f"character set {named!r} is not one this bridge reads "
                       f"({', '.join(name or 'empty' for name in CHARSETS)})", "MSH-18")
    try:
        return raw.decode(charset)
    except UnicodeDecodeError as exc:
        raise Rejected(f"bytes that are not {named or 'ASCII'} at {exc.start}", "MSH-18") \
            from None


def parse(raw: bytes, site: str) -> Received:
    """The message's orders, every value checked; Rejected, with the reason, for anything
    this bridge will not put on a worklist."""
    text = decode(raw).replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    try:
        message = hl7.parse(text)
        msh = message.segments("MSH")[0]
        kind = (field_value(msh, 9, component=1).upper(), field_value(msh, 9, component=2).upper())
        control_id = field_value(msh, 10)
        sender = f"{field_value(msh, 3)}^{field_value(msh, 4)}"
        sent_at = field_value(msh, 7)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - the parser's many ways of saying "not HL7"
        raise Rejected(f"not a readable HL7 v2 message ({exc.__class__.__name__})") from None
    if not control_id:
        raise Rejected("no message control ID", "MSH-10")
    if kind not in ACCEPTED:
        raise Rejected(f"{'^'.join(kind)} is not an order this bridge takes "
                       "(ORM^O01, OMI^O23)", "MSH-9")
    received = Received(message, sender, control_id)
    try:
        groups = _groups(message)
        if not groups:
            raise Rejected("no order in the message (ORC)", "ORC")
        patient = _patient(message)
        for group in groups:
            received.changes.append(_change(group, patient, sent_at, site))
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a structure the parser built oddly
        raise Rejected(f"a segment this bridge cannot read ({exc.__class__.__name__})") \
            from None
    return received


# --- reading the segments -----------------------------------------------------------------

def field_value(segment, number: int, component: int = 1, repetition: int = 1) -> str:
    """One component of one field, unescaped; "" when the segment (or the field) is absent."""
    if segment is None:
        return ""
    try:
        value = segment.extract_field(1, number, repetition, component)
    except (IndexError, KeyError):
        return ""
    return str(value).strip()


def _groups(message) -> list[dict]:
    """Each order group: its ORC and the TQ1, OBR and first IPC that follow it."""
    groups: list[dict] = []
    for segment in message:
        name = str(segment[0]).upper()
        if name == "ORC":
            groups.append({"ORC": segment})
        elif name in ("TQ1", "OBR", "IPC") and groups and name not in groups[-1]:
            groups[-1][name] = segment
    return groups


def _patient(message) -> dict[str, str]:
    try:
        pid = message.segments("PID")[0]
    except KeyError:
        raise Rejected("no patient (PID)", "PID") from None
    try:
        pv1 = message.segments("PV1")[0]
    except KeyError:
        pv1 = None
    return {"patient_id": _text(field_value(pid, 3), 64, "PID-3.1", required=True),
            "issuer": _text(field_value(pid, 3, component=4), 64, "PID-3.4"),
            "patient_name": _person(pid, 5, "PID-5", required=True),
            "birth_date": _date(field_value(pid, 7)[:8], "PID-7"),
            "sex": _sex(field_value(pid, 8)),
            "referring": _person(pv1, 8, "PV1-8", doctor=True)}


def _change(group: dict, patient: dict[str, str], sent_at: str, site: str) -> Change:
    orc, obr, ipc, tq1 = (group.get(name) for name in ("ORC", "OBR", "IPC", "TQ1"))
    control = field_value(orc, 1).upper()
    if control in SCHEDULE:
        action = "schedule"
    elif control in CANCEL:
        action = "cancel"
    else:
        raise Rejected(f"order control {control or 'empty'!r} is not handled "
                       f"({', '.join(sorted(SCHEDULE | CANCEL))})", "ORC-1")

    def first(*found: tuple[object, int]) -> str:
        return next((value for segment, number in found
                     if (value := field_value(segment, number))), "")

    accession = _text(first((ipc, 1), (obr, 18), (orc, 3)), 16, "Accession Number",
                      required=True)
    requested = _text(first((ipc, 2), (obr, 19)) or accession, 16, "OBR-19")
    study_uid = first((ipc, 3))
    if not study_uid:
        study_uid = f"2.25.{uuid.uuid5(UID_ROOT, f'{site}/{accession}').int}"
    if len(study_uid) > 64 or not re.fullmatch(r"[0-9]+(\.[0-9]+)*", study_uid):
        raise Rejected(f"{study_uid[:70]!r} is not a DICOM UID", "IPC-3")
    when = first((tq1, 7)) or field_value(orc, 7, component=4) or first((obr, 7)) or sent_at
    date, time = _when(when)
    referring = patient["referring"] or _person(obr, 16, "OBR-16", doctor=True)
    order = Order(
        accession=accession, patient_id=patient["patient_id"], issuer=patient["issuer"],
        patient_name=patient["patient_name"], birth_date=patient["birth_date"],
        sex=patient["sex"],
        modality=_code_string(first((ipc, 5), (obr, 24)), "OBR-24"),
        station_aet=_aet(field_value(ipc, 9)),
        scheduled_date=date, scheduled_time=time, study_uid=study_uid,
        requested_procedure_id=requested,
        step_id=_text(first((ipc, 4), (obr, 20)) or requested, 16, "OBR-20"),
        description=_text(field_value(obr, 4, component=2), 64, "OBR-4.2"),
        code=(_text(field_value(obr, 4), 16, "OBR-4.1"),
              _text(field_value(obr, 4, component=3), 16, "OBR-4.3"),
              _text(field_value(obr, 4, component=2), 64, "OBR-4.2")),
        referring=referring,
        placer=_text(field_value(orc, 2), 64, "ORC-2"))
    if not all(order.code[:2]):
        order = replace(order, code=("", "", ""))  # a code needs its value and its scheme
    return Change(action, order)


# --- values as DICOM takes them -----------------------------------------------------------

def _text(value: str, most: int, where: str, required: bool = False) -> str:
    if required and not value:
        raise Rejected("missing", where)
    if len(value) > most:
        raise Rejected(f"{len(value)} characters, DICOM holds at most {most} (never cut short)",
                       where)
    if "\\" in value or any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in value):
        raise Rejected("a backslash or a control character", where)
    return value


def _person(segment, number: int, where: str, required: bool = False,
            doctor: bool = False) -> str:
    """A DICOM PN from HL7's XPN (family^given^middle^suffix^prefix), or from an XCN (a
    doctor: the same after an ID number) when `doctor`."""
    first = 2 if doctor else 1
    parts = [field_value(segment, number, component=c) for c in range(first, first + 5)]
    # DICOM PN: family^given^middle^prefix^suffix
    family, given, middle, suffix, prefix = parts
    name = "^".join((family, given, middle, prefix, suffix)).rstrip("^")
    if any("^" in part or "=" in part for part in parts):
        raise Rejected("a name component holding ^ or =", where)
    return _text(name, 64, where, required=required)


def _date(value: str, where: str) -> str:
    if not value:
        return ""
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise Rejected(f"{value[:20]!r} is not a date (YYYYMMDD)", where) from None
    return value


def _when(value: str) -> tuple[str, str]:
    """(YYYYMMDD, HHMMSS) of an HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])."""
    digits = re.match(r"\d*", value)[0]
    if len(digits) < 8:
        raise Rejected(f"{value[:30]!r} is not a date and time", "scheduled start (TQ1-7)")
    date = _date(digits[:8], "scheduled start (TQ1-7)")
    time = (digits[8:14] + "000000")[:6] if len(digits) > 8 else "000000"
    try:
        datetime.strptime(time, "%H%M%S")
    except ValueError:
        raise Rejected(f"{value[:30]!r} is not a time of day", "scheduled start") from None
    return date, time


def _sex(value: str) -> str:
    value = value.upper()
    return value if value in ("M", "F", "O") else ""  # U, A, N...: unknown to DICOM's CS


def _code_string(value: str, where: str) -> str:
    value = value.upper()
    if value and not re.fullmatch(r"[A-Z0-9_ ]{1,16}", value):
        raise Rejected(f"{value[:30]!r} is not a DICOM modality", where)
    return value


def _aet(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9_.\- ]{1,16}", value):
        raise Rejected(f"{value[:30]!r} is not a DICOM AE title", "IPC-9")
    return value
