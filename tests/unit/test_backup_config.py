"""borgmatic's configuration as rendered from the settings: what a backup holds is decided here."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gotg_pacs.audit import AuditLog
from gotg_pacs.backup.borgmatic import Backups
from gotg_pacs.config import Settings
from gotg_pacs.web.users import Users

BORGMATIC = Path(sys.executable).parent / "borgmatic"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(storage_path=tmp_path / "orthanc", state_path=tmp_path / "state",
                    backup_path=tmp_path / "usb", site_code="field-7",
                    admin_password="correct horse battery")


def test_the_images_and_the_state_snapshot_are_backed_up_not_the_live_index(settings):
    rendered = Backups(settings).config()
    assert rendered["source_directories"] == [str(settings.orthanc_storage_dir),
                                              str(settings.state_path / "backup" / "snapshot")]
    assert str(settings.orthanc_index_dir) not in json.dumps(rendered)
    assert rendered["repositories"] == [{"path": str(settings.backup_path / "gotg-pacs.borg"),
                                         "label": "local"}]
    assert rendered["archive_name_format"].startswith("field-7-")
    assert (rendered["keep_daily"], rendered["keep_weekly"], rendered["keep_monthly"]) == \
        (7, 4, 12)
    assert rendered["one_file_system"] is True


def test_no_backup_disk_means_no_repository(settings):
    assert Backups(replace(settings, backup_path=None)).repositories() == []


def test_borgmatic_accepts_the_configuration_and_the_passphrase_stays_out_of_it(settings):
    backups = Backups(settings)
    backups._prepare()
    written = backups.config_file.read_text()
    passphrase = backups.passphrase_file.read_text()
    assert len(passphrase) >= 32 and passphrase not in written
    for secret in (backups.config_file, backups.passphrase_file):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    checked = subprocess.run([str(BORGMATIC), "config", "validate", "--config",
                              str(backups.config_file)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # A second run keeps the passphrase: a new one would lock the box out of its own backups.
    Backups(settings)._prepare()  # a later command, its own instance
    assert backups.passphrase_file.read_text() == passphrase


def test_a_state_file_that_cannot_be_copied_keeps_its_last_copy_and_not_the_backup(settings):
    """A damaged accounts database must not cost the studies their backup: the snapshot takes
    everything else, keeps the previous copy of the accounts and says what is not current."""
    backups = Backups(settings)
    accounts = Users.from_settings(settings)
    accounts.bootstrap_admin("first password here")
    accounts.close()
    AuditLog(settings.audit_file).record("login", "admin", "10.0.0.9")
    first = backups.snapshot()
    assert "state_errors" not in first
    kept = backups.snapshot_dir / "users.sqlite"
    before = kept.read_bytes()
    assert before

    settings.users_file.write_bytes(b"this is no SQLite database" * 200)
    AuditLog(settings.audit_file).record("logout", "admin", "10.0.0.9")
    second = backups.snapshot()
    assert [problem.split(":")[0] for problem in second["state_errors"]] == ["the web accounts"]
    assert kept.read_bytes() == before, "the last good copy stays"
    assert b"logout" in (backups.snapshot_dir / "audit.jsonl").read_bytes()
    assert stat.S_IMODE((backups.snapshot_dir / "audit.jsonl").stat().st_mode) == 0o600


def test_the_trails_a_restore_kept_are_in_the_next_backup(settings):
    """Until HQ holds them, an old box's trails kept by a restore exist only on this box."""
    earlier = settings.audit_file.parent / "earlier" / ("a" * 32 + ".jsonl")
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"action": "login"}\n')
    backups = Backups(settings)
    assert "state_errors" not in backups.snapshot()
    copied = backups.snapshot_dir / "audit-earlier" / earlier.name
    assert copied.read_bytes() == earlier.read_bytes()
