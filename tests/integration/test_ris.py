"""The RIS bridge with real parts: the python `hl7` package's `mllp_send` as the RIS, `pacs ris
run` as the service, Orthanc answering DCMTK's `findscu -W`, pynetdicom as the modality's MPPS.

Why it matters: radiographers pick patients from this list instead of typing names on a
modality keyboard. An order the RIS was told "accepted" must reach the list and survive a power
cut; a cancelled one must leave it, and so must one the modality reports done; a message the
bridge cannot take must be refused in words the RIS logs, with nothing of it kept.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from gotg_pacs.process import wait_until
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.hl7_ris import Hl7Ris
from tests.support.mpps import MppsModality
from tests.support.mpps import step as _step
from tests.support.reference_ris import ReferenceRis
from tests.support.site import free_port

MLLP_SEND = str(Path(sys.executable).with_name("mllp_send"))
ORDER = "\n".join([
    "MSH|^~\\&|RIS|GOTG|PACS|CLINIC|20261127101500||ORM^O01|{control}|P|2.5.1",
    "PID|1||PAT-4711^^^CLINIC^MR||Doe^Jane^Q||19800102|F",
    "PV1|1|O||||||DOC1^House^Greg",
    "ORC|{order}|PLAC1|FILL1||SC||^^^20261127110000",
    "OBR|1|PLAC1|FILL1|CXR^Chest X-ray 2 views^LOCAL||||||||||||||ACC-4711|RP1|SPS1||||CR",
]) + "\n"
WORKLIST_KEYS = {"PatientName": "", "PatientID": "", "AccessionNumber": "",
                 "StudyInstanceUID": "", "ScheduledProcedureStepSequence[0].Modality": "CR"}


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def make_ris(appliance_factory, tmp_path):
    """An appliance with `pacs ris run` beside it, with these settings."""
    started = []

    def make(**env: str):
        appliance = appliance_factory(**env)
        port = appliance.settings.hl7_port

        def start() -> subprocess.Popen:
            appliance.ris = subprocess.Popen(
                [sys.executable, "-m", "gotg_pacs", "--env-file", str(appliance.env_file),
                 "ris", "run"], stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / "ris.log", "a"))  # noqa: SIM115
            assert wait_until(lambda: _listening(port) and _listening(
                appliance.settings.mpps_port), 30), (tmp_path / "ris.log").read_text()
            return appliance.ris

        appliance.hl7_port, appliance.start_ris = port, start
        start()
        started.append(appliance)
        return appliance

    yield make
    for appliance in started:
        appliance.ris.terminate()
        appliance.ris.wait(30)


@pytest.fixture
def ris(make_ris):
    return make_ris()


def _send(appliance, text: str, tmp_path) -> list[str]:
    """The RIS's side: mllp_send as a RIS operator would run it; MSA of each ACK."""
    message = tmp_path / f"{uuid.uuid4().hex}.hl7"
    message.write_text(text)
    sent = subprocess.run([MLLP_SEND, "--loose", "-f", str(message), "-p",
                           str(appliance.hl7_port), "127.0.0.1"], capture_output=True,
                          timeout=60)
    assert sent.returncode == 0, sent.stderr
    return [segment.decode() for segment in sent.stdout.replace(b"\n", b"\r").split(b"\r")
            if segment.startswith(b"MSA|")]


def test_an_order_from_the_ris_is_on_the_worklist_and_a_cancel_takes_it_off(ris, tmp_path):
    assert _send(ris, ORDER.format(control="MSG1", order="NW"), tmp_path) == ["MSA|AA|MSG1"]
    [item] = ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl")
    assert (str(item.PatientName), str(item.PatientID), str(item.AccessionNumber)) == \
        ("Doe^Jane^Q", "PAT-4711", "ACC-4711")
    assert str(item.StudyInstanceUID).startswith("2.25.")
    assert ris.modality.find_worklist({**WORKLIST_KEYS, "ScheduledProcedureStepSequence[0]"
                                       ".Modality": "CT"}, tmp_path / "wl-ct") == []
    shown = json.loads(run_pacs("ris", "orders", "--json", env_file=ris.env_file).stdout)
    assert shown["counts"] == {"scheduled": 1}

    assert _send(ris, ORDER.format(control="MSG2", order="CA"), tmp_path) == ["MSA|AA|MSG2"]
    assert ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl-after") == []


def test_what_the_bridge_cannot_take_is_refused_and_nothing_of_it_kept(ris, tmp_path):
    refused = _send(ris, ORDER.format(control="MSG3", order="NW").replace(
        "ORM^O01", "SIU^S12"), tmp_path)
    assert refused[0].startswith("MSA|AR|MSG3|") and "not an order" in refused[0]
    hostile = ORDER.format(control="MSG4", order="NW").replace(
        "Doe^Jane^Q", "<script>alert(1)</script>\\E\\^Jane")
    assert _send(ris, hostile, tmp_path)[0].startswith("MSA|AR|MSG4|")
    too_long = ORDER.format(control="MSG5", order="NW").replace("ACC-4711", "A" * 17)
    assert "never cut short" in _send(ris, too_long, tmp_path)[0]
    shown = json.loads(run_pacs("ris", "orders", "--json", env_file=ris.env_file).stdout)
    assert shown == {"counts": {}, "orders": []}
    assert ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl") == []
    assert ris.ris.poll() is None, "the service is still up"


def test_an_acknowledged_order_survives_a_kill_9_and_the_worklist_heals(ris, tmp_path):
    assert _send(ris, ORDER.format(control="MSG6", order="NW"), tmp_path) == ["MSA|AA|MSG6"]
    ris.ris.send_signal(signal.SIGKILL)
    ris.ris.wait(30)
    # As if the power went between the order's commit and its worklist file.
    for item in ris.settings.worklists_dir.glob("*.wl"):
        item.unlink()
    ris.start_ris()
    [item] = ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl")
    assert str(item.AccessionNumber) == "ACC-4711"
    # The RIS, never having heard back, sends it again: acknowledged, kept once.
    assert _send(ris, ORDER.format(control="MSG6", order="NW"), tmp_path) == ["MSA|AA|MSG6"]
    shown = json.loads(run_pacs("ris", "orders", "--json", env_file=ris.env_file).stdout)
    assert shown["counts"] == {"scheduled": 1}


def _state(appliance, accession: str) -> str:
    shown = json.loads(run_pacs("ris", "orders", "--json", env_file=appliance.env_file).stdout)
    return next(order["state"] for order in shown["orders"] if order["accession"] == accession)


def test_mpps_in_progress_keeps_the_order_listed_and_completed_takes_it_off(ris, tmp_path):
    assert _send(ris, ORDER.format(control="MSG7", order="NW"), tmp_path) == ["MSA|AA|MSG7"]
    modality, uid = MppsModality(ris.settings.mpps_port, ris.settings.pacs_aet), generate_uid()
    assert modality.create(uid, _step("ACC-4711")) == 0x0000
    assert _state(ris, "ACC-4711") == "in_progress"
    assert len(ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl1")) == 1, \
        "still listed: a modality that crashed mid-exam picks the patient again"
    assert modality.create(uid, _step("ACC-4711")) == 0x0111, "a duplicate step"
    assert modality.set(uid, "COMPLETED") == 0x0000
    assert _state(ris, "ACC-4711") == "completed"
    assert ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl2") == [], "the item expired"
    assert modality.set(uid, "IN PROGRESS") == 0x0110, "a finished step never changes"
    # The RIS changing the order afterwards does not put a done procedure back on the list.
    assert _send(ris, ORDER.format(control="MSG8", order="XO"), tmp_path) == ["MSA|AA|MSG8"]
    assert _state(ris, "ACC-4711") == "completed"
    assert ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl3") == []


def test_mpps_refuses_what_it_cannot_keep_and_discontinued_also_ends_the_order(ris, tmp_path):
    assert _send(ris, ORDER.format(control="MSG9", order="NW"), tmp_path) == ["MSA|AA|MSG9"]
    modality = MppsModality(ris.settings.mpps_port, ris.settings.pacs_aet)
    assert modality.set(generate_uid(), "COMPLETED") == 0x0112, "no such step"
    missing = _step("ACC-4711")
    del missing.ScheduledStepAttributesSequence
    assert modality.create(generate_uid(), missing) == 0x0120
    assert modality.create(generate_uid(), _step("ACC-4711", "COMPLETED")) == 0x0106, \
        "a step is created in progress"
    unscheduled, uid = generate_uid(), generate_uid()
    assert modality.create(unscheduled, _step("")) == 0x0000, "an exam without an order is kept"
    assert modality.create(uid, _step("ACC-4711")) == 0x0000
    assert modality.set(uid, "DISCONTINUED") == 0x0000
    assert _state(ris, "ACC-4711") == "discontinued"
    assert ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl") == []
    assert ris.ris.poll() is None


def test_with_standard_access_only_declared_modalities_report_steps(make_ris):
    appliance = make_ris(DICOM_ACCESS="standard")
    modality = MppsModality(appliance.settings.mpps_port, appliance.settings.pacs_aet)
    assert modality.create(generate_uid(), _step("")) == 0x0124, "undeclared: refused"
    appliance.orthanc.put_modality("radiography", "DCMTK_MODALITY", "127.0.0.1", free_port())
    assert modality.create(generate_uid(), _step("")) == 0x0000
    other = MppsModality(appliance.settings.mpps_port, appliance.settings.pacs_aet,
                         calling_aet="SOMEONE_ELSE")
    assert other.create(generate_uid(), _step("")) == 0x0124, \
        "another AE title from the same address"


def _study(tmp_path, name: str, **tags: str) -> tuple[list, str]:
    files = corpus.renumbered_study([corpus.DATA_DIR / "SC_rgb.dcm"], tmp_path / name, **tags)
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _unmatched(appliance) -> list[dict]:
    said = run_pacs("ris", "unmatched", "--json", env_file=appliance.env_file)
    assert said.returncode == 0, said.stderr
    return json.loads(said.stdout)["entries"]


def test_without_mpps_the_stable_study_completes_its_order(ris, tmp_path):
    """Most portable X-rays in the field speak no MPPS: the images arriving, complete, are
    what says the exam was done."""
    assert _send(ris, ORDER.format(control="MSG10", order="NW"), tmp_path) == ["MSA|AA|MSG10"]
    files, _ = _study(tmp_path, "done", AccessionNumber="ACC-4711", PatientID="PAT-4711")
    assert ris.modality.store(files).ok
    assert wait_until(lambda: _state(ris, "ACC-4711") == "completed", 90, interval=2), \
        (tmp_path / "ris.log").read_text()[-2000:]
    assert ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl") == []
    assert _unmatched(ris) == []


def test_studies_without_their_order_wait_on_the_reconciliation_list(ris, tmp_path):
    """A modality that lost its worklist sends what the radiographer typed: never matched by
    guesswork, listed with the orders it might be, decided by a person."""
    assert _send(ris, ORDER.format(control="MSG11", order="NW"), tmp_path) == ["MSA|AA|MSG11"]
    typed, typed_uid = _study(tmp_path, "typed", AccessionNumber="", PatientID="PAT-4711",
                              PatientName="DOE^JANE^Q")
    # The order's accession, but another patient's images: not that order.
    other, other_uid = _study(tmp_path, "other", AccessionNumber="ACC-4711",
                              PatientID="SOMEONE-ELSE")
    assert ris.modality.store(typed + other).ok
    assert wait_until(lambda: len(_unmatched(ris)) == 2, 90, interval=2), \
        (tmp_path / "ris.log").read_text()[-2000:]
    entries = {entry["study_uid"]: entry for entry in _unmatched(ris)}
    assert entries[typed_uid]["candidates"] == ["ACC-4711"], "by Patient ID"
    assert entries[other_uid]["candidates"] == ["ACC-4711"], "by accession, for a person to see"
    assert _state(ris, "ACC-4711") == "scheduled", "nothing decided for them"
    assert len(ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl1")) == 1

    refused = run_pacs("ris", "resolve", typed_uid, "--order", "ACC-NONE",
                       env_file=ris.env_file)
    assert refused.returncode == 1 and "no order ACC-NONE" in refused.stderr
    decided = run_pacs("ris", "resolve", typed_uid, "--order", "ACC-4711", "--note",
                       "typed at the modality", "--json", env_file=ris.env_file)
    assert decided.returncode == 0, decided.stderr
    assert _state(ris, "ACC-4711") == "completed"
    assert ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl2") == []
    assert run_pacs("ris", "resolve", other_uid, "--no-order", env_file=ris.env_file
                    ).returncode == 0
    assert _unmatched(ris) == []
    everything = json.loads(run_pacs("ris", "unmatched", "--all", "--json",
                                     env_file=ris.env_file).stdout)["entries"]
    decisions = {entry["study_uid"]: entry["resolution"]["order"] for entry in everything}
    assert decisions == {typed_uid: "ACC-4711", other_uid: None}
    # The typed study's images are given the order's identity; the other is left as sent.
    assert wait_until(lambda: [(c["kind"], c["state"]) for c in _changes(ris)] == [
        ("reconcile", "applied")], 90, interval=2), (tmp_path / "ris.log").read_text()[-2000:]
    _index, ds = _patient_of(ris, typed_uid)
    assert (ds.AccessionNumber, str(ds.PatientName), ds.PatientID, ds.IssuerOfPatientID) == (
        "ACC-4711", "Doe^Jane^Q", "PAT-4711", "CLINIC")
    assert ds.SOPInstanceUID == pydicom.dcmread(typed[0]).SOPInstanceUID
    assert _patient_of(ris, other_uid)[1].PatientID == "SOMEONE-ELSE"


def _statuses(appliance) -> dict:
    return json.loads(run_pacs("ris", "statuses", "--json", env_file=appliance.env_file).stdout)


def test_appointments_from_the_ris_api_reach_the_worklist_and_bad_ones_are_left_off(
        make_ris, tmp_path):
    reference = ReferenceRis().up()
    try:
        reference.schedule("R-1")
        reference.schedule("R-TOO-LONG-ACCESSION")                     # 20 characters
        reference.schedule("R-2", scheduled_at="tomorrow morning")
        reference.schedule("R-3", patient={"id": "P\\3", "family_name": "Doe"})
        reference.schedule("R-4", patient={"id": "P-4", "family_name": "<b>Roe</b>"})
        ris = make_ris(RIS_URL=reference.url, RIS_API_KEY=reference.api_key,
                       RIS_POLL_INTERVAL="5s")
        keys = {**WORKLIST_KEYS, "ScheduledProcedureStepSequence[0].Modality": "CR"}
        assert wait_until(lambda: len(ris.modality.find_worklist(
            keys, tmp_path / uuid.uuid4().hex)) == 2, 60, interval=2), \
            (tmp_path / "ris.log").read_text()[-3000:]
        listed = {str(item.AccessionNumber): item for item in ris.modality.find_worklist(
            keys, tmp_path / "wl")}
        assert set(listed) == {"R-1", "R-4"}
        assert str(listed["R-1"].PatientName) == "Doe^John"
        assert str(listed["R-4"].PatientName) == "<b>Roe</b>", "kept as data, never as markup"
        log = (tmp_path / "ris.log").read_text()
        assert "R-TOO-LONG-ACCESSI" in log and "'tomorrow morning' is not an ISO 8601" in log
        reference.schedule("R-1", status="cancelled")
        assert wait_until(lambda: {str(item.AccessionNumber) for item in ris.modality
                                   .find_worklist(keys, tmp_path / uuid.uuid4().hex)}
                          == {"R-4"}, 60, interval=2)
    finally:
        reference.down()


def test_statuses_wait_while_the_ris_is_down_and_arrive_in_order_once(make_ris, tmp_path):
    """The RIS hears what happened to every order, in order, once, however long the site's
    link to it is down."""
    reference = ReferenceRis().up()
    try:
        reference.schedule("R-10", patient={"id": "PAT-4711", "family_name": "Doe"})
        ris = make_ris(RIS_URL=reference.url, RIS_API_KEY=reference.api_key,
                       RIS_POLL_INTERVAL="5s")
        assert wait_until(lambda: _state_or_none(ris, "R-10") == "scheduled", 60, interval=2)
        reference.down()
        modality, uid = MppsModality(ris.settings.mpps_port, ris.settings.pacs_aet), \
            generate_uid()
        assert modality.create(uid, _step("R-10")) == 0x0000
        assert modality.set(uid, "COMPLETED") == 0x0000
        files, study_uid = _study(tmp_path, "r10", AccessionNumber="R-10",
                                  PatientID="PAT-4711")
        assert ris.modality.store(files).ok
        assert wait_until(lambda: _statuses(ris)["waiting"] == 3, 90, interval=2), \
            _statuses(ris)
        # Still down: nothing is lost, nothing skipped; and the service restarting keeps them.
        ris.ris.send_signal(signal.SIGKILL)
        ris.ris.wait(30)
        ris.start_ris()
        assert _statuses(ris)["waiting"] == 3
        reference.up()
        assert wait_until(lambda: len(reference.events) == 3, 90, interval=2), \
            (tmp_path / "ris.log").read_text()[-2000:]
        assert [(e["accession"], e["status"]) for e in reference.events] == [
            ("R-10", "in_progress"), ("R-10", "completed"), ("R-10", "images_available")]
        assert reference.events[2]["study_instance_uid"] == study_uid
        assert reference.events[2]["performed"] == {
            "procedures": [{"code": "CXR2", "scheme": "LOCAL",
                            "meaning": "Chest X-ray 2 views"}],
            "series": 1, "images": 1, "modalities": ["OT"]}, "billed as the MPPS said"
        assert wait_until(lambda: _statuses(ris)["waiting"] == 0, 30, interval=1)
        # An event for an order the RIS does not know is refused for good and recorded; the
        # queue goes on past it.
        assert _send(ris, ORDER.format(control="MSG20", order="NW"), tmp_path) == \
            ["MSA|AA|MSG20"]
        other = generate_uid()
        assert modality.create(other, _step("ACC-4711")) == 0x0000
        assert wait_until(lambda: any(s["state"] == "refused" for s in _statuses(ris)[
            "statuses"]), 60, interval=2)
        assert len(reference.events) == 3
        # The RIS learns of the order after all: the refused event is sent again, and taken.
        reference.schedule("ACC-4711", patient={"id": "PAT-4711", "issuer": "CLINIC",
                                                "family_name": "Doe"})
        again = run_pacs("ris", "statuses", "--retry-refused", "--json", env_file=ris.env_file)
        assert again.returncode == 0 and "1 refused status(es) queued again" in again.stderr
        assert wait_until(lambda: len(reference.events) == 4, 60, interval=2)
        assert reference.events[3]["accession"] == "ACC-4711"
    finally:
        reference.down()


def _state_or_none(appliance, accession: str) -> str | None:
    shown = json.loads(run_pacs("ris", "orders", "--json", env_file=appliance.env_file).stdout)
    return next((o["state"] for o in shown["orders"] if o["accession"] == accession), None)


PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
RESULT = "\n".join([
    "MSH|^~\\&|RIS|GOTG|PACS|CLINIC|20261127150000||ORU^R01|{control}|P|2.5.1",
    "PID|1||{patient}^^^CLINIC^MR||Doe^Jane^Q||19800102|F",
    "OBR|1|PLAC1|FILL1|CXR^Chest X-ray 2 views^LOCAL|||20261127093000|||||||||||ACC-4711"
    "||||20261127143000|||{status}|||||||R1&Quinn&Ada",
    "OBX|1|TX|&GDT^Findings||{text}||||||F",
]) + "\n"


def _reports(appliance) -> dict:
    shown = run_pacs("ris", "reports", "--json", env_file=appliance.env_file)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def _documents(appliance, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The study's report documents as Orthanc holds them, by SOP class (SR, PDF)."""
    [study] = appliance.orthanc.post("/tools/lookup", data=study_uid.encode())
    found: dict[str, list[pydicom.Dataset]] = {}
    for instance in appliance.orthanc.get(f"{study['Path']}/instances"):
        content = appliance.orthanc.request("GET", f"/instances/{instance['ID']}/file").content
        ds = pydicom.dcmread(io.BytesIO(content))
        if ds.Modality in ("SR", "DOC"):
            found.setdefault(ds.Modality, []).append(ds)
    return found


def test_a_final_report_by_hl7_is_attached_to_its_study_and_a_correction_beside_it(
        ris, tmp_path):
    """The report comes back to the images: before them it waits; never under another
    patient's study; a correction is attached beside the first, which stays."""
    assert _send(ris, ORDER.format(control="MSG30", order="NW"), tmp_path) == ["MSA|AA|MSG30"]
    result = RESULT.format(control="ORU1", patient="PAT-4711", status="F",
                           text="<script>alert(1)</script> Lungs clear.")
    pdf_obx = f"OBX|2|ED|PDF^Report||^application^pdf^Base64^{base64.b64encode(PDF).decode()}"
    assert _send(ris, result + pdf_obx + "\n", tmp_path) == ["MSA|AA|ORU1"]
    assert _send(ris, RESULT.format(control="ORU2", patient="SOMEONE-ELSE", status="F",
                                    text="Not hers."), tmp_path) == ["MSA|AA|ORU2"]
    assert _reports(ris)["counts"] == {"waiting": 2}, "no study yet: they wait"

    files, study_uid = _study(tmp_path, "reported", AccessionNumber="ACC-4711",
                              PatientID="PAT-4711")
    assert ris.modality.store(files).ok
    assert wait_until(lambda: _reports(ris)["counts"].get("attached") == 1, 90, interval=2), \
        (tmp_path / "ris.log").read_text()[-2000:]
    documents = _documents(ris, study_uid)
    [sr], [pdf] = documents["SR"], documents["DOC"]
    assert sr.ContentSequence[-1].TextValue == "<script>alert(1)</script> Lungs clear."
    assert (sr.PatientID, sr.AccessionNumber, sr.VerificationFlag) == (
        "PAT-4711", "ACC-4711", "VERIFIED")
    assert pdf.EncapsulatedDocument[:pdf.EncapsulatedDocumentLength] == PDF
    [waiting] = [r for r in _reports(ris)["reports"] if r["state"] == "waiting"]
    assert "belongs to Patient ID PAT-4711, the report names SOMEONE-ELSE" in \
        waiting["last_error"]

    assert _send(ris, RESULT.format(control="ORU3", patient="PAT-4711", status="C",
                                    text="Corrected: small left effusion."), tmp_path) == \
        ["MSA|AA|ORU3"]
    assert wait_until(lambda: _reports(ris)["counts"].get("attached") == 2, 60, interval=2)
    srs = sorted(_documents(ris, study_uid)["SR"], key=lambda ds: ds.ContentSequence[-1]
                 .TextValue)
    assert [ds.ContentSequence[-1].TextValue for ds in srs] == [
        "<script>alert(1)</script> Lungs clear.", "Corrected: small left effusion."]
    predecessor = srs[1].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        srs[0].SOPInstanceUID
    status = json.loads(run_pacs("status", "--json", env_file=ris.env_file).stdout)
    assert status["ris"]["reports_waiting"] == 1


def test_a_report_from_the_ris_api_is_attached_to_its_study(make_ris, tmp_path):
    reference = ReferenceRis().up()
    try:
        reference.sign("R-20", "Fracture of the left radius.",
                       pdf=base64.b64encode(PDF).decode())
        ris = make_ris(RIS_URL=reference.url, RIS_API_KEY=reference.api_key,
                       RIS_POLL_INTERVAL="5s")
        files, study_uid = _study(tmp_path, "r20", AccessionNumber="R-20",
                                  PatientID="PAT-REST")
        assert ris.modality.store(files).ok
        assert wait_until(lambda: _reports(ris)["counts"] == {"attached": 1}, 90,
                          interval=2), (tmp_path / "ris.log").read_text()[-2000:]
        documents = _documents(ris, study_uid)
        assert documents["SR"][0].ContentSequence[-1].TextValue == \
            "Fracture of the left radius."
        assert documents["SR"][0].ContentSequence[0].PersonName == "Quinn^Ada"
        assert documents["DOC"][0].EncapsulatedDocument[:len(PDF)] == PDF
    finally:
        reference.down()


def _changes(appliance) -> list[dict]:
    shown = run_pacs("ris", "demographics", "--json", env_file=appliance.env_file)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)["changes"]


def _patient_of(appliance, study_uid: str) -> tuple[dict, pydicom.Dataset]:
    """The study's patient as Orthanc's index has it, and its first instance's file."""
    [study] = appliance.orthanc.post("/tools/lookup", data=study_uid.encode())
    [instance] = appliance.orthanc.get(f"{study['Path']}/instances")[:1]
    content = appliance.orthanc.request("GET", f"/instances/{instance['ID']}/file").content
    return (appliance.orthanc.get(f"{study['Path']}/patient")["MainDicomTags"],
            pydicom.dcmread(io.BytesIO(content)))


def test_a_patient_update_reaches_worklist_and_images_and_a_merge_waits_for_a_person(
        ris, tmp_path):
    """A name corrected at registration reaches the images, UIDs and pixels kept, with an
    audit line; a merge of two patients' images happens only once a person confirms it."""
    assert _send(ris, ORDER.format(control="MSG40", order="NW"), tmp_path) == ["MSA|AA|MSG40"]
    assert _send(ris, ORDER.format(control="MSG41", order="NW").replace("ACC-4711", "ACC-NEXT"),
                 tmp_path) == ["MSA|AA|MSG41"]  # her next exam, still on the worklist
    files, study_uid = _study(tmp_path, "hers", AccessionNumber="ACC-4711",
                              PatientID="PAT-4711", PatientName="Doe^Jane^Q")
    old_files, old_uid = _study(tmp_path, "twice", AccessionNumber="",
                                PatientID="PAT-DUP", PatientName="Doe^Jane")
    assert ris.modality.store(files + old_files).ok
    original = pydicom.dcmread(files[0])
    header = "MSH|^~\\&|HIS|GOTG|PACS|CLINIC|20261127160000||{kind}|{control}|P|2.5.1\n"
    assert _send(ris, header.format(kind="ADT^A40", control="ADT1")
                 + "PID|1||PAT-4711^^^CLINIC||Doe^Jane^Q||19800102|F\nMRG|PAT-DUP\n",
                 tmp_path) == ["MSA|AA|ADT1"]
    assert _send(ris, header.format(kind="ADT^A08", control="ADT2")
                 + "PID|1||PAT-4711^^^CLINIC||Doe^Janet^Q||19800102|F\n", tmp_path) == \
        ["MSA|AA|ADT2"]
    assert wait_until(lambda: any(c["kind"] == "update" and c["state"] == "applied"
                                  for c in _changes(ris)), 90, interval=2), \
        (tmp_path / "ris.log").read_text()[-2000:]
    index, ds = _patient_of(ris, study_uid)
    assert index["PatientName"] == "Doe^Janet^Q" and str(ds.PatientName) == "Doe^Janet^Q"
    assert (ds.SOPInstanceUID, ds.PixelData) == (original.SOPInstanceUID, original.PixelData)
    # Once her study is complete (stable), its order leaves the list; the next one stays.
    assert wait_until(lambda: _state(ris, "ACC-4711") == "completed", 90, interval=2)
    [item] = ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl")
    assert (str(item.AccessionNumber), str(item.PatientName)) == ("ACC-NEXT", "Doe^Janet^Q")
    audit = [json.loads(line) for line in ris.settings.audit_file.read_text().splitlines()]
    assert any(e["action"] == "modify" and e.get("resource") == study_uid for e in audit)

    [merge] = [c for c in _changes(ris) if c["kind"] == "merge"]
    assert merge["state"] == "held"
    assert _patient_of(ris, old_uid)[1].PatientID == "PAT-DUP", "not merged by itself"
    confirmed = run_pacs("ris", "merge", str(merge["seq"]), "--confirm", "--note",
                         "registered twice", env_file=ris.env_file)
    assert confirmed.returncode == 0, confirmed.stderr
    assert wait_until(lambda: all(c["state"] == "applied" for c in _changes(ris)), 90,
                      interval=2), (tmp_path / "ris.log").read_text()[-2000:]
    index, ds = _patient_of(ris, old_uid)
    assert (ds.PatientID, str(ds.PatientName)) == ("PAT-4711", "Doe^Janet^Q"), \
        "confirmed after the rename: the name the RIS gave last, not the merge message's"
    assert index["PatientID"] == "PAT-4711"
    assert ris.orthanc.post("/tools/find", json={"Level": "Patient",
                                                 "Query": {"PatientID": "PAT-DUP"}}) == []


def test_an_instance_staged_when_the_power_went_is_stored_at_the_next_start(ris, tmp_path):
    """The one moment an instance being rewritten is not in Orthanc: its new copy is on disk,
    and goes back in when the bridge starts again."""
    files, study_uid = _study(tmp_path, "staged", AccessionNumber="X1", PatientID="PAT-X")
    assert ris.modality.store(files).ok
    [study] = ris.orthanc.post("/tools/lookup", data=study_uid.encode())
    [instance] = ris.orthanc.get(f"{study['Path']}/instances")
    content = ris.orthanc.request("GET", f"/instances/{instance['ID']}/file").content
    ris.ris.send_signal(signal.SIGKILL)
    ris.ris.wait(30)
    staging = ris.settings.state_path / "ris" / "rewriting"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / f"{instance['ID']}.dcm").write_bytes(content)
    ris.orthanc.delete(f"/instances/{instance['ID']}")
    ris.start_ris()
    assert wait_until(lambda: not list(staging.glob("*.dcm")), 60, interval=1)
    assert ris.orthanc.request("GET", f"/instances/{instance['ID']}/file").content == content


def test_statuses_reach_an_hl7_only_ris_in_order_across_an_outage(make_ris, tmp_path):
    """A RIS with no REST API hears what happened by HL7 order status messages, in order,
    once; refused ones are recorded and do not block the rest."""
    his = Hl7Ris().up()
    try:
        ris = make_ris(RIS_HL7_ADDRESS=his.address, RIS_POLL_INTERVAL="5s")
        assert _send(ris, ORDER.format(control="MSG50", order="NW"), tmp_path) == \
            ["MSA|AA|MSG50"]
        modality, uid = MppsModality(ris.settings.mpps_port, ris.settings.pacs_aet), \
            generate_uid()
        assert modality.create(uid, _step("ACC-4711")) == 0x0000
        assert wait_until(lambda: his.statuses() == [("ACC-4711", "IP", "")], 60, interval=1), \
            (tmp_path / "ris.log").read_text()[-2000:]
        [message] = his.messages
        assert str(message.segment("ORC")[2]) == "PLAC1", "the RIS's own order number"
        assert str(message.segment("PID")[5]) == "Doe^Jane^Q"
        his.down()
        assert modality.set(uid, "COMPLETED") == 0x0000
        files, study_uid = _study(tmp_path, "hl7", AccessionNumber="ACC-4711",
                                  PatientID="PAT-4711")
        assert ris.modality.store(files).ok
        assert wait_until(lambda: _statuses(ris)["waiting"] == 2, 90, interval=2)
        his.up()
        assert wait_until(lambda: len(his.messages) == 3, 90, interval=2), \
            (tmp_path / "ris.log").read_text()[-2000:]
        assert his.statuses() == [("ACC-4711", "IP", ""), ("ACC-4711", "CM", ""),
                                  ("ACC-4711", "CM", "R")]
        assert str(his.messages[2].segment("ZDS")[1][0][0]) == study_uid
        # One the RIS refuses is recorded; the queue goes on.
        his.refuse.add("ACC-REF")
        assert _send(ris, ORDER.format(control="MSG51", order="NW").replace(
            "ACC-4711", "ACC-REF"), tmp_path) == ["MSA|AA|MSG51"]
        assert modality.create(generate_uid(), _step("ACC-REF")) == 0x0000
        assert wait_until(lambda: any(s["state"] == "refused" for s in _statuses(ris)[
            "statuses"]), 60, interval=2)
        assert _statuses(ris)["waiting"] == 0 and len(his.messages) == 3
    finally:
        his.down()


def _raw_find(appliance, elements: list[tuple[int, str, bytes]]) -> tuple[list, bool]:
    """A worklist C-FIND from pynetdicom with these raw elements as the query, encoded as
    sent (however malformed): the statuses answered, and whether the association was
    aborted."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityWorklistInformationFind

    query = Dataset()
    for tag, vr, value in elements:
        query.add(RawDataElement(Tag(tag), vr, len(value), value, 0, False, True))
    ae = AE(ae_title="DCMTK_MODALITY")
    ae.dimse_timeout = 5  # an aborted association answers nothing: no need to wait long
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", appliance.settings.dicom_port,
                         ae_title=appliance.settings.pacs_aet)
    assert assoc.is_established
    answers = [(status.Status if status else None, found)
               for status, found in assoc.send_c_find(query, ModalityWorklistInformationFind)]
    aborted = assoc.is_aborted
    assoc.release()
    return answers, aborted


def test_malformed_worklist_queries_are_refused_and_nothing_crashes(ris, tmp_path):
    """A modality's broken query must never bring the worklist down, nor match what it did
    not ask for. A query that cannot be decoded gets the association aborted (DICOM's answer
    when the message itself cannot be read); one whose values are nonsense matches nothing."""
    assert _send(ris, ORDER.format(control="MSG60", order="NW"), tmp_path) == ["MSA|AA|MSG60"]
    answers, aborted = _raw_find(ris, [(0x00100010, "PN", b""),
                                       (0x00400100, "LO", b"notasequence")])
    assert aborted or all(status not in (0xFF00, 0xFF01, 0x0000) for status, _ in answers)
    for elements in ([(0x00100030, "DA", b"\xff" * 20)],
                     [(0x00080005, "CS", b"ISO_IR 999"), (0x00100010, "PN", b"Roe*")]):
        answers, aborted = _raw_find(ris, elements)
        assert aborted or [found for status, found in answers
                           if status in (0xFF00, 0xFF01)] == [], elements
    # Bytes that are no sequence where one belongs: read as an empty one by Orthanc (a
    # universal match on it); whatever the answer, the service lives on.
    answers, aborted = _raw_find(ris, [(0x00400100, "SQ", bytes(range(1, 9)))])
    assert aborted or answers[-1][0] == 0x0000
    assert ris.orthanc.is_alive()
    [item] = ris.modality.find_worklist(WORKLIST_KEYS, tmp_path / "wl")
    assert str(item.AccessionNumber) == "ACC-4711", "the worklist answers as before"


def test_reports_and_rewritten_instances_are_owed_to_hq(ris, tmp_path):
    """What the bridge adds to a study (a report) or rewrites in it (a corrected name) goes
    to HQ with the next sync, even when HQ confirmed the study before."""
    from gotg_pacs.sync.feed import Feed
    from gotg_pacs.sync.outbox import Outbox

    assert _send(ris, ORDER.format(control="MSG70", order="NW"), tmp_path) == ["MSA|AA|MSG70"]
    files, _study_uid = _study(tmp_path, "owed", AccessionNumber="ACC-4711",
                               PatientID="PAT-4711")
    assert ris.modality.store(files).ok
    image_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    box = Outbox(ris.settings.sync_outbox_file)
    feed = Feed(ris.orthanc, box)
    try:
        while not feed.step():
            pass
        box.db.execute("UPDATE instances SET state = 'confirmed'")  # HQ holds the study
        header = "MSH|^~\\&|HIS|GOTG|PACS|CLINIC|20261127160000||ADT^A08|ADT9|P|2.5.1\n"
        assert _send(ris, header + "PID|1||PAT-4711^^^CLINIC||Doe^Janet||19800102|F\n",
                     tmp_path) == ["MSA|AA|ADT9"]
        assert _send(ris, RESULT.format(control="ORU9", patient="PAT-4711", status="F",
                                        text="Normal."), tmp_path) == ["MSA|AA|ORU9"]
        assert wait_until(lambda: _reports(ris)["counts"] == {"attached": 1} and all(
            c["state"] == "applied" for c in _changes(ris)), 90, interval=2), \
            (tmp_path / "ris.log").read_text()[-2000:]
        while not feed.step():
            pass
        owed = dict(box.db.execute("SELECT sop_uid, state FROM instances").fetchall())
        [report] = [d["sop"] for r in _reports(ris)["reports"] for d in r["documents"]]
        assert owed[image_uid] == "pending", "the corrected image goes again"
        assert owed[report] == "pending", "the report goes"
    finally:
        box.close()
