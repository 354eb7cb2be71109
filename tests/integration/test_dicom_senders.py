"""Images from devices nobody declared: kept (standard), noted and listed for an admin, refused
once blocked, and refused altogether in strict mode. Real Orthanc, DCMTK as the devices."""

from __future__ import annotations

import dataclasses
import json

from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.dcmtk import Modality


def _as(appliance, calling_aet: str) -> Modality:
    return dataclasses.replace(appliance.modality, calling_aet=calling_aet)


def _senders(appliance) -> dict[str, dict]:
    listed = run_pacs("modality", "senders", "--json", env_file=appliance.env_file)
    assert listed.returncode == 0, listed.stderr
    return {sender["aet"]: sender for sender in json.loads(listed.stdout)}


def test_an_undeclared_device_is_kept_listed_and_can_be_declared_or_blocked(appliance_factory,
                                                                             tmp_path):
    site = appliance_factory(DICOM_ACCESS="standard")
    files = corpus.renumbered_copies(corpus.representative()[:1], 3, tmp_path / "copies")
    assert _as(site, "PORTABLE1").store(files[:1]).ok
    assert site.instance_count() == 1, "a new portable X-ray never loses an image"
    seen = _senders(site)["PORTABLE1"]
    assert (seen["ip"], seen["declared"], seen["blocked"]) == ("127.0.0.1", False, False)
    undeclared = run_pacs("modality", "senders", "--undeclared", env_file=site.env_file)
    assert "PORTABLE1" in undeclared.stdout and "NOT DECLARED" in undeclared.stdout

    declared = run_pacs("modality", "add", "portable", "PORTABLE1", "127.0.0.1", "104",
                        env_file=site.env_file)
    assert declared.returncode == 0, declared.stderr
    assert _senders(site)["PORTABLE1"]["declared"] is True

    blocked = run_pacs("modality", "block", "ROGUE", env_file=site.env_file)
    assert blocked.returncode == 0, blocked.stderr
    _as(site, "ROGUE").store(files[1:2])
    assert site.instance_count() == 1, "a blocked sender's image is refused, at once"
    assert _senders(site)["ROGUE"]["blocked"] is True
    assert run_pacs("modality", "block", "ROGUE", "--unblock",
                    env_file=site.env_file).returncode == 0
    assert _as(site, "ROGUE").store(files[1:2]).ok
    assert site.instance_count() == 2
    # What a hostile device calls itself is checked before it reaches the file.
    bad = run_pacs("modality", "block", "BAD\nNAME", env_file=site.env_file)
    assert bad.returncode == 2 and "not a valid AE title" in bad.stderr


def test_strict_mode_takes_images_only_from_declared_modalities(appliance_factory, tmp_path):
    site = appliance_factory(DICOM_ACCESS="strict")
    files = corpus.renumbered_copies(corpus.representative()[:1], 2, tmp_path / "copies")
    _as(site, "STRANGER").store(files[:1])
    assert site.instance_count() == 0
    assert run_pacs("modality", "add", "ct", "CT_ROOM", "127.0.0.1", "104",
                    env_file=site.env_file).returncode == 0
    assert _as(site, "CT_ROOM").store(files[1:]).ok
    assert site.instance_count() == 1
