"""Lossy previews for triage on poor links: a new derived instance, never a replacement.

On a 2G or satellite link the lossless original of a CR can take an hour; a lossy preview a tenth
of its size lets HQ see the study and decide what is urgent while the original follows. The
original is never touched and never replaced (design invariant 3): a preview is a NEW instance
with its own SOP Instance UID, in a series of its own in the same study, that says what it is
(Lossy Image Compression 01, ratio, method, DERIVED, a reference to the source, a series
description that says "not for diagnosis").

Policy: lossy JPEG 2000 only for grey CR, DX, CT and MR images, at a compression ratio no higher
than the ceiling published for that modality (`LIMITS`). The ceilings are those of the German
Radiological Society's consensus conference of February 2008 (Loose et al., RoeFo 2009): CT 8:1
(brain 5:1), CR/DR 10:1 (mammography excepted), MR 7:1. The Canadian Association of
Radiologists' standard of the same year allows more (CR/DR 30:1, CT 15:1, MR 24:1); the stricter
German figures are taken. Everything else gets no preview: ultrasound, nuclear medicine,
segmentations, colour images, mammography (MG, or any breast image: stricter rules), "for
processing" X-ray, enhanced multi-frame objects, and any source that is already lossy (the same
group's review warns against compressing twice) or that cannot be decoded here.

The ratio is counted the conservative way: uncompressed bytes as stored (Bits Allocated) over
the bytes of the JPEG 2000 codestreams. OpenJPEG's target ratio counts Bits Stored instead and
may overshoot by a few percent, so the request is scaled, the achieved ratio measured, and the
encoding redone a little gentler (at most `ATTEMPTS` times) until it is within the ceiling; a
preview that is not is never made. Images that compress beyond the ceiling even at full quality
(large blank areas) get none either: their lossless original is about as small.

Previews are deterministic: the same original gives the same bytes and UIDs (the SOP Instance UID
is derived from the source's and the policy version, the series UID from the source series), so
a preview made again after a crash is the same instance, not a second copy, and every preview of
one series lands in one preview series.

Memory: as for lossless transcoding (`codecs.MAX_TRANSCODE_BYTES`), both the file and its decoded
pixels must fit under the limit, so a 2 GB Pi never runs short.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from .codecs import MAX_TRANSCODE_BYTES, NATIVE

log = logging.getLogger(__name__)

# Published ceilings for irreversible compression, by Modality (see the module docstring).
LIMITS = {"CR": 10.0, "DX": 10.0, "CT": 8.0, "MR": 7.0}
CT_HEAD_LIMIT = 5.0  # CT of the brain: the consensus is stricter there
HEAD = {"HEAD", "BRAIN", "SKULL", "HEADNECK"}
# Sources whose pixels are exact: native, deflated, or encapsulated with a lossless codec.
DECODABLE = NATIVE | {DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless,
                      RLELossless, JPEGLossless, JPEGLosslessSV1}
ATTEMPTS = 3
# OpenJPEG overshoots its target ratio by up to ~4 % (measured): asking 2 % under the ceiling
# makes one encoding enough for most images (each costs ~0.5 s for a 7 MB CR here, more on a Pi).
HEADROOM = 0.98
# Not a quality judgement (the ratio ceiling is that): a floor that catches a broken encoding,
# e.g. signed values wrapped round. Measured on pydicom-data at the ceilings: 34-76 dB.
MIN_PSNR_DB = 30.0
PSNR_BLOCK = 2**18  # pixels compared at a time
POLICY_VERSION = "gotg-preview-1"   # part of each preview's UID: a new policy, a new instance
SERIES_SALT = "gotg-preview"        # one preview series per source series
DESCRIPTION = "PREVIEW (lossy, not for diagnosis)"
LOSSY_COMPRESSION = ("113040", "DCM", "Lossy Compression")               # CID 7203
UNCOMPRESSED_PREDECESSOR = ("121320", "DCM", "Uncompressed predecessor")  # CID 7202


@dataclass(frozen=True)
class Preview:
    """A lossy derived instance of one original, ready to store or send."""

    payload: bytes          # the derived DICOM file (Part 10)
    sop_uid: str            # its own SOP Instance UID, never the original's
    series_uid: str         # the preview series of the original's series
    ratio: float            # uncompressed pixel bytes / compressed pixel bytes, <= limit
    source_sop_uid: str     # the original it was derived from (and stands in for, for triage)
    limit: float            # the published ceiling it was made under
    psnr_db: float          # fidelity against the original's pixel range


def preview_limit(header: Dataset) -> float | None:
    """The ceiling for a lossy preview of this instance, or None when the policy allows none.

    Reads only attributes before the pixel data (`stop_before_pixels` is enough), so a caller
    can decide without decoding anything.
    """
    limit, reason = _policy(header)
    if limit is None:
        log.info("no preview for %s: %s", _text(header.get("SOPInstanceUID")) or "?", reason)
    return limit


def make_preview(original: bytes) -> Preview | None:
    """A lossy JPEG 2000 derived instance of `original` within its modality's ceiling, or None
    when the policy does not allow one or it cannot be made safely. `original` is only read."""
    if len(original) > MAX_TRANSCODE_BYTES:
        log.info("no preview: instance of %d bytes is too large to decode here", len(original))
        return None
    try:
        header = pydicom.dcmread(io.BytesIO(original), stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - not parseable: no preview, the original goes as is
        log.info("no preview: not readable as DICOM: %s", exc)
        return None
    limit = preview_limit(header)
    if limit is None:
        return None
    source_uid = _text(header.get("SOPInstanceUID"))
    try:
        dataset = pydicom.dcmread(io.BytesIO(original))
        if "PixelData" not in dataset:
            log.info("no preview for %s: no pixel data", source_uid)
            return None
        pixels = dataset.pixel_array
        ratio = _encode(dataset, pixels, limit)
        if ratio is None:
            return None
        sop_uid, series_uid = _derive(dataset, header, limit, ratio)
        out = io.BytesIO()
        dataset.save_as(out, enforce_file_format=True)
        payload = out.getvalue()
        del dataset
        psnr = _psnr(pixels, pydicom.dcmread(io.BytesIO(payload)).pixel_array)
    except Exception as exc:  # noqa: BLE001 - a codec that cannot take this image: no preview
        log.info("no preview for %s: %s", source_uid, exc)
        return None
    if psnr < MIN_PSNR_DB:
        log.warning("preview of %s refused: %.1f dB from the original, the encoding is broken",
                    source_uid, psnr)
        return None
    return Preview(payload, sop_uid, series_uid, ratio, source_uid, limit, psnr)


def _text(value: object) -> str:
    """A header value as one plain string, or "" (headers are untrusted: lists, bytes, None)."""
    return value.strip() if isinstance(value, str) else ""


def _policy(header: Dataset) -> tuple[float | None, str]:
    modality = _text(header.get("Modality")).upper()
    if modality not in LIMITS:
        return None, f"no published ceiling for modality {modality or '(none)'}"
    meta = getattr(header, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax not in DECODABLE:
        return None, f"pixel data already lossy or not decodable here ({syntax or 'unknown'})"
    if _text(header.get("LossyImageCompression")) == "01":
        return None, "already lossy-compressed once"
    if "Rows" not in header:
        return None, "no image"
    if _text(header.get("PhotometricInterpretation")) not in ("MONOCHROME1", "MONOCHROME2") \
            or header.get("SamplesPerPixel", 1) != 1:
        return None, "not a grey image"
    if header.get("BitsAllocated") not in (8, 16):
        return None, f"{header.get('BitsAllocated')}-bit pixels"
    if "PerFrameFunctionalGroupsSequence" in header or "SharedFunctionalGroupsSequence" in header:
        return None, "enhanced multi-frame object (derivation per frame not built)"
    if _text(header.get("PresentationIntentType")).upper() == "FOR PROCESSING":
        return None, "a 'for processing' image"
    body = _text(header.get("BodyPartExamined")).upper()
    if body == "BREAST":
        return None, "breast imaging has stricter rules"
    try:
        frames = int(header.get("NumberOfFrames") or 1)
        decoded = int(header.Rows) * int(header.Columns) * frames * header.BitsAllocated // 8
    except (AttributeError, TypeError, ValueError):
        return None, "image size unreadable"
    if not 0 < decoded <= MAX_TRANSCODE_BYTES:
        return None, f"{decoded} bytes of pixels is too large to decode here"
    if modality == "CT" and body in HEAD:
        return CT_HEAD_LIMIT, ""
    return LIMITS[modality], ""


def _encode(dataset: Dataset, pixels: np.ndarray, limit: float) -> float | None:
    """Compress `dataset`'s pixels in place to lossy JPEG 2000 at the highest ratio within
    `limit`; the achieved ratio, or None when no encoding is within it."""
    frames = int(dataset.get("NumberOfFrames") or 1)
    uncompressed = pixels.size * dataset.BitsAllocated // 8
    # OpenJPEG counts Bits Stored: ask for the ratio that is `limit` in Bits Allocated.
    request = limit * dataset.BitsStored / dataset.BitsAllocated * HEADROOM
    for _ in range(ATTEMPTS):
        dataset.compress(JPEG2000, pixels, j2k_cr=[request], generate_instance_uid=False)
        compressed = sum(len(f) for f in generate_frames(dataset.PixelData,
                                                         number_of_frames=frames))
        ratio = uncompressed / compressed
        if ratio <= limit:
            return ratio
        if request <= 1.0:
            break
        request = max(1.0, request * limit / ratio * 0.99)
    log.info("no preview for %s: compresses to %.1f:1 even at full quality, beyond %.0f:1",
             _text(dataset.get("SOPInstanceUID")), ratio, limit)
    return None


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _derive(dataset: Dataset, header: Dataset, limit: float, ratio: float) -> tuple[str, str]:
    """Turn the (already recompressed) copy into a derived instance of its own."""
    source_sop = _text(header.get("SOPInstanceUID"))
    source_class = _text(header.get("SOPClassUID"))
    sop_uid = generate_uid(entropy_srcs=[source_sop, POLICY_VERSION, f"{limit:g}"])
    series_uid = generate_uid(entropy_srcs=[_text(header.get("SeriesInstanceUID")), SERIES_SALT])
    dataset.SOPInstanceUID = sop_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
    dataset.SeriesInstanceUID = series_uid

    image_type = dataset.get("ImageType") or []
    original_type = [image_type] if isinstance(image_type, str) else [str(v) for v in image_type]
    dataset.ImageType = ["DERIVED", *(original_type[1:] or ["PRIMARY"])]
    recorded = f"{ratio:.2f}"
    dataset.LossyImageCompression = "01"
    dataset.LossyImageCompressionRatio = recorded
    dataset.LossyImageCompressionMethod = "ISO_15444_1"
    described = (f"Lossy JPEG 2000 preview at {recorded}:1 (ceiling {limit:g}:1) for triage "
                 f"over a poor link; the lossless original follows")
    prior = _text(dataset.get("DerivationDescription"))
    dataset.DerivationDescription = (f"{described}; {prior}" if prior else described)[:1024]
    dataset.DerivationCodeSequence = [_code(*LOSSY_COMPRESSION)]
    source = Dataset()
    source.ReferencedSOPClassUID = source_class
    source.ReferencedSOPInstanceUID = source_sop
    source.PurposeOfReferenceCodeSequence = [_code(*UNCOMPRESSED_PREDECESSOR)]
    dataset.SourceImageSequence = [source]
    described_series = _text(dataset.get("SeriesDescription"))
    dataset.SeriesDescription = (f"{DESCRIPTION} {described_series}" if described_series
                                 else DESCRIPTION)[:64]
    # What the lossy pixels or the new instance make untrue: extremes, signatures over the
    # original's bytes, the original's creation time (left out: previews stay deterministic).
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue",
                    "DigitalSignaturesSequence", "MACParametersSequence",
                    "InstanceCreationDate", "InstanceCreationTime"):
        if keyword in dataset:
            delattr(dataset, keyword)
    return sop_uid, series_uid


def _psnr(original: np.ndarray, decoded: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, the peak being the original's range of values."""
    if original.shape != decoded.shape:
        return 0.0
    first, second = original.reshape(-1), decoded.reshape(-1)
    squared = 0.0
    for start in range(0, first.size, PSNR_BLOCK):  # float64 temporaries stay small on a Pi
        error = (first[start:start + PSNR_BLOCK].astype(np.float64)
                 - second[start:start + PSNR_BLOCK])
        squared += float(np.dot(error, error))
    mse = squared / first.size
    if mse == 0:
        return float("inf")
    peak = max(float(original.max()) - float(original.min()), 1.0)
    return 10 * np.log10(peak * peak / mse)
