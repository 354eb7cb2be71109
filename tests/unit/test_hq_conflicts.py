"""HQ's conflict rules on real images: qualification changes exactly the identity, the ledger
never merges and never loses a decision.

Why it matters: two clinics' "12345" are two people; a qualification that changed anything else
(or a check that let it) would be a silent edit of a medical image.
"""

from __future__ import annotations

import io
import json

import pydicom
import pytest

from gotg_pacs import clikit
from gotg_pacs.hq import conflicts
from tests.support import corpus


def _dataset(name: str = "MR2_UNCR.dcm") -> pydicom.Dataset:
    return pydicom.dcmread(corpus.DATA_DIR / name)


def _qualified_file(dataset: pydicom.Dataset, site: str) -> pydicom.Dataset:
    conflicts.qualify(dataset, site)
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=False)
    return pydicom.dcmread(io.BytesIO(out.getvalue()))


@pytest.mark.parametrize("name", [*corpus.REPRESENTATIVE[:3], "US1_UNCR.dcm",
                                  "gdcm-US-ALOKA-16_big.dcm"])
def test_qualification_changes_the_identity_only_and_keeps_the_original_in_the_file(name):
    original = _dataset(name)
    sent_id = str(original.get("PatientID", ""))
    stored = _qualified_file(_dataset(name), "site-a")
    assert stored.PatientID == f"site-a:{sent_id}"
    assert stored.IssuerOfPatientID == "site-a"
    assert stored.OtherPatientIDsSequence[-1].PatientID == sent_id
    assert conflicts.same_but_identity(_dataset(name), stored, "site-a")
    assert not conflicts.same_but_identity(_dataset(name), stored, "site-b")
    assert not conflicts.same_but_identity(original, _dataset(name), "site-a"), "unqualified"


@pytest.mark.parametrize("change", ["PatientName", "StudyDescription", "pixels", "issuer",
                                    "other-ids"])
def test_verification_refuses_any_other_difference(change):
    stored = _qualified_file(_dataset(), "site-a")
    if change == "pixels":
        data = bytearray(stored.PixelData)
        data[100] ^= 1
        stored.PixelData = bytes(data)
    elif change == "issuer":
        stored.IssuerOfPatientID = "site-b"
    elif change == "other-ids":
        stored.OtherPatientIDsSequence[-1].PatientID = "99"
    else:
        setattr(stored, change, "Changed")
    assert not conflicts.same_but_identity(_dataset(), stored, "site-a")


def test_an_issuer_and_other_ids_already_sent_are_kept_in_order():
    dataset = _dataset()
    sent_id = str(dataset.PatientID)
    dataset.IssuerOfPatientID = "MOH"
    earlier = pydicom.Dataset()
    earlier.PatientID = "N-1"
    dataset.OtherPatientIDsSequence = [earlier]
    conflicts.qualify(dataset, "site-a")
    assert [item.PatientID for item in dataset.OtherPatientIDsSequence] == ["N-1", sent_id]
    assert dataset.OtherPatientIDsSequence[-1].IssuerOfPatientID == "MOH"
    assert dataset.IssuerOfPatientID == "site-a"


def test_differing_names_the_attributes_and_the_pixels():
    old, new = _dataset(), _dataset()
    new.PatientName = "Fixed^Name"
    new.PixelData = bytes(len(new.PixelData))
    assert conflicts.differing(old, new) == ["PatientName", "PixelData"]


def _observe(ledger, site, patient_id, name, study="1.2.3", sop="1.2.3.1", issuer=""):
    dataset = pydicom.Dataset()
    dataset.PatientID, dataset.PatientName, dataset.StudyInstanceUID = patient_id, name, study
    dataset.PatientBirthDate, dataset.PatientSex = "19800101", "F"
    ledger.observe(site, dataset, sop, f"hq-{sop}", patient_id, issuer)


def test_the_ledger_lists_disagreements_and_never_lists_bare_id_collisions(tmp_path):
    ledger = conflicts.Ledger(tmp_path)
    _observe(ledger, "site-a", "12345", "Amina", study="1.1")
    _observe(ledger, "site-b", "12345", "Omar", study="2.1")
    assert ledger.entries() == [], "two sites' 12345 are two patients: nothing to reconcile"
    _observe(ledger, "site-a", "12345", "Amina", study="1.1")  # the same again: idempotent
    _observe(ledger, "site-a", "12345", "Amena", study="1.2", sop="1.2.1")
    [entry] = ledger.entries()
    assert entry["kind"] == "patient-demographics" and entry["subject"] == "site-a:12345"
    assert [v["PatientName"] for v in entry["variants"]] == ["Amina", "Amena"]

    _observe(ledger, "site-b", "777", "Omar", study="1.1", sop="1.1.9")  # site-a's study
    assert {e["kind"] for e in ledger.entries()} == {"patient-demographics",
                                                     "study-across-sites"}
    _observe(ledger, "site-a", "N-1", "Sara", study="3.1", sop="3.1.1", issuer="MOH")
    _observe(ledger, "site-b", "N-1", "Sarah", study="4.1", sop="4.1.1", issuer="MOH")
    assert "issued-id-across-sites" in {e["kind"] for e in ledger.entries()}

    resolved = ledger.resolve(entry["id"], "same-patient", "typo at the modality", "nadia")
    assert resolved["state"] == "resolved" and resolved["resolutions"][0]["by"] == "nadia"
    assert entry["id"] not in [e["id"] for e in ledger.entries()]
    _observe(ledger, "site-a", "12345", "A.", study="1.3", sop="1.3.1")
    reopened = ledger.entry(entry["id"])
    assert reopened["state"] == "open" and len(reopened["variants"]) == 3
    assert reopened["resolutions"][0]["note"] == "typo at the modality", "history kept"
    with pytest.raises(ValueError):
        ledger.resolve(entry["id"], "merge", "", "nadia")
    audit = [json.loads(line) for line in ledger.audit_file.read_text().splitlines()]
    assert [a["event"] for a in audit] == ["resolved"]


def test_a_revision_is_kept_byte_for_byte_under_a_name_no_header_chooses(tmp_path):
    ledger = conflicts.Ledger(tmp_path / "hq")
    source = tmp_path / "new.dcm"
    source.write_bytes(b"revised bytes")
    hostile_uid = "../../etc/passwd<script>"
    held = {"hq_id": "abc", "site": "site-a", "md5": "0" * 32}
    revision = ledger.keep_revision("site-a", hostile_uid, "1" * 32, source, held,
                                    ["PatientName"])
    path = ledger.revision_path(revision)
    assert path.read_bytes() == b"revised bytes"
    assert tmp_path / "hq" / "revisions" in path.parents
    assert ledger.held_revision("site-a", hostile_uid, "1" * 32) == revision
    assert ledger.held_revision("site-b", hostile_uid, "1" * 32) is None
    [entry] = ledger.entries()
    assert entry["kind"] == "revision" and entry["subject"] == f"site-a|{hostile_uid}"
    [audit] = [json.loads(line) for line in ledger.audit_file.read_text().splitlines()]
    assert audit["old_md5"] == "0" * 32 and audit["new_md5"] == "1" * 32
    assert audit["differing"] == ["PatientName"] and audit["site"] == "site-a"
    assert clikit.printable("A\x1b[2JB") == "A\\x1b[2JB"
