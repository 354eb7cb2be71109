"""Orthanc's configuration as rendered from the settings: the archive's safety is decided here."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from gotg_pacs import orthanc_conf
from gotg_pacs.config import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(storage_path=tmp_path / "orthanc", state_path=tmp_path / "state",
                    admin_password="correct horse battery")


@pytest.mark.parametrize("access", ["open", "standard"])
def test_durability_and_no_recycling_hold_in_every_mode(settings, access):
    from dataclasses import replace

    rendered = orthanc_conf.render(replace(settings, dicom_access=access))
    assert rendered["MaximumStorageSize"] == 0 and rendered["MaximumPatientCount"] == 0
    assert rendered["StorageCompression"] is False
    assert rendered["StoreMD5ForAttachments"] is True
    assert rendered["SyncStorageArea"] is True
    assert rendered["OverwriteInstances"] is False
    assert rendered["SaveJobs"] is True
    for key in orthanc_conf.FORBIDDEN:
        assert key not in rendered
    # An unknown device must never lose images: storing is open in every mode.
    assert rendered["DicomAlwaysAllowStore"] is True
    assert rendered["UnknownSopClassAccepted"] is True


def test_max_storage_gb_never_turns_on_recycling(settings):
    from dataclasses import replace

    rendered = orthanc_conf.render(replace(settings, max_storage_gb=100))
    assert rendered["MaximumStorageSize"] == 0


def test_open_access_is_for_trials_and_standard_checks_callers(settings):
    from dataclasses import replace

    open_ = orthanc_conf.render(replace(settings, dicom_access="open"))
    standard = orthanc_conf.render(replace(settings, dicom_access="standard"))
    for key in ("DicomAlwaysAllowFind", "DicomAlwaysAllowGet", "DicomAlwaysAllowMove",
                "DicomAlwaysAllowFindWorklist"):
        assert open_[key] is True and standard[key] is False
    for key in ("DicomCheckCalledAet", "DicomCheckModalityHost"):
        assert open_[key] is False and standard[key] is True


def test_settings_reach_orthanc(settings):
    rendered = orthanc_conf.render(settings)
    assert rendered["DicomAet"] == "GOTG_PACS" and rendered["DicomPort"] == 4242
    assert rendered["HttpPort"] == 8042 and rendered["RemoteAccessAllowed"] is False
    assert rendered["StableAge"] == 120
    assert rendered["StorageDirectory"] == str(settings.storage_path / "storage")
    assert rendered["IndexDirectory"] == str(settings.storage_path / "index")
    assert rendered["Worklists"] == {"Enable": True, "Database": str(settings.worklists_dir)}
    assert rendered["AuthenticationEnabled"] is True
    assert rendered["RegisteredUsers"] == {"admin": "correct horse battery"}
    assert [Path(p).name for p in rendered["Plugins"]] == list(orthanc_conf.PLUGIN_FILES)


def test_memory_is_bounded_for_a_2gb_pi(settings):
    rendered = orthanc_conf.render(settings)
    assert 0 < rendered["MallocArenaMax"] <= 4
    assert rendered["HttpThreadsCount"] <= 20 and rendered["DicomThreadsCount"] <= 4
    assert rendered["ConcurrentJobs"] <= 2
    assert rendered["MaximumStorageCacheSize"] <= 32


def test_written_atomically_and_private(settings, tmp_path):
    path = orthanc_conf.write(settings)
    assert json.loads(path.read_text()) == orthanc_conf.render(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "it holds the admin password"
    assert [p.name for p in path.parent.iterdir()] == ["orthanc.json"]
