"""The pacs_config role, applied for real with ansible-playbook.

Why it matters: HQ pushes every site's configuration with this role. A value the settings model
refuses must fail the push and leave the site's working file untouched; an unchanged push must
change nothing; and what the role writes must load to exactly the values HQ set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gotg_pacs import config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def play(tmp_path):
    playbook = tmp_path / "play.yml"
    playbook.write_text("- hosts: all\n  gather_facts: false\n  roles: [pacs_config]\n")
    pacs_command = tmp_path / "pacs"
    pacs_command.write_text(f"#!/bin/sh\nexec {sys.executable} -m gotg_pacs \"$@\"\n")
    pacs_command.chmod(0o755)
    env_file = tmp_path / "etc" / "pacs.env"

    def run(*extra: str, **variables: str) -> subprocess.CompletedProcess:
        values = {"pacs_config_env_file": str(env_file),
                  "pacs_config_pacs_command": str(pacs_command), **variables}
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,",
                "-c", "local", str(playbook), "-e", json.dumps(values), *extra]
        env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
               "ANSIBLE_PYTHON_INTERPRETER": sys.executable}
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)

    run.env_file = env_file
    return run


SITE = {"pacs_config_pacs_name": "Mobile clinic 3 é", "pacs_config_site_code": "mobile-3",
        "pacs_config_pacs_aet": "MOBILE3", "pacs_config_admin_password": "a long 'quoted' pass",
        "pacs_config_hq_url": "https://hq.example.org/sync", "pacs_config_hq_token": "t0ken",
        "pacs_config_backup_interval": "12h"}


def test_role_writes_what_hq_set_and_is_idempotent(play):
    first = play(**SITE)
    assert first.returncode == 0, first.stdout + first.stderr
    settings = config.load(play.env_file)
    assert settings.pacs_name == "Mobile clinic 3 é"
    assert settings.pacs_aet == "MOBILE3" and settings.site_code == "mobile-3"
    assert settings.admin_password == "a long 'quoted' pass"
    assert settings.backup_interval == 12 * 3600
    assert oct(play.env_file.stat().st_mode & 0o777) == "0o640"

    again = play(**SITE)
    assert again.returncode == 0
    assert "changed=0" in again.stdout


def test_a_value_pacs_refuses_fails_the_push_and_keeps_the_old_file(play):
    assert play(**SITE).returncode == 0
    before = play.env_file.read_bytes()
    bad = play(**{**SITE, "pacs_config_dicom_port": "four-two-four-two"})
    assert bad.returncode != 0
    assert "failed=1" in bad.stdout
    assert "DICOM_PORT='four-two-four-two' is not a whole number" in bad.stdout
    assert play.env_file.read_bytes() == before


def test_no_default_password_reaches_a_site(play):
    result = play()  # ENABLE_AUTH defaults to true; nobody set ADMIN_PASSWORD
    assert result.returncode != 0
    assert "ADMIN_PASSWORD must be set when ENABLE_AUTH is true" in result.stdout
    assert not play.env_file.exists()


def test_check_mode_reports_without_writing(play):
    assert play(**SITE).returncode == 0
    before = play.env_file.read_bytes()
    check = play("--check", **{**SITE, "pacs_config_pacs_aet": "OTHER"})
    assert check.returncode == 0, check.stdout
    assert "changed=1" in check.stdout
    assert play.env_file.read_bytes() == before
