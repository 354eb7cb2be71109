"""What a restore puts back besides the studies: the web accounts, the audit trail and the site's
certificate authority, as the archive's snapshot holds them (borgmatic.Backups.snapshot).

- **Accounts** go back only into a box whose accounts are as it was made (nobody but `admin`,
  still on the password the box was given): a box in use keeps its people. No session comes
  along; everyone signs in again, with the password they had.
- **The site CA** goes back with them, so every tablet that trusted the lost box trusts this one;
  the box's own CA is kept aside, and nginx issues its certificate again from the old CA.
- **The audit trail** of the old box is kept as an earlier trail (`audit.keep_earlier`) and shipped
  to HQ for what HQ never received of it; this box goes on with its own, which records the
  restore.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

from .. import audit, durable, units
from ..config import Settings
from ..web.tls import SiteTLS, TLSError
from ..web.users import ADMIN_CHANGED_MARKER, UserError, Users

log = logging.getLogger(__name__)

# In the archive's snapshot folder (STATE_PATH/backup/snapshot), relative to it.
STATE_FILES = ("users.sqlite", "audit.jsonl", "tls/ca.key", "tls/ca.crt", "tls/ca-chain.crt")
NGINX = "nginx.service"


def snapshot_paths(contents: dict[Path, int]) -> dict[str, Path]:
    """The archive's copies of STATE_FILES, by their name in the snapshot."""
    found = {}
    for path in contents:
        if ".." in path.parts:
            continue
        for name in STATE_FILES:
            parts = ("backup", "snapshot", *name.split("/"))
            if path.parts[-len(parts):] == parts:
                found[name] = path
    return found


def put_back(settings: Settings, snapshot: Path, archive: str) -> dict:
    """From `snapshot` (the archive's snapshot folder, extracted): what was put back, kept or
    could not be, each in words for the person restoring."""
    report: dict[str, str] = {}
    users = snapshot / "users.sqlite"
    fresh = True
    if users.exists():
        report["accounts"], fresh = _accounts(settings, users)
    else:
        report["accounts"] = "not in this archive"
    ca = snapshot / "tls"
    if not (ca / "ca.key").exists():
        report["site_ca"] = "not in this archive"
    elif not fresh:
        report["site_ca"] = ("this box's own kept: its accounts are in use, so are its tablets' "
                             "trust")
    else:
        report["site_ca"] = _site_ca(settings, ca)
    report["audit_trail"] = _audit_trail(settings, snapshot / "audit.jsonl", archive, report)
    return report


def _accounts(settings: Settings, copy: Path) -> tuple[str, bool]:
    made = not settings.users_file.exists()
    store = Users.from_settings(settings)
    try:
        if not store.as_made():
            return "this box's own kept: people already use them", False
        try:
            names = store.take_from(copy)
        except (sqlite3.Error, UserError) as exc:
            return f"NOT put back: the archive's copy cannot be read ({exc})", True
    finally:
        store.close()
    _own_like_state(settings, settings.users_file, made)
    if "admin" in names:  # the password the box was given no longer signs in: erase its copy
        marker = settings.state_path / ADMIN_CHANGED_MARKER
        durable.write_bytes(marker, b"")
        _own_like_state(settings, marker)
    return (f"{len(names)} put back ({', '.join(names)}): sign in with the password you had; "
            "`pacs user reset NAME` gives a new one-time password"), True


def _site_ca(settings: Settings, copy: Path) -> str:
    tls = SiteTLS(settings.tls_dir, settings.site_code)
    try:
        put = tls.take_ca_from(copy)
    except (TLSError, OSError) as exc:
        return f"NOT put back: {exc}"
    if put is None:
        return "the same as this box's"
    reloaded = ""
    if units.active(NGINX):
        done = subprocess.run(["systemctl", "reload", NGINX], capture_output=True, text=True)
        reloaded = ("; nginx serves a certificate from it now" if done.returncode == 0 else
                    f"; nginx did not reload ({done.stderr.strip()}): restart it")
    else:
        reloaded = "; the HTTPS origin uses it from its next start"
    return (f"put back (fingerprint SHA-256 {put}): tablets that trusted the old box trust this "
            f"one{reloaded}; this box's own CA is kept in {tls.folder}/replaced-*")


def _audit_trail(settings: Settings, copy: Path, archive: str, report: dict[str, str]) -> str:
    log_file = settings.audit_file
    made = not log_file.exists()
    earlier = None
    if copy.exists():
        folder_made = not audit.earlier_folder(log_file).exists()
        earlier = audit.keep_earlier(log_file, copy)
        if earlier:
            _own_like_state(settings, audit.earlier_folder(log_file), folder_made)
            _own_like_state(settings, audit.earlier_folder(log_file) / f"{earlier}.jsonl")
    audit.AuditLog(log_file).record("restore", _who(), "console", archive=archive,
                                    earlier_trail=earlier or "",
                                    accounts=report["accounts"][:120],
                                    site_ca=report["site_ca"][:120])
    _own_like_state(settings, log_file, made)
    if not copy.exists():
        return "not in this archive; the restore is recorded in this box's trail"
    if earlier is None:
        return "this box's own (the archive holds the trail written here)"
    return (f"the old box's trail {earlier} kept beside this box's and sent to HQ for what HQ "
            "lacks of it")


def _who() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _own_like_state(settings: Settings, path: Path, also_parent: bool = False) -> None:
    """Files a root restore makes in STATE_PATH belong to the services' user, as the rest."""
    if os.geteuid() != 0 or not path.exists():
        return
    owner = settings.state_path.stat()
    for each in ([path.parent] if also_parent else []) + [path]:
        shutil.chown(each, owner.st_uid, owner.st_gid)
