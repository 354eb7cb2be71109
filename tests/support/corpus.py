"""Real DICOM for tests and benchmarks, from the `pydicom-data` package.

`REPRESENTATIVE` covers what field modalities send: CT, MR, CR, US, NM, SC, SEG; single and
multi-frame; uncompressed (little and big endian), JPEG baseline and lossless, JPEG-LS, JPEG 2000
(lossless and lossy) and RLE; every file a distinct SOP Instance UID.
"""

from __future__ import annotations

from pathlib import Path

import data_store
import pydicom
from pydicom.uid import generate_uid

DATA_DIR = Path(data_store.__file__).parent / "data"

REPRESENTATIVE = (
    "693_UNCR.dcm",                        # CT, explicit little endian
    "MR2_UNCR.dcm",                        # MR 2 MB
    "RG3_J2KR.dcm",                        # CR, JPEG 2000 lossless
    "MR2_J2KI.dcm",                        # MR, JPEG 2000 lossy
    "US1_UNCR.dcm",                        # US colour
    "OBXXXX1A_rle.dcm",                    # US, RLE
    "gdcm-US-ALOKA-16_big.dcm",            # US, explicit big endian
    "JPGLosslessP14SV1_1s_1f_8b.dcm",      # US, JPEG lossless
    "color3d_jpeg_baseline.dcm",           # US multi-frame (120), JPEG baseline
    "emri_small_jpeg_ls_lossless.dcm",     # enhanced MR multi-frame, JPEG-LS
    "eCT_Supplemental.dcm",                # enhanced CT multi-frame
    "JPEG-LL.dcm",                         # NM secondary capture, JPEG lossless
    "SC_rgb.dcm",                          # secondary capture RGB
    "liver.dcm",                           # segmentation
)


def representative() -> list[Path]:
    return [DATA_DIR / name for name in REPRESENTATIVE]


def renumbered_copies(sources: list[Path], copies: int, out_dir: Path) -> list[Path]:
    """`copies` studies made of the sources, each with fresh Study/Series/SOP Instance UIDs.

    For measurements that must store new instances every time (Orthanc ignores an instance it
    already holds, which would flatter the numbers).
    """
    written = []
    for copy in range(copies):
        written += renumbered_study(sources, out_dir, prefix=f"{copy:04d}-",
                                    PatientID=f"BENCH-{copy:04d}")
    return written


def content(dataset: pydicom.Dataset) -> dict:
    """What a DICOM object says, for comparing a stored copy with its original.

    Group lengths (gggg,0000) and Data Set Trailing Padding are encoding artefacts that DICOM lets
    any sender recompute or drop; everything else must be identical.
    """
    return {element.tag: element.value for element in dataset
            if element.tag.element != 0 and element.tag != 0xFFFCFFFC}


def renumbered_study(sources: list[Path], out_dir: Path, prefix: str = "",
                     **tags: str) -> list[Path]:
    """Copies of the sources as one new study with fresh UIDs and these header values."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, written = generate_uid(), []
    for index, source in enumerate(sources):
        dataset = pydicom.dcmread(source)
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = generate_uid()
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        for keyword, value in tags.items():
            setattr(dataset, keyword, value)
        target = out_dir / f"{prefix}{index:02d}-{source.name}"
        dataset.save_as(target, enforce_file_format=True)
        written.append(target)
    return written
