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
    assert sorted(p.name for p in path.parent.iterdir()) == ["orthanc.json", "senders.lua"]


@pytest.fixture
def hq_settings(settings) -> Settings:
    from dataclasses import replace

    return replace(settings, orthanc_index="postgresql", postgresql_host="db.hq.example",
                   postgresql_port=5433, postgresql_database="orthanc_hq",
                   postgresql_user="orthanc", postgresql_password="p@ss w:rd/%")


def test_a_clinic_keeps_its_sqlite_index(settings):
    rendered = orthanc_conf.render(settings)
    assert "PostgreSQL" not in rendered
    assert not any("PostgreSQL" in plugin for plugin in rendered["Plugins"])


def test_hq_keeps_the_index_in_postgresql_and_the_files_on_disk(hq_settings):
    rendered = orthanc_conf.render(hq_settings)
    assert rendered["Plugins"][-1] == "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"
    assert not any("Storage" in Path(plugin).name for plugin in rendered["Plugins"])
    postgresql = rendered["PostgreSQL"]
    assert postgresql["EnableIndex"] is True
    assert postgresql["EnableStorage"] is False, "the storage folder is what backups copy"
    assert rendered["StorageDirectory"] == str(hq_settings.orthanc_storage_dir)
    assert postgresql["Lock"] is True, "one Orthanc per index database"
    assert 1 < postgresql["IndexConnectionsCount"] <= 10
    # Bounded start-up: PostgreSQL down is reported within about 20 s, not retried for ever.
    assert postgresql["MaximumConnectionRetries"] * postgresql["ConnectionRetryInterval"] <= 30
    # Nothing else about the archive's safety changes at HQ.
    for key, value in orthanc_conf.DURABILITY.items():
        assert rendered[key] == value


def test_the_connection_survives_any_password_characters(hq_settings):
    from urllib.parse import unquote, urlsplit

    uri = orthanc_conf.render(hq_settings)["PostgreSQL"]["ConnectionUri"]
    for key in ("Host", "Port", "Database", "Username", "Password"):
        assert key not in orthanc_conf.render(hq_settings)["PostgreSQL"]
    parts = urlsplit(uri)
    assert parts.scheme == "postgresql" and " " not in uri
    assert (unquote(parts.username), unquote(parts.password)) == ("orthanc", "p@ss w:rd/%")
    assert (parts.hostname, parts.port, parts.path) == ("db.hq.example", 5433, "/orthanc_hq")
    assert parts.query == "connect_timeout=10"


def test_a_socket_folder_or_ipv6_host_is_written_as_libpq_reads_it(hq_settings):
    from dataclasses import replace

    socket = orthanc_conf.postgresql_uri(replace(hq_settings, postgresql_host="/run/postgresql",
                                                 postgresql_password=""))
    assert socket == "postgresql://orthanc@%2Frun%2Fpostgresql:5433/orthanc_hq?connect_timeout=10"
    ipv6 = orthanc_conf.postgresql_uri(replace(hq_settings, postgresql_host="::1"))
    assert "@[::1]:5433/" in ipv6
