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
from pathlib import Path

log = logging.getLogger(__name__)

ORTHANC = "orthanc.service"
SYNC = "pacs-sync.service"


def active(unit: str) -> bool:
    """Whether systemd runs `unit` now (False off the appliance, or for another user than root,
    who could not stop it anyway)."""
    if os.geteuid() != 0 or not Path("/run/systemd/system").is_dir() \
            or not shutil.which("systemctl"):
        return False
    return subprocess.run(["systemctl", "is-active", "--quiet", unit]).returncode == 0


def _systemctl(verb: str, units: list[str]) -> None:
    done = subprocess.run(["systemctl", verb, *units], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"systemctl {verb} {' '.join(units)} failed: "
                           f"{done.stderr.strip() or done.returncode}")


@contextmanager
def stopped(units: list[str]) -> Iterator[list[str]]:
    """Stop the active ones of `units` (in this order) and start them again (in reverse) when
    the work is done or failed. Yields the units stopped."""
    running = [unit for unit in units if active(unit)]
    if running:
        log.info("stopping %s", " ".join(running))
        _systemctl("stop", running)
    try:
        yield running
    finally:
        if running:
            log.info("starting %s", " ".join(reversed(running)))
            _systemctl("start", list(reversed(running)))
