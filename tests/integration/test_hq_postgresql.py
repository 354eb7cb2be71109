"""HQ's Orthanc keeps its index in a real PostgreSQL server, and says so when it cannot.

Why it matters: HQ holds every site's studies. Its index must really be in PostgreSQL (not a
SQLite file Orthanc quietly fell back to when something was missing), survive a restart, and an
HQ whose database is down, or whose password is wrong, must refuse to start with a line saying
which, rather than come up empty.
"""

from __future__ import annotations

import pydicom
import pytest

from gotg_pacs import config, orthanc_conf
from gotg_pacs.process import StartError, start_orthanc
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.site import free_port, write_env

SOP_INSTANCE_UID = "taggroup = 8 AND tagelement = 24"  # (0008,0018) in Orthanc's identifiers
INSTANCE = 3  # Orthanc's resource type of an instance


def _uids(files) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def test_hq_stores_its_index_in_postgresql_and_a_restart_keeps_it(hq, postgres):
    database = hq.settings.postgresql_database
    assert hq.orthanc.system()["DatabaseBackendPlugin"].startswith(
        "/usr/lib/orthanc/libOrthancPostgreSQLIndex")
    files = corpus.representative()[:3]
    assert hq.modality.store(files).ok

    # Each instance is a row in PostgreSQL, under the ID Orthanc's API gives it.
    in_postgresql = set(postgres.sql(
        database, f"SELECT value FROM dicomidentifiers WHERE {SOP_INSTANCE_UID}").split())
    assert in_postgresql == _uids(files)
    ids = set(postgres.sql(
        database, f"SELECT publicid FROM resources WHERE resourcetype = {INSTANCE}").split())
    assert ids == set(hq.orthanc.get("/instances"))
    # No SQLite index anywhere; the image files themselves stay in the storage folder.
    assert not (hq.settings.orthanc_index_dir / "index").exists()
    uuids = postgres.sql(database, "SELECT uuid FROM attachedfiles WHERE filetype = 1").split()
    assert len(uuids) == len(files)
    for uuid in uuids:
        assert (hq.settings.orthanc_storage_dir / uuid[:2] / uuid[2:4] / uuid).is_file()

    hq.child.stop()
    hq.child = start_orthanc(hq.settings)
    assert set(hq.orthanc.get("/instances")) == ids
    for instance in ids:
        assert hq.orthanc.verify_md5(instance)


def _hq_env(tmp_path, postgres, **overrides: str):
    home = tmp_path / "hq"
    home.mkdir(exist_ok=True)
    env = {**postgres.env(postgres.create_database()), "SITE_CODE": "hq", **overrides}
    return write_env(home / "pacs.env", **env)


@pytest.mark.parametrize("problem, overrides, says", [
    ("down", {"POSTGRESQL_PORT": "free"}, "Connection refused"),
    ("wrong password", {"POSTGRESQL_PASSWORD": "not the password"},
     'password authentication failed for user "orthanc"'),
])
def test_hq_refuses_to_start_when_postgresql_fails_and_says_why(tmp_path, postgres, problem,
                                                                   overrides, says):
    if overrides.get("POSTGRESQL_PORT") == "free":
        overrides = {**overrides, "POSTGRESQL_PORT": str(free_port())}
    env = _hq_env(tmp_path, postgres, **overrides)
    settings = config.load(env)
    result = run_pacs("run", env_file=env, timeout=120)
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("pacs:")]
    assert line.startswith(f"pacs: could not start: Orthanc could not open its index in "
                           f"PostgreSQL (database {settings.postgresql_database} on 127.0.0.1:"
                           f"{settings.postgresql_port} as orthanc): ")
    assert says in line and "POSTGRESQL_PASSWORD" in line
    assert postgres.password not in result.stdout + result.stderr
    # It did not come up on a SQLite index instead.
    assert not (settings.orthanc_index_dir / "index").exists()


def test_a_second_orthanc_on_the_same_index_database_is_refused(tmp_path, postgres):
    first = config.load(_hq_env(tmp_path, postgres))
    home = tmp_path / "other"
    home.mkdir()
    second = config.load(write_env(home / "pacs.env", SITE_CODE="hq",
                                   **postgres.env(first.postgresql_database)))
    running = start_orthanc(first)
    try:
        with pytest.raises(StartError, match="is in use by another Orthanc: one Orthanc per "
                                             "index database"):
            start_orthanc(second)
    finally:
        running.stop()


def _plugins_dir(tmp_path, index_plugin: str | None):
    """A plugins folder with Debian's real plugins and, under the index plugin's name, `what`."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    for name in orthanc_conf.PLUGIN_FILES:
        (folder / name).symlink_to(orthanc_conf.PLUGINS_DIR / name)
    if index_plugin:
        (folder / orthanc_conf.POSTGRESQL_INDEX_PLUGIN).symlink_to(
            orthanc_conf.PLUGINS_DIR / index_plugin)
    return folder


def test_without_the_plugin_package_pacs_refuses_rather_than_run_on_sqlite(
        tmp_path, postgres, monkeypatch):
    settings = config.load(_hq_env(tmp_path, postgres))
    monkeypatch.setattr(orthanc_conf, "PLUGINS_DIR", _plugins_dir(tmp_path, None))
    with pytest.raises(StartError, match="apt-get install orthanc-postgresql"):
        start_orthanc(settings)
    assert not settings.orthanc_config_file.exists()  # Orthanc was never started


def test_an_orthanc_that_came_up_without_its_postgresql_index_is_stopped(
        tmp_path, postgres, monkeypatch):
    # A plugin that loads but is no index (the package's storage plugin, left disabled):
    # Orthanc 1.10 then starts on SQLite without a word. pacs checks and stops it.
    settings = config.load(_hq_env(tmp_path, postgres))
    monkeypatch.setattr(orthanc_conf, "PLUGINS_DIR",
                        _plugins_dir(tmp_path, "libOrthancPostgreSQLStorage.so"))
    with pytest.raises(StartError, match="Orthanc started without its PostgreSQL index"):
        start_orthanc(settings)
