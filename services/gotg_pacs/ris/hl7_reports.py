"""HL7 v2 results (ORU^R01) read into `Report`s, or refused with the reason.

Each OBR starts a report; the OBX segments after it are its content. Only final (OBR-25 F) and
corrected (C) results are reports to attach: preliminary and other results are acknowledged and
left (the RIS sends the final one later). A message refused is refused whole.

Where each value is read from:
  Patient ID              PID-3.1
  Accession Number        OBR-18, else OBR-3 (filler order number), else ORC-3
  Result status           OBR-25: F final, C corrected
  Text                    OBX of type TX, FT or ST: OBX-5, each repetition a line
  PDF                     OBX of type ED: OBX-5 ^application^pdf^Base64^<data>
  Author                  OBR-32 (ID&family&given), else OBX-16 (ID^family^given)
  Signed                  OBR-22, else OBR-7, else the message's time (MSH-7)
  Title                   OBR-4.2
"""

from __future__ import annotations

import hl7

from . import hl7_orders, reports, values
from .hl7_orders import Received, field_value
from .reports import Report
from .values import Rejected

ACCEPTED = {("ORU", "R01")}
RESULT = {"F": "final", "C": "corrected"}
TEXT_TYPES = {"TX", "FT", "ST"}


def reports_in(received: Received) -> tuple[list[Report], int]:
    """The final and corrected reports of an ORU^R01, and how many other results it held."""
    message = received.message
    try:
        patient_id = values.text(field_value(message.segments("PID")[0], 3), 64, "PID-3.1",
                                 required=True)
    except KeyError:
        raise Rejected("no patient (PID)", "PID") from None
    found, others = [], 0
    try:
        groups = _groups(message)
        if not groups:
            raise Rejected("no result in the message (OBR)", "OBR")
        for group in groups:
            status = field_value(group["OBR"], 25).upper()
            if status not in RESULT:
                others += 1
                continue
            found.append(_report(group, patient_id, RESULT[status], received.sent_at))
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a structure the parser built oddly
        raise Rejected(f"a segment this bridge cannot read ({exc.__class__.__name__})") \
            from None
    return found, others


def _groups(message) -> list[dict]:
    """Each OBR with the ORC before it and the OBX after it."""
    groups: list[dict] = []
    orc = None
    for segment in message:
        name = str(segment[0]).upper()
        if name == "ORC":
            orc = segment
        elif name == "OBR":
            groups.append({"ORC": orc, "OBR": segment, "OBX": []})
        elif name == "OBX" and groups:
            groups[-1]["OBX"].append(segment)
    return groups


def _report(group: dict, patient_id: str, status: str, sent_at: str) -> Report:
    obr, orc = group["OBR"], group["ORC"]
    accession = field_value(obr, 18) or field_value(obr, 3) or field_value(orc, 3)
    lines, pdf = [], b""
    for number, obx in enumerate(group["OBX"], 1):
        kind = field_value(obx, 2).upper()
        if kind in TEXT_TYPES:
            lines.extend(_repetitions(obx, 5))
        elif kind == "ED":
            if pdf:
                raise Rejected("more than one PDF in one report", f"OBX {number}")
            pdf = _pdf(obx, f"OBX {number}-5")
    author = _author(obr, group["OBX"])
    when = field_value(obr, 22) or field_value(obr, 7) or sent_at
    return reports.report(
        accession=accession, patient_id=patient_id, status=status,
        text=reports.checked_text("\n".join(lines), "OBX-5"), author=author,
        signed=hl7_orders.when_of(when, "OBR-22"), title=field_value(obr, 4, component=2),
        pdf=pdf)


def _repetitions(segment, number: int) -> list[str]:
    """Every repetition of a field, each as text (a line of the report)."""
    try:
        field = segment[number]
    except IndexError:
        return []
    # A field holds its repetitions (a line each); a bare value is one.
    count = len(field) if isinstance(field, hl7.containers.Field) else 1
    return [segment.extract_field(1, number, r, 1) for r in range(1, count + 1)]


def _pdf(obx, where: str) -> bytes:
    kind = (field_value(obx, 5, component=2).lower(), field_value(obx, 5, component=3).lower())
    if kind not in (("application", "pdf"), ("ap", "pdf")):
        raise Rejected(f"encapsulated {'/'.join(kind)!r}: only application/pdf is taken",
                       where)
    if field_value(obx, 5, component=4).lower() != "base64":
        raise Rejected("encapsulated data not in Base64", where)
    return reports.checked_pdf(field_value(obx, 5, component=5), where)


def _author(obr, observations: list) -> str:
    """OBR-32's name (its first component's subcomponents), else the first OBX-16."""
    try:
        parts = [str(obr.extract_field(1, 32, 1, 1, s)).strip() for s in (2, 3)]
    except (IndexError, KeyError):
        parts = ["", ""]
    if not parts[0] and observations:
        parts = [field_value(observations[0], 16, component=c) for c in (2, 3)]
    return values.person_name(tuple(parts), "OBR-32")

