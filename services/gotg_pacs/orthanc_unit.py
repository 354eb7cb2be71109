"""Orthanc as a systemd service: the same start path as `pacs run`, without a Python supervisor.

`pacs run` keeps a Python parent beside Orthanc; on the appliance systemd is the parent, so the
unit calls three small steps and no Python stays resident (a Pi 4 with 2 GB counts every MB):

- `pacs orthanc serve` (ExecStart): lock the storage, render Orthanc's JSON from the settings,
  move aside what a power cut left unindexed, then *become* Orthanc (exec), which inherits the
  storage lock and keeps it exactly as long as it runs;
- `pacs orthanc ready` (ExecStartPost): wait until Orthanc answers, check it runs on the index it
  was told to, and re-store what the power cut hid, so the unit is active only once that is done;
- `pacs orthanc stopped` (ExecStopPost): leave the clean-stop marker only when Orthanc exited by
  itself with status 0, so the next start skips the scan; any other end leads to a scan.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from . import orphans
from .config import Settings
from .orthanc import Orthanc
from .process import StartError, orthanc_argv, prepare_start, wait_until


def serve(settings: Settings, announce: Callable[[dict], None] = lambda facts: None) -> None:
    """Prepare, then replace this process with Orthanc. Returns only by raising StartError.

    `announce` hears what is about to run (binary, configuration, files set aside) just before.
    """
    lock, config_file, set_aside = prepare_start(settings)
    try:
        argv = orthanc_argv(config_file)
        announce({"orthanc": argv[0], "config": str(config_file), "set_aside": set_aside})
        sys.stdout.flush()
        sys.stderr.flush()
        os.set_inheritable(lock, True)
        os.execv(argv[0], argv)
    except OSError as exc:
        os.close(lock)
        raise StartError(f"cannot start Orthanc: {exc}") from exc


def _running(pid: int | None) -> bool:
    """Whether Orthanc's process still exists (no PID known: assume it does)."""
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, under another user
        return True
    return True


def ready(settings: Settings, timeout: float, main_pid: int | None = None) -> orphans.Readopted:
    """Wait for Orthanc, check its index, re-store what a power cut hid.

    `main_pid` is Orthanc's process (systemd's $MAINPID): once it has exited there is nothing to
    wait for. systemd keeps a unit "starting" while this step runs, even with Orthanc dead, so
    waiting out the timeout would hold every `systemctl restart` behind it for that long.
    """
    # A slow answer still counts: under load (a Pi, an emulated NUC) /system can take seconds,
    # and a short timeout here would keep the recovery waiting for an Orthanc that is up.
    client = Orthanc.from_settings(settings, timeout=15.0)
    answered = wait_until(lambda: client.is_alive() or not _running(main_pid), timeout,
                          interval=0.5)
    if not _running(main_pid):
        raise StartError("Orthanc exited before it answered (journalctl -u orthanc tells why)")
    if not answered:
        raise StartError(f"Orthanc did not answer on port {settings.http_port} within "
                         f"{timeout:.0f}s (journalctl -u orthanc tells why)")
    client = Orthanc.from_settings(settings, timeout=120)
    if settings.orthanc_index == "postgresql" and not client.system().get("DatabaseBackendPlugin"):
        raise StartError("Orthanc started without its PostgreSQL index "
                         "(ORTHANC_INDEX=postgresql): refusing to run on SQLite")
    return orphans.readopt(settings, client)


def stopped(settings: Settings, environ: dict[str, str] | None = None) -> bool:
    """Mark a clean stop when systemd says Orthanc exited with status 0. Returns whether it did."""
    environ = os.environ if environ is None else environ
    clean = environ.get("EXIT_CODE") == "exited" and environ.get("EXIT_STATUS") == "0"
    if clean:
        orphans.mark_clean_stop(settings)
    return clean
