"""External-media export: the pure parts (File IDs, space, directory records, DICOMDIR encoding,
what counts as a disk we may add to). The whole export against a real Orthanc is in
tests/integration/test_archive_external.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet, is_conformant_file_id
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gotg_pacs import archive, clikit
from tests.support import corpus


def _header(**tags) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    values = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1", "SOPInstanceUID": generate_uid(),
              "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4", "PatientID": "P1",
              "PatientName": "Doe^Jane", "StudyDate": "20240102", "StudyTime": "101010",
              "StudyID": "1", "AccessionNumber": "", "Modality": "CR", "SeriesNumber": "1",
              "InstanceNumber": "1"}
    values.update(tags)
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    return dataset


def test_file_ids_are_conformant_and_bounded():
    assert archive.component("IM", 1) == "IM000001"
    assert is_conformant_file_id(Path("EX000001/ST999999/SE000001/IM000001"))
    for bad in (0, 1_000_000):
        with pytest.raises(archive.ArchiveError):
            archive.component("IM", bad)
    assert archive.file_set_id("kakuma-2") == "KAKUMA_2"
    assert archive.file_set_id("a" * 32) == "A" * 16
    assert archive.file_set_id("") == "GOTG_PACS"


def test_printable_escapes_terminal_control_and_truncates():
    assert clikit.printable("\x1b[2Jred") == "\\x1b[2Jred"
    assert clikit.printable("x" * 100, limit=10) == "x" * 9 + "…"


def test_space_needed_counts_whole_blocks_and_the_directory():
    assert archive.space_needed([1, 4096, 4097], 4096, 3) == (
        4096 + 4096 + 8192 + 3 * archive.PER_INSTANCE_OVERHEAD + archive.FIXED_OVERHEAD)
    assert archive.space_needed([], 4096, 0) == archive.FIXED_OVERHEAD


def test_unidentified_patients_get_distinct_stable_stand_ins():
    a1 = archive.records_for(_header(PatientID="", StudyInstanceUID="1.1"), "EX000001/IM000001")
    a2 = archive.records_for(_header(PatientID="", StudyInstanceUID="1.1"), "EX000001/IM000002")
    b = archive.records_for(_header(PatientID="", StudyInstanceUID="1.2"), "EX000001/IM000003")
    assert a1.patient.PatientID == a2.patient.PatientID != b.patient.PatientID
    assert a1.patient.PatientID.startswith("NOID-") and a1.patient_key != b.patient_key


def test_same_id_with_another_name_is_never_filed_as_one_patient():
    one = archive.records_for(_header(PatientName="Doe^Jane"), "A/B")
    other = archive.records_for(_header(PatientName="Roe^John"), "A/C")
    assert one.patient_key != other.patient_key


def test_stand_ins_for_empty_type_1_keys_touch_only_the_record():
    header = _header(StudyDate="", StudyTime="", SeriesDate="20230505", StudyID="",
                     Modality="", SeriesNumber="", InstanceNumber="")
    records = archive.records_for(header, "EX000001/ST000001/SE000001/IM000007", 7)
    assert records.study.StudyDate == "20230505" and records.study.StudyTime == "000000"
    assert records.study.StudyID == "NONE" and records.series.Modality == "OT"
    assert str(records.leaf.InstanceNumber) == "7"
    assert records.leaf.ReferencedFileID == ["EX000001", "ST000001", "SE000001", "IM000007"]
    assert header.StudyDate == "" and header.PatientID == "P1"  # the header is not changed
    bare = archive.records_for(_header(StudyDate="", StudyTime=""), "A/B")
    assert bare.study.StudyDate == "19000101"


def test_leaf_record_types_of_non_image_objects():
    kinds = {"1.2.840.10008.5.1.4.1.1.88.33": "SR DOCUMENT",        # Comprehensive SR
             "1.2.840.10008.5.1.4.1.1.88.59": "KEY OBJECT DOC",     # Key Object Selection
             "1.2.840.10008.5.1.4.1.1.11.1": "PRESENTATION",        # Grayscale Softcopy PS
             "1.2.840.10008.5.1.4.1.1.104.1": "ENCAP DOC",          # Encapsulated PDF
             "1.2.840.10008.5.1.4.1.1.1": "IMAGE"}                   # CR
    for sop_class, expected in kinds.items():
        assert archive.leaf_record_type(_header(SOPClassUID=sop_class)) == expected


def test_a_non_image_object_missing_record_keys_is_still_referenced():
    records = archive.records_for(_header(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.33"), "A/B")
    assert records.leaf_type == "IMAGE" and "filed as IMAGE" in records.warning


def _file_set(root: Path, sources: list[Path]) -> list[archive.Records]:
    records = []
    for index, source in enumerate(sources, 1):
        file_id = f"EX000001/ST000001/SE000001/IM{index:06d}"
        (root / file_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, root / file_id)
        records.append(archive.records_for(archive.read_header(root / file_id), file_id, index))
    return records


def test_dicomdir_of_the_whole_corpus_reads_back_through_pydicom(tmp_path):
    sources = corpus.representative()
    records = _file_set(tmp_path, sources)
    (tmp_path / "DICOMDIR").write_bytes(archive.encode_dicomdir(records, "TEST", "1.2.3.4"))

    referenced = archive.read_dicomdir(tmp_path / "DICOMDIR")
    assert len(referenced) == len(sources)
    for record in records:
        uid = str(record.leaf.ReferencedSOPInstanceUIDInFile)
        assert referenced[uid]["path"] == "/".join(record.leaf.ReferencedFileID)
        syntax = record.leaf.ReferencedTransferSyntaxUIDInFile
        assert referenced[uid]["transfer_syntax_uid"] == syntax

    directory = pydicom.dcmread(tmp_path / "DICOMDIR")
    assert directory.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert directory.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert directory.FileSetID == "TEST"
    by_offset = {item.seq_item_tell: item for item in directory.DirectoryRecordSequence}
    first = by_offset[directory.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity]
    assert first.DirectoryRecordType == "PATIENT"
    below = by_offset[first.OffsetOfReferencedLowerLevelDirectoryEntity]
    assert below.DirectoryRecordType == "STUDY"
    # The two MR2 files (one patient, one study) share their PATIENT and STUDY records.
    patients = [r for r in directory.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT"]
    assert [str(p.PatientID) for p in patients].count("5MR2") == 1
    file_set = FileSet()
    file_set.load(tmp_path / "DICOMDIR", include_orphans=False, raise_orphans=True)
    assert len(file_set) == len(sources)


def test_a_dicomdir_pointing_to_a_missing_file_does_not_verify(tmp_path):
    records = _file_set(tmp_path, corpus.representative()[:2])
    (tmp_path / "DICOMDIR").write_bytes(archive.encode_dicomdir(records, "TEST", "1.2.3.4"))
    (tmp_path / "EX000001/ST000001/SE000001/IM000002").unlink()
    with pytest.raises(archive.ArchiveError, match="references 2 files"):
        archive.read_dicomdir(tmp_path / "DICOMDIR")


def test_which_disks_may_be_added_to(tmp_path):
    assert archive.load_on_disk(tmp_path).manifest is None  # empty: a new File-set

    (tmp_path / archive.MANIFEST).write_text("{}")
    state = archive.load_on_disk(tmp_path)  # an export that never reached its DICOMDIR
    assert state.manifest is None and "never finished" in state.notes[0]

    (tmp_path / archive.MANIFEST).unlink()
    records = _file_set(tmp_path, corpus.representative()[:1])
    (tmp_path / "DICOMDIR").write_bytes(archive.encode_dicomdir(records, "OTHER", "1.2.3"))
    with pytest.raises(archive.ArchiveError, match="did not make"):
        archive.load_on_disk(tmp_path)

    manifest = {"format": archive.MANIFEST_FORMAT, "version": archive.MANIFEST_VERSION,
                "studies": [], "exports": []}
    (tmp_path / archive.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(archive.ArchiveError, match="changed by something other"):
        archive.load_on_disk(tmp_path)
    (tmp_path / archive.MANIFEST).write_text("{not json")
    with pytest.raises(archive.ArchiveError, match="damaged"):
        archive.load_on_disk(tmp_path)


def test_targets_that_are_not_usable_folders(tmp_path):
    with pytest.raises(archive.ArchiveError, match="does not exist"):
        archive.check_target(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(archive.ArchiveError, match="not a folder"):
        archive.check_target(tmp_path / "file")
    assert archive.check_target(tmp_path) == tmp_path.resolve()


def test_export_folders_are_numbered_past_leftovers(tmp_path):
    assert archive.next_export_id(tmp_path) == "EX000001"
    (tmp_path / "EX000003.partial").mkdir()
    (tmp_path / "EX000002").mkdir()
    (tmp_path / "EXPORTS").mkdir()  # not ours
    assert archive.next_export_id(tmp_path) == "EX000004"
    assert archive.leftovers(tmp_path, archive.OnDisk()) == ["EX000002", "EX000003.partial"]


def test_md5_from_device_is_the_files_md5(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert archive.md5_from_device(tmp_path / "f") == (hashlib.md5(data).hexdigest(), len(data))
