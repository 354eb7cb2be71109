"""HQ's copies of the sites' backups: audited, then pruned and compacted, by HQ alone.

A site writes to HQ_BACKUP_PATH/SITE.borg with a key HQ allows only `borg serve --append-only`:
the site (or a thief holding its box) can add archives, and a delete or prune it sends is only
appended to the repository's log, undone by borg's append-only recovery until someone compacts
the repository with full access. HQ is that someone, so before each compaction it audits
against what it recorded at its last one (archive names, borg's archive IDs and start times):

1. every archive recorded is still there, the same archive (same ID), or renamed `kept.NAME` by
   the site's cleanup (same start time); one that vanished or changed was deleted or replaced
   with the site's key, and nothing is pruned or compacted for that site (HQ IT rolls the
   repository back first, see the README);
2. an archive new since then is dated between that audit (less a day for a clinic's clock) and
   now (plus a day): one dated in the past would let pruning, which keeps the newest archive of
   each day, week and month, drop a genuine one;
3. HQ prunes (the sites' own retention) and lists again: only what `prune --dry-run` named may be
   gone; anything else went meanwhile, and there is no compaction (the point of no return). The
   list is taken once more after compacting: a deletion that slipped into that last second is
   reported, too late to undo.

What a key can still do, written off as the limit of append-only: add genuine-looking archives
for weeks until retention drops the real ones. Revoke a lost box's key at once.

The record is HQ's own (STATE_PATH/hq/backup-audit, root's when run as root). borg runs as the
owner of HQ_BACKUP_PATH (the account the sites log in to), even when root starts this to read
the escrow: a segment written by root would lock the sites out. Its configuration and cache sit
in HQ_BACKUP_PATH/.audit, and the passphrase (from HQ's escrow: the newest that opens the
repository) only while it runs. The first audit of a repository has nothing to compare with and
trusts what it finds.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from .. import durable
from ..backup.borgmatic import KEEP, KEPT, WARNINGS_FAIL, check_arguments
from ..config import Settings
from .escrow import Escrow

WORK_FOLDER = ".audit"  # in HQ_BACKUP_PATH: borgmatic's files while an audit runs
WOULD_PRUNE = re.compile(r"^Would prune:\s+(\S+)", re.MULTILINE)
SITE_REPOSITORY = re.compile(r"([a-z0-9][a-z0-9-]{1,31})\.borg")  # a SITE_CODE
CLOCK_SLACK = 86400  # seconds a clinic's clock may be off before its archives are suspect


class AuditFailed(Exception):
    """A site's repository lost or gained archives HQ cannot account for: left as it is."""


class WrongPassphrase(Exception):
    """borg says the passphrase does not open the repository."""


def _start(archive: dict) -> float:
    return datetime.fromisoformat(archive["start"]).timestamp()


class SiteBackups:
    def __init__(self, settings: Settings, site: str) -> None:
        if settings.hq_backup_path is None:
            raise ValueError("HQ_BACKUP_PATH is not set: this HQ keeps no site backups")
        self.settings = settings
        self.site = site
        self.repository = settings.hq_backup_path / f"{site}.borg"
        self.work = settings.hq_backup_path / WORK_FOLDER
        self.record = settings.hq_dir / "backup-audit" / f"{site}.json"
        owner = settings.hq_backup_path.stat()
        self.owner = (owner.st_uid, owner.st_gid) if os.geteuid() == 0 else None

    def _write_work(self, name: str, text: str) -> Path:
        """A file borgmatic reads, 0600, owned by the repositories' owner. The folder is never
        followed if it is a link (the sites' account owns what is around it)."""
        try:
            if not stat.S_ISDIR(os.lstat(self.work).st_mode):
                raise AuditFailed(f"{self.work} is not a plain folder: refusing to write there")
        except FileNotFoundError:
            self.work.mkdir(mode=0o700)
            if self.owner is not None:
                os.lchown(self.work, *self.owner)
        path = self.work / name
        durable.replace_text(path, text, mode=0o600)
        if self.owner is not None:
            os.lchown(path, *self.owner)
        return path

    def _config(self) -> Path:
        """borgmatic's configuration for this one repository."""
        config = {
            "repositories": [{"path": str(self.repository), "label": self.site}],
            "encryption_passcommand": f"cat {self.work / (self.site + '.passphrase')}",
            # The site's archive names: prune matches only those (a kept.* copy stays).
            "archive_name_format": f"{self.site}-{{now:%Y-%m-%dT%H:%M:%S.%f}}",
            "lock_wait": 600,
            "borg_base_directory": str(self.work / "borg"),
            "user_runtime_directory": str(self.work / "run"),
            "user_state_directory": str(self.work / "state"),
            **KEEP,
        }
        return self._write_work(f"{self.site}.yaml", json.dumps(config, indent=2) + "\n")

    def _borgmatic(self, *args: str, dry_run: bool = False, strict: bool = False) -> str:
        """`strict`: borg's exit status 1 is an error (WARNINGS_FAIL)."""
        borgmatic = Path(sys.executable).parent / "borgmatic"
        done = subprocess.run(
            [str(borgmatic if borgmatic.exists() else "borgmatic"), "--config",
             str(self._config()), *(["--dry-run"] if dry_run else []),
             *(WARNINGS_FAIL if strict else []), *args],
            capture_output=True, text=True, env={**os.environ, "HOME": str(self.work)},
            **({"user": self.owner[0], "group": self.owner[1], "extra_groups": []}
               if self.owner is not None else {}))
        if done.returncode != 0:
            said = done.stderr + done.stdout
            if "is incorrect" in said:
                raise WrongPassphrase(self.site)
            lines = [line for line in said.splitlines() if line.strip()]
            raise RuntimeError(f"borgmatic {args[0]} on {self.repository} failed: "
                               + " | ".join(lines[-4:]))
        return done.stdout + done.stderr

    def _unlock(self) -> None:
        """The escrowed passphrase that opens the repository, newest first."""
        kept = [entry["passphrase"] for entry in
                reversed(Escrow(self.settings.hq_dir / "escrow").kept(self.site))]
        if not kept:
            raise AuditFailed(f"HQ keeps no backup passphrase for {self.site}: it cannot read "
                              "the repository (the site hands it over after its next backup)")
        for secret in kept:
            self._write_work(f"{self.site}.passphrase", secret)
            try:
                self.archives()
                return
            except WrongPassphrase:
                continue
        raise AuditFailed(f"none of the {len(kept)} passphrase(s) HQ keeps for {self.site} "
                          "opens its repository")

    def archives(self) -> dict[str, dict]:
        """Every archive by name: borg's archive ID and start time."""
        listed = json.loads(self._borgmatic("repo-list", "--json", "--match-archives", "sh:*"))
        return {archive["name"]: {"id": archive["id"], "start": _start(archive)}
                for answer in listed for archive in answer["archives"]}

    def _recorded(self) -> dict | None:
        try:
            return json.loads(self.record.read_text())
        except FileNotFoundError:
            return None

    def _audit(self, now: dict[str, dict], recorded: dict) -> None:
        seen, since = recorded["archives"], recorded["audited_at"]
        gone = []
        for name, archive in seen.items():
            if name in now:
                if now[name]["id"] != archive["id"]:
                    gone.append(f"{name} (replaced by another archive of that name)")
            elif now.get(KEPT + name, {}).get("start") != archive["start"]:
                gone.append(name)
        if gone:
            raise AuditFailed(
                f"{len(gone)} archive(s) of {self.site} vanished since HQ's last audit "
                f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}): deleted or "
                "replaced with the site's key. Nothing pruned or compacted; roll the repository "
                "back to the last transaction before it (borg's append-only recovery)")
        misdated = [name for name, archive in now.items() if name not in seen
                    and not name.startswith(KEPT)
                    and not since - CLOCK_SLACK <= archive["start"] <= time.time() + CLOCK_SLACK]
        if misdated:
            raise AuditFailed(
                f"{len(misdated)} archive(s) of {self.site} new since HQ's last audit are dated "
                f"outside it ({', '.join(misdated[:3])}): made with a forged date, or on a box "
                "whose clock is far off. Nothing pruned; check the site's clock and its key")

    def prune(self) -> dict:
        """Audit, prune, audit again, compact; the outcome (what was pruned, what is kept)."""
        try:
            self._unlock()
            before = self.archives()
            recorded = self._recorded()
            if recorded is not None:
                self._audit(before, recorded)
            would = set(WOULD_PRUNE.findall(self._borgmatic("prune", "--list", dry_run=True)))
            self._borgmatic("prune")
            after = self.archives()
            unexpected = sorted(set(before) - set(after) - would)
            if unexpected:
                raise AuditFailed(f"{', '.join(unexpected)} of {self.site} vanished during HQ's "
                                  "prune, which did not name them: not compacted")
            self._borgmatic("compact")
            audited_at = time.time()
            last = self.archives()
            self.record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            durable.replace_text(self.record, json.dumps(
                {"archives": last, "audited_at": audited_at}, indent=2) + "\n", mode=0o600)
            if set(after) - set(last):
                raise AuditFailed(f"{', '.join(sorted(set(after) - set(last)))} of {self.site} "
                                  "vanished while HQ compacted: deleted with the site's key, "
                                  "and gone for good")
        finally:  # the passphrase does not stay in the sites' account's folder
            (self.work / f"{self.site}.passphrase").unlink(missing_ok=True)
        return {"site": self.site, "first_audit": recorded is None,
                "pruned": sorted(set(before) - set(after)), "kept": sorted(after)}

    def check(self, verify_data: bool = False) -> dict:
        """borg's check of this site's repository where it lies: its segments and archives
        (weekly), or every chunk's data read and verified (monthly). A site without a backup
        disk cannot verify its data itself: over its link that would read the whole repository.
        The outcome is kept beside the audit record."""
        kind = "verify_data" if verify_data else "check"
        started = time.time()
        try:
            self._unlock()
            self._borgmatic("check", *check_arguments(verify_data), strict=True)
            outcome = {"ok": True, "seconds": round(time.time() - started, 1)}
        except (AuditFailed, RuntimeError) as exc:
            outcome = {"ok": False, "error": str(exc)}
        finally:
            (self.work / f"{self.site}.passphrase").unlink(missing_ok=True)
        checks = self.record.with_suffix(".checks.json")
        try:
            kept = json.loads(checks.read_text())
        except FileNotFoundError:
            kept = {}
        kept[kind] = {"at": time.time(), **outcome}
        checks.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable.replace_text(checks, json.dumps(kept, indent=2) + "\n", mode=0o600)
        return {"site": self.site, "kind": kind, **outcome}


def sites(settings: Settings) -> list[str]:
    """The sites with a repository in HQ_BACKUP_PATH."""
    if settings.hq_backup_path is None or not settings.hq_backup_path.is_dir():
        return []
    return sorted(match[1] for path in settings.hq_backup_path.iterdir()
                  if (match := SITE_REPOSITORY.fullmatch(path.name)) and path.is_dir())
