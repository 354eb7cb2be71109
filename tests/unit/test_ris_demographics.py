"""Patient changes from the RIS (ADT^A08/A31/A40, edits in orders) read, kept, and the instance
rewrite that carries them into the images.

Why it matters: a corrected name must reach the images a clinician opens, without touching
anything else in them; a merge of two patients must never happen without a person agreeing.
"""

from __future__ import annotations

import pydicom
import pytest

from gotg_pacs.ris.demographics import Demographics, DemographicsQueue, PatientChange, rewrite
from gotg_pacs.ris.hl7_orders import Rejected, read
from gotg_pacs.ris.hl7_patients import changes_in
from tests.support import corpus
from tests.support.hl7_ris import msa

MSH = "MSH|^~\\&|HIS|GOTG|PACS|CLINIC|20261127160000||{kind}|{control}|P|2.5.1"
ORM = ("MSH|^~\\&|RIS|GOTG|PACS|CLINIC|20261127101500||ORM^O01|{control}|P|2.5.1\r"
       "PID|1||PAT123^^^CLINIC^MR||{name}||19800102|F\r"
       "ORC|NW|PLAC1|FILL1||SC||^^^20261127110000\r"
       "OBR|1|PLAC1|FILL1|CXR^Chest^LOCAL||||||||||||||ACC1|RP1|SPS1||||CR")


def adt(kind: str, *segments: str, control: str = "A1") -> bytes:
    return "\r".join([MSH.format(kind=kind, control=control), *segments]).encode("latin-1")


def test_updates_and_merges_are_read_from_adt():
    [update] = changes_in(read(adt("ADT^A08", "PID|1||PAT123^^^CLINIC^MR||Doe^Janet||19800103|F")))
    assert update == PatientChange("update", Demographics("PAT123", "CLINIC", "Doe^Janet",
                                                          "19800103", "F"))
    merges = changes_in(read(adt("ADT^A40", "PID|1||PAT1||Roe^Ann||19700101|F", "MRG|OLD1",
                                 "PID|1||PAT2||Poe^Bo||19600101|M", "MRG|OLD2^^^X")))
    assert [(m.kind, m.patient.patient_id, m.prior_id) for m in merges] == [
        ("merge", "PAT1", "OLD1"), ("merge", "PAT2", "OLD2")]


@pytest.mark.parametrize(("message", "said"), [
    (adt("ADT^A40", "PID|1||PAT1||Roe^Ann", "MRG|PAT1"), "merged into itself"),
    (adt("ADT^A40", "PID|1||PAT1||Roe^Ann"), "no PID and MRG pair"),
    (adt("ADT^A08", "EVN|A08"), "no patient (PID)"),
    (adt("ADT^A08", "PID|1||PAT1||Roe\\E\\^Ann"), "backslash"),
    (adt("ADT^A08", "PID|1||PAT1||Roe^Ann||19701340"), "not a date"),
])
def test_a_patient_change_the_bridge_cannot_take_is_refused_and_nothing_kept(listener, message,
                                                                             said):
    code, _control, text = msa(listener.handle(message))[:3]
    assert code == "AR" and said in text
    assert DemographicsQueue(listener.orders).listing() == []


def test_an_update_waits_to_be_applied_and_a_merge_for_a_person(listener):
    assert msa(listener.handle(adt("ADT^A40", "PID|1||PAT1||Roe^Ann", "MRG|OLD1",
                                   control="M1")))[0] == "AA"
    assert msa(listener.handle(adt("ADT^A08", "PID|1||PAT1||Roe^Anne", control="U1")))[0] \
        == "AA"
    assert msa(listener.handle(adt("ADT^A08", "PID|1||PAT1||Roe^Anne", control="U1")))[0] \
        == "AA", "sent again: its ACK was lost"
    queue = DemographicsQueue(listener.orders)
    assert [(c["kind"], c["state"]) for c in reversed(queue.listing())] == [
        ("merge", "held"), ("update", "waiting")]
    assert [change.kind for _, change in queue.waiting()] == ["update"]
    [merge] = [c for c in queue.listing() if c["kind"] == "merge"]
    queue.decide(merge["seq"], True, "admin", "same person, registered twice")
    assert [change.kind for _, change in queue.waiting()] == ["merge", "update"], "in order"
    with pytest.raises(KeyError):
        queue.decide(merge["seq"], False, "admin", "changed my mind")


def test_a_patient_edited_in_the_ris_is_an_update_for_the_images(listener):
    assert msa(listener.handle(ORM.format(control="O1", name="Doe^Jane").encode()))[0] == "AA"
    assert DemographicsQueue(listener.orders).listing() == [], "a first order: nothing edited"
    assert msa(listener.handle(ORM.format(control="O2", name="Doe^Janet").encode()))[0] == "AA"
    [edit] = DemographicsQueue(listener.orders).listing()
    assert (edit["kind"], edit["patient"]["patient_name"]) == ("update", "Doe^Janet")
    assert listener.orders.get("ACC1")[1].patient_name == "Doe^Janet"


def test_the_rewrite_changes_the_patient_and_nothing_else(tmp_path):
    source = corpus.DATA_DIR / "MR2_J2KR.dcm"
    before = pydicom.dcmread(source)
    change = PatientChange("update", Demographics(str(before.PatientID), None, "Ngũyen^Thị",
                                                  "19800103", "F"))
    assert rewrite(source, tmp_path / "after.dcm", change)
    after = pydicom.dcmread(tmp_path / "after.dcm")
    assert (str(after.PatientName), after.PatientBirthDate, after.PatientSex) == (
        "Ngũyen^Thị", "19800103", "F")
    assert after.SpecificCharacterSet == "ISO_IR 192", "a name latin-1 cannot hold: UTF-8"
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert after.PixelData == before.PixelData, "compressed pixels untouched"
    assert (after.SOPInstanceUID, after.SeriesInstanceUID, after.StudyInstanceUID) == (
        before.SOPInstanceUID, before.SeriesInstanceUID, before.StudyInstanceUID)
    untouched = {e.tag for e in before if e.tag not in (0x00100010, 0x00100030, 0x00100040,
                                                         0x00080005)}
    assert all(after[tag].value == before[tag].value for tag in untouched)
    assert not rewrite(tmp_path / "after.dcm", tmp_path / "again.dcm", change), \
        "applied twice (a power cut): nothing written the second time"
    assert not (tmp_path / "again.dcm").exists()

    # An update that leaves the birth date and sex out says nothing of them.
    name_only = PatientChange("update", Demographics(str(before.PatientID), None, "Roe^Ann",
                                                     None, None))
    assert rewrite(tmp_path / "after.dcm", tmp_path / "named.dcm", name_only)
    named = pydicom.dcmread(tmp_path / "named.dcm")
    assert (str(named.PatientName), named.PatientBirthDate, named.PatientSex) == (
        "Roe^Ann", "19800103", "F")

    merged = PatientChange("merge", Demographics("SURVIVOR", "GOTG", "Roe^Ann", None, None),
                           str(before.PatientID))
    assert rewrite(source, tmp_path / "moved.dcm", merged)
    moved = pydicom.dcmread(tmp_path / "moved.dcm")
    assert (moved.PatientID, moved.IssuerOfPatientID, str(moved.PatientName)) == (
        "SURVIVOR", "GOTG", "Roe^Ann")


def test_an_update_changes_only_what_it_gives_and_clears_only_what_it_says(listener):
    """HL7's rule for updates: an empty field changes nothing, "" clears it."""
    [change] = changes_in(read(adt("ADT^A08", "PID|1||PAT1||Roe^Ann")))
    assert change.patient.said() == {"patient_name": "Roe^Ann"}
    [change] = changes_in(read(adt("ADT^A08", 'PID|1||PAT1^^^""||Roe^Ann||""|U')))
    assert change.patient.said() == {"issuer": "", "patient_name": "Roe^Ann",
                                     "birth_date": "", "sex": ""}
    # An order without birth date or sex is no edit of them either.
    assert msa(listener.handle(ORM.format(control="O1", name="Doe^Jane").encode()))[0] == "AA"
    assert msa(listener.handle(ORM.format(control="O2", name="Doe^Jane").replace(
        "|19800102|F", "||").encode()))[0] == "AA"
    assert DemographicsQueue(listener.orders).listing() == []


def test_an_order_refused_keeps_none_of_the_patient_edit_it_carried(listener):
    assert msa(listener.handle(ORM.format(control="O1", name="Doe^Jane").encode()))[0] == "AA"
    someone_else = ORM.format(control="O2", name="Poe^Bo").replace(
        "PAT123", "PAT999").replace("ACC1", "ACC9")
    assert msa(listener.handle(someone_else.encode()))[0] == "AA"
    # Jane renamed, in an order naming Bo's accession: refused whole, the rename with it.
    mixed_up = ORM.format(control="O3", name="Doe^Janet").replace("ACC1", "ACC9")
    assert msa(listener.handle(mixed_up.encode()))[0] == "AR"
    assert DemographicsQueue(listener.orders).listing() == []
    # The same rename in an order the bridge takes is kept.
    assert msa(listener.handle(ORM.format(control="O4", name="Doe^Janet").encode()))[0] == "AA"
    assert [c["patient"]["patient_name"] for c in
            DemographicsQueue(listener.orders).listing()] == ["Doe^Janet"]


def test_hl7_reading_of_a_broken_adt_never_crashes():
    for cut in range(0, 120, 7):
        message = adt("ADT^A40", "PID|1||PAT1||Roe^Ann", "MRG|OLD1")[:cut]
        try:
            changes_in(read(message))
        except Rejected:
            pass


def test_a_resolved_study_waits_to_be_given_its_orders_identity(listener, tmp_path):
    assert msa(listener.handle(ORM.format(control="O1", name="Doe^Jane").encode()))[0] == "AA"
    typed = {"AccessionNumber": "", "PatientID": "TYPED-1", "PatientName": "DOE^JANE",
             "PatientBirthDate": "19800102"}
    assert listener.orders.study_arrived("1.2.3.4", "o1", typed) == (None, [])
    listener.orders.resolve("1.2.3.4", "ACC1", "radiographer", "typed at the modality")
    [(_, change)] = DemographicsQueue(listener.orders).waiting()
    assert change == PatientChange("reconcile", Demographics("PAT123", "CLINIC", "Doe^Jane",
                                                             "19800102", "F"),
                                   "TYPED-1", "1.2.3.4", "ACC1", "o1")
    source = corpus.DATA_DIR / "MR2_J2KR.dcm"
    assert rewrite(source, tmp_path / "reconciled.dcm", change)
    after = pydicom.dcmread(tmp_path / "reconciled.dcm")
    assert (after.AccessionNumber, after.PatientID, after.IssuerOfPatientID) == (
        "ACC1", "PAT123", "CLINIC")


def test_a_merge_confirmed_late_takes_what_updates_said_since(listener):
    assert msa(listener.handle(adt("ADT^A40", "PID|1||PAT1||Roe^Ann||19700101|F",
                                   "MRG|OLD1", control="M1")))[0] == "AA"
    assert msa(listener.handle(adt("ADT^A08", "PID|1||PAT1||Roe^Anne", control="U1")))[0] \
        == "AA"
    queue = DemographicsQueue(listener.orders)
    [(update_seq, _)] = queue.waiting()
    queue.applied(update_seq, 0)
    [merge] = [c for c in queue.listing() if c["kind"] == "merge"]
    assert queue.updated_since("PAT1", merge["seq"]) == {"patient_name": "Roe^Anne"}
    assert queue.updated_since("PAT1", update_seq) == {}
