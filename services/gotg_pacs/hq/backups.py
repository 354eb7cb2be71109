"""HQ's copies of the sites' backups: audited, then pruned and compacted, by HQ alone.

A site writes to HQ_BACKUP_PATH/SITE.borg with a key HQ allows only `borg serve --append-only`:
the site (or a thief holding its box) can add archives, and a delete or prune it sends is only
appended to the repository's log, undone by borg's append-only recovery until someone compacts
the repository with full access. HQ is that someone, so before each compaction it audits:

1. every archive HQ saw at its last audit is still listed; one that vanished was deleted with the
   site's key, and nothing is pruned or compacted for that site (HQ IT rolls the repository back
   first, see the README);
2. HQ prunes (the sites' own retention), then lists again: only what `prune --dry-run` named may
   be gone; anything else went meanwhile, and there is no compaction (the point of no return).

borg runs as the owner of HQ_BACKUP_PATH (the account the sites log in to), even when root
starts this to read the escrow: a segment written by root would lock the sites out. The archive
list each audit ends with is kept in HQ_BACKUP_PATH/.audit/SITE.json, with borgmatic's files for
the repository, all owned by that account. The first
audit of a repository has nothing to compare with and trusts what it finds. The passphrase comes
from HQ's escrow: of every one the site handed over, the newest that opens the repository.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .. import durable
from ..backup.borgmatic import KEEP, KEPT
from ..config import Settings
from .escrow import Escrow

AUDIT_FOLDER = ".audit"
WOULD_PRUNE = re.compile(r"^Would prune:\s+(\S+)", re.MULTILINE)
SITE_REPOSITORY = re.compile(r"([a-z0-9][a-z0-9-]{1,31})\.borg")  # a SITE_CODE


class AuditFailed(Exception):
    """A site's repository lost archives HQ did not prune: it is left as it is."""


class WrongPassphrase(Exception):
    """borg says the passphrase does not open the repository."""


class SiteBackups:
    def __init__(self, settings: Settings, site: str) -> None:
        if settings.hq_backup_path is None:
            raise ValueError("HQ_BACKUP_PATH is not set: this HQ keeps no site backups")
        self.settings = settings
        self.site = site
        self.repository = settings.hq_backup_path / f"{site}.borg"
        # Beside the repositories, owned by their account (HQ's state folder is the
        # receiver's, closed to it); no site reaches it: each key is held to its repository.
        self.folder = settings.hq_backup_path / AUDIT_FOLDER
        owner = settings.hq_backup_path.stat()
        self.owner = (owner.st_uid, owner.st_gid) if os.geteuid() == 0 else None

    def _write(self, name: str, text: str) -> Path:
        """A file of ours in the backups folder, 0600, owned by the repositories' owner."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.folder / name
        durable.replace_text(path, text, mode=0o600)
        if self.owner is not None:
            os.chown(self.folder, *self.owner)
            os.chown(path, *self.owner)
        return path

    @property
    def record(self) -> Path:
        return self.folder / f"{self.site}.json"

    def _config(self) -> Path:
        """borgmatic's configuration for this one repository (HQ's own borg state)."""
        config = {
            "repositories": [{"path": str(self.repository), "label": self.site}],
            "encryption_passcommand": f"cat {self.folder / (self.site + '.passphrase')}",
            # The site's archive names: prune matches only those (a kept.* copy stays).
            "archive_name_format": f"{self.site}-{{now:%Y-%m-%dT%H:%M:%S.%f}}",
            "lock_wait": 600,
            "borg_base_directory": str(self.folder / "borg"),
            "user_runtime_directory": str(self.folder / "run"),
            "user_state_directory": str(self.folder / "state"),
            **KEEP,
        }
        return self._write(f"{self.site}.yaml", json.dumps(config, indent=2) + "\n")

    def _borgmatic(self, *args: str, dry_run: bool = False) -> str:
        borgmatic = Path(sys.executable).parent / "borgmatic"
        done = subprocess.run(
            [str(borgmatic if borgmatic.exists() else "borgmatic"), "--config",
             str(self._config()), *(["--dry-run"] if dry_run else []), *args],
            capture_output=True, text=True, env={**os.environ, "HOME": str(self.folder)},
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
            self._write(f"{self.site}.passphrase", secret)
            try:
                self.archives()
                return
            except WrongPassphrase:
                continue
        raise AuditFailed(f"none of the {len(kept)} passphrase(s) HQ keeps for {self.site} "
                          "opens its repository")

    def archives(self) -> list[str]:
        listed = json.loads(self._borgmatic("repo-list", "--json", "--match-archives", "sh:*"))
        return [archive["name"] for answer in listed for archive in answer["archives"]]

    def _recorded(self) -> list[str] | None:
        try:
            return json.loads(self.record.read_text())["archives"]
        except FileNotFoundError:
            return None

    def prune(self) -> dict:
        """Audit, prune, audit again, compact; the outcome (what was pruned, what is kept)."""
        self._unlock()
        before = self.archives()
        recorded = self._recorded()
        # A site's cleanup renames an archive it relies on to kept.NAME: moved, not deleted.
        vanished = sorted(name for name in set(recorded or []) - set(before)
                          if KEPT + name not in before)
        if vanished:
            raise AuditFailed(
                f"{len(vanished)} archive(s) of {self.site} vanished since HQ's last audit "
                f"({', '.join(vanished[:3])}{', ...' if len(vanished) > 3 else ''}): deleted "
                "with the site's key. Nothing pruned or compacted; roll the repository back to "
                "the last transaction before the deletion (borg's append-only recovery)")
        would = set(WOULD_PRUNE.findall(self._borgmatic("prune", "--list", dry_run=True)))
        self._borgmatic("prune")
        after = self.archives()
        unexpected = sorted(set(before) - set(after) - would)
        if unexpected:
            raise AuditFailed(f"{', '.join(unexpected)} of {self.site} vanished during HQ's "
                              "prune, which did not name them: not compacted")
        self._borgmatic("compact")
        self._write(self.record.name, json.dumps({"archives": after}, indent=2) + "\n")
        return {"site": self.site, "first_audit": recorded is None,
                "pruned": sorted(set(before) - set(after)), "kept": after}


def sites(settings: Settings) -> list[str]:
    """The sites with a repository in HQ_BACKUP_PATH."""
    if settings.hq_backup_path is None or not settings.hq_backup_path.is_dir():
        return []
    return sorted(match[1] for path in settings.hq_backup_path.iterdir()
                  if (match := SITE_REPOSITORY.fullmatch(path.name)) and path.is_dir())
