"""The patch HQ keeps at ingest, so a clinic can have its exact original back for a repair.

Why it matters: a fetch-back is put in place only under the MD5 the clinic's Orthanc recorded;
a patch that rebuilds anything but the original's every byte would make the repair fail, or,
worse, not be a repair at all.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os

import pydicom
import pytest

from gotg_pacs.hq import conflicts, originals
from tests.support import corpus


def _qualified(source, tmp_path, site="site-a"):
    dataset = pydicom.dcmread(source)
    conflicts.qualify(dataset, site)
    out = tmp_path / f"{source.name}.qualified"
    dataset.save_as(out, enforce_file_format=False)
    return out


def _rebuilt(qualified, made) -> bytes:
    out = io.BytesIO()
    with open(qualified, "rb") as handle:
        originals.rebuild(handle, qualified.stat().st_size, made, out)
    return out.getvalue()


@pytest.mark.parametrize("source", corpus.representative(), ids=lambda path: path.name)
def test_every_corpus_file_comes_back_byte_for_byte_from_its_qualified_copy(source, tmp_path):
    qualified = _qualified(source, tmp_path)
    assert qualified.read_bytes() != source.read_bytes()
    made = originals.patch(source, qualified)
    assert made is not None
    kept = base64.b64decode(json.loads(made)["middle"])
    # The identity's bytes (18 to 40 for most files; 1.3 KB where group lengths change).
    assert len(kept) < min(originals.PATCH_MAX, source.stat().st_size // 10)
    rebuilt = _rebuilt(qualified, made)
    assert hashlib.md5(rebuilt).hexdigest() == hashlib.md5(source.read_bytes()).hexdigest()


def test_ends_found_across_block_boundaries_and_in_files_of_any_length(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    base = os.urandom(3 * originals.BLOCK + 17)
    cases = [
        (base, base),                                      # the same
        (base, base[:originals.BLOCK] + b"X" + base[originals.BLOCK:]),  # one byte inserted
        (base, base[:-1]),                                 # one byte shorter
        (b"", base[:10]),                                  # nothing at all
        (base[:5] + b"original" + base[5:], base[:5] + b"site-a:qualified" + base[5:]),
    ]
    for original, qualified in cases:
        a.write_bytes(original)
        b.write_bytes(qualified)
        made = originals.patch(a, b)
        assert _rebuilt(b, made) == original
        assert len(base64.b64decode(json.loads(made)["middle"])) <= len("original")


def test_no_patch_where_the_files_differ_throughout_and_a_wrong_one_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(os.urandom(originals.PATCH_MAX + 1))
    b.write_bytes(os.urandom(originals.PATCH_MAX + 1))
    assert originals.patch(a, b) is None, "a transcoding or another file: no way back"
    with open(b, "rb") as handle:
        for wrong in ("not json", json.dumps({"prefix": 1}),
                      json.dumps({"prefix": 10, "suffix": originals.PATCH_MAX, "middle": ""}),
                      json.dumps({"prefix": -1, "suffix": 0, "middle": ""}),
                      json.dumps({"prefix": 0, "suffix": 0, "middle": "!!"})):
            with pytest.raises(ValueError):
                originals.rebuild(handle, b.stat().st_size, wrong, io.BytesIO())
