"""`pacs run` (what `make run` starts) as a new user meets it.

Why it matters: this is the first thing anyone trying the appliance does. It must start real
Orthanc, say where everything is, stop cleanly on Ctrl-C, keep the data for the next run, and
explain in one line what is wrong when it cannot start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys

import psutil
import pytest

from gotg_pacs import config
from gotg_pacs.orthanc import Orthanc
from gotg_pacs.process import wait_until
from tests.conftest import run_pacs, write_env
from tests.support import corpus
from tests.support.dcmtk import Modality
from tests.support.site import Running


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    yield
    Running.kill_all()


def _orthanc_children(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "Orthanc"]


def test_run_serves_dicom_stops_on_ctrl_c_and_keeps_the_data(tmp_path):
    env = write_env(tmp_path / "pacs.env")
    settings = config.load(env)
    modality = Modality(settings.pacs_aet, settings.dicom_port)
    files = corpus.representative()[:3]

    first = Running(env)
    first.wait_for("FILE.dcm")
    banner = "\n".join(first.lines)
    assert f"AET {settings.pacs_aet} on port {settings.dicom_port}" in banner
    assert f"https://localhost:{settings.https_port}/dicom-web/" in banner
    assert f"(loopback only: http://127.0.0.1:{settings.http_port}/)" in banner
    orthanc_processes = _orthanc_children(first.process.pid)
    assert len(orthanc_processes) == 1
    assert modality.echo().ok
    assert modality.store(files).ok

    assert first.interrupt() == 0
    assert "Stopped." in first.lines[-1]
    assert not orthanc_processes[0].is_running() or orthanc_processes[0].status() == "zombie"
    assert (settings.log_dir / "orthanc.log").read_text().count("Orthanc has stopped") == 1

    second = Running(env)
    second.wait_for("FILE.dcm")
    try:
        client = Orthanc.from_settings(settings)
        assert client.statistics()["CountInstances"] == len(files)
        for instance_id in client.get("/instances"):
            assert client.verify_md5(instance_id)
    finally:
        assert second.interrupt() == 0


def test_sigterm_stops_as_cleanly_as_ctrl_c(tmp_path):
    env = write_env(tmp_path / "pacs.env")
    running = Running(env)
    running.wait_for("FILE.dcm")
    [orthanc] = _orthanc_children(running.process.pid)
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(60) == 0
    assert not orthanc.is_running() or orthanc.status() == "zombie"


def test_run_json_prints_one_line_of_endpoints_for_an_ordinary_users_path(tmp_path):
    env = write_env(tmp_path / "pacs.env")
    settings = config.load(env)
    # An ordinary Debian user's PATH has no /usr/sbin, where Orthanc lives.
    process = subprocess.Popen([sys.executable, "-m", "gotg_pacs", "--env-file", str(env), "run",
                                "--json"], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PATH": "/usr/local/bin:/usr/bin:/bin"})
    try:
        ready = json.loads(process.stdout.readline())
        assert ready["ready"] is True and ready["dicom_port"] == settings.dicom_port
        assert ready["dicomweb"] == f"https://localhost:{settings.https_port}/dicom-web/"
        assert ready["orthanc_loopback"] == f"http://127.0.0.1:{settings.http_port}/"
        assert Modality(settings.pacs_aet, settings.dicom_port).echo().ok
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
    assert process.stdout.read() == "", "nothing but the one JSON line on stdout"


def test_kill_9_of_pacs_run_takes_orthanc_down_cleanly_and_loses_nothing(tmp_path):
    env = write_env(tmp_path / "pacs.env")
    settings = config.load(env)
    files = corpus.representative()[:3]
    running = Running(env)
    running.wait_for("FILE.dcm")
    [orthanc] = _orthanc_children(running.process.pid)
    assert Modality(settings.pacs_aet, settings.dicom_port).store(files).ok

    running.process.kill()
    running.process.wait(30)
    orthanc.wait(60)  # no orphan left holding the ports
    log = (settings.log_dir / "orthanc.log").read_text()
    assert log.rstrip().endswith("Orthanc has stopped"), "Orthanc must stop cleanly, not die"

    again = Running(env)
    again.wait_for("FILE.dcm")
    client = Orthanc.from_settings(settings)
    assert client.statistics()["CountInstances"] == len(files)
    assert all(client.verify_md5(i) for i in client.get("/instances"))
    assert again.interrupt() == 0


def test_ctrl_c_during_start_up_stops_orthanc_too(tmp_path):
    env = write_env(tmp_path / "pacs.env")
    running = Running(env)
    assert wait_until(lambda: _orthanc_children(running.process.pid), 30, interval=0.01)
    [orthanc] = _orthanc_children(running.process.pid)
    assert running.interrupt() == 0
    assert not orthanc.is_running() or orthanc.status() == "zombie"


def test_patient_data_and_logs_are_private_to_the_appliance(tmp_path):
    env = write_env(tmp_path / "pacs.env")
    settings = config.load(env)
    running = Running(env)
    running.wait_for("FILE.dcm")
    assert Modality(settings.pacs_aet, settings.dicom_port).store(corpus.representative()[:1]).ok
    assert running.interrupt() == 0
    for folder in (settings.storage_path, settings.orthanc_storage_dir, settings.state_path):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    stored = [p for p in settings.orthanc_storage_dir.rglob("*") if p.is_file()]
    assert stored
    for path in [*stored, settings.log_dir / "orthanc.log", settings.orthanc_config_file]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_a_taken_port_is_reported_as_such(tmp_path):
    env = write_env(tmp_path / "pacs.env")
    settings = config.load(env)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("0.0.0.0", settings.dicom_port))
        squatter.listen()
        result = run_pacs("run", env_file=env, timeout=30)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert f"port {settings.dicom_port} (DICOM_PORT) is already in use by " in line
    assert f"{psutil.Process().name()} (pid {os.getpid()})" in line
    assert not settings.orthanc_index_dir.exists(), "nothing may start when a port is taken"


def test_a_bad_value_stops_start_up_with_one_line_naming_the_key(tmp_path):
    env = write_env(tmp_path / "pacs.env", PACS_AET="THIS_AET_IS_FAR_TOO_LONG")
    result = run_pacs("run", env_file=env, timeout=30)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "PACS_AET" in line and "1-16 characters" in line
    assert result.stdout == ""


def test_an_unknown_key_stops_start_up_and_suggests_the_right_one(tmp_path):
    env = write_env(tmp_path / "pacs.env")
    typo_line = len(env.read_text().splitlines()) + 1
    with env.open("a") as handle:
        handle.write("DICOM_PROT=4243\n")
    result = run_pacs("run", env_file=env, timeout=30)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert f"{env}:{typo_line}: unknown key DICOM_PROT (did you mean DICOM_PORT?)" in line


def test_an_unusable_storage_folder_is_named_and_left_alone(tmp_path):
    env = write_env(tmp_path / "pacs.env")
    settings = config.load(env)
    settings.storage_path.mkdir(parents=True)
    settings.orthanc_index_dir.write_text("a file where Orthanc needs a folder")
    result = run_pacs("run", env_file=env, timeout=90)
    assert result.returncode == 1
    assert f"could not start: cannot create the folder {settings.orthanc_index_dir}" \
        in result.stderr
    assert settings.orthanc_index_dir.read_text() == "a file where Orthanc needs a folder"


def test_orthanc_failing_at_start_up_is_reported_with_its_log(tmp_path):
    env = write_env(tmp_path / "pacs.env")
    settings = config.load(env)
    settings.orthanc_index_dir.mkdir(parents=True)
    # An index written by something that is not Orthanc: Orthanc refuses to start on it.
    (settings.orthanc_index_dir / "index").write_bytes(b"not an SQLite database" * 100)
    result = run_pacs("run", env_file=env, timeout=90)
    assert result.returncode == 1
    assert "Orthanc exited at start-up" in result.stderr
    assert "last log lines" in result.stderr
    assert (settings.orthanc_index_dir / "index").read_bytes() == b"not an SQLite database" * 100
