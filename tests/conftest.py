"""Fixtures shared by the whole suite.

Integration fixtures start the real Orthanc from Debian through the same code `pacs run` uses, on
free ports in a temporary folder, and stop it afterwards; nothing is mocked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gotg_pacs import config
from gotg_pacs.orthanc import Orthanc
from gotg_pacs.process import start_orthanc
from tests.support.dcmtk import Modality
from tests.support.postgres import PostgresServer
from tests.support.site import free_port, write_env  # noqa: F401 (tests import them from here)

REPO = Path(__file__).resolve().parent.parent


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked `started_first` (image builds and boots, tens of minutes of emulated CPU)
    go to the front, so that `make test`'s two workers run them beside the rest of the suite
    instead of after it. The sort is stable: everything else keeps its order."""
    items.sort(key=lambda item: item.get_closest_marker("started_first") is None)


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


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the run (started on first use); each HQ gets a database."""
    server = PostgresServer().start()
    yield server
    server.stop()


def run_pacs(*args: str, env_file: Path | None = None, timeout: float = 120,
             **kwargs) -> subprocess.CompletedProcess:
    """The real `pacs` command line, as a user types it."""
    argv = [sys.executable, "-m", "gotg_pacs"]
    if env_file:
        argv += ["--env-file", str(env_file)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
