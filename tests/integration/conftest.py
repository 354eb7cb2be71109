import json
import subprocess
import sys
from pathlib import Path

import pytest

from gotg_pacs.process import wait_until
from gotg_pacs.sync.transport import HQClient
from tests.conftest import run_pacs
from tests.support.container import CLINIC_SITE, build_tree, build_wheelhouse
from tests.support.site import free_port, hq_answers, write_env


def pytest_collection_modifyitems(items):
    # The hook sees the whole session's items: mark only those under this folder.
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def hq(appliance_factory, tmp_path, postgres):
    """HQ's Orthanc (its index in a PostgreSQL database of its own) and a receiver in front of
    it, with one site's credential."""
    port = free_port()
    home = tmp_path / "hq"
    home.mkdir()
    write_env(home / "pacs.env", SITE_CODE="hq", HQ_RECEIVER_PORT=str(port),
              **postgres.env(postgres.create_database()))
    archive = appliance_factory("hq")
    added = run_pacs("hq", "site", "add", "test-site", "--json", env_file=archive.env_file)
    assert added.returncode == 0, added.stderr
    archive.url = f"http://127.0.0.1:{port}"
    archive.token = json.loads(added.stdout)["hq_token"]
    client = HQClient(archive.url, archive.token, timeout=5)

    def start_receiver() -> subprocess.Popen:
        """The receiver as its own process (tests may kill -9 it and start another)."""
        archive.receiver = subprocess.Popen(
            [sys.executable, "-m", "gotg_pacs", "--env-file", str(archive.env_file), "hq", "run"],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "receiver.log", "a"))  # noqa: SIM115
        assert wait_until(lambda: hq_answers(client), 30)
        return archive.receiver

    archive.start_receiver = start_receiver
    start_receiver()
    yield archive
    archive.receiver.terminate()
    archive.receiver.wait(30)




@pytest.fixture
def make_clinic(appliance_factory, tmp_path, hq):
    """A clinic syncing to HQ at `url` (the receiver directly, or across a shaped link)."""

    def make(url: str, **overrides: str):
        home = tmp_path / "clinic"
        home.mkdir()
        write_env(home / "pacs.env", **{"SITE_CODE": "test-site", "HQ_URL": url,
                                        "HQ_TOKEN": hq.token, "OFFLINE_MODE": "auto",
                                        "COMPRESSION_LEVEL": "6", **overrides})
        return appliance_factory("clinic")

    return make


@pytest.fixture
def clinic(make_clinic, hq):
    return make_clinic(hq.url)



@pytest.fixture(scope="session")
def clinic_site(tmp_path_factory) -> dict:
    """A clinic's settings, with a wheelhouse built from this checkout (as HQ ships it)."""
    where = tmp_path_factory.mktemp("wheelhouse")
    wheelhouse = build_wheelhouse(where / "amd64", where / "build.log")
    return {**CLINIC_SITE, "pacs_services_wheelhouse": str(wheelhouse)}


@pytest.fixture(scope="session")
def clinic_tree(tmp_path_factory, clinic_site) -> Path:
    """The clinic's Debian 13 tree as the image builder makes it (mmdebstrap + clinic.yml)."""
    where = tmp_path_factory.mktemp("appliance")
    build_tree(where / "rootfs", clinic_site, where / "build.log")
    return where / "rootfs"
