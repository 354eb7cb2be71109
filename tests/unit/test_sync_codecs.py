"""Transport compression on real images: always lossless, verified, and smaller than gzip."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless

from gotg_pacs.sync import codecs
from tests.support import corpus

UNCOMPRESSED = ["MR2_UNCR.dcm", "RG3_UNCR.dcm", "693_UNCR.dcm", "US1_UNCR.dcm", "emri_small.dcm",
                "SC_rgb_16bit.dcm", "OBXXXX1A.dcm", "gdcm-US-ALOKA-16_big.dcm"]


def _read(name: str) -> bytes:
    return (corpus.DATA_DIR / name).read_bytes()


@pytest.mark.parametrize("name", [*UNCOMPRESSED, "RG3_J2KR.dcm", "OBXXXX1A_rle.dcm",
                                  "color3d_jpeg_baseline.dcm", "emri_small_jpeg_ls_lossless.dcm"])
def test_every_instance_comes_back_lossless(name):
    original = _read(name)
    packed = codecs.pack(original, level=9)
    assert len(packed.payload) <= len(original)
    received = codecs.unpack(packed.codec, packed.payload, packed.payload_md5, packed.original_md5)
    if packed.exact:
        assert received == original
    else:
        before, after = pydicom.dcmread(io.BytesIO(original)), pydicom.dcmread(io.BytesIO(received))
        assert np.array_equal(before.pixel_array, after.pixel_array)
        assert codecs._content(before) == codecs._content(after)


def test_no_single_codec_wins_so_each_image_gets_its_own():
    fast = {name: codecs.pack(_read(name), level=3) for name in UNCOMPRESSED}
    assert fast["US1_UNCR.dcm"].codec == "zstd", "colour ultrasound: bytes beat JPEG-LS"
    assert fast["RG3_UNCR.dcm"].codec == "jpegls", "grey CR compresses best as an image"
    assert fast["MR2_UNCR.dcm"].codec == "jpegls"
    best = {name: codecs.pack(_read(name), level=9) for name in UNCOMPRESSED}
    assert len({packed.codec for packed in best.values()}) > 1
    assert best["SC_rgb_16bit.dcm"].codec == "zstd", "16-bit colour: no image codec takes it"
    # JPEG XL, when the level allows it: far smaller for ultrasound, a little for CR and CT.
    for name, gain in (("US1_UNCR.dcm", 0.7), ("OBXXXX1A.dcm", 0.8), ("693_UNCR.dcm", 0.9),
                       ("RG3_UNCR.dcm", 0.97)):
        assert best[name].codec == "jxl", name
        assert len(best[name].payload) < gain * len(fast[name].payload), name


def test_already_compressed_images_are_not_recoded():
    assert codecs.pack(_read("RG3_J2KR.dcm"), level=9).codec in ("zstd", "identity")


def test_level_0_sends_as_is_and_low_levels_only_use_the_fast_codecs():
    original = _read("MR2_UNCR.dcm")
    assert codecs.pack(original, level=0).codec == "identity"
    assert codecs.pack(original, level=3).codec in ("zstd", "jpegls")
    assert codecs.pack(_read("US1_UNCR.dcm"), level=3).codec == "zstd"


def test_corpus_travels_smaller_than_gzip():
    files = [_read(name) for name in UNCOMPRESSED]
    ours = sum(len(codecs.pack(data, level=6).payload) for data in files)
    theirs = sum(len(gzip.compress(data, 6)) for data in files)
    assert ours < 0.75 * theirs, f"{ours} bytes against gzip's {theirs}"


def test_a_transcoding_that_changes_one_pixel_is_refused():
    original = _read("693_UNCR.dcm")
    dataset = pydicom.dcmread(io.BytesIO(original))
    pixels = dataset.pixel_array
    altered = pydicom.dcmread(io.BytesIO(original))
    array = altered.pixel_array.copy()
    array[10, 10] += 1
    altered.PixelData = array.tobytes()
    altered.compress(JPEGLSLossless, generate_instance_uid=False)
    out = io.BytesIO()
    altered.save_as(out, enforce_file_format=True)
    assert codecs.same_image(dataset, pixels, out.getvalue()) is False
    renamed = pydicom.dcmread(io.BytesIO(original))
    renamed.PatientName = "Other^Patient"
    renamed.compress(JPEGLSLossless, generate_instance_uid=False)
    out = io.BytesIO()
    renamed.save_as(out, enforce_file_format=True)
    assert codecs.same_image(dataset, pixels, out.getvalue()) is False


def test_damage_in_transit_is_detected():
    packed = codecs.pack(_read("US1_UNCR.dcm"), level=6)
    damaged = bytearray(packed.payload)
    damaged[len(damaged) // 2] ^= 0xFF
    with pytest.raises(codecs.CodecError, match="damaged in transit"):
        codecs.unpack(packed.codec, bytes(damaged), packed.payload_md5, packed.original_md5)
    with pytest.raises(codecs.CodecError, match="differs from the original"):
        codecs.unpack("identity", b"x", codecs._md5(b"x"), packed.original_md5)
