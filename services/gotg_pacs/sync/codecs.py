"""Lossless transport compression per instance: the smallest of zstd, JPEG-LS, JPEG XL and
JPEG 2000.

No single codec wins (measured on pydicom-data): grey CR/CT/MR pixels shrink 2-3x more with
JPEG-LS, JPEG XL or JPEG 2000 than with any byte compressor, colour ultrasound compresses better
as bytes with zstd than with JPEG-LS, and JPEG XL beats both on it (see `jxl`). So each instance
is tried with the candidates its COMPRESSION_LEVEL allows and the smallest wins, under one rule:
a transcoded candidate (JPEG-LS, JPEG 2000) counts only if decoding it gives exactly the
original pixels and every other attribute is unchanged; a JPEG XL candidate only if it gives
back the original file byte for byte. zstd of the original file is exact by construction.

Effort by COMPRESSION_LEVEL: 0 sends as is; 1-3 try zstd and JPEG-LS (JPEG-LS is ~5x faster than
JPEG 2000 at a similar ratio); 4-6 add JPEG XL (~6x JPEG-LS's time, files up to 8 MB); 7-9 add
JPEG 2000. Files already compressed (JPEG, JPEG 2000, RLE) or too large to decode safely on a
2 GB Pi only get zstd.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pydicom
import zstandard
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from . import jxl

log = logging.getLogger(__name__)

ZSTD_LEVELS = {1: 1, 2: 2, 3: 3, 4: 5, 5: 7, 6: 9, 7: 12, 8: 15, 9: 19}
# Transcoding holds the file, its pixels and each candidate decoded again (~5x the file): above
# this size an instance is only zstd-compressed, streamed, so a 2 GB Pi never runs short.
MAX_TRANSCODE_BYTES = 32 * 2**20
BLOCK = 2**20  # streaming unit for files that are not held in memory
# Small instances travel together: a tar of their payloads named 0, 1, ... and a JSON manifest
# (name, sop_uid, codec, payload_md5, original_md5 per member), read by HQ member by member.
BATCH, BATCH_MANIFEST = "batch", "manifest.json"
TRANSCODERS = {"jpegls": JPEGLSLossless, "j2k": JPEG2000Lossless}
EXACT = ("identity", "zstd", "jxl")  # HQ gets the original file back, byte for byte
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


class CodecError(Exception):
    """A payload that does not decode to what it claims."""


@dataclass(frozen=True)
class Packed:
    """One instance as it travels: how it was packed and the hashes that prove it arrived."""

    codec: str           # identity, zstd, jxl, jpegls, j2k
    payload: bytes
    original_size: int
    original_md5: str    # the instance as stored at the clinic
    payload_md5: str     # what travels; HQ checks it before anything else

    @property
    def exact(self) -> bool:
        """True when HQ gets the original bytes back (not a lossless transcoding)."""
        return self.codec in EXACT


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
        if level >= 4:
            candidate = jxl.encode(original)
            if candidate is not None and len(candidate) < len(best) \
                    and _exact_jxl(candidate, original):
                best_codec, best = "jxl", candidate
    return Packed(best_codec, best, len(original), md5, _md5(best))


def _exact_jxl(candidate: bytes, original: bytes) -> bool:
    try:
        return jxl.decode(candidate, len(original)) == original
    except jxl.JxlError as exc:
        log.info("JPEG XL candidate rejected: %s", exc)
        return False


def pack_stream(source: BinaryIO, out: BinaryIO, level: int) -> tuple[str, str, str]:
    """zstd (or, at level 0, a plain copy) of a file too large to transcode, streamed in
    blocks. Returns (codec, original MD5, payload MD5)."""
    original, payload = hashlib.md5(), hashlib.md5()

    class Hashing:
        def write(self, data: bytes) -> int:
            payload.update(data)
            return out.write(data)

    sink = Hashing()
    writer = (zstandard.ZstdCompressor(level=ZSTD_LEVELS[level]).stream_writer(
        sink, closefd=False) if level > 0 else None)
    while block := source.read(BLOCK):
        original.update(block)
        (writer or sink).write(block)
    if writer:
        writer.close()
    return ("zstd" if writer else "identity"), original.hexdigest(), payload.hexdigest()


def unpack_to(codec: str, payload: BinaryIO, out: BinaryIO, payload_md5: str,
              original_md5: str) -> None:
    """Stream the DICOM file to store at HQ into `out`, checking it is what the clinic sent.

    The payload's MD5 proves the transfer; for exact codecs the result's MD5 must also be the
    original's. A transcoded instance was proven pixel- and attribute-identical at the clinic
    before it left. Streams in 1 MB blocks: memory stays flat whatever the instance's size,
    except for JPEG XL, decoded whole (the clinic makes it only for files up to
    jxl.MAX_BYTES, and a payload claiming more is refused).
    """
    if codec not in (*EXACT, *TRANSCODERS):
        raise CodecError(f"unknown codec {codec!r}")
    if codec == "jxl":
        return _unpack_jxl(payload, out, payload_md5, original_md5)
    sent, result = hashlib.md5(), hashlib.md5()

    def payload_blocks():
        while block := payload.read(BLOCK):
            sent.update(block)
            yield block

    if codec == "zstd":
        blocks = payload_blocks()
        reader = zstandard.ZstdDecompressor().stream_reader(_Blocks(blocks))
        try:
            while block := reader.read(BLOCK):
                result.update(block)
                out.write(block)
        except zstandard.ZstdError as exc:
            for _ in blocks:  # the whole payload's MD5 says whether the link damaged it
                pass
            if sent.hexdigest() != payload_md5:
                raise CodecError("payload damaged in transit (MD5 differs)") from None
            raise CodecError(f"zstd payload does not decompress: {exc}") from None
    else:
        for block in payload_blocks():
            result.update(block)
            out.write(block)
    if sent.hexdigest() != payload_md5:
        raise CodecError("payload damaged in transit (MD5 differs)")
    if codec not in TRANSCODERS and result.hexdigest() != original_md5:
        raise CodecError("unpacked instance differs from the original (MD5)")


def _unpack_jxl(payload: BinaryIO, out: BinaryIO, payload_md5: str, original_md5: str) -> None:
    """A JPEG XL payload is decoded whole: the clinic only makes one for a file of at most
    jxl.MAX_BYTES, and anything claiming more is refused."""
    data = payload.read(jxl.MAX_BYTES + 1)
    if len(data) > jxl.MAX_BYTES:
        raise CodecError("a JPEG XL payload larger than any the clinic makes")
    if _md5(data) != payload_md5:
        raise CodecError("payload damaged in transit (MD5 differs)")
    try:
        original = jxl.decode(data, jxl.MAX_BYTES)
    except jxl.JxlError as exc:
        raise CodecError(str(exc)) from None
    if _md5(original) != original_md5:
        raise CodecError("unpacked instance differs from the original (MD5)")
    out.write(original)


class _Blocks(io.RawIOBase):
    """A readable file over an iterator of blocks (zstd's stream reader wants one)."""

    def __init__(self, blocks) -> None:
        self._blocks, self._rest = blocks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._rest:
            self._rest = next(self._blocks, b"")
        size = min(len(buffer), len(self._rest))
        buffer[:size], self._rest = self._rest[:size], self._rest[size:]
        return size


def unpack(codec: str, payload: bytes, payload_md5: str, original_md5: str) -> bytes:
    """`unpack_to` for a payload held in memory."""
    out = io.BytesIO()
    unpack_to(codec, io.BytesIO(payload), out, payload_md5, original_md5)
    return out.getvalue()
