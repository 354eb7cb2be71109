"""The role scenarios under molecule/ run as a developer runs them: `molecule test -s NAME`.

Why it matters: a role must converge on a fresh Debian 13 box, change nothing the second time,
and leave the box as the role promises, checked from inside it by testinfra. The boxes are
systemd-nspawn trees (molecule/shared/nspawn.py): there is no Docker engine here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.container import REPO

pytestmark = pytest.mark.timeout(1200)


@pytest.mark.parametrize("scenario", ["clinic", "hq"])  # hq's pushes hq.yml: base included
def test_the_role_converges_settles_and_verifies(scenario):
    venv_bin = Path(sys.executable).parent
    ran = subprocess.run([str(venv_bin / "molecule"), "test", "-s", scenario], cwd=REPO,
                         capture_output=True, text=True, timeout=1100,
                         env={**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}",
                              "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1"})
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output[-5000:]
    for step in ("converge", "idempotence", "verify"):
        assert re.search(rf"{scenario}\W+{step}\W+Executed: Successful", output), output[-3000:]
    assert re.search(r"=+ \d+ passed", output) and "FAILED" not in output, output[-3000:]
