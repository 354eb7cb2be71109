"""`pacs status`: the first command HQ IT types on a box that misbehaves.

Why it matters: it must tell the truth when parts are down (exit 1, the part named), and its
counts and storage figures must be the archive's own, not guesses.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from gotg_pacs import config
from gotg_pacs.orthanc import Orthanc
from gotg_pacs.process import wait_until
from tests.conftest import run_pacs
from tests.support import corpus
from tests.support.dcmtk import Modality
from tests.support.site import Running, write_env


@pytest.fixture
def running_appliance(tmp_path):
    """The whole appliance under `pacs run`: Orthanc and every service."""
    env = write_env(tmp_path / "pacs.env")
    running = Running(env)
    running.wait_for("FILE.dcm")
    settings = config.load(env)
    site = SimpleNamespace(env_file=env, settings=settings, orthanc=Orthanc.from_settings(settings),
                           modality=Modality(settings.pacs_aet, settings.dicom_port))
    yield site
    running.interrupt()
    Running.kill_all()


def test_status_reports_services_counts_storage_plugins_and_versions(running_appliance):
    appliance = running_appliance
    files = corpus.representative()[:5]
    assert appliance.modality.store(files).ok
    wait_until(lambda: run_pacs("status", env_file=appliance.env_file).returncode == 0, 40)
    result = run_pacs("status", "--json", env_file=appliance.env_file)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    orthanc, sync = report["services"]
    assert sync["name"] == "sync" and sync["up"] and sync["heartbeat_age_s"] < 90
    assert orthanc["up"] and orthanc["version"] == appliance.orthanc.system()["Version"]
    assert orthanc["aet"] == "GOTG_PACS"
    assert set(orthanc["plugins"]) == {"dicom-web", "gdcm", "worklists"}
    assert report["counts"]["instances"] == len(files)
    stored = sum(p.stat().st_size for p in appliance.settings.orthanc_storage_dir.rglob("*")
                 if p.is_file())
    assert report["storage"]["archive_bytes"] == stored
    usage = shutil.disk_usage(appliance.settings.storage_path)
    assert abs(report["storage"]["free_bytes"] - usage.free) < 512 * 1024 * 1024
    assert report["versions"]["dcmtk"].startswith("3.")

    text = run_pacs("status", env_file=appliance.env_file)
    assert text.returncode == 0
    assert "all parts up" in text.stdout
    assert f"{len(files)} instances" in text.stdout


def test_status_says_which_part_is_down_and_exits_1(appliance):
    appliance.stop()
    result = run_pacs("status", "--json", env_file=appliance.env_file)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    orthanc, sync = report["services"]
    assert orthanc["up"] is False and "not answering" in orthanc["error"]
    assert sync["up"] is False and "has never run" in sync["error"]
    assert report["storage"]["free_bytes"] > 0

    text = run_pacs("status", env_file=appliance.env_file)
    assert text.returncode == 1
    assert "orthanc" in text.stdout and "DOWN" in text.stdout


def test_status_with_a_wrong_password_reports_orthanc_refusing(appliance, tmp_path):
    env = tmp_path / "wrong.env"
    env.write_text(appliance.env_file.read_text().replace(
        f"ADMIN_PASSWORD={appliance.settings.admin_password}", "ADMIN_PASSWORD=not-the-password"))
    result = run_pacs("status", "--json", env_file=env)
    assert result.returncode == 1
    orthanc, _sync = json.loads(result.stdout)["services"]
    assert orthanc["up"] is False and "401" in orthanc["error"]
