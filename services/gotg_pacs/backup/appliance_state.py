"""What a restore puts back besides the studies: the web accounts, the audit trail and the site's
certificate authority, as the archive's snapshot holds them (borgmatic.Backups.snapshot).

- **Accounts** go back only in a whole restore (a new box) of this site's own archive, into a box
  whose accounts are as it was made (nobody but `admin`, still on the password it was given): a
  box in use keeps its people. No session comes along; everyone signs in again, with the
  password they had.
- **The site CA** goes back with them, so every tablet that trusted the lost box trusts this one;
  the box's own CA is kept aside, and nginx issues its certificate again from the old CA.
- **The audit trails** of the old box (its own and those it had restored in turn) are kept as
  earlier trails (`audit.keep_earlier`) and shipped to HQ for what HQ never received of them;
  this box goes on with its own, which records the restore. Another site's trails stay in its
  archive (HQ files trails by the site that sends them).
"""

from __future__ import annotations

import getpass
import logging
import os
import sqlite3
import subprocess
from pathlib import Path

from .. import audit, durable, units
from ..config import Settings
from ..ris import worklist
from ..ris.orders import Orders
from ..web.tls import SiteTLS, TLSError
from ..web.users import ADMIN_CHANGED_MARKER, UserError, Users
from .borgmatic import EARLIER_TRAILS, RIS_ORDERS

log = logging.getLogger(__name__)

# In the archive's snapshot folder (STATE_PATH/backup/snapshot), relative to it.
STATE_FILES = ("users.sqlite", "audit.jsonl", "tls/ca.key", "tls/ca.crt", "tls/ca-chain.crt",
               RIS_ORDERS)
NGINX = "nginx.service"


def snapshot_paths(contents: dict[Path, int]) -> dict[str, Path]:
    """The archive's copies of STATE_FILES and of earlier trails, by their name in the
    snapshot."""
    found = {}
    for path in contents:
        if ".." in path.parts:
            continue
        for name in STATE_FILES:
            parts = ("backup", "snapshot", *name.split("/"))
            if path.parts[-len(parts):] == parts:
                found[name] = path
        if path.parts[-4:-1] == ("backup", "snapshot", EARLIER_TRAILS) \
                and path.name.endswith(".jsonl"):
            found[f"{EARLIER_TRAILS}/{path.name}"] = path
    return found


def put_back(settings: Settings, snapshot: Path, archive: str, whole: bool,
             site: str) -> dict:
    """From `snapshot` (the archive's snapshot folder, extracted) of `site`'s archive: what was
    put back, kept or could not be, each in words for the person restoring. `whole`: the
    studies went back into an empty box."""
    report: dict[str, str] = {}
    users = snapshot / "users.sqlite"
    ca = snapshot / "tls"
    if site != settings.site_code:
        kept = f"this box's own kept: the archive is site {site}'s"
        report["accounts"] = report["site_ca"] = kept
    elif not whole:
        kept = "this box's own kept: the studies were merged into a box in use"
        report["accounts"] = report["site_ca"] = kept
    elif not _as_made(settings):
        kept = "this box's own kept: people already use its accounts"
        report["accounts"] = report["site_ca"] = kept
    else:
        report["accounts"] = (_accounts(settings, users) if users.exists()
                              else "not in this archive")
        report["site_ca"] = (_site_ca(settings, ca) if (ca / "ca.key").exists()
                             else "not in this archive")
    report["ris_orders"] = (_ris_orders(settings, snapshot / RIS_ORDERS)
                            if site == settings.site_code
                            else f"site {site}'s orders left in its archive")
    report["audit_trail"] = _audit_trails(settings, snapshot, archive, site, report)
    return report


def _as_made(settings: Settings) -> bool:
    if not settings.users_file.exists():
        return True
    store = Users.from_settings(settings)
    try:
        return store.as_made()
    finally:
        store.close()


def _accounts(settings: Settings, copy: Path) -> str:
    made = not settings.users_file.exists()
    try:
        store = Users.from_settings(settings)
        try:
            names = store.take_from(copy)
        except (sqlite3.Error, UserError) as exc:
            return f"NOT put back: the archive's copy cannot be read ({exc})"
        finally:
            store.close()
    finally:  # made here by root, or not: the web service's own either way
        _own_like_state(settings, settings.users_file, made)
    if "admin" in names:  # the password the box was given no longer signs in: erase its copy
        marker = settings.state_path / ADMIN_CHANGED_MARKER
        durable.write_bytes(marker, b"")
        _own_like_state(settings, marker)
    return (f"{len(names)} put back ({', '.join(names)}): sign in with the password you had; "
            "`pacs user reset NAME` gives a new one-time password")


def _ris_orders(settings: Settings, copy: Path) -> str:
    """The archive's orders this box lacks, back on the worklist: a radiographer on the new
    box picks the patients the old one had scheduled. Orders this box has are its own."""
    if not copy.exists():
        return "not in this archive"
    made = not settings.ris_orders_file.exists()
    try:
        with Orders(settings.ris_orders_file) as orders:
            added = orders.take_from(copy)
            worklist.match(settings.worklists_dir, orders.scheduled())
    except (sqlite3.Error, OSError) as exc:
        return f"NOT put back: {exc}"
    finally:  # made here by root, or not: the RIS bridge's own either way
        _own_like_state(settings, settings.ris_orders_file.parent, made)
        for path in (settings.ris_orders_file.parent.iterdir()
                     if settings.ris_orders_file.parent.exists() else []):
            _own_like_state(settings, path)
        for item in settings.worklists_dir.glob("*.wl"):
            _own_like_state(settings, item)
    return f"{added} put back (the worklist holds every scheduled one)"


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


def _audit_trails(settings: Settings, snapshot: Path, archive: str, site: str,
                  report: dict[str, str]) -> str:
    log_file = settings.audit_file
    copies = [snapshot / "audit.jsonl", *sorted((snapshot / EARLIER_TRAILS).glob("*.jsonl"))]
    copies = [copy for copy in copies if copy.exists()]
    made = not log_file.exists()
    folder = audit.earlier_folder(log_file)
    folder_made = not folder.exists()
    kept: list[str] = []
    try:
        if site == settings.site_code:
            for copy in copies:
                if trail := audit.keep_earlier(log_file, copy):
                    kept.append(trail)
        audit.AuditLog(log_file).record("restore", _who(), "console", archive=archive,
                                        earlier_trails=",".join(kept),
                                        accounts=report["accounts"][:120],
                                        site_ca=report["site_ca"][:120])
    finally:  # whatever a root restore made here stays the services' to write
        _own_like_state(settings, log_file, made)
        _own_like_state(settings, folder, folder_made)
        for trail in kept:
            _own_like_state(settings, folder / f"{trail}.jsonl")
    if not copies:
        return "not in this archive; the restore is recorded in this box's trail"
    if site != settings.site_code:
        return (f"site {site}'s trails left in its archive (HQ holds what that site sent); the "
                "restore is recorded in this box's trail")
    if not kept:
        return "this box's own (the archive holds the trail written here)"
    return (f"the old box's trail(s) {', '.join(kept)} kept beside this box's and sent to HQ "
            "for what HQ lacks of them")


def _who() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _own_like_state(settings: Settings, path: Path, also_parent: bool = False) -> None:
    """Files a root restore makes in STATE_PATH belong to the services' user, as the rest."""
    if not path.exists():
        return
    for each in ([path.parent] if also_parent else []) + [path]:
        durable.own_like(each, settings.state_path)
