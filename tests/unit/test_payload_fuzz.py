"""HQ's unpacking of what clinics send, fuzzed with hypothesis: a site holding a valid token can
send any bytes with a matching payload MD5, so every mutation of a real payload (cut, flipped,
spliced, its JSON layout rewritten) must end in CodecError, never another exception, and nothing
but the exact original may ever come out."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from gotg_pacs.sync import codecs, jxl

ORIGINAL = Path(get_testdata_file("CT_small.dcm")).read_bytes()
ORIGINAL_MD5 = hashlib.md5(ORIGINAL).hexdigest()
PAYLOADS = {"jxl": jxl.encode(ORIGINAL), "zstd": codecs.pack(ORIGINAL, 1).payload}
assert PAYLOADS["jxl"] is not None
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _unpacked(codec: str, payload: bytes) -> bytes | None:
    try:
        return codecs.unpack(codec, payload, hashlib.md5(payload).hexdigest(), ORIGINAL_MD5)
    except codecs.CodecError:
        return None


@st.composite
def mutated(draw, codec: str) -> bytes:
    data = bytearray(PAYLOADS[codec])
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "cut", "splice", "insert"]))
        if kind == "flip" and data:
            data[where] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[where:]
        elif kind == "splice":
            chunk = draw(st.binary(min_size=1, max_size=64))
            data[where:where + len(chunk)] = chunk
        else:
            data[where:where] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@FUZZ
@given(payload=mutated("jxl"))
def test_any_mutation_of_a_jpeg_xl_payload_is_refused_or_exact(payload):
    out = _unpacked("jxl", payload)
    assert out is None or out == ORIGINAL


@FUZZ
@given(payload=mutated("zstd"))
def test_any_mutation_of_a_zstd_payload_is_refused_or_exact(payload):
    out = _unpacked("zstd", payload)
    assert out is None or out == ORIGINAL


def _with_layout(layout: dict) -> bytes:
    """The real payload with its JSON layout replaced by `layout`."""
    payload = PAYLOADS["jxl"]
    magic = payload[:8]
    (size,) = struct.unpack("<I", payload[8:12])
    header = json.dumps(layout).encode()
    return magic + struct.pack("<I", len(header)) + header + payload[12 + size:]


LAYOUT = json.loads(PAYLOADS["jxl"][12:12 + struct.unpack("<I", PAYLOADS["jxl"][8:12])[0]])
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.text(max_size=20),
                   st.floats(allow_nan=True), st.lists(st.integers(), max_size=3))


@FUZZ
@given(key=st.sampled_from(sorted(LAYOUT)), value=VALUES)
def test_a_layout_with_any_field_rewritten_is_refused_or_exact(key, value):
    out = _unpacked("jxl", _with_layout({**LAYOUT, key: value}))
    assert out is None or out == ORIGINAL


@FUZZ
@given(payload=st.binary(max_size=4096))
def test_arbitrary_bytes_are_refused(payload):
    """The codecs HQ rebuilds the original from (the transcoded ones are DICOM files that go to
    Orthanc's own parser as they are), and a codec nobody knows."""
    for codec in (*sorted(codecs.EXACT), "nonsense"):
        assert _unpacked(codec, payload) in (None, ORIGINAL)
