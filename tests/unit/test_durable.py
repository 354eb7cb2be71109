"""Replacing a file: the old one or the new one, never half of either, and no secret exposed."""

from __future__ import annotations

import pytest

from gotg_pacs import durable


def test_the_new_file_takes_the_mode_it_is_given_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "orthanc.json"
    target.write_text("old")
    target.chmod(0o644)
    durable.replace_text(target, "new secret", mode=0o600)
    assert target.read_text() == "new secret"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["orthanc.json"]


def test_a_file_like_another_gets_its_mode(tmp_path):
    target = tmp_path / "pacs.env"
    target.write_text("A=1\n")
    target.chmod(0o640)
    durable.replace_text(target, "A=2\n", like=target)
    assert target.stat().st_mode & 0o777 == 0o640


def test_a_failed_write_keeps_the_old_file_whole(tmp_path):
    target = tmp_path / "pacs.env"
    target.write_text("A=1\n")
    with pytest.raises(UnicodeEncodeError):
        durable.replace_text(target, "A=\udcff\n")  # cannot be written as UTF-8
    assert target.read_text() == "A=1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pacs.env"]


def test_exclusive_bytes_never_overwrite(tmp_path):
    target = tmp_path / "DICOMDIR"
    durable.write_bytes(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        durable.write_bytes(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first"
