"""Orthanc's systemd steps: only an exit systemd saw as clean skips the next start's scan.

Why it matters: the scan after an unclean stop is what finds images a power cut hid from
Orthanc's index. Marking a killed or failed Orthanc as cleanly stopped would skip it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

import pytest

from gotg_pacs import orphans
from gotg_pacs.config import load
from gotg_pacs.orthanc_unit import ready, stopped
from gotg_pacs.process import StartError


@pytest.fixture
def settings(tmp_path):
    env = tmp_path / "pacs.env"
    env.write_text(f"STORAGE_PATH={tmp_path / 'orthanc'}\nSTATE_PATH={tmp_path / 'state'}\n"
                   "ENABLE_AUTH=false\n")
    made = load(env)
    made.orthanc_storage_dir.mkdir(parents=True)
    return made


def test_an_exit_with_status_0_is_a_clean_stop(settings):
    assert stopped(settings, {"EXIT_CODE": "exited", "EXIT_STATUS": "0"})
    assert (settings.orthanc_storage_dir / orphans.CLEAN_MARKER).exists()


@pytest.mark.parametrize("environ", [
    {"EXIT_CODE": "killed", "EXIT_STATUS": "KILL"},   # SIGKILL after the stop timeout
    {"EXIT_CODE": "dumped", "EXIT_STATUS": "SEGV"},   # a crash
    {"EXIT_CODE": "exited", "EXIT_STATUS": "1"},      # gave up (or `pacs orthanc serve` failed)
    {},                                               # run by hand, outside systemd
])
def test_any_other_end_leads_to_a_scan(settings, environ):
    assert not stopped(settings, environ)
    assert not (settings.orthanc_storage_dir / orphans.CLEAN_MARKER).exists()


def _port_nobody_answers() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ready_gives_up_at_once_when_orthanc_has_exited(settings):
    # systemd keeps the unit "starting" while this step runs, Orthanc dead or not: waiting out
    # the timeout would hold a `systemctl restart` (a push from HQ) behind it for 25 minutes.
    settings = dataclasses.replace(settings, http_port=_port_nobody_answers())
    gone = subprocess.Popen(["true"])
    gone.wait()
    started = time.monotonic()
    with pytest.raises(StartError, match="exited before it answered"):
        ready(settings, timeout=120, main_pid=gone.pid)
    assert time.monotonic() - started < 10


def test_ready_waits_its_timeout_while_orthanc_runs_without_answering(settings):
    settings = dataclasses.replace(settings, http_port=_port_nobody_answers())
    with pytest.raises(StartError, match="did not answer"):
        ready(settings, timeout=1.5, main_pid=os.getpid())


def test_the_cli_orthanc_starts_through_loads_no_image_libraries():
    # `pacs orthanc serve` runs before every Orthanc start: on a Pi (or an emulated NUC) numpy
    # and pydicom cost seconds that the DICOM port stays closed.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, gotg_pacs.cli, gotg_pacs.orthanc_unit; "
                               "print(sorted({'numpy', 'pydicom'} & set(sys.modules)))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
