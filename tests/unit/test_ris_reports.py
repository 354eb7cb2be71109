"""Reports from the RIS (HL7 ORU^R01) read, kept once, and made into DICOM that DCMTK reads.

Why it matters: a report is what the clinician acts on. It must reach the images as signed,
never twice, never under another patient; a message the bridge cannot take must be refused with
the reason, and a preliminary result must not pass for a final one.
"""

from __future__ import annotations

import base64
import subprocess

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gotg_pacs.ris import reports
from gotg_pacs.ris.hl7_orders import Rejected, read
from gotg_pacs.ris.hl7_reports import reports_in
from gotg_pacs.ris.reports import ReportQueue
from tests.support.hl7_ris import msa

PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
MSH = "MSH|^~\\&|RIS|GOTG|PACS|CLINIC|20261127150000||ORU^R01|{control}|P|2.5.1"
PID = "PID|1||PAT123^^^CLINIC^MR||Doe^Jane||19800102|F"
OBR = ("OBR|1|PLAC1|FILL1|CXR^Chest X-ray 2 views^LOCAL|||20261127093000|||||||||||{accession}"
       "||||20261127143000|||{status}|||||||R1&Quinn&Ada")
TEXT = "OBX|{n}|{kind}|&GDT^Findings||{value}||||||F|||||R1^Quinn^Ada"
ED = "OBX|9|ED|PDF^Report||^application^pdf^Base64^{data}||||||F"
STUDY = {"MainDicomTags": {"StudyInstanceUID": "1.2.826.0.1.3680043.2.1125.1",
                           "AccessionNumber": "ACC0001", "StudyDate": "20261127",
                           "StudyTime": "093000", "StudyID": "1"},
         "PatientMainDicomTags": {"PatientID": "PAT123", "PatientName": "Doe^Jane",
                                  "PatientBirthDate": "19800102", "PatientSex": "F"}}


def oru(control="R1", accession="ACC0001", status="F", lines=("No acute findings.",),
        pdf: bytes | None = None, kind="TX") -> bytes:
    segments = [MSH.format(control=control), PID, OBR.format(accession=accession,
                                                             status=status)]
    segments += [TEXT.format(n=n, kind=kind, value=line) for n, line in enumerate(lines, 1)]
    if pdf is not None:
        segments.append(ED.format(data=base64.b64encode(pdf).decode()))
    return "\r".join(segments).encode("latin-1")


def test_an_oru_report_is_read_with_its_text_pdf_author_and_signing_time():
    [found], others = reports_in(read(oru(lines=("Heart normal.", "Lungs \\T\\ pleura clear."),
                                          pdf=PDF)))
    assert others == 0
    assert (found.accession, found.patient_id, found.status, found.author) == \
        ("ACC0001", "PAT123", "final", "Quinn^Ada")
    assert found.text == "Heart normal.\nLungs & pleura clear."
    assert (found.signed_date, found.signed_time) == ("20261127", "143000")
    assert found.pdf == PDF and found.title == "Chest X-ray 2 views"
    [formatted], _ = reports_in(read(oru(kind="FT", lines=("One\\.br\\Two",))))
    assert formatted.text == "One\nTwo", "FT's line breaks are lines"
    [repeated], _ = reports_in(read(oru(lines=("Heart normal.~Lungs clear.~Impression: none",))))
    assert repeated.text == "Heart normal.\nLungs clear.\nImpression: none", \
        "each repetition of OBX-5 is a line, none lost"
    [by_filler], _ = reports_in(read(oru(accession="")))
    assert by_filler.accession == "FILL1", "no OBR-18: the filler order number"


def test_a_preliminary_result_is_acknowledged_and_not_kept(listener):
    assert msa(listener.handle(oru(status="P")))[0] == "AA"
    assert ReportQueue(listener.orders).counts() == {}


@pytest.mark.parametrize(("message", "said"), [
    (oru(pdf=b"<html>not a pdf</html>"), "not a PDF"),
    (oru(lines=("bell \x07 here",)), "control character"),
    (oru(accession="").replace(b"|FILL1|", b"||"), "Accession Number: missing"),
    (oru(accession="A" * 17), "never cut short"),
    (oru(lines=()), "neither text nor a PDF"),
    (oru().replace(b"^application^pdf^", b"^text^html^") + b"\rOBX|9|ED|X||^text^html^Base64"
     b"^PGI+", "only application/pdf"),
])
def test_a_report_the_bridge_cannot_take_is_refused_and_nothing_kept(listener, message, said):
    code, _control, text = msa(listener.handle(message))[:3]
    assert code == "AR" and said in text
    assert ReportQueue(listener.orders).counts() == {}


def test_the_same_report_is_kept_once_however_it_is_sent_again(listener):
    assert msa(listener.handle(oru(control="R1")))[0] == "AA"
    assert msa(listener.handle(oru(control="R1")))[0] == "AA", "its ACK was lost: sent again"
    assert msa(listener.handle(oru(control="R2")))[0] == "AA", "the RIS sent it once more"
    assert ReportQueue(listener.orders).counts() == {"waiting": 1}
    assert msa(listener.handle(oru(control="R3", status="C",
                                   lines=("Corrected: small effusion.",))))[0] == "AA"
    assert ReportQueue(listener.orders).counts() == {"waiting": 2}


def test_the_sr_and_pdf_are_dicom_that_dcmtk_reads(tmp_path):
    [first], _ = reports_in(read(oru(lines=("<script>alert(1)</script>", "Lungs clear."),
                                     pdf=PDF)))
    sr = reports.text_sr(first, STUDY, [])
    pdf = reports.encapsulated_pdf(first, STUDY)
    (tmp_path / "sr.dcm").write_bytes(reports.as_bytes(sr))
    (tmp_path / "pdf.dcm").write_bytes(reports.as_bytes(pdf))
    dumped = subprocess.run(["dsrdump", str(tmp_path / "sr.dcm")], capture_output=True,
                            text=True, check=True)
    assert "Basic Text SR" in dumped.stdout and "Diagnostic Imaging Report" in dumped.stdout
    assert "<script>alert(1)</script>" in dumped.stdout and "Quinn^Ada" in dumped.stdout
    assert "Verified" in dumped.stdout.title()
    subprocess.run(["dcm2pdf", str(tmp_path / "pdf.dcm"), str(tmp_path / "out.pdf")],
                   check=True, capture_output=True)
    assert (tmp_path / "out.pdf").read_bytes().rstrip(b"\0") == PDF
    for document in (sr, pdf):
        back = pydicom.dcmread(tmp_path / ("sr.dcm" if document is sr else "pdf.dcm"))
        assert (back.StudyInstanceUID, back.PatientID, back.AccessionNumber) == (
            "1.2.826.0.1.3680043.2.1125.1", "PAT123", "ACC0001"), "in the study it reports"
    assert sr.SOPInstanceUID == reports.text_sr(first, STUDY, []).SOPInstanceUID, \
        "the same report makes the same instance: stored once"

    [corrected], _ = reports_in(read(oru(status="C", lines=("Corrected.",))))
    second = reports.text_sr(corrected, STUDY, [{"class": sr.SOPClassUID,
                                                 "sop": sr.SOPInstanceUID,
                                                 "series": sr.SeriesInstanceUID}])
    assert second.SOPInstanceUID != sr.SOPInstanceUID
    named = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert named.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr.SOPInstanceUID


_PIECES = st.sampled_from(["|", "^", "~", "\\", "&", "\r", "OBX|", "OBR|", "ED", "\x00",
                           "é", "F", "C", "Base64^", "%PDF-"])


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=500), insert=st.lists(_PIECES, max_size=6),
       noise=st.binary(max_size=40))
def test_fuzzed_reports_are_answered_and_never_crash(listener, cut, insert, noise):
    base = oru(control=f"FUZZ{cut}", pdf=PDF)
    message = base[:cut] + "".join(insert).encode("utf-8") + noise + base[cut:]
    before = ReportQueue(listener.orders).counts()
    try:
        reports_in(read(message))
    except Rejected:
        pass
    code = msa(listener.handle(message))[0]
    assert code in ("AA", "AR", "AE")
    if code != "AA":
        assert ReportQueue(listener.orders).counts() == before
