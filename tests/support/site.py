"""A throw-away appliance: an env file on free ports under a folder of its own, and `pacs run`."""

from __future__ import annotations

import io
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom

from gotg_pacs.orthanc import Orthanc, OrthancError
from gotg_pacs.sync import codecs
from gotg_pacs.sync.feed import Feed
from gotg_pacs.sync.outbox import Outbox


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different free ports: each held until all are found, so the kernel cannot hand
    the same one out twice (an env file with two settings on one port is refused)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def write_env(path: Path, **overrides: str) -> Path:
    """An env file for an appliance living under path.parent, on free ports."""
    values = {
        "PACS_NAME": "Test clinic",
        "SITE_CODE": "test-site",
        "PACS_AET": "GOTG_PACS",
        **dict(zip(("DICOM_PORT", "HTTP_PORT", "HTTPS_PORT", "HTTP_REDIRECT_PORT",
                    "WEB_API_PORT", "HL7_PORT", "MPPS_PORT"), map(str, free_ports(7)),
                   strict=True)),
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


class Running:
    """`pacs run` in the background, as a user starts it; its output collected line by line."""

    started: list[Running] = []

    def __init__(self, env_file: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gotg_pacs", "--env-file", str(env_file), "run", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._incoming: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        Running.started.append(self)

    def _read(self) -> None:
        for line in self.process.stdout:
            self._incoming.put(line.rstrip("\n"))
        self._incoming.put(None)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._incoming.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"{text!r} never appeared:\n" + "\n".join(self.lines[-30:]))

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C, as a user would; the exit status once everything stopped."""
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        while (line := self._incoming.get(timeout=10)) is not None:
            self.lines.append(line)
        return code

    @classmethod
    def kill_all(cls) -> None:
        while cls.started:
            running = cls.started.pop()
            if running.process.poll() is None:
                running.process.kill()
                running.process.wait(30)


@contextmanager
def running_appliance(folder: Path, **overrides: str) -> Iterator[Path]:
    """`pacs run` of a site living in `folder` (a module's appliance): its env file once
    everything is up, and a clean stop (Ctrl-C) after."""
    env = write_env(folder / "pacs.env", **overrides)
    running = Running(env)
    try:
        running.wait_for("is running")
        yield env
    except BaseException:  # a fixture or test failed: no orphan appliance outlives the run
        running.interrupt()
        raise
    assert running.interrupt() == 0


def owe(clinic, files) -> Outbox:
    """Store the files at the clinic and make them due now (critical, no wait for stability)."""
    assert not files or clinic.modality.store(files).ok
    box = Outbox(clinic.settings.sync_outbox_file)
    feed = Feed(clinic.orthanc, box)
    while not feed.step():
        pass
    for row in box.queue():
        box.prioritize(row["orthanc_id"], row["study_uid"])
    return box


def _site_of(hq: Orthanc, instance: str) -> str | None:
    try:
        return hq.request("GET", f"/instances/{instance}/metadata/GotgSite").text.strip()
    except OrthancError:
        return None


def same_at_hq(clinic: Orthanc, hq: Orthanc, sop_uid: str, site: str | None = None) -> bool:
    """Does HQ hold this clinic instance as sent, apart from exactly the documented
    qualification of the patient's identity by the site that sent it (`conflicts.qualify`):
    every other attribute the same, and every pixel (a lossless transcoding re-encodes them)?
    With `site`, HQ's copy from that site (another site may hold its own); an instance no site
    sent (Orthanc's own peer transfer, say) must be the same bytes or content, unqualified."""
    [here] = clinic.find_instance(sop_uid)
    there = hq.find_instance(sop_uid)
    if site is not None:
        there = [instance for instance in there if _site_of(hq, instance) == site]
    if len(there) != 1:
        return False
    mine = clinic.request("GET", f"/instances/{here}/file").content
    theirs = hq.request("GET", f"/instances/{there[0]}/file").content
    a, b = pydicom.dcmread(io.BytesIO(mine)), pydicom.dcmread(io.BytesIO(theirs))
    sender = _site_of(hq, there[0])
    if sender is not None:
        # Imported here: the shaped link's forwarders import this module and need none of HQ.
        from gotg_pacs.hq import conflicts

        conflicts.qualify(a, sender)
    elif mine == theirs:
        return True
    if codecs._content(a) != codecs._content(b):
        return False
    if a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID:  # not transcoded
        return a.get(0x7FE00010) == b.get(0x7FE00010)
    return np.array_equal(a.pixel_array, b.pixel_array)


def hq_answers(client) -> bool:
    """Does the HQ receiver answer this client yet (the empty holdings question)?"""
    try:
        client.holdings([])
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False
