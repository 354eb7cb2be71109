"""Lossless transport compression per instance: the smallest of zstd, JPEG-LS and JPEG 2000.

No single codec wins (measured on pydicom-data): grey CR/CT/MR pixels shrink 2-3x more with
JPEG-LS or JPEG 2000 than with any byte compressor, while colour ultrasound compresses best as
bytes with zstd. So each instance is tried with the candidates its COMPRESSION_LEVEL allows and the
smallest wins, under one rule: a transcoded candidate counts only if decoding it gives exactly the
original pixels and every other attribute is unchanged. zstd of the original file is exact by
construction (HQ gets the original bytes back).

Effort by COMPRESSION_LEVEL: 0 sends as is; 1-6 try zstd and JPEG-LS (JPEG-LS is ~5x faster than
JPEG 2000 at a similar ratio); 7-9 add JPEG 2000. Files already compressed (JPEG, JPEG 2000, RLE)
or too large to decode safely on a 2 GB Pi only get zstd.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np
import pydicom
import zstandard
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

log = logging.getLogger(__name__)

ZSTD_LEVELS = {1: 1, 2: 2, 3: 3, 4: 5, 5: 7, 6: 9, 7: 12, 8: 15, 9: 19}
MAX_TRANSCODE_BYTES = 128 * 2**20  # decoded pixels held in memory twice while checking
TRANSCODERS = {"jpegls": JPEGLSLossless, "j2k": JPEG2000Lossless}
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


class CodecError(Exception):
    """A payload that does not decode to what it claims."""


@dataclass(frozen=True)
class Packed:
    """One instance as it travels: how it was packed and the hashes that prove it arrived."""

    codec: str           # identity, zstd, jpegls, j2k
    payload: bytes
    original_size: int
    original_md5: str    # the instance as stored at the clinic
    payload_md5: str     # what travels; HQ checks it before anything else

    @property
    def exact(self) -> bool:
        """True when HQ gets the original bytes back (not a lossless transcoding)."""
        return self.codec in ("identity", "zstd")


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _content(dataset: pydicom.Dataset) -> dict:
    """Every attribute but the pixel data and encoding artefacts (group lengths, padding)."""
    return {e.tag: e.value for e in dataset
            if e.tag != 0x7FE00010 and e.tag.element != 0 and e.tag != 0xFFFCFFFC}


def same_image(original: pydicom.Dataset, pixels: np.ndarray, candidate: bytes) -> bool:
    """Does the candidate file decode to exactly these pixels and carry the same attributes?"""
    try:
        decoded = pydicom.dcmread(io.BytesIO(candidate))
        return (_content(decoded) == _content(original)
                and decoded.file_meta.MediaStorageSOPInstanceUID
                == original.file_meta.MediaStorageSOPInstanceUID
                and np.array_equal(decoded.pixel_array, pixels))
    except Exception as exc:  # noqa: BLE001 - any failure to decode disqualifies the candidate
        log.info("transcoded candidate rejected: %s", exc)
        return False


def _transcoded(original_bytes: bytes, codec: str) -> bytes | None:
    out = io.BytesIO()
    try:
        dataset = pydicom.dcmread(io.BytesIO(original_bytes))
        pixels = dataset.pixel_array  # truncated or odd pixel data: no transcoding, bytes only
        candidate = pydicom.dcmread(io.BytesIO(original_bytes))
        # Lossless: the instance stays the same instance (same SOP Instance UID).
        candidate.compress(TRANSCODERS[codec], generate_instance_uid=False)
        candidate.save_as(out, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - a codec that cannot take this image just drops out
        log.info("%s cannot encode this image: %s", codec, exc)
        return None
    data = out.getvalue()
    return data if same_image(dataset, pixels, data) else None


def _transcodable(original: bytes) -> bool:
    if len(original) > MAX_TRANSCODE_BYTES:
        return False
    try:
        header = pydicom.dcmread(io.BytesIO(original), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not parseable here: bytes-only compression
        return False
    return (str(header.file_meta.get("TransferSyntaxUID", "")) in NATIVE
            and "Rows" in header and header.get("BitsAllocated") in (8, 16))


def pack(original: bytes, level: int) -> Packed:
    """The smallest verified lossless form of one instance for COMPRESSION_LEVEL `level`."""
    md5 = _md5(original)
    best_codec, best = "identity", original
    if level > 0:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVELS[level]).compress(original)
        if len(packed) < len(best):
            best_codec, best = "zstd", packed
        if _transcodable(original):
            for codec in ("jpegls", "j2k") if level >= 7 else ("jpegls",):
                candidate = _transcoded(original, codec)
                if candidate is not None and len(candidate) < len(best):
                    best_codec, best = codec, candidate
    return Packed(best_codec, best, len(original), md5, _md5(best))


def unpack(codec: str, payload: bytes, payload_md5: str, original_md5: str) -> bytes:
    """The DICOM file to store at HQ, after checking it is what the clinic sent.

    The payload's MD5 proves the transfer; for exact codecs the result's MD5 must also be the
    original's. A transcoded instance was proven pixel- and attribute-identical at the clinic
    before it left.
    """
    if _md5(payload) != payload_md5:
        raise CodecError("payload damaged in transit (MD5 differs)")
    if codec in TRANSCODERS:
        return payload
    if codec == "zstd":
        try:
            result = zstandard.ZstdDecompressor().decompress(payload)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd payload does not decompress: {exc}") from None
    elif codec == "identity":
        result = payload
    else:
        raise CodecError(f"unknown codec {codec!r}")
    if _md5(result) != original_md5:
        raise CodecError("unpacked instance differs from the original (MD5)")
    return result
