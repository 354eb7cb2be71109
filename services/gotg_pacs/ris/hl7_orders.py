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
from dataclasses import dataclass, field, replace
from datetime import datetime

import hl7

from . import values
from .values import Change, Order, Rejected

ACCEPTED = {("ORM", "O01"), ("OMI", "O23")}
SCHEDULE = {"NW", "XO", "SC"}          # new, changed, status changed: (still) to be done
CANCEL = {"CA", "DC", "OC", "OD"}      # cancelled or discontinued: off the worklist
# MSH-18 as HL7 names them; an empty MSH-18 means ASCII (HL7 2.5.1, 2.15.9.18).
CHARSETS = {"": "ascii", "ASCII": "ascii", "UNICODE UTF-8": "utf-8", "UNICODE": "utf-8",
            "8859/1": "latin-1", "8859/15": "iso8859-15"}
MAX_MESSAGE = 8 << 20  # bytes: an order is a few hundred, a report with its PDF in Base64 more


@dataclass
class Received:
    """One message as read: who sent it, its control ID (a resent message is known by it),
    and the orders it changes, in order."""
    message: hl7.Message
    sender: str
    control_id: str
    kind: tuple[str, str] = ("", "")   # MSH-9: message code, trigger event
    sent_at: str = ""                  # MSH-7
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


def read(raw: bytes) -> Received:
    """The message and its header (who sent it, its control ID, its kind); Rejected for what
    is not a readable HL7 v2 message."""
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
    return Received(message, sender, control_id, kind, sent_at)


def parse(raw: bytes, site: str) -> Received:
    """The message's orders, every value checked; Rejected, with the reason, for anything
    this bridge will not put on a worklist."""
    return orders_in(read(raw), site)


def orders_in(received: Received, site: str) -> Received:
    """`received` with its orders read (`changes`)."""
    if received.kind not in ACCEPTED:
        raise Rejected(f"{'^'.join(received.kind)} is not an order, report or patient change "
                       "this bridge takes (ORM^O01, OMI^O23, ORU^R01, ADT^A08/A31/A40)",
                       "MSH-9")
    message = received.message
    try:
        groups = _groups(message)
        if not groups:
            raise Rejected("no order in the message (ORC)", "ORC")
        patient = _patient(message)
        for group in groups:
            received.changes.append(_change(group, patient, received.sent_at, site))
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
    return {"patient_id": values.text(field_value(pid, 3), 64, "PID-3.1", required=True),
            "issuer": values.text(field_value(pid, 3, component=4), 64, "PID-3.4"),
            "patient_name": person_of(pid, 5, "PID-5", required=True),
            "birth_date": values.date(field_value(pid, 7)[:8], "PID-7"),
            "sex": values.sex(field_value(pid, 8)),
            "referring": person_of(pv1, 8, "PV1-8", doctor=True)}


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

    accession = values.text(first((ipc, 1), (obr, 18), (orc, 3)), 16, "Accession Number",
                      required=True)
    requested = values.text(first((ipc, 2), (obr, 19)) or accession, 16, "OBR-19")
    study_uid = (values.dicom_uid(first((ipc, 3)), "IPC-3")
                 or values.derived_study_uid(site, accession))
    when = first((tq1, 7)) or field_value(orc, 7, component=4) or first((obr, 7)) or sent_at
    date, time = when_of(when, "scheduled start (TQ1-7)")
    referring = patient["referring"] or person_of(obr, 16, "OBR-16", doctor=True)
    order = Order(
        accession=accession, patient_id=patient["patient_id"], issuer=patient["issuer"],
        patient_name=patient["patient_name"], birth_date=patient["birth_date"],
        sex=patient["sex"],
        modality=values.modality(first((ipc, 5), (obr, 24)), "OBR-24"),
        station_aet=values.ae_title(field_value(ipc, 9), "IPC-9"),
        scheduled_date=date, scheduled_time=time, study_uid=study_uid,
        requested_procedure_id=requested,
        step_id=values.text(first((ipc, 4), (obr, 20)) or requested, 16, "OBR-20"),
        description=values.text(field_value(obr, 4, component=2), 64, "OBR-4.2"),
        code=(values.text(field_value(obr, 4), 16, "OBR-4.1"),
              values.text(field_value(obr, 4, component=3), 16, "OBR-4.3"),
              values.text(field_value(obr, 4, component=2), 64, "OBR-4.2")),
        referring=referring,
        placer=values.text(field_value(orc, 2), 64, "ORC-2"))
    if not all(order.code[:2]):
        order = replace(order, code=("", "", ""))  # a code needs its value and its scheme
    return Change(action, order)


# --- HL7's forms of a name and a time ------------------------------------------------------

def person_of(segment, number: int, where: str, required: bool = False,
            doctor: bool = False) -> str:
    """A DICOM PN from HL7's XPN (family^given^middle^suffix^prefix), or from an XCN (a
    doctor: the same after an ID number) when `doctor`."""
    first = 2 if doctor else 1
    parts = [field_value(segment, number, component=c) for c in range(first, first + 5)]
    # DICOM PN: family^given^middle^prefix^suffix
    family, given, middle, suffix, prefix = parts
    return values.person_name((family, given, middle, prefix, suffix), where, required=required)


def when_of(value: str, where: str) -> tuple[str, str]:
    """(YYYYMMDD, HHMMSS) of an HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])."""
    digits = re.match(r"\d*", value)[0]
    if len(digits) < 8:
        raise Rejected(f"{value[:30]!r} is not a date and time", where)
    date = values.date(digits[:8], where)
    time = (digits[8:14] + "000000")[:6] if len(digits) > 8 else "000000"
    try:
        datetime.strptime(time, "%H%M%S")
    except ValueError:
        raise Rejected(f"{value[:30]!r} is not a time of day", where) from None
    return date, time
