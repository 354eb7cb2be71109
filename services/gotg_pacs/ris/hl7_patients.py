"""HL7 v2 patient administration (ADT) read into patient changes, or refused with the reason.

  A08 (update patient information), A31 (update person information): an update under the
      Patient ID of PID-3, with PID-5 name, PID-7 birth date, PID-8 sex. A field left empty
      changes nothing; `""` clears it (HL7's rule for updates).
  A40 (merge patient, patient identifier list): the patient of PID-3 survives; MRG-1 names the
      Patient ID merged into it. Each PID/MRG pair is one merge.

The values pass the same checks as an order's (values.py); a message refused is refused whole.
"""

from __future__ import annotations

from . import values
from .demographics import Demographics, PatientChange
from .hl7_orders import Received, field_value, person_of
from .values import Rejected

UPDATES = {("ADT", "A08"), ("ADT", "A31")}
MERGES = {("ADT", "A40")}
ACCEPTED = UPDATES | MERGES


def changes_in(received: Received) -> list[PatientChange]:
    try:
        if received.kind in UPDATES:
            return [PatientChange("update", _demographics(received.message.segments("PID")[0]))]
        found, pid = [], None
        for segment in received.message:
            name = str(segment[0]).upper()
            if name == "PID":
                pid = segment
            elif name == "MRG" and pid is not None:
                prior = values.text(field_value(segment, 1), 64, "MRG-1.1", required=True)
                patient = _demographics(pid)
                if prior == patient.patient_id:
                    raise Rejected("a patient merged into itself", "MRG-1.1")
                found.append(PatientChange("merge", patient, prior))
                pid = None
        if not found:
            raise Rejected("no PID and MRG pair in the merge", "MRG")
        return found
    except KeyError:
        raise Rejected("no patient (PID)", "PID") from None
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a structure the parser built oddly
        raise Rejected(f"a segment this bridge cannot read ({exc.__class__.__name__})") \
            from None


def _said(pid, number: int, component: int = 1) -> str | None:
    """A field as an update means it: empty says nothing (None, left as it is), HL7's `""`
    clears the value ("")."""
    value = field_value(pid, number, component)
    return "" if value == '""' else (value or None)


def _demographics(pid) -> Demographics:
    issuer, birth, sex = _said(pid, 3, 4), _said(pid, 7), _said(pid, 8)
    return Demographics(
        patient_id=values.text(field_value(pid, 3), 64, "PID-3.1", required=True),
        issuer=None if issuer is None else values.text(issuer, 64, "PID-3.4"),
        patient_name=person_of(pid, 5, "PID-5", required=True),
        birth_date=None if birth is None else values.date(birth[:8], "PID-7"),
        sex=None if sex is None else values.sex(sex))  # U (unknown) clears it too
