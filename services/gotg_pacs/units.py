"""The appliance's systemd units, stopped around work that needs Orthanc down and started again.

On the appliance systemd runs Orthanc and the services; a command run by site IT (a restore
into an empty box) stops what must stop and brings it back even when the work fails. Outside
systemd (`pacs run`, the tests) nothing here applies: the one running the processes stops them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ORTHANC = "orthanc.service"
SYNC = "pacs-sync.service"
# The backup role's scheduled jobs (roles/backup/vars: backup_jobs), which read or repair
# the storage: their timers are held while the storage moves, their services must be idle.
BACKUP_JOBS = ("pacs-backup", "pacs-backup-check", "pacs-backup-verify", "pacs-backup-drill",
               "pacs-integrity")
BACKUP_TIMERS = tuple(f"{job}.timer" for job in BACKUP_JOBS)
BACKUP_SERVICES = tuple(f"{job}.service" for job in BACKUP_JOBS)


def systemd_running() -> bool:
    """Whether systemd runs this machine (the appliance), not `pacs run` or a test's container."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def active(unit: str) -> bool:
    """Whether systemd runs `unit` now (False off the appliance, or for another user than root,
    who could not stop it anyway)."""
    if os.geteuid() != 0 or not systemd_running():
        return False
    return subprocess.run(["systemctl", "is-active", "--quiet", unit]).returncode == 0


def _systemctl(verb: str, units: list[str]) -> None:
    done = subprocess.run(["systemctl", verb, *units], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"systemctl {verb} {' '.join(units)} failed: "
                           f"{done.stderr.strip() or done.returncode}")


@dataclass
class Stopped:
    units: list[str] = field(default_factory=list)  # stopped for the work, started after
    start_error: str | None = None  # why they did not all start again
    keep_stopped: bool = False  # set by the work when starting them would do harm


@contextmanager
def stopped(units: list[str]) -> Iterator[Stopped]:
    """Stop the active ones of `units` (in this order) and start them again (in reverse) when
    the work is done or failed, even when stopping failed halfway. A failure to start again is
    kept in `start_error` (logged too): it must not hide the outcome of the work."""
    done = Stopped([unit for unit in units if active(unit)])
    try:
        if done.units:
            log.info("stopping %s", " ".join(done.units))
            _systemctl("stop", done.units)
        yield done
    finally:
        if done.keep_stopped:
            log.error("leaving %s stopped", " ".join(done.units))
        elif done.units:
            log.info("starting %s", " ".join(reversed(done.units)))
            try:
                _systemctl("start", list(reversed(done.units)))
            except RuntimeError as exc:
                log.error("%s", exc)
                done.start_error = str(exc)
