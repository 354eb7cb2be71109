"""JPEG XL transport: the original file back byte for byte, whatever its pixel layout, and no
payload a site sends (or a link damages) makes HQ store anything else or run out of memory."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pydicom
import pytest
import zstandard
from pillow_jxl import Decoder, Encoder

from gotg_pacs.sync import codecs, jxl
from tests.support import corpus

LIMIT = codecs.MAX_TRANSCODE_BYTES


def _file(dataset: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _exact(original: bytes) -> bytes:
    payload = jxl.encode(original)
    assert payload is not None
    assert jxl.decode(payload, LIMIT) == original
    return payload


def test_layouts_a_modality_sends_come_back_byte_for_byte():
    ct = pydicom.dcmread(corpus.DATA_DIR / "693_UNCR.dcm")  # signed, negative values
    assert ct.PixelRepresentation == 1 and ct.pixel_array.min() < 0
    assert len(_exact(_file(ct))) < 0.2 * len(_file(ct))
    _exact((corpus.DATA_DIR / "gdcm-US-ALOKA-16_big.dcm").read_bytes())  # big endian
    _exact((corpus.DATA_DIR / "eCT_Supplemental.dcm").read_bytes())  # multi-frame

    colour = pydicom.dcmread(corpus.DATA_DIR / "US1_UNCR.dcm")
    planar = colour.pixel_array.transpose(2, 0, 1).copy()  # RRR...GGG...BBB
    colour.PlanarConfiguration = 1
    colour.PixelData = planar.tobytes()
    original = _file(colour)
    _exact(original)
    assert np.array_equal(pydicom.dcmread(io.BytesIO(jxl.decode(jxl.encode(original), LIMIT)))
                          .pixel_array, colour.pixel_array)


def test_bits_no_attribute_mentions_are_kept_too():
    """12 bits stored in 16, with something in the four spare bits (overlays did that): the
    bytes as stored travel, not the values a viewer would show."""
    mr = pydicom.dcmread(corpus.DATA_DIR / "MR2_UNCR.dcm")
    assert mr.BitsStored == 12
    raw = np.frombuffer(mr.PixelData, dtype="<u2").copy()
    raw[::7] |= 0xA000
    mr.PixelData = raw.tobytes()
    _exact(_file(mr))


def test_an_odd_number_of_8_bit_pixels_keeps_its_padding_byte():
    us = pydicom.dcmread(corpus.DATA_DIR / "OBXXXX1A.dcm")
    image = us.pixel_array[:99, :99].copy()
    us.Rows, us.Columns = image.shape
    us.PixelData = image.tobytes() + b"\x00"  # 9801 bytes, padded to even
    original = _file(us)
    _exact(original)


def test_what_it_does_not_take_is_left_to_the_other_codecs():
    assert jxl.encode((corpus.DATA_DIR / "SC_rgb_16bit.dcm").read_bytes()) is None
    assert jxl.encode((corpus.DATA_DIR / "RG3_J2KR.dcm").read_bytes()) is None  # compressed
    assert jxl.encode(b"not DICOM at all") is None
    short = pydicom.dcmread(corpus.DATA_DIR / "OBXXXX1A.dcm")
    short.PixelData = short.PixelData[:-100]  # truncated pixel data
    assert jxl.encode(_file(short)) is None


def _parts(payload: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack_from("<I", payload, len(jxl.MAGIC))
    start = len(jxl.MAGIC) + 4
    return json.loads(payload[start:start + size]), payload[start + size:]


def _forged(layout: dict, body: bytes) -> bytes:
    header = json.dumps(layout).encode()
    return jxl.MAGIC + struct.pack("<I", len(header)) + header + body


def test_hostile_or_damaged_payloads_are_refused_at_hq():
    original = (corpus.DATA_DIR / "OBXXXX1A.dcm").read_bytes()
    good = _exact(original)
    layout, body = _parts(good)

    def refused(payload: bytes, why: str) -> None:
        with pytest.raises(codecs.CodecError, match=why):
            codecs.unpack("jxl", payload, codecs._md5(payload), codecs._md5(original))

    assert codecs.unpack("jxl", good, codecs._md5(good), codecs._md5(original)) == original
    refused(good[:-10], "does not decode")  # cut short
    refused(good + b"more", "more than it describes")
    refused(b"GOTGZIP" + good[7:], "not a JPEG XL")
    # A header claiming an image far larger than any the clinic sends: refused before any
    # memory is set aside for it.
    huge = {**layout, "rows": 100_000, "columns": 100_000,
            "length": 100_000 * 100_000}
    refused(_forged(huge, body), "does not add up")
    # Claims that do not match what the images decode to.
    refused(_forged({**layout, "rows": layout["rows"] // 2,
                     "length": layout["length"] // 2}, body), "another size")
    refused(_forged({**layout, "offset": 10**9}, body), "outside the file")
    # Decodes, but is not the original: the MD5 HQ was told of says so.
    other = pydicom.dcmread(io.BytesIO(original))
    other.PatientName = "Someone^Else"
    forged = _exact(_file(other))
    with pytest.raises(codecs.CodecError, match="differs from the original"):
        codecs.unpack("jxl", forged, codecs._md5(forged), codecs._md5(original))
    with pytest.raises(codecs.CodecError, match="damaged in transit"):
        codecs.unpack("jxl", good, codecs._md5(b"something else"), codecs._md5(original))


@pytest.mark.parametrize("mode,dtype", [("L", "u1"), ("I;16", "<u2")])  # 16 bits: a container
@pytest.mark.parametrize("width,height", [(640, 480), (512, 512), (99, 99), (1, 1), (3000, 7),
                                          (7, 3000), (1250, 1000), (1280, 720), (3555, 2000)])
def test_a_frames_size_is_read_before_it_is_decoded(width, height, mode, dtype):
    image = np.zeros((height, width), dtype=dtype)
    frame = Encoder(mode=mode, lossless=True, effort=1)(image.tobytes(), width, height,
                                                       jpeg_encode=False)
    assert frame.startswith(jxl.CONTAINER) == (mode == "I;16")
    assert jxl._dimensions(frame) == (width, height)


def test_frames_too_large_for_the_pis_memory_are_left_to_jpeg_ls():
    big = pydicom.dcmread(corpus.DATA_DIR / "OBXXXX1A.dcm")
    big.Rows, big.Columns = 2048, 2049
    big.PixelData = bytes(2048 * 2049 + 1)
    assert jxl.encode(_file(big)) is None
    big.Columns = 2048
    big.PixelData = bytes(2048 * 2048)
    _exact(_file(big))


def test_a_frame_claiming_a_huge_image_is_refused_before_decoding():
    original = (corpus.DATA_DIR / "OBXXXX1A.dcm").read_bytes()
    layout, body = _parts(_exact(original))
    rest, frame = body[:layout["rest"]], body[layout["rest"]:]
    # A SizeHeader for 100000 x 100000 (not div8, selector 3: 30 bits, ratio 1:1) in front of
    # the real frame's bytes: 10 gigapixels a decoder would try to allocate.
    bits = 0 | (3 << 1) | ((100_000 - 1) << 3) | (1 << 33)
    bomb = b"\xff\x0a" + bits.to_bytes(5, "little") + frame[7:]
    assert jxl._dimensions(bomb) == (100_000, 100_000)
    forged = _forged({**layout, "frame_bytes": [len(bomb)]}, rest + bomb)
    with pytest.raises(codecs.CodecError, match="another size"):
        codecs.unpack("jxl", forged, codecs._md5(forged), codecs._md5(original))


def test_the_images_hold_the_values_a_viewer_shows_whatever_the_byte_order_or_sign():
    """JPEG XL compresses well only what it sees as an image: big endian read as big endian,
    signed values shifted, not just any reversible scramble of the bytes."""
    for name, shift in (("gdcm-US-ALOKA-16_big.dcm", 0), ("693_UNCR.dcm", 0x8000)):
        original = (corpus.DATA_DIR / name).read_bytes()
        dataset = pydicom.dcmread(io.BytesIO(original))
        layout, body = _parts(jxl.encode(original))
        frame = body[layout["rest"]:]
        _jpeg, _info, data, _icc, _boxes = Decoder()(frame)
        seen = np.frombuffer(data, dtype="<u2").reshape(dataset.Rows, dataset.Columns)
        shown = dataset.pixel_array.astype(np.int32) + shift
        if dataset.BitsStored < 16 and not shift:
            seen = seen & ((1 << dataset.BitsStored) - 1)
        assert np.array_equal(seen, shown), name


def test_claims_that_would_set_memory_aside_are_refused_before_it_is():
    original = (corpus.DATA_DIR / "OBXXXX1A.dcm").read_bytes()
    layout, body = _parts(_exact(original))
    rest, frame = body[:layout["rest"]], body[layout["rest"]:]

    def refused(payload: bytes, why: str) -> None:
        with pytest.raises(codecs.CodecError, match=why):
            codecs.unpack("jxl", payload, codecs._md5(payload), codecs._md5(original))

    # zstd names its own content size: a few hundred bytes claiming gigabytes.
    bomb = zstandard.ZstdCompressor().compress(bytes(LIMIT + 1))
    refused(_forged({**layout, "rest": len(bomb)}, bomb + frame), "more than")
    # A byte order that numpy would read as a huge sub-array.
    refused(_forged({**layout, "order": "(1000000000,)"}, body), "does not add up")
    refused(_forged({**layout, "rows": "99"}, body), "does not add up")
    # A header far larger than any real one, parsed before anything is checked.
    huge = jxl.MAGIC + struct.pack("<I", 2**20 + 1) + b"[" * (2**20 + 1)
    refused(huge, "header")
    # More pixels than the clinic ever sends as JPEG XL.
    refused(_forged({**layout, "rows": 4096, "columns": 4096, "length": 4096 * 4096},
                    body), "does not add up")
    # The codestream in parts (jxlp boxes): the first part alone would hide the real size.
    cut = jxl.CONTAINER + _box(b"ftyp", b"jxl \x00\x00\x00\x00jxl ") \
        + _box(b"jxlp", b"\x00\x00\x00\x00" + frame[:3]) \
        + _box(b"jxlp", b"\x80\x00\x00\x01" + frame[3:])
    refused(_forged({**layout, "frame_bytes": [len(cut)]}, rest + cut), "codestream")


def _box(kind: bytes, content: bytes) -> bytes:
    return struct.pack(">I", 8 + len(content)) + kind + content
