"""`pacs archive --external PATH`: studies copied to a USB disk as a standard DICOM File-set.

What lands on the disk (PS3.10 media layout, readable by any DICOM viewer that opens a DICOMDIR):

```
PATH/DICOMDIR                              the File-set's directory (PS3.10, Explicit VR LE)
PATH/GOTG_MANIFEST.json                    what is on the disk, with an MD5 per file (below)
PATH/EX000001/ST000001/SE000001/IM000001   one folder per export, then study, series, instance
```

Every File ID component is generated here (8 characters of A-Z 0-9, at most 4 levels): nothing
read from a DICOM header ever becomes part of a path. Each file holds exactly the bytes Orthanc
stored at ingest, checked against Orthanc's own MD5 while copying; nothing is re-encoded.

**How the DICOMDIR is written, and why not `FileSet.write()` or `dcmmkdir`.** Measured on the
representative corpus (`tests/support/corpus.py`), pydicom's `FileSet.add()/write()` refused 3 of
14 real files (empty Patient ID or Study Date: common from field modalities and for unidentified
emergency patients) and re-encoded every file it copied (1 of the 11 it took came out with
different bytes, which breaks the MD5 chain back to Orthanc); it also stages a full copy of every
file in /tmp (RAM on the Pi) and rewrites an existing DICOMDIR in place, moving files. DCMTK's
`dcmmkdir +I` takes every file as it is, but invents one Patient ID per *instance* when the ID is
empty (one study shown as several patients) and, when appending (`+A`), reuses the invented IDs
of an earlier run, which files a second unidentified patient under the first; it is also not on
the appliance image. So: the directory records are made by pydicom's own record makers
(`pydicom.fileset.DIRECTORY_RECORDERS`, PS3.3 Annex F) from each copied file's header, with
clearly marked stand-ins for empty Type 1 keys (below); the DICOMDIR is encoded with pydicom's
writer, its record offsets taken from a first encoding read back; and the result is checked by
loading it with `pydicom.fileset.FileSet` (a separate reader that follows those offsets) before
it is put in place.

Stand-ins in the DICOMDIR records only (the image files are never changed): an empty Patient ID
becomes `NOID-` + 12 hex digits of the study's UID (so two unidentified patients are never filed
together); an empty Study Date/Time falls back to the series, acquisition or content date, then
`19000101`/`000000`; an empty Study ID becomes `NONE`, Modality `OT`, Series/Instance Number `0`.
Patients are grouped by Issuer, Patient ID *and* name: a typing difference shows as two entries,
never as one patient hiding another's study.

**Safety.** The target is locked (`flock`) for the run. A new export writes only into a folder
that did not exist (`EXnnnnnn.partial`, files created exclusively), fsyncs every file and folder,
re-reads every file from the device (page cache dropped first) and compares its MD5, renames the
folder into place, writes `GOTG_MANIFEST.json` and the DICOMDIR under temporary names, checks
that the new DICOMDIR parses and references exactly the manifest's instances, and renames the
manifest and then the DICOMDIR last. Until that last rename the disk shows the previous complete
File-set (or none); a failed run removes the folder it created. Adding to a disk that already
holds a GOTG File-set is safe (instances already there with the same MD5 are skipped, new ones go
into a new folder); a DICOMDIR made by anything else is refused, never rewritten. Nothing is ever
deleted from Orthanc: this module only reads from it.

**The manifest** (`GOTG_MANIFEST.json`, UTF-8 JSON, `"format": "gotg-pacs-media-manifest"`,
`"version": 1`): `file_set_id`, `file_set_uid`, `created`, `updated` (UTC, ISO 8601), `site`
(`code`, `name`, `aet` of the site that made the disk), `exports` (one entry per run: `id` = its
folder, `started`, `finished`, `site_code`, `pacs_name`, `software`, counts and bytes), and
`studies`: each with `study_instance_uid`, `patient_id`, `patient_name`, `study_date`,
`study_description`, `accession_number` and `series`, each with `series_instance_uid`,
`modality`, `series_number` and `instances`, each with `sop_instance_uid`, `sop_class_uid`,
`transfer_syntax_uid`, `path` (the File ID with `/`), `size`, `md5` (of the file's bytes, equal
to Orthanc's MD5 of the original) and `export`. Header values in it are data, never markup:
whoever displays them must escape them.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import DIRECTORY_RECORDERS, FileSet
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    generate_uid,
)

from . import __version__, durable
from .clikit import printable
from .config import Settings
from .orthanc import Orthanc, OrthancError, OrthancUnreachable

DICOMDIR = "DICOMDIR"
MANIFEST = "GOTG_MANIFEST.json"
MANIFEST_FORMAT = "gotg-pacs-media-manifest"
MANIFEST_VERSION = 1
PARTIAL = ".partial"
EXPORT_DIR = re.compile(r"EX(\d{6})")
CHUNK = 1 << 20
DOWNLOAD_TIMEOUT = (10.0, 300.0)  # connect, then between bytes: a big CR file on a busy Pi
# Room kept back beyond the files themselves: DICOMDIR and manifest (old and new side by side
# until the rename) and a margin so the disk is never filled to the last block.
PER_INSTANCE_OVERHEAD = 2048
FIXED_OVERHEAD = 1 << 20


class ArchiveError(Exception):
    """The export cannot be done or did not verify; the message says what and what to do."""


Progress = Callable[[str, int, int, int, int], None]  # phase, done, total, bytes done, bytes total


def md5_from_device(path: Path) -> tuple[str, int]:
    """MD5 and size of a file as the device holds it: its cached pages are dropped first, so a
    write the disk did not keep is not hidden by the page cache."""
    digest = hashlib.md5()
    size = 0
    with open(path, "rb") as handle:
        descriptor = handle.fileno()
        with contextlib.suppress(OSError, AttributeError):  # best effort: not every fs or OS
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        while block := handle.read(CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def file_set_id(site_code: str) -> str:
    """A File-set ID (CS, at most 16 of A-Z 0-9 _ space) from the site code."""
    cleaned = re.sub(r"[^A-Z0-9_]", "_", site_code.upper())[:16]
    return cleaned or "GOTG_PACS"


def component(prefix: str, number: int) -> str:
    """One File ID component: two letters and six digits (PS3.10 8.2: 8 of A-Z 0-9 _)."""
    if not 0 < number < 1_000_000:
        raise ArchiveError(f"more than 999999 {prefix} entries in one folder")
    return f"{prefix}{number:06d}"


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the target ----------------------------------------------------------------------------------


def check_target(target: Path) -> Path:
    """The target folder, resolved, or an ArchiveError saying what is wrong with it."""
    if not target.exists():
        raise ArchiveError(f"{target} does not exist: is the USB disk plugged in and mounted?")
    if not target.is_dir():
        raise ArchiveError(f"{target} is not a folder: give the folder where the disk is mounted")
    root = target.resolve()
    if not os.access(root, os.W_OK | os.X_OK):
        raise ArchiveError(f"{root} is not writable (read-only disk, or a folder this user may "
                           "not write to)")
    return root


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One export at a time into one target (an flock on the folder itself: nothing to clean up)."""
    descriptor = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ArchiveError(f"another export into {root} is running; wait for it to "
                                   "finish") from None
            raise
        yield
    finally:
        os.close(descriptor)


def free_bytes(root: Path) -> tuple[int, int]:
    """Bytes an ordinary write may still use on the target's filesystem, and its block size."""
    stats = os.statvfs(root)
    return stats.f_bavail * stats.f_frsize, stats.f_frsize or 4096


def space_needed(sizes: Iterable[int], block: int, instances_after: int) -> int:
    """Bytes the export needs: each file rounded up to whole blocks, plus the DICOMDIR and
    manifest for every instance on the disk afterwards, plus a fixed margin."""
    files = sum(-(-size // block) * block for size in sizes)
    return files + instances_after * PER_INSTANCE_OVERHEAD + FIXED_OVERHEAD


# --- what is already on the disk -----------------------------------------------------------------


@dataclass
class OnDisk:
    """The committed GOTG File-set at the target (empty when there is none)."""

    manifest: dict[str, Any] | None = None
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)  # SOP UID -> entry
    notes: list[str] = field(default_factory=list)

    def entries(self) -> list[dict[str, Any]]:
        return list(self.instances.values())


def _manifest_instances(manifest: dict[str, Any]) -> Iterator[tuple[dict, dict, dict]]:
    for study in manifest.get("studies", []):
        for series in study.get("series", []):
            for instance in series.get("instances", []):
                yield study, series, instance


def read_dicomdir(path: Path) -> dict[str, dict[str, str]]:
    """SOP Instance UID -> File ID, SOP class and transfer syntax of every instance a DICOMDIR
    references, as pydicom's FileSet reads it; an ArchiveError if it does not parse cleanly or
    references a file that is not there."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            file_set = FileSet()
            file_set.load(path, include_orphans=False, raise_orphans=True)
            referenced: dict[str, dict[str, str]] = {}
            records = 0
            for instance in file_set:
                records += 1
                file_id = Path(instance.path).relative_to(path.parent).as_posix()
                referenced[str(instance.SOPInstanceUID)] = {
                    "path": file_id, "sop_class_uid": str(instance.SOPClassUID),
                    "transfer_syntax_uid": str(instance.TransferSyntaxUID)}
            dataset = pydicom.dcmread(path)
    except ArchiveError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same to the user
        raise ArchiveError(f"{path} is not a readable DICOMDIR ({printable(exc, 200)})") from None
    leaves = sum(1 for record in dataset.get("DirectoryRecordSequence", [])
                 if "ReferencedFileID" in record)
    if records != len(referenced) or leaves != len(referenced):
        raise ArchiveError(f"{path} references {leaves} files but only {len(referenced)} "
                           "distinct instances are there and readable")
    return referenced


def load_on_disk(root: Path) -> OnDisk:
    """What the target already holds, or an ArchiveError if it is not ours to add to."""
    dicomdir, manifest_path = root / DICOMDIR, root / MANIFEST
    has_dicomdir, has_manifest = dicomdir.exists(), manifest_path.exists()
    if not has_dicomdir:
        state = OnDisk()
        if has_manifest:
            state.notes.append(f"{MANIFEST} without a DICOMDIR (an export that never finished): "
                               "replaced")
        return state
    if not has_manifest:
        raise ArchiveError(f"{root} already holds a DICOM File-set (DICOMDIR) that GOTG PACS "
                           "did not make; it is left untouched. Use an empty folder or another "
                           "disk")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{manifest_path} is damaged ({exc}); the disk is left untouched. "
                           "Use an empty folder or another disk") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ArchiveError(f"{manifest_path} is not a GOTG PACS manifest this version knows; "
                           "the disk is left untouched")
    referenced = read_dicomdir(dicomdir)
    state = OnDisk(manifest=manifest)
    listed = {entry["sop_instance_uid"]: entry for _, _, entry in _manifest_instances(manifest)}
    for uid, ref in referenced.items():
        entry = listed.get(uid)
        if entry is None or entry["path"] != ref["path"]:
            raise ArchiveError(f"the DICOMDIR on {root} was changed by something other than "
                               f"GOTG PACS (instance {printable(uid, 80)} at {ref['path']} is "
                               f"not in {MANIFEST}); the disk is left untouched")
        state.instances[uid] = entry
    dropped = len(listed) - len(state.instances)
    if dropped:  # the manifest was renamed into place, the DICOMDIR never was
        state.notes.append(f"{dropped} instance(s) listed in {MANIFEST} by an export that never "
                           "finished are not on the DICOMDIR: dropped from the manifest")
    return state


def leftovers(root: Path, state: OnDisk) -> list[str]:
    """Export folders no committed DICOMDIR references (an export killed before it finished).
    Never deleted here: they are reported, and safe to delete by hand."""
    used = {entry["path"].split("/", 1)[0] for entry in state.entries()}
    found = []
    for child in sorted(root.iterdir()):
        name = child.name
        base = name[: -len(PARTIAL)] if name.endswith(PARTIAL) else name
        if EXPORT_DIR.fullmatch(base) and child.is_dir() and name not in used:
            found.append(name)
    return found


def next_export_id(root: Path) -> str:
    numbers = [int(match.group(1)) for child in root.iterdir()
               if (match := EXPORT_DIR.match(child.name))]
    return component("EX", max(numbers, default=0) + 1)


# --- what Orthanc holds --------------------------------------------------------------------------


@dataclass
class Planned:
    orthanc_id: str
    sop_instance_uid: str
    size: int
    study: dict[str, Any]
    series: dict[str, Any]
    index: int  # position in its series


def select_studies(client: Orthanc, study_uids: Iterable[str], since: dt.date | None
                   ) -> list[str]:
    """Orthanc IDs of the studies to export: those UIDs (every one must be here), else all;
    `since`: only studies this archive received something for on or after that day."""
    wanted = list(dict.fromkeys(study_uids))
    if wanted:
        found, missing = [], []
        for uid in wanted:
            hits = [item["ID"] for item in client.post("/tools/lookup", data=uid.encode()) or []
                    if item.get("Type") == "Study"]
            (found.extend(hits) if hits else missing.append(uid))
        if missing:
            raise ArchiveError("not in this archive: "
                               + ", ".join(printable(u, 80) for u in missing)
                               + " (nothing was written)")
        ids = list(dict.fromkeys(found))
    else:
        ids = client.get("/studies")
    if since is None:
        return ids
    day = since.strftime("%Y%m%d")
    return [study_id for study_id in ids
            if client.get(f"/studies/{study_id}").get("LastUpdate", "")[:8] >= day]


def plan_study(client: Orthanc, study_id: str) -> list[Planned]:
    study = client.get(f"/studies/{study_id}")
    series_info = {item["ID"]: item for item in client.get(f"/studies/{study_id}/series")}
    tags, patient = study.get("MainDicomTags", {}), study.get("PatientMainDicomTags", {})
    study_entry = {"study_instance_uid": tags.get("StudyInstanceUID", ""),
                   "patient_id": patient.get("PatientID", ""),
                   "patient_name": patient.get("PatientName", ""),
                   "study_date": tags.get("StudyDate", ""),
                   "study_description": tags.get("StudyDescription", ""),
                   "accession_number": tags.get("AccessionNumber", ""),
                   "orthanc_id": study_id}
    planned = []
    instances = client.get(f"/studies/{study_id}/instances")
    instances.sort(key=lambda item: (item["ParentSeries"], item.get("IndexInSeries") or 0))
    for item in instances:
        series = series_info.get(item["ParentSeries"], {})
        series_tags = series.get("MainDicomTags", {})
        series_entry = {"series_instance_uid": series_tags.get("SeriesInstanceUID", ""),
                        "modality": series_tags.get("Modality", ""),
                        "series_number": series_tags.get("SeriesNumber", ""),
                        "orthanc_id": item["ParentSeries"]}
        planned.append(Planned(item["ID"], item["MainDicomTags"].get("SOPInstanceUID", ""),
                               int(item.get("FileSize") or 0), study_entry, series_entry,
                               item.get("IndexInSeries") or 0))
    return planned


def orthanc_md5(client: Orthanc, instance_id: str) -> str:
    return client.request("GET", f"/instances/{instance_id}/attachments/dicom/md5").text.strip()


# --- DICOMDIR records and encoding ---------------------------------------------------------------


_LEAF_BY_NAME = (  # record type of non-image objects, by the SOP class name (PS3.3 F.3.2.2)
    ("Presentation State Storage", "PRESENTATION"),
    ("Key Object Selection", "KEY OBJECT DOC"),
    ("SR Storage", "SR DOCUMENT"),
    ("Waveform Storage", "WAVEFORM"),
    ("Encapsulated", "ENCAP DOC"),
    ("Spectroscopy Storage", "SPECTROSCOPY"),
    ("Raw Data Storage", "RAW DATA"),
    ("Registration Storage", "REGISTRATION"),
    ("Spatial Fiducials Storage", "FIDUCIAL"),
    ("Real World Value Mapping", "VALUE MAP"),
)


def leaf_record_type(header: Dataset) -> str:
    name = UID(str(header.get("SOPClassUID", ""))).name
    if "EncapsulatedDocument" in header:
        return "ENCAP DOC"
    for part, record_type in _LEAF_BY_NAME:
        if part in name:
            return record_type
    return "IMAGE"


def _empty(header: Dataset, keyword: str) -> bool:
    return keyword not in header or header[keyword].VM == 0 or str(header[keyword].value) == ""


def _with_stand_ins(header: Dataset, index: int) -> Dataset:
    """A copy of the header with the stand-ins described in the module docstring."""
    filled = Dataset(dict(header.items()))  # its own element table: the header stays as read

    def stand_in(keyword: str, value: str) -> None:
        if keyword in filled:  # a new element, never a change to the header's own
            del filled[keyword]
        setattr(filled, keyword, value)

    if _empty(header, "PatientID"):
        study_uid = str(header.get("StudyInstanceUID", "")) or str(header.get("SOPInstanceUID"))
        stand_in("PatientID", "NOID-" + hashlib.sha1(study_uid.encode()).hexdigest()[:12])
    for keyword, fallbacks, last in (("StudyDate", ("SeriesDate", "AcquisitionDate",
                                                    "ContentDate"), "19000101"),
                                     ("StudyTime", ("SeriesTime", "AcquisitionTime",
                                                    "ContentTime"), "000000")):
        if _empty(header, keyword):
            found = [header[k].value for k in fallbacks if not _empty(header, k)]
            stand_in(keyword, found[0] if found else last)
    for keyword, value in (("StudyID", "NONE"), ("Modality", "OT"), ("SeriesNumber", "0"),
                           ("InstanceNumber", str(index))):
        if _empty(header, keyword):
            stand_in(keyword, value)
    return filled


def _record(record_type: str, source: Dataset) -> Dataset:
    record = DIRECTORY_RECORDERS[record_type](source)
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = record_type
    if "SpecificCharacterSet" in source:
        record.SpecificCharacterSet = source.SpecificCharacterSet
    return record


@dataclass
class Records:
    """The four records of one instance and the keys that group them."""

    patient_key: tuple[str, ...]
    patient: Dataset
    study_key: str
    study: Dataset
    series_key: str
    series: Dataset
    leaf: Dataset
    leaf_type: str
    warning: str | None = None


def records_for(header: Dataset, file_id: str, index: int = 0) -> Records:
    """PATIENT/STUDY/SERIES/leaf directory records for one file, from its header."""
    meta = getattr(header, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        raise ArchiveError(f"{file_id} has no transfer syntax in its file meta information")
    filled = _with_stand_ins(header, index)
    leaf_type, warning = leaf_record_type(header), None
    try:
        leaf = _record(leaf_type, filled)
    except (ValueError, KeyError, AttributeError) as exc:  # a non-image object missing keys
        warning = (f"{file_id}: filed as IMAGE in the DICOMDIR, not {leaf_type} "
                   f"({printable(exc, 120)})")
        leaf_type, leaf = "IMAGE", _record("IMAGE", filled)
    leaf.ReferencedFileID = file_id.split("/")
    leaf.ReferencedSOPClassUIDInFile = header.SOPClassUID
    leaf.ReferencedSOPInstanceUIDInFile = header.SOPInstanceUID
    leaf.ReferencedTransferSyntaxUIDInFile = syntax
    patient_key = (str(filled.get("IssuerOfPatientID", "")), str(filled.PatientID),
                   str(filled.get("PatientName", "")))
    return Records(patient_key, _record("PATIENT", filled), str(filled.StudyInstanceUID),
                   _record("STUDY", filled), str(filled.SeriesInstanceUID),
                   _record("SERIES", filled), leaf, leaf_type, warning)


class DirectoryTree:
    """Patient -> study -> series -> leaf records, in the order first seen. Only the first
    record of each patient, study and series is kept (a later instance's copies are dropped
    at once), so a disk of tens of thousands of instances fits in a Pi's memory."""

    def __init__(self, records: Iterable[Records] = ()) -> None:
        self.patients: dict[tuple, tuple[Dataset, dict]] = {}
        self.leaves = 0
        for rec in records:
            self.add(rec)

    def add(self, rec: Records) -> None:
        patient = self.patients.setdefault(rec.patient_key, (rec.patient, {}))
        study = patient[1].setdefault(rec.study_key, (rec.study, {}))
        series = study[1].setdefault(rec.series_key, (rec.series, []))
        series[1].append(rec.leaf)
        self.leaves += 1

    def ordered(self) -> list[tuple[Dataset, list[Dataset]]]:
        """Depth-first order of the records, each with its children."""
        ordered: list[tuple[Dataset, list[Dataset]]] = []
        for patient, studies in self.patients.values():
            ordered.append((patient, [study for study, _ in studies.values()]))
            for study, series_map in studies.values():
                ordered.append((study, [series for series, _ in series_map.values()]))
                for series, leaves in series_map.values():
                    ordered.append((series, leaves))
                    ordered.extend((leaf, []) for leaf in leaves)
        return ordered


def encode_dicomdir(records: DirectoryTree | Iterable[Records], fileset_id: str,
                    fileset_uid: str) -> bytes:
    """The DICOMDIR file (PS3.10, Explicit VR Little Endian) for these records.

    Record offsets are byte positions in the file; they are taken from a first encoding read
    back (each offset is a fixed-size UL, so filling them in moves nothing), then the second
    encoding is read back again to prove it.
    """
    tree = records if isinstance(records, DirectoryTree) else DirectoryTree(records)
    ordered = tree.ordered()
    roots = [record for record, _ in ordered if record.DirectoryRecordType == "PATIENT"]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = fileset_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    directory = Dataset()
    directory.file_meta = meta
    directory.FileSetID = fileset_id
    directory.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    directory.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    directory.FileSetConsistencyFlag = 0
    directory.DirectoryRecordSequence = [record for record, _ in ordered]

    def encode() -> tuple[bytes, list[int]]:
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, directory, enforce_file_format=True)
        data = buffer.getvalue()
        back = pydicom.dcmread(io.BytesIO(data))
        return data, [item.seq_item_tell for item in back.DirectoryRecordSequence]

    _, positions = encode()
    where = {id(record): position for (record, _), position in zip(ordered, positions,
                                                                  strict=True)}
    for record, children in ordered:
        record.OffsetOfReferencedLowerLevelDirectoryEntity = (where[id(children[0])]
                                                              if children else 0)
    for siblings in [roots] + [children for _, children in ordered]:
        for this, following in zip(siblings, siblings[1:], strict=False):
            this.OffsetOfTheNextDirectoryRecord = where[id(following)]
    if roots:
        directory.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = where[id(roots[0])]
        directory.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = where[id(roots[-1])]
    data, again = encode()
    if again != positions:  # cannot happen unless the encoder changed under us
        raise ArchiveError("DICOMDIR encoding is not stable; nothing was put in place")
    return data


def read_header(path: Path) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True, defer_size=4096)
    except Exception as exc:  # noqa: BLE001
        raise ArchiveError(f"{path} is not a readable DICOM file ({printable(exc, 200)})"
                           ) from None


# --- the export ----------------------------------------------------------------------------------


def new_manifest(settings: Settings, now: str) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
            "file_set_id": file_set_id(settings.site_code), "file_set_uid": generate_uid(),
            "created": now, "updated": now,
            "site": {"code": settings.site_code, "name": settings.pacs_name,
                     "aet": settings.pacs_aet},
            "exports": [], "studies": []}


def committed_manifest(state: OnDisk) -> dict[str, Any]:
    """The manifest on disk with only what the committed DICOMDIR references."""
    assert state.manifest is not None
    manifest = copy.deepcopy(state.manifest)
    for study in manifest["studies"]:
        for series in study["series"]:
            series["instances"] = [entry for entry in series["instances"]
                                   if entry["sop_instance_uid"] in state.instances]
        study["series"] = [series for series in study["series"] if series["instances"]]
    manifest["studies"] = [study for study in manifest["studies"] if study["series"]]
    committed = {entry["export"] for entry in state.entries()}
    manifest["exports"] = [item for item in manifest["exports"] if item["id"] in committed]
    return manifest


class _ManifestIndex:
    """Adds instances to a manifest under their study and series, found by UID in O(1)."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.studies = {study["study_instance_uid"]: study for study in manifest["studies"]}
        self.series = {(study["study_instance_uid"], series["series_instance_uid"]): series
                       for study in manifest["studies"] for series in study["series"]}

    def add(self, planned: Planned, entry: dict[str, Any]) -> None:
        study_uid = planned.study["study_instance_uid"]
        study = self.studies.get(study_uid)
        if study is None:
            study = {key: value for key, value in planned.study.items() if key != "orthanc_id"}
            study["series"] = []
            self.manifest["studies"].append(study)
            self.studies[study_uid] = study
        key = (study_uid, planned.series["series_instance_uid"])
        series = self.series.get(key)
        if series is None:
            series = {k: v for k, v in planned.series.items() if k != "orthanc_id"}
            series["instances"] = []
            study["series"].append(series)
            self.series[key] = series
        series["instances"].append(entry)


def verify_file_set(root: Path, dicomdir: Path, manifest: dict[str, Any],
                    reread: Iterable[str] | None = None,
                    progress: Progress | None = None) -> list[str]:
    """Problems found (empty: verified). The DICOMDIR must parse and reference exactly the
    manifest's instances at their paths; every file in `reread` (paths; default all) is read
    back from the device and must have the manifest's MD5 and size; the others must be there
    with the manifest's size."""
    problems: list[str] = []
    try:
        referenced = read_dicomdir(dicomdir)
    except ArchiveError as exc:
        return [str(exc)]
    listed = {entry["sop_instance_uid"]: entry for _, _, entry in _manifest_instances(manifest)}
    for uid, entry in listed.items():
        ref = referenced.get(uid)
        if ref is None:
            problems.append(f"{entry['path']}: in the manifest but not in the DICOMDIR")
        elif ref["path"] != entry["path"]:
            problems.append(f"{entry['path']}: the DICOMDIR points to {ref['path']}")
        elif (ref["sop_class_uid"], ref["transfer_syntax_uid"]) != (
                entry["sop_class_uid"], entry["transfer_syntax_uid"]):
            problems.append(f"{entry['path']}: SOP class or transfer syntax differs between "
                            "DICOMDIR and manifest")
    for uid in referenced.keys() - listed.keys():
        problems.append(f"{referenced[uid]['path']}: in the DICOMDIR but not in the manifest")
    wanted = set(listed[uid]["path"] for uid in listed) if reread is None else set(reread)
    total_bytes = sum(entry["size"] for entry in listed.values() if entry["path"] in wanted)
    done = done_bytes = 0
    for entry in listed.values():
        path = root / entry["path"]
        try:
            if entry["path"] in wanted:
                digest, size = md5_from_device(path)
                done += 1
                done_bytes += size
                if progress:
                    progress("verifying", done, len(wanted), done_bytes, total_bytes)
                if digest != entry["md5"] or size != entry["size"]:
                    problems.append(f"{entry['path']}: read back MD5 {digest} ({size} bytes), "
                                    f"expected {entry['md5']} ({entry['size']} bytes)")
            elif path.stat().st_size != entry["size"]:
                problems.append(f"{entry['path']}: size differs from the manifest")
        except OSError as exc:
            problems.append(f"{entry['path']}: cannot be read back ({exc.strerror or exc})")
    return problems


def export(settings: Settings, target: Path, study_uids: Iterable[str] = (),
           since: dt.date | None = None, progress: Progress | None = None,
           client: Orthanc | None = None) -> dict[str, Any]:
    """Copy the studies to `target` as described in the module docstring; the report."""
    started, clock = _utc_now(), time.monotonic()
    root = check_target(target)
    for own in (settings.storage_path, settings.state_path):
        own = own.resolve()
        if root == own or own in root.parents or root in own.parents:
            raise ArchiveError(f"{root} is (or holds) the archive's own storage ({own}); give "
                               "the folder where the USB disk is mounted")
    client = client or Orthanc.from_settings(settings, timeout=60)
    with locked(root):
        state = load_on_disk(root)
        report: dict[str, Any] = {"ok": False, "target": str(root), "notes": list(state.notes),
                                  "leftovers": leftovers(root, state)}
        if report["leftovers"]:
            report["notes"].append("folders from an export that never finished (not on the "
                                   "DICOMDIR, safe to delete): " + ", ".join(report["leftovers"]))
        study_ids = select_studies(client, study_uids, since)
        if not study_ids:
            raise ArchiveError("no studies to export" + (f" received since {since}" if since
                                                         else " in this archive"))

        planned: list[Planned] = []
        for study_id in study_ids:
            planned.extend(plan_study(client, study_id))
        todo, already, seen = [], 0, {}
        for item in planned:
            on_disk = state.instances.get(item.sop_instance_uid)
            if item.sop_instance_uid in seen:
                if orthanc_md5(client, item.orthanc_id) != orthanc_md5(client,
                                                                       seen[item.sop_instance_uid]):
                    raise ArchiveError(f"two different instances in this archive share the SOP "
                                       f"Instance UID {printable(item.sop_instance_uid, 80)}; a "
                                       "DICOMDIR can hold only one (nothing was written)")
                continue
            seen[item.sop_instance_uid] = item.orthanc_id
            if on_disk is None:
                todo.append(item)
            elif on_disk["md5"] == orthanc_md5(client, item.orthanc_id):
                already += 1
            else:
                raise ArchiveError(f"{on_disk['path']} on {root} holds a different version of "
                                   f"instance {printable(item.sop_instance_uid, 80)} than this "
                                   "archive (nothing was written); use another disk")

        free, block = free_bytes(root)
        needed = space_needed((item.size for item in todo), block,
                              len(state.instances) + len(todo))
        report.update(studies=len(study_ids), instances_already_there=already,
                      bytes_needed=needed, bytes_free=free)
        if needed > free:
            raise ArchiveError(f"not enough space on {root}: {len(todo)} instances need "
                               f"{needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free (nothing was "
                               "written)")
        if not todo:
            report.update(ok=True, export=None, instances_written=0, bytes_written=0,
                          instances_verified=0, seconds=round(time.monotonic() - clock, 2))
            return report

        export_id = next_export_id(root)
        report["export"] = export_id
        try:
            written = _write_export(client, root, export_id, todo, state, settings, started,
                                    progress, report)
        except OrthancError as exc:
            raise ArchiveError(f"the archive stopped answering while copying ({exc}); nothing "
                               f"was put in place on {root}, run the export again") from None
        except OSError as exc:  # cleaned up already: say what happened in the user's words
            what = ("the disk filled up" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                    else f"writing failed: {exc.strerror or exc}")
            raise ArchiveError(f"{what} while copying to {root}; nothing was put in place and "
                               "the disk holds what it held before") from None
        report.update(ok=True, instances_written=len(todo), bytes_written=written,
                      seconds=round(time.monotonic() - clock, 2))
        return report


def _write_export(client: Orthanc, root: Path, export_id: str, todo: list[Planned],
                  state: OnDisk, settings: Settings, started: str, progress: Progress | None,
                  report: dict[str, Any]) -> int:
    """Files, then DICOMDIR and manifest; on any failure before the commit, the folder this run
    created and its temporary files are removed and the disk is as it was."""
    partial = root / (export_id + PARTIAL)
    final = root / export_id
    temp_dicomdir = root / (DICOMDIR + PARTIAL)
    temp_manifest = root / (MANIFEST + PARTIAL)
    for stale in (temp_dicomdir, temp_manifest):  # ours, from a run that was killed
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    # The instances already on the disk first: their files must still read as DICOM before
    # anything is added, and their records keep their place at the head of the DICOMDIR.
    tree = DirectoryTree()
    for done, entry in enumerate(state.entries(), 1):
        tree.add(records_for(read_header(root / entry["path"]), entry["path"]))
        if progress:
            progress("indexing the disk", done, len(state.instances), 0, 0)
    partial.mkdir()  # fails if it exists: never writes into a folder it did not create
    committed = False
    try:
        manifest = (committed_manifest(state) if state.manifest is not None
                    else new_manifest(settings, started))
        index = _ManifestIndex(manifest)
        total_bytes = sum(item.size for item in todo)
        done_bytes = 0
        numbers: dict[str, Any] = {}  # study UID -> (number, {series UID -> (number, count)})
        for done, item in enumerate(todo, 1):
            study_no, series_map = numbers.setdefault(item.study["orthanc_id"],
                                                      (len(numbers) + 1, {}))
            series_no, count = series_map.get(item.series["orthanc_id"],
                                              (len(series_map) + 1, 0))
            series_map[item.series["orthanc_id"]] = (series_no, count + 1)
            file_id = "/".join((export_id, component("ST", study_no),
                                component("SE", series_no), component("IM", count + 1)))
            path = partial.joinpath(*file_id.split("/")[1:])
            path.parent.mkdir(parents=True, exist_ok=True)
            digest, size = _copy_instance(client, item, path)
            header = read_header(path)
            if str(header.get("SOPInstanceUID", "")) != item.sop_instance_uid:
                raise ArchiveError(f"instance {item.orthanc_id}: the file Orthanc served is not "
                                   "the instance it lists (nothing was put in place)")
            records = records_for(header, file_id, count + 1)
            if records.warning:
                report["notes"].append(records.warning)
            tree.add(records)
            syntax = str(header.file_meta.TransferSyntaxUID)
            index.add(item, {
                "sop_instance_uid": item.sop_instance_uid,
                "sop_class_uid": str(header.SOPClassUID), "transfer_syntax_uid": syntax,
                "path": file_id, "size": size, "md5": digest, "export": export_id})
            done_bytes += size
            if progress:
                progress("copying", done, len(todo), done_bytes, total_bytes)

        for folder in sorted({p for p in partial.rglob("*") if p.is_dir()}, reverse=True):
            durable.fsync_dir(folder)
        durable.fsync_dir(partial)
        new_paths = [entry["path"] for _, _, entry in _manifest_instances(manifest)
                     if entry["export"] == export_id]
        os.rename(partial, final)
        durable.fsync_dir(root)

        finished = _utc_now()
        manifest["updated"] = finished
        manifest["exports"].append({
            "id": export_id, "started": started, "finished": finished,
            "site_code": settings.site_code, "pacs_name": settings.pacs_name,
            "software": f"gotg-pacs {__version__}, pydicom {pydicom.__version__}",
            "studies": len(numbers), "instances": len(todo), "bytes": done_bytes})
        encoded = encode_dicomdir(tree, manifest["file_set_id"], manifest["file_set_uid"])
        dicomdir_md5 = hashlib.md5(encoded).hexdigest()
        durable.write_bytes(temp_dicomdir, encoded, exclusive=True)
        durable.write_bytes(temp_manifest, json.dumps(manifest, indent=1, ensure_ascii=False)
                            .encode("utf-8"), exclusive=True)
        # Every new file read back from the device, the new DICOMDIR parsed, before the commit.
        problems = verify_file_set(root, temp_dicomdir, manifest, reread=new_paths,
                                   progress=progress)
        if problems:
            raise ArchiveError(f"the copy on {root} did not verify, nothing was put in place:\n  "
                               + "\n  ".join(problems[:20]))
        report["instances_verified"] = len(new_paths)
        os.replace(temp_manifest, root / MANIFEST)
        durable.fsync_dir(root)
        os.replace(temp_dicomdir, root / DICOMDIR)  # the commit: last, atomic
        durable.fsync_dir(root)
        committed = True
        try:
            digest, _ = md5_from_device(root / DICOMDIR)
        except OSError as exc:
            raise ArchiveError(f"the DICOMDIR put in place on {root} cannot be read back "
                               f"({exc.strerror or exc}): check the disk with "
                               f"`pacs archive --external {root} --verify`") from None
        problems = verify_file_set(root, root / DICOMDIR, manifest, reread=())
        if digest != dicomdir_md5:
            problems.insert(0, f"DICOMDIR reads back with MD5 {digest}, written {dicomdir_md5}")
        if problems:
            raise ArchiveError(f"the DICOMDIR put in place on {root} did not verify:\n  "
                               + "\n  ".join(problems[:20]))
        return done_bytes
    finally:
        if not committed:
            for leftover in (temp_dicomdir, temp_manifest):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            for folder in (partial, final):
                if folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                durable.fsync_dir(root)


def _copy_instance(client: Orthanc, item: Planned, path: Path) -> tuple[str, int]:
    """Orthanc's original file into a new file at `path`, on the device; its MD5 and size,
    checked against the MD5 Orthanc took at ingest."""
    digest = hashlib.md5()
    size = 0
    response = client.request("GET", f"/instances/{item.orthanc_id}/file", stream=True,
                              timeout=DOWNLOAD_TIMEOUT)
    try:
        with open(path, "xb") as handle:
            for block in response.iter_content(CHUNK):
                handle.write(block)
                digest.update(block)
                size += len(block)
            handle.flush()
            os.fsync(handle.fileno())
    except requests.RequestException as exc:  # the stream broke off after it started
        raise OrthancUnreachable(f"download of instance {item.orthanc_id} broke off ({exc})"
                                 ) from None
    finally:
        response.close()
    expected = orthanc_md5(client, item.orthanc_id)
    if digest.hexdigest() != expected:
        raise ArchiveError(f"instance {item.orthanc_id}: Orthanc served bytes with MD5 "
                           f"{digest.hexdigest()} but recorded {expected} at ingest; run "
                           "`pacs integrity check` (nothing was put in place)")
    return digest.hexdigest(), size


def verify_only(target: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Re-read a whole GOTG disk against its manifest (no Orthanc needed): the report."""
    root = check_target(target)
    if not (root / DICOMDIR).exists() or not (root / MANIFEST).exists():
        raise ArchiveError(f"{root} holds no GOTG PACS File-set (DICOMDIR and {MANIFEST})")
    with locked(root):
        state = load_on_disk(root)
        manifest = committed_manifest(state)
        problems = verify_file_set(root, root / DICOMDIR, manifest, progress=progress)
    return {"ok": not problems, "target": str(root), "instances": len(state.instances),
            "problems": problems, "notes": state.notes, "leftovers": leftovers(root, state),
            "site": state.manifest.get("site"), "exports": state.manifest.get("exports")}


__all__ = ["ArchiveError", "OrthancError", "export", "verify_only", "encode_dicomdir",
           "records_for", "space_needed", "component", "file_set_id", "printable",
           "md5_from_device", "check_target", "load_on_disk", "read_dicomdir"]
