"""JPEG XL lossless for native pixel data, with the original file given back byte for byte.

JPEG XL's lossless mode is the smallest we measured on pydicom-data (whole payloads): colour
ultrasound 91 KB where zstd needs 146 KB and JPEG-LS 263 KB, palette ultrasound 17 KB against
JPEG-LS's 26 KB, CT 82 KB against 100 KB, CR 811 KB against 849 KB, MR 588 KB against 600 KB.
DICOM names JPEG XL transfer syntaxes only since 2024 and no Orthanc we run decodes them, so it
is a transport form only: the payload is the file with its pixel bytes cut out (zstd) and those
bytes as JPEG XL images, one per frame, and HQ puts them back where they were. The result is
the original file, checked by its MD5 exactly like a zstd payload, and HQ stores the original
as the clinic has it.

Taken, in files up to 8 MB with frames up to 2048 x 2048 (memory, below): native pixel data of
8 or 16 bits with one sample (signed values shifted by 2^15, so CT's negative numbers stay
small), or three 8-bit samples in either planar configuration. Everything else is left to the
other codecs. The bytes are taken as stored, unused high bits included: nothing is
interpreted, so nothing can be lost.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pydicom
import zstandard
from pillow_jxl import Decoder, Encoder

MAGIC = b"GOTGJXL1"
EFFORT = 7  # libjxl's default: effort 9 takes ~2.5x the time for 1-3 % fewer bytes
NATIVE = {"1.2.840.10008.1.2": "<", "1.2.840.10008.1.2.1": "<", "1.2.840.10008.1.2.2": ">"}
MODES = {(1, 8): "L", (1, 16): "I;16", (3, 8): "RGB"}  # (samples, bits) -> JPEG XL image mode
# libjxl's lossless encoder needs ~13 bytes per pixel of a frame (210 MB for 16 Mpx, measured).
# Packing an 8 MB file of 2048 x 2048 pixels peaks at 192 MB with JPEG XL, 124 MB without:
# larger frames (a big DX) go as JPEG-LS, so pacs-sync stays inside its 256 MB on a 2 GB Pi.
MAX_PIXELS = 2048 * 2048
# Packing holds the file, its candidates and the check's decoded copy at once: beyond this the
# file goes as JPEG-LS or zstd (a 16-bit multi-frame MR of 30 MB would not fit in 256 MB).
MAX_BYTES = 8 * 2**20
MAX_HEADER = 2**16  # a 2000-frame cine's description takes ~16 KB
CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


class JxlError(Exception):
    """A payload that is not a well-formed JPEG XL transport of a DICOM file."""


def _layout(original: bytes) -> dict | None:
    """Where the pixel bytes are and how to read them as images; None if not taken here."""
    if len(original) > MAX_BYTES:
        return None
    try:
        dataset = pydicom.dcmread(io.BytesIO(original))
        order = NATIVE.get(str(dataset.file_meta.TransferSyntaxUID))
        samples, bits = int(dataset.SamplesPerPixel), int(dataset.BitsAllocated)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        frames = int(dataset.get("NumberOfFrames") or 1)
        pixels = dataset.PixelData
        planar = int(dataset.get("PlanarConfiguration") or 0) if samples == 3 else 0
        signed = bits == 16 and int(dataset.get("PixelRepresentation") or 0) == 1
    except Exception:  # noqa: BLE001 - anything unusual is simply left to the other codecs
        return None
    if order is None or (samples, bits) not in MODES or min(rows, columns, frames) < 1 \
            or rows * columns > MAX_PIXELS:
        return None
    length = frames * rows * columns * samples * bits // 8
    if not length <= len(pixels) <= length + 1:  # + one padding byte to an even length
        return None
    offset = original.rfind(pixels)
    if offset < 0:
        return None
    return {"offset": offset, "length": length, "frames": frames, "rows": rows,
            "columns": columns, "samples": samples, "bits": bits, "order": order,
            "signed": signed, "planar": planar}


def _images(region: bytes, layout: dict) -> np.ndarray:
    """The pixel bytes as frames of images in the encoder's layout (16 bits little endian,
    signed values shifted, colour interleaved)."""
    frames, rows, columns = layout["frames"], layout["rows"], layout["columns"]
    if layout["bits"] == 16:
        values = np.frombuffer(region, dtype=layout["order"] + "u2").astype("<u2")
        if layout["signed"]:
            values ^= 0x8000
        return values.reshape(frames, rows, columns)
    values = np.frombuffer(region, dtype="u1")
    if layout["samples"] == 1:
        return values.reshape(frames, rows, columns)
    if layout["planar"]:
        return values.reshape(frames, 3, rows, columns).transpose(0, 2, 3, 1)
    return values.reshape(frames, rows, columns, 3)


def _region(images: np.ndarray, layout: dict) -> bytes:
    """The inverse of `_images`: the pixel bytes exactly as the file held them."""
    if layout["bits"] == 16:
        values = images.astype("<u2")
        if layout["signed"]:
            values ^= 0x8000
        return values.astype(layout["order"] + "u2").tobytes()
    if layout["samples"] == 3 and layout["planar"]:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).tobytes()
    return images.tobytes()


def encode(original: bytes) -> bytes | None:
    """The JPEG XL transport of this file, or None when its pixel data is not taken here.
    The caller checks `decode(result) == original` before using it."""
    layout = _layout(original)
    if layout is None:
        return None
    start, end = layout["offset"], layout["offset"] + layout["length"]
    mode = MODES[layout["samples"], layout["bits"]]
    encoder = Encoder(mode=mode, lossless=True, effort=EFFORT)
    try:
        frames = [encoder(np.ascontiguousarray(image).tobytes(), layout["columns"],
                          layout["rows"], jpeg_encode=False)
                  for image in _images(original[start:end], layout)]
    except Exception:  # noqa: BLE001 - libjxl refusing an image leaves it to the others
        return None
    rest = zstandard.ZstdCompressor(level=9).compress(original[:start] + original[end:])
    header = json.dumps({**layout, "rest": len(rest),
                         "frame_bytes": [len(f) for f in frames]}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, rest, *frames])


def _codestream(frame: bytes) -> bytes:
    """The codestream: the frame itself, or (16-bit images: libjxl adds a level box) the
    content of its ISO BMFF container's `jxlc` box (ISO/IEC 18181-2)."""
    if frame[:2] == b"\xff\x0a":
        return frame
    if not frame.startswith(CONTAINER):
        raise JxlError("a frame is neither a JPEG XL codestream nor its container")
    at = 0
    while at + 8 <= len(frame):
        size, kind = struct.unpack_from(">I4s", frame, at)
        start = at + 8
        if size == 1:  # a 64-bit size follows
            (size,) = struct.unpack_from(">Q", frame, start)
            start += 8
        end = len(frame) if size == 0 else at + size
        if end <= at:
            break
        if kind == b"jxlc":
            return frame[start:end]
        if kind == b"jxlp":  # parts would hide the real size behind the first one's
            raise JxlError("a codestream in parts, which the clinic never sends")
        at = end
    raise JxlError("a JPEG XL container without a codestream")


def _dimensions(frame: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG XL frame's SizeHeader (ISO/IEC 18181-1), read before
    decoding: a frame claiming a huge image never gets memory set aside for it."""
    codestream = _codestream(frame)
    if codestream[:2] != b"\xff\x0a":
        raise JxlError("a frame's codestream does not start as JPEG XL's does")
    bits, at = int.from_bytes(codestream[2:16], "little"), 0

    def read(count: int) -> int:
        nonlocal at
        value = (bits >> at) & ((1 << count) - 1)
        at += count
        return value

    def size(div8: int) -> int:
        return (read(5) + 1) * 8 if div8 else read((9, 13, 18, 30)[read(2)]) + 1

    div8 = read(1)
    height = size(div8)
    ratio = read(3)
    if ratio == 0:
        return size(div8), height
    numerator, denominator = RATIOS[ratio]
    return height * numerator // denominator, height


def _checked_layout(header: bytes, max_size: int) -> dict:
    """The payload's description of its pixels, every field of the type and range the clinic
    writes, before any of it sizes an allocation."""
    if len(header) > MAX_HEADER:
        raise JxlError("a header larger than any the clinic writes")
    layout = json.loads(header)
    numbers = ("offset", "length", "frames", "rows", "columns", "samples", "bits", "planar",
               "rest")
    if not isinstance(layout, dict) or any(type(layout.get(k)) is not int for k in numbers) \
            or layout.get("order") not in ("<", ">") or type(layout.get("signed")) is not bool \
            or not isinstance(layout.get("frame_bytes"), list) \
            or any(type(n) is not int or n < 1 for n in layout["frame_bytes"]):
        raise JxlError("the payload's description of its pixels does not add up")
    frames, rows, columns = layout["frames"], layout["rows"], layout["columns"]
    if (layout["samples"], layout["bits"]) not in MODES or layout["planar"] not in (0, 1) \
            or min(frames, rows, columns) < 1 or rows * columns > MAX_PIXELS \
            or len(layout["frame_bytes"]) != frames or layout["rest"] < 0 \
            or layout["length"] != frames * rows * columns * layout["samples"] \
            * layout["bits"] // 8 or layout["length"] > max_size:
        raise JxlError("the payload's description of its pixels does not add up")
    return layout


def _rest(frame: bytes, limit: int) -> bytes:
    """The file around its pixels, decompressed to at most `limit` bytes: zstd's own claim of
    its content size is never what sets memory aside."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(frame))
    blocks, size = [], 0
    while block := reader.read(2**20):
        size += len(block)
        if size > limit:
            raise JxlError("the rest of the file decompresses to more than it may")
        blocks.append(block)
    return b"".join(blocks)


def decode(payload: bytes, max_size: int) -> bytes:
    """The original file from its JPEG XL transport; JxlError if the payload is malformed or
    would decode to more than `max_size` bytes (HQ never trusts what a payload claims)."""
    try:
        if not payload.startswith(MAGIC):
            raise JxlError("not a JPEG XL transport payload")
        (size,) = struct.unpack_from("<I", payload, len(MAGIC))
        at = len(MAGIC) + 4
        layout = _checked_layout(payload[at:at + size], max_size)
        at += size
        rows, columns = layout["rows"], layout["columns"]
        rest = _rest(payload[at:at + layout["rest"]], max_size - layout["length"])
        at += layout["rest"]
        mode = MODES[layout["samples"], layout["bits"]]
        shape = (1, rows, columns) + ((3,) if layout["samples"] == 3 else ())
        dtype = "<u2" if layout["bits"] == 16 else "u1"
        decoder, pixels = Decoder(), []
        for frame_bytes in layout["frame_bytes"]:
            frame = payload[at:at + frame_bytes]
            at += frame_bytes
            if _dimensions(frame) != (columns, rows):
                raise JxlError("a frame is another size of image than the payload describes")
            _jpeg, info, data, _icc, _boxes = decoder(frame)
            if (info.width, info.height, info.mode) != (columns, rows, mode) \
                    or len(data) != np.prod(shape) * np.dtype(dtype).itemsize:
                raise JxlError("a frame decodes to another size or kind of image")
            pixels.append(_region(np.frombuffer(data, dtype=dtype).reshape(shape), layout))
        if at != len(payload):
            raise JxlError("the payload holds more than it describes")
        offset = layout["offset"]
        if not 0 <= offset <= len(rest):
            raise JxlError("the pixels' place lies outside the file")
        return b"".join([rest[:offset], *pixels, rest[offset:]])
    except JxlError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformation of an untrusted payload
        raise JxlError(f"JPEG XL payload does not decode: {exc.__class__.__name__}: {exc}") \
            from None
