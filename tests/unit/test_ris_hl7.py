"""HL7 v2 orders in: what is read from where, what is refused, and that nothing half-kept is.

Why it matters: the worklist puts these values into the images a modality makes. A Patient ID
cut short, a name with DICOM's separator in it, or an accession re-pointed to another patient
would file images under the wrong person; a message acknowledged before it is on disk would be
lost at the next power cut, and the RIS would never send it again.
"""

from __future__ import annotations

import json
import sqlite3

import hl7
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gotg_pacs.ris import worklist
from gotg_pacs.ris.hl7_orders import Rejected, parse
from gotg_pacs.ris.mllp import Listener
from gotg_pacs.ris.orders import Orders
from tests.support.disk import tmpfs
from tests.support.hl7_ris import msa

MSH = "MSH|^~\\&|RIS|GOTG|PACS|CLINIC|20261127101500||{kind}|{control}|P|2.5.1||||||{charset}"
PID = "PID|1||PAT123^^^CLINIC^MR||Doe^Jane^Q||19800102|F"
PV1 = "PV1|1|O||||||DOC1^House^Greg"  # PV1-8: referring
ORC = "ORC|{control}|PLAC1|FILL1||SC||^^^20261127110000"
OBR = ("OBR|1|PLAC1|FILL1|CXR^Chest X-ray 2 views^LOCAL|||20261127093000|||||||||"
       "DOC2^Wilson^James||{accession}|RP0001|SPS0001||||CR")


def orm(control="MSG1", accession="ACC0001", order="NW", pid=PID, charset="",
        kind="ORM^O01", extra: tuple[str, ...] = ()) -> bytes:
    segments = [MSH.format(kind=kind, control=control, charset=charset), pid, PV1,
                ORC.format(control=order), OBR.format(accession=accession), *extra]
    return "\r".join(segments).encode("utf-8" if charset == "UNICODE UTF-8" else "latin-1")


def test_an_orm_order_is_read_field_by_field():
    [change] = parse(orm(), "site-a").changes
    order = change.order
    assert change.action == "schedule"
    assert (order.accession, order.patient_id, order.issuer) == ("ACC0001", "PAT123", "CLINIC")
    assert (order.patient_name, order.birth_date, order.sex) == ("Doe^Jane^Q", "19800102", "F")
    assert (order.modality, order.requested_procedure_id, order.step_id) == \
        ("CR", "RP0001", "SPS0001")
    # ORC-7's start comes before OBR-7; PV1-8 before OBR-16.
    assert (order.scheduled_date, order.scheduled_time) == ("20261127", "110000")
    assert order.referring == "House^Greg" and order.placer == "PLAC1"
    assert order.code == ("CXR", "LOCAL", "Chest X-ray 2 views")
    assert order.study_uid.startswith("2.25.") and len(order.study_uid) <= 64
    assert parse(orm(control="MSG2"), "site-a").changes[0].order.study_uid == order.study_uid, \
        "the same order sent again gets the same Study Instance UID"
    assert parse(orm(), "site-b").changes[0].order.study_uid != order.study_uid


def test_an_omi_order_takes_its_imaging_values_from_ipc_and_tq1():
    message = "\r".join([
        MSH.format(kind="OMI^O23", control="OMI1", charset="UNICODE UTF-8"),
        "PID|1||P-77^^^^MR||Müller^Jürgen||19700315|M",
        "ORC|NW|PL9|FL9",
        "TQ1|1||||||20261128143000",
        "OBR|1|PL9|FL9|CT-HEAD^CT head^LOCAL|||||||||||||||||||CT",
        "IPC|A-9001|RP-9|1.2.826.0.1.3680043.2.1125.1|SPS-9|CT||||CT_ROOM_1",
    ]).encode("utf-8")
    [change] = parse(message, "site-a").changes
    order = change.order
    assert (order.accession, order.requested_procedure_id, order.step_id) == \
        ("A-9001", "RP-9", "SPS-9")
    assert order.study_uid == "1.2.826.0.1.3680043.2.1125.1"
    assert (order.modality, order.station_aet) == ("CT", "CT_ROOM_1")
    assert (order.scheduled_date, order.scheduled_time) == ("20261128", "143000")
    assert order.patient_name == "Müller^Jürgen"


@pytest.mark.parametrize(("message", "where"), [
    (orm(pid="PID|1||^^^CLINIC||Doe^Jane"), "PID-3.1"),
    (orm(pid="PID|1||PAT1||"), "PID-5"),
    (orm(accession="A" * 17), "Accession Number"),
    (orm(pid="PID|1||PAT\\E\\1||Doe^Jane"), "PID-3.1"),              # an escaped backslash
    (orm(pid="PID|1||PAT1||Doe^Jane||19801302"), "PID-7"),           # no 13th month
    (orm(order="XX"), "ORC-1"),
    (orm(kind="ADT^A08"), "MSH-9"),
    (orm(control=""), "MSH-10"),
    (orm(charset="EBCDIC"), "MSH-18"),
    (orm(charset="UNICODE UTF-8").replace(b"Doe", b"D\xff\xfe"), "MSH-18"),
    (orm().replace(b"|CR", b"|C<R>"), "OBR-24"),
    (orm().replace(b"ORC|NW", b"NTE|NW"), "ORC"),
    (orm().replace(b"^^^20261127110000", b"^^^2026").replace(b"20261127093000", b"")
     .replace(b"20261127101500", b""), "scheduled start (TQ1-7)"),
])
def test_a_value_dicom_cannot_hold_as_sent_refuses_the_message(message, where):
    with pytest.raises(Rejected) as refused:
        parse(message, "site-a")
    assert refused.value.where == where


def test_an_order_is_on_the_worklist_once_acknowledged_and_off_it_once_cancelled(listener,
                                                                                  tmp_path):
    assert msa(listener.handle(orm())) == ["AA", "MSG1"]
    [item] = (tmp_path / "worklists").glob("*.wl")
    shown = pydicom.dcmread(item)
    assert str(shown.AccessionNumber) == "ACC0001" and str(shown.PatientName) == "Doe^Jane^Q"
    assert shown.file_meta.MediaStorageSOPClassUID == worklist.FIND_SOP_CLASS
    assert shown.ScheduledProcedureStepSequence[0].Modality == "CR"
    assert "ACC0001" not in item.name, "file names are never header values"

    # Sent again (its ACK was lost): acknowledged again, nothing applied twice.
    assert msa(listener.handle(orm()))[0] == "AA"
    assert listener.orders.counts() == {"scheduled": 1}
    assert msa(listener.handle(orm(control="MSG2", order="CA"))) == ["AA", "MSG2"]
    assert listener.orders.get("ACC0001")[0] == "cancelled"
    assert not list((tmp_path / "worklists").glob("*.wl"))


def test_a_refused_message_keeps_nothing_not_even_its_valid_orders(listener):
    assert msa(listener.handle(orm()))[0] == "AA"
    other = PID.replace("PAT123", "PAT999")
    # Two orders: a new one, then the known accession for another patient.
    message = orm(control="MSG3", accession="ACC0002", pid=other,
                  extra=(ORC.format(control="NW"), OBR.format(accession="ACC0001")))
    code, control, text = msa(listener.handle(message))
    assert (code, control) == ("AR", "MSG3") and "not re-pointed" in text
    assert listener.orders.get("ACC0002") is None
    assert listener.orders.get("ACC0001")[1].patient_id == "PAT123"
    # The RIS corrects it and sends it under a new control ID: taken.
    assert msa(listener.handle(orm(control="MSG4", accession="ACC0002", pid=other)))[0] == "AA"


def test_a_full_disk_answers_ae_so_the_ris_sends_it_again(tmp_path):
    with tmpfs(tmp_path / "full", "8m") as disk:
        (disk / "worklists").mkdir()
        with Orders(disk / "orders.sqlite") as orders:
            listener = Listener(orders, disk / "worklists", "site-a")
            assert msa(listener.handle(orm()))[0] == "AA"
            filler = disk / "filler"
            try:
                with open(filler, "wb") as out:
                    while True:
                        out.write(b"\0" * 4096)
                        out.flush()
            except OSError:
                pass  # full
            code, _, text = msa(listener.handle(orm(control="MSG5", accession="ACC0005")))
            assert code == "AE" and "send it again" in text
            filler.unlink()
            assert msa(listener.handle(orm(control="MSG5", accession="ACC0005")))[0] == "AA"
            assert orders.get("ACC0005")[0] == "scheduled"


def test_a_message_that_is_no_hl7_at_all_gets_a_refusal_it_can_read(listener):
    for junk in (b"", b"hello", b"MSH", b"MSH|^~\\&|" + b"|" * 40, b"\x00\x01\x02"):
        code, _, text = msa(listener.handle(junk))
        assert code == "AR" and text


_PIECES = st.sampled_from(["|", "^", "~", "\\", "&", "\r", "\n", "MSH", "PID", "ORC", "OBR",
                           "IPC", "TQ1", "NW", "CA", "ORM", "O01", "\x00", "é", "20261127",
                           "E\\", "\\F\\", "ACC", "9" * 70])


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=400), insert=st.lists(_PIECES, max_size=6),
       noise=st.binary(max_size=40))
def test_fuzzed_messages_are_answered_and_never_crash_the_parser(listener, cut, insert, noise):
    """Valid orders cut, spliced and salted: every one gets AA, AR or AE; nothing crashes;
    whatever is refused changes nothing kept."""
    base = orm(control=f"FUZZ{cut}")
    message = base[:cut] + "".join(insert).encode("utf-8") + noise + base[cut:]
    before = listener.orders.listing()
    try:
        parse(message, "site-a")
    except Rejected:
        pass
    ack = listener.handle(message)
    code = msa(ack)[0]
    assert code in ("AA", "AR", "AE")
    if code != "AA":
        assert listener.orders.listing() == before


def test_a_backups_orders_fill_in_what_is_missing_and_never_overwrite(tmp_path):
    """A restore brings back the old box's schedule; an order this box already has (taken
    since, perhaps changed or cancelled) stays as it is here."""
    (tmp_path / "wl").mkdir()
    with Orders(tmp_path / "old.sqlite") as old:
        Listener(old, tmp_path / "wl", "site-a").handle(orm())
        Listener(old, tmp_path / "wl", "site-a").handle(orm(control="MSG2", accession="ACC2"))
    with Orders(tmp_path / "new.sqlite") as new:
        listener = Listener(new, tmp_path / "wl", "site-a")
        assert msa(listener.handle(orm(control="MSG9", order="CA")))[0] == "AA"  # not here
        assert msa(listener.handle(orm(control="MSG8", accession="ACC2", order="NW")))[0] == "AA"
        assert msa(listener.handle(orm(control="MSG7", accession="ACC2", order="CA")))[0] == "AA"
        assert new.take_from(tmp_path / "old.sqlite") == 1
        assert new.get("ACC0001")[0] == "scheduled"
        assert new.get("ACC2")[0] == "cancelled", "this box's newer word stands"
        assert msa(listener.handle(orm()))[0] == "AA"  # MSG1 known now: applied once
        assert new.counts() == {"scheduled": 1, "cancelled": 1}


def test_a_store_from_before_reports_and_billing_is_brought_up_to_date(tmp_path):
    """A box updated in the field keeps its orders database: the columns added since are
    added to it, its rows kept, and what it holds still goes out."""
    path = tmp_path / "orders.sqlite"
    with sqlite3.connect(path) as old:
        old.executescript("""
            CREATE TABLE statuses (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                event_id TEXT NOT NULL UNIQUE, accession TEXT NOT NULL, status TEXT NOT NULL,
                at REAL NOT NULL, study_uid TEXT NOT NULL,
                state TEXT NOT NULL DEFAULT 'waiting', tries INTEGER NOT NULL DEFAULT 0,
                last_error TEXT NOT NULL DEFAULT '', sent_at REAL);
            CREATE TABLE studies (study_uid TEXT PRIMARY KEY, orthanc_id TEXT NOT NULL,
                accession TEXT NOT NULL, matched TEXT, tags TEXT NOT NULL,
                candidates TEXT NOT NULL, resolution TEXT, seen REAL NOT NULL);
            INSERT INTO statuses (event_id, accession, status, at, study_uid)
                VALUES ('e1', 'ACC0001', 'completed', 1, '1.2.3');""")
    old.close()
    with Orders(path) as orders:
        [waiting] = orders.waiting_statuses()
        assert (waiting["event_id"], waiting["performed"]) == ("e1", "")
        (tmp_path / "wl").mkdir()
        listener = Listener(orders, tmp_path / "wl", "site-a")
        assert msa(listener.handle(orm()))[0] == "AA"
        orders.study_arrived("1.2.4", "o1", {"AccessionNumber": "ACC0001",
                                             "PatientID": "PAT123"},
                             {"series": 1, "images": 2, "modalities": ["CR"]})
        billed = json.loads(orders.waiting_statuses()[1]["performed"])
        assert billed == {"procedures": [{"code": "CXR", "scheme": "LOCAL",
                                          "meaning": "Chest X-ray 2 views"}],
                          "series": 1, "images": 2, "modalities": ["CR"]}, \
            "no MPPS: the procedure ordered"


def test_a_study_is_matched_once_and_one_without_an_order_lists_its_likely_orders(listener):
    assert msa(listener.handle(orm()))[0] == "AA"
    orders = listener.orders
    tags = {"AccessionNumber": "ACC0001", "PatientID": "PAT123", "PatientName": "Doe^Jane^Q",
            "PatientBirthDate": "19800102", "StudyDate": "20261127"}
    assert orders.study_arrived("1.2.3", "o-1", tags) == ("ACC0001", ["ACC0001"])
    assert orders.get("ACC0001")[0] == "completed"
    assert orders.study_arrived("1.2.3", "o-1", tags) == ("ACC0001", []), "once"
    assert msa(listener.handle(orm(control="MSG2", accession="ACC2")))[0] == "AA"
    # Typed at the modality: another ID, the same person by name and birth date.
    typed = {**tags, "AccessionNumber": "", "PatientID": "TYPED-1",
             "PatientName": "DOE  JANE^q"}
    assert orders.study_arrived("1.2.4", "o-2", typed) == (None, [])
    [entry] = orders.unmatched()
    assert (entry["study_uid"], entry["candidates"]) == ("1.2.4", ["ACC2"])
    assert orders.get("ACC2")[0] == "scheduled", "a candidate, never a match"
    assert orders.resolve("1.2.4", None, "amina", "emergency") == []
    assert orders.unmatched() == [] and orders.get("ACC2")[0] == "scheduled"
    with pytest.raises(KeyError):
        orders.resolve("1.2.4", "ACC2", "amina", "twice")


def test_a_status_for_an_hl7_ris_carries_its_values_escaped(listener):
    """Values from the RIS come back inside the status message; HL7's separators in them
    must not split fields (an Accession Number with | would otherwise shift every field)."""
    from gotg_pacs.ris.hl7_statuses import Hl7Statuses

    assert msa(listener.handle(orm(accession="A\\F\\1\\T\\2\\R\\3", pid=PID.replace(
        "PAT123", "P\\F\\1\\T\\2"))))[0] == "AA"  # the RIS escapes them too
    assert listener.orders.get("A|1&2~3") is not None
    statuses = Hl7Statuses("127.0.0.1:1", listener.orders, "site-a")
    message = hl7.parse(statuses.message({
        "event_id": "e-1", "accession": "A|1&2~3", "status": "images_available",
        "at": 1795770000.0, "study_uid": "1.2.3"}))
    orc, obr = message.segment("ORC"), message.segment("OBR")
    assert message.unescape(str(orc[3])) == "A|1&2~3"
    assert (str(orc[1]), str(orc[5]), str(obr[25])) == ("SC", "CM", "R")
    assert message.unescape(str(obr[18])) == "A|1&2~3"
    assert message.unescape(str(message.segment("PID")[3][0][0])) == "P|1&2"
    assert str(message.segment("MSH")[10]) == "e-1"
    from gotg_pacs.ris.hl7_statuses import escape
    assert escape("Müller|Зоя\\^&~") == "Müller\\F\\Зоя\\E\\\\S\\\\T\\\\R\\", \
        "HL7's delimiters escaped, every other character as it is (UTF-8, MSH-18)"


def test_matching_the_worklist_at_start_writes_only_what_differs(listener):
    """A start with thousands of orders must not rewrite (and fsync) every item on an SD
    card; an item damaged or missing is written again."""
    for n in range(3):
        assert msa(listener.handle(orm(control=f"M{n}", accession=f"ACC{n}")))[0] == "AA"
    folder = listener.worklists
    assert worklist.match(folder, listener.orders.scheduled()) == (0, 0)
    [first, second, _third] = sorted(folder.glob("*.wl"))
    first.write_bytes(b"damaged")
    second.unlink()
    (folder / "stale.wl").write_bytes(b"an order no longer here")
    assert worklist.match(folder, listener.orders.scheduled()) == (2, 1)
    assert pydicom.dcmread(first).AccessionNumber.startswith("ACC")
