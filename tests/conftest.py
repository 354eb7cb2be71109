"""Fixtures shared by the whole suite.

Integration fixtures start the real Orthanc from Debian through the same code `pacs run` uses, on
free ports in a temporary folder, and stop it afterwards; nothing is mocked.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gotg_pacs import config
from gotg_pacs.orthanc import Orthanc
from gotg_pacs.process import start_orthanc
from tests.support.dcmtk import Modality

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_env(path: Path, **overrides: str) -> Path:
    """An env file for an appliance living under path.parent, on free ports."""
    values = {
        "PACS_NAME": "Test clinic",
        "SITE_CODE": "test-site",
        "PACS_AET": "GOTG_PACS",
        "DICOM_PORT": str(free_port()),
        "HTTP_PORT": str(free_port()),
        "DICOM_ACCESS": "open",
        "STORAGE_PATH": "orthanc",
        "STATE_PATH": "state",
        "BACKUP_PATH": "backup",
        "STABLE_AGE": "10s",
        "ENABLE_AUTH": "true",
        "ADMIN_PASSWORD": secrets.token_urlsafe(12),
        "OFFLINE_MODE": "offline",
    }
    values.update(overrides)
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


class Appliance:
    """A running Orthanc configured by the appliance's settings, and a modality pointed at it."""

    def __init__(self, env_file: Path) -> None:
        self.env_file = env_file
        self.settings = config.load(env_file)
        self.child = start_orthanc(self.settings)
        self.orthanc = Orthanc.from_settings(self.settings, timeout=60)
        self.modality = Modality(self.settings.pacs_aet, self.settings.dicom_port)

    def stop(self) -> int | None:
        return self.child.stop()

    def instance_count(self) -> int:
        return self.orthanc.statistics()["CountInstances"]


@pytest.fixture
def appliance_factory(tmp_path):
    started: list[Appliance] = []

    def start(name: str = "site", **overrides: str) -> Appliance:
        home = tmp_path / name
        home.mkdir(exist_ok=True)
        env = home / "pacs.env"
        if not env.exists():
            write_env(env, **overrides)
        appliance = Appliance(env)
        started.append(appliance)
        return appliance

    yield start
    for appliance in started:
        appliance.stop()


@pytest.fixture
def appliance(appliance_factory) -> Appliance:
    return appliance_factory()


def run_pacs(*args: str, env_file: Path | None = None, timeout: float = 120,
             **kwargs) -> subprocess.CompletedProcess:
    """The real `pacs` command line, as a user types it."""
    argv = [sys.executable, "-m", "gotg_pacs"]
    if env_file:
        argv += ["--env-file", str(env_file)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
