"""The appliance's backups, driven through borgmatic (borg underneath, both maintained upstream).

borgmatic's configuration is not kept by hand: every run renders it from the settings into
STATE_PATH/backup/borgmatic.yaml, so pacs.env stays the one configuration the site edits. What an
archive holds:

- Orthanc's storage area: every DICOM file exactly as stored (the data itself);
- a snapshot of the appliance's own state taken just before: Orthanc's SQLite index (copied with
  Orthanc frozen for milliseconds, see index_copy: index and files form a consistent pair), the
  sync outbox (which instances HQ confirmed, through SQLite's online backup), pacs.env, the
  modalities declared to Orthanc, the web accounts, the audit trail and the site CA with its key
  (restoring those into a new box is still by hand: `borg extract` from the snapshot folder).

The local repository lives on the backup disk mounted at BACKUP_PATH, never on the disk that
holds the images (a backup on the same disk dies with it). With REMOTE_BACKUP_URL, every backup
also goes to HQ over SSH, to REMOTE_BACKUP_URL/SITE_CODE.borg, with a key HQ allows only
`borg serve --append-only` for that one repository: the clinic (or a thief holding the box) can
add archives but not erase HQ's history, and only HQ prunes there. A site offline for days keeps
backing up locally; the remote copy catches up when the link allows (borg sends only new chunks).
Both are encrypted with repokey-blake2 unless ENCRYPTION is false; the passphrase is made on the
box at first use and kept 0600 in STATE_PATH/backup.
"""

from __future__ import annotations

import configparser
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import audit, durable
from ..config import Settings
from ..orthanc import Orthanc, OrthancError
from .index_copy import IndexCopyError, copy_index

log = logging.getLogger(__name__)
REPOSITORY_FOLDER = "gotg-pacs.borg"
LOCAL = "local"
REMOTE = "hq"
# Retention of the local repository (pruned after each backup; HQ prunes its own copy).
KEEP = {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 12}
KEPT = "kept."  # prefix of archives kept out of pruning (they hold studies cleaned up here)
INDEX_SNAPSHOT = "orthanc-index.sqlite"  # in the snapshot folder
EARLIER_TRAILS = "audit-earlier"  # in the snapshot: the trails a restore kept (audit/earlier)
RIS_ORDERS = "ris-orders.sqlite"  # in the snapshot: the orders the worklist answers from
PATHS_PER_CALL = 400  # paths per `list` call: well inside the kernel's argument limit
_LISTED = re.compile(r"^([0-9a-f]{32}) (\d+) (.+)$")
# borg's exit status 1 as an error: borg 1.2 reports damaged chunks found by a check that way,
# and borgmatic would call it a warning.
WARNINGS_FAIL = ["--override", "borg_exit_codes=[{code: 1, treat_as: error}]"]


def check_arguments(verify_data: bool) -> list[str]:
    """borgmatic check's arguments, here and at HQ: segments and archives, or every chunk's data,
    of every archive (the kept ones too, not only those named like new ones)."""
    only = ["--only", "data"] if verify_data else ["--only", "repository", "--only", "archives"]
    return ["--force", *only, "--match-archives", "sh:*"]


class BackupError(Exception):
    """A backup that cannot be made or read, worded for site IT."""


@dataclass(frozen=True)
class Repository:
    label: str
    path: str


class Contents(dict):
    """An archive's regular files (absolute path as backed up -> size); `irregular` lists its
    links, devices and fifos, which a restore never trusts."""

    def __init__(self) -> None:
        super().__init__()
        self.irregular: list[Path] = []


def _sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (SQLite's online backup), if it exists."""
    if not source.exists():
        return
    partial = target.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    with closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)) as src, \
            closing(sqlite3.connect(partial)) as copy:
        src.backup(copy)
    os.replace(partial, target)


class Backups:
    def __init__(self, settings: Settings, env_file: Path | None = None,
                 reading: str = LOCAL, site: str | None = None) -> None:
        """`reading`: the repository restores and checks read (LOCAL or REMOTE); `site`: whose
        repository at HQ (another site's, to rebuild it on a new box; default this one)."""
        self.settings = settings
        self.env_file = env_file
        self.folder = settings.state_path / "backup"
        if reading == LOCAL and settings.backup_path is None and settings.remote_backup_url:
            reading = REMOTE  # no backup disk: checks, drills and repairs read HQ's copy
        self.reading = reading
        self.site = site or settings.site_code
        self._prepared = False

    # --- places ------------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.folder / "borgmatic.yaml"

    @property
    def passphrase_file(self) -> Path:
        return self.folder / "passphrase"

    @property
    def snapshot_dir(self) -> Path:
        return self.folder / "snapshot"

    @property
    def status_file(self) -> Path:
        return self.folder / "status.json"

    @property
    def ssh_key(self) -> Path:
        return self.folder / "ssh" / "id_ed25519"

    def repositories(self) -> list[Repository]:
        """The repositories this box writes to: the USB backup disk when BACKUP_PATH is set,
        HQ when REMOTE_BACKUP_URL is."""
        repos = []
        if self.settings.backup_path is not None:
            repos.append(Repository(LOCAL, str(self.settings.backup_path / REPOSITORY_FOLDER)))
        if self.settings.remote_backup_url:
            repos.append(Repository(
                REMOTE, f"{self.settings.remote_backup_url.rstrip('/')}/{self.site}.borg"))
        return repos

    def sources(self) -> list[Path]:
        return [self.settings.orthanc_storage_dir, self.snapshot_dir]

    # --- configuration -----------------------------------------------------------------------

    def config(self) -> dict:
        """borgmatic's configuration for this box, from the settings alone."""
        return {
            "source_directories": [str(path) for path in self.sources()],
            "repositories": [{"path": repo.path, "label": repo.label}
                             for repo in self.repositories()],
            "one_file_system": True,
            "archive_name_format": f"{self.settings.site_code}-{{now:%Y-%m-%dT%H:%M:%S.%f}}",
            "encryption_passcommand": f"cat {shlex.quote(str(self.passphrase_file))}",
            # DICOM is often compressed already: borg tries zstd and keeps what pays.
            "compression": "auto,zstd,3",
            "lock_wait": 120,
            # HQ's host key is learnt on first contact and held to after; never a prompt.
            "ssh_command": " ".join([
                "ssh", "-i", shlex.quote(str(self.ssh_key)), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"UserKnownHostsFile={shlex.quote(str(self.ssh_key.parent / 'known_hosts'))}",
                "-o", "ConnectTimeout=30", "-o", "ServerAliveInterval=30",
                "-o", "ServerAliveCountMax=6"]),
            "borg_base_directory": str(self.folder / "borg"),
            "user_runtime_directory": str(self.folder / "run"),
            "user_state_directory": str(self.folder / "state"),
            **KEEP,
            "checks": [{"name": "repository"}, {"name": "archives"}],
        }

    def _prepare(self) -> None:
        """The passphrase (made once, ever) and borgmatic's configuration (once per command: a
        cleanup asks about every study, and the settings do not change meanwhile)."""
        if self._prepared:
            return
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.passphrase_file.exists():
            existing = [repo.path for repo in self.repositories()
                        if (Path(repo.path) / "config").exists()]
            if existing:
                # A new passphrase would not open it, and borg would only say "incorrect".
                raise BackupError(
                    f"the backup disk holds a repository ({existing[0]}) but this box has lost "
                    f"its passphrase ({self.passphrase_file} is missing): put it back "
                    "(`pacs backup passphrase --from-hq`, or `--set` from where it was kept), "
                    "or use an empty backup disk")
            if self._hq_keeps_passphrase():
                # A new box for this site: a new passphrase would not open HQ's copy of it.
                raise BackupError(
                    "HQ keeps a backup passphrase for this site and this box has none: put it "
                    "back with `pacs backup passphrase --from-hq` before any backup or restore")
            durable.replace_text(self.passphrase_file, secrets.token_urlsafe(32), mode=0o600)
        self._write_config()
        self._prepared = True

    def _write_config(self) -> None:
        """borgmatic's configuration (and the SSH key it names), with or without a passphrase."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.settings.remote_backup_url and not self.ssh_key.exists():
            self.make_ssh_key()
        durable.replace_text(self.config_file, json.dumps(self.config(), indent=2) + "\n",
                             mode=0o600)

    def _hq_keeps_passphrase(self) -> bool:
        """Does HQ keep a passphrase for this site? False when it cannot be asked (a new site
        offline from the start must still back up to its disk)."""
        if not self.settings.hq_url:
            return False
        from ..sync.transport import HQClient, HQRefused, HQUnreachable

        try:
            HQClient.from_settings(self.settings, timeout=30).kept_passphrases()
        except HQRefused as exc:
            return exc.status != 404
        except HQUnreachable:
            log.warning("HQ could not be asked whether it keeps this site's backup passphrase")
            return False
        return True

    def put_back_passphrase(self, candidates: list[str]) -> str | None:
        """A passphrase kept off the box, put back (a new box, the old backup disk or HQ's
        copy): of the candidates (newest first), the first that opens an existing repository,
        or the first when none exists yet. Never over another one: that one may be all that
        opens archives made since. Returns a warning when the repository could not be asked
        (HQ out of reach, this box's key not allowed there yet)."""
        candidates = [secret.strip() for secret in candidates]
        if not candidates or any(not secret or any(char.isspace() for char in secret)
                                 for secret in candidates):
            raise BackupError("no passphrase given (one line, no spaces, on standard input)")
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.passphrase_file.exists():
            if self.passphrase_file.read_text().strip() in candidates:
                return
            raise BackupError(f"this box has another passphrase already "
                              f"({self.passphrase_file}); it is left as it is")
        self._write_config()
        repos = self.repositories()
        local = [r for r in repos if r.label == LOCAL and (Path(r.path) / "config").exists()]
        repo = (local or [r for r in repos if r.label == REMOTE] or [None])[0]
        unchecked = []
        for secret in candidates:
            durable.replace_text(self.passphrase_file, secret, mode=0o600)
            if repo is None:
                return None  # nothing to open yet: the newest is the site's
            try:
                self._run("repo-info", "--repository", repo.label)
                return None
            except BackupError as exc:
                said = str(exc)
            if "is incorrect" in said:
                continue
            if repo.label == REMOTE and ("does not exist" in said
                                         or "not a valid repository" in said):
                durable.replace_text(self.passphrase_file, candidates[0], mode=0o600)
                return None  # HQ holds no repository for the site yet
            unchecked.append((secret, said))  # unreachable, not allowed yet: cannot tell
        if unchecked:
            durable.replace_text(self.passphrase_file, unchecked[0][0], mode=0o600)
            return (f"kept, but not checked against the {repo.label} repository: "
                    f"{unchecked[0][1]}")
        self.passphrase_file.unlink()
        raise BackupError(f"none of the {len(candidates)} passphrase(s) given opens the "
                          f"{repo.label} repository ({repo.path})")

    def make_ssh_key(self) -> str:
        """The box's key for HQ's backup server (made once); its public half."""
        if not self.ssh_key.exists():
            self.ssh_key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            made = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                   f"gotg-pacs-backup@{self.settings.site_code}",
                                   "-f", str(self.ssh_key)], capture_output=True, text=True)
            if made.returncode != 0:
                raise BackupError(f"cannot make the backup's SSH key: {made.stderr.strip()}")
        return self.ssh_key.with_suffix(".pub").read_text().strip()

    def hq_access_line(self) -> str | None:
        """The authorized_keys line HQ installs for this site: this key may only append to
        this site's repository (no shell, no forwarding, no other repository)."""
        remote = [repo for repo in self.repositories() if repo.label == REMOTE]
        if not remote:
            return None
        path = re.sub(r"^ssh://[^/]+", "", remote[0].path)
        if not re.fullmatch(r"/[A-Za-z0-9._/-]+", path) or "/../" in f"{path}/":
            raise BackupError(f"REMOTE_BACKUP_URL's path {path!r} is not a plain folder path")
        return (f'restrict,command="borg serve --append-only --restrict-to-repository '
                f'{path}" {self.make_ssh_key()}')

    def hand_over_passphrase(self, hq) -> bool:
        """Give HQ the passphrase (`hq`: a sync HQClient), once: True when handed over now. A
        failure (HQ out of reach) is logged and tried again after the next backup."""
        if not self.passphrase_file.exists():
            return False
        secret = self.passphrase_file.read_text().strip()
        digest = hashlib.sha256(secret.encode()).hexdigest()
        if (self.last() or {}).get("escrowed") == digest:
            return False
        try:
            hq.hand_over_passphrase(secret)
        except Exception as exc:  # noqa: BLE001 - HQ's answer or silence: try next time
            log.warning("backup passphrase not handed to HQ yet: %s", exc)
            return False
        self._update_status(lambda status: status.update(escrowed=digest))
        return True

    # --- the backup disk's repository key, kept at HQ too ------------------------------------

    def _local_repository(self) -> Repository:
        local = [repo for repo in self.repositories() if repo.label == LOCAL]
        if not local or not (Path(local[0].path) / "config").exists():
            raise BackupError("no repository on the backup disk yet: it is made by the first "
                              "backup")
        return local[0]

    def repository_id(self) -> str:
        """The backup disk's repository ID, as its own config file holds it."""
        config = configparser.ConfigParser()
        config.read(Path(self._local_repository().path) / "config")
        try:
            return config["repository"]["id"].strip()
        except KeyError:
            raise BackupError("the backup disk's repository config holds no ID: it is damaged "
                              "beyond its key") from None

    def export_key(self) -> str:
        """The backup disk's repository key as `borg key export` writes it (still sealed by the
        passphrase): with it, a repository whose config lost its key opens again."""
        repo = self._local_repository()
        self._prepare()
        return self._run("key", "export", "--repository", repo.label).stdout

    def hand_over_key(self, hq) -> bool:
        """Give HQ the backup disk's repository key (`hq`: a sync HQClient), once per key: True
        when handed over now. A failure is logged and tried again after the next backup."""
        try:
            key = self.export_key()
            repository = self.repository_id()
        except BackupError as exc:
            log.warning("repository key not handed to HQ: %s", exc)
            return False
        digest = hashlib.sha256(key.encode()).hexdigest()
        if (self.last() or {}).get("key_escrowed") == digest:
            return False
        try:
            hq.hand_over_key(repository, key)
        except Exception as exc:  # noqa: BLE001 - HQ's answer or silence: try next time
            log.warning("repository key not handed to HQ yet: %s", exc)
            return False
        self._update_status(lambda status: status.update(key_escrowed=digest))
        return True

    def put_back_key(self, keys: list[dict]) -> str:
        """Import into the backup disk's repository the key HQ keeps for it (its ID matching);
        returns that ID. borg checks the key belongs to the repository."""
        repository = self.repository_id()
        matching = [entry["key"] for entry in keys if entry.get("repository") == repository]
        if not matching:
            raise BackupError(f"HQ keeps no key for the repository on the backup disk "
                              f"({repository}); it keeps {len(keys)} for other repositories")
        repo = self._local_repository()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile("w", dir=self.folder, prefix=".key-",
                                         suffix=".txt") as handle:
            handle.write(matching[-1])
            handle.flush()
            # borg itself: borgmatic 1.9 has no key import, and its passthrough would put the
            # repository in the wrong place of a two-word command.
            done = subprocess.run([shutil.which("borg") or "borg", "key", "import", repo.path,
                                   handle.name], capture_output=True, text=True,
                                  env={**os.environ,
                                       "BORG_BASE_DIR": str(self.folder / "borg")})
        if done.returncode != 0:
            raise BackupError("borg did not take the key back: "
                              + " ".join(done.stderr.split())[-300:])
        return repository

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One borg job at a time (backup, check, restore, drill, repair): a second waits for
        the first, so borg's own lock never times out under it and no job's scratch folder is
        emptied by another's."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _run(self, *args: str, check: bool = True,
             warnings_fail: bool = False) -> subprocess.CompletedProcess:
        """borgmatic with this box's configuration. `warnings_fail`: see WARNINGS_FAIL."""
        borgmatic = Path(sys.executable).parent / "borgmatic"
        if not borgmatic.exists():
            borgmatic = Path(shutil.which("borgmatic") or "borgmatic")
        done = subprocess.run([str(borgmatic), "--config", str(self.config_file), "--no-color",
                               *(WARNINGS_FAIL if warnings_fail else []), *args],
                              capture_output=True, text=True)
        if check and done.returncode != 0:
            noise = ("torsion.org", "returned non-zero exit status", "Error running actions",
                     "An error occurred", "summary:", "rebuilt index:", "committed index:")
            lines = [line.removeprefix(f"{args[2]}: ") if len(args) > 2 else line
                     for line in done.stderr.splitlines()
                     if line.strip() and not any(word in line for word in noise)
                     and not line.startswith("/")]
            raise BackupError(f"borgmatic {args[0]} failed: "
                              + " | ".join(dict.fromkeys(lines[-6:])))
        return done

    # --- the disk ----------------------------------------------------------------------------

    def _check_disk(self, repo: Repository) -> None:
        where = self.settings.backup_path
        assert where is not None
        if not where.is_dir():
            raise BackupError(f"backup disk missing: BACKUP_PATH {where} does not exist; "
                              "plug in the backup disk")
        if not os.path.ismount(where):
            # An empty folder where the disk is mounted: a repository made there would fill
            # the system disk and vanish under the USB disk once it is plugged in again.
            raise BackupError(f"backup disk missing: nothing is mounted at BACKUP_PATH {where}; "
                              "plug in the USB backup disk")
        if where.stat().st_dev == self.settings.storage_path.stat().st_dev:
            raise BackupError(f"BACKUP_PATH {where} is on the same disk as the images "
                              "(STORAGE_PATH): a backup there dies with them. Mount the backup "
                              "disk at BACKUP_PATH")

    def _ensure_repository(self, repo: Repository) -> bool:
        """Make the repository on first use. True when it was made now."""
        if (Path(repo.path) / "config").exists():
            return False
        mode = "repokey-blake2" if self.settings.encryption else "none"
        self._run("repo-create", "--repository", repo.label, "--encryption", mode)
        return True

    # --- what staff and timers ask for -------------------------------------------------------

    def snapshot(self) -> dict:
        """The appliance's own state as of now, consistent, ready to be archived. Returns how
        the index copy went: how long Orthanc paused for it, or why there is none."""
        self.snapshot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        index = self.snapshot_dir / INDEX_SNAPSHOT
        try:
            paused = copy_index(self.settings, index)
            taken = {"index_pause_ms": None if paused is None else round(paused * 1000, 1)}
        except IndexCopyError as exc:
            # The files alone still restore (stored again through Orthanc); a stale index
            # beside newer files would not be a pair, so none goes in.
            index.unlink(missing_ok=True)
            log.warning("backup without Orthanc's index: %s", exc)
            taken = {"index_error": str(exc)}
        # The sync queue, the web accounts, the worklist's orders, the audit trail (append-only:
        # its complete lines are a consistent copy), the site CA with its key (a restored box
        # keeps its tablets' trust) and the settings. Each is taken on its own: one that cannot
        # be copied is reported and keeps its previous copy, and never costs the studies their
        # backup.
        problems = []
        for what, take in (
                ("the sync queue", lambda: _sqlite_copy(self.settings.sync_outbox_file,
                                                        self.snapshot_dir / "outbox.sqlite")),
                ("the web accounts", lambda: _sqlite_copy(self.settings.users_file,
                                                          self.snapshot_dir / "users.sqlite")),
                ("the RIS orders", lambda: _sqlite_copy(self.settings.ris_orders_file,
                                                        self.snapshot_dir / RIS_ORDERS)),
                ("the audit trail", lambda: self._copy_private(self.settings.audit_file,
                                                               "audit.jsonl")),
                ("the earlier audit trails", self._copy_earlier_trails),
                ("the site's certificate authority", self._copy_site_ca),
                ("the settings", lambda: self._copy_private(self.env_file, "pacs.env"))):
            try:
                take()
            except (OSError, sqlite3.Error) as exc:
                log.warning("%s is not in this backup (%s); its previous copy stays", what, exc)
                problems.append(f"{what}: {exc}")
        if problems:
            taken["state_errors"] = problems
        # Also as JSON: a restore that merges into another box's index declares them there.
        try:
            declared = Orthanc.from_settings(self.settings, timeout=10).modalities()
        except OrthancError as exc:  # Orthanc down: the previous export stays, the backup goes on
            log.warning("modalities not exported (Orthanc: %s); keeping the last export", exc)
        else:
            durable.replace_text(self.snapshot_dir / "modalities.json",
                                 json.dumps(declared, indent=2) + "\n", mode=0o600)
        return taken

    def _copy_private(self, source: Path | None, name: str) -> None:
        if source is not None and source.exists():
            partial = self.snapshot_dir / (name + ".partial")
            shutil.copyfile(source, partial)
            os.chmod(partial, 0o600)
            os.replace(partial, self.snapshot_dir / name)

    def _copy_earlier_trails(self) -> None:
        """Trails a restore kept (audit/earlier): until HQ holds them, only this box does."""
        earlier = sorted(audit.earlier_folder(self.settings.audit_file).glob("*.jsonl"))
        if earlier:
            (self.snapshot_dir / EARLIER_TRAILS).mkdir(exist_ok=True, mode=0o700)
        for path in earlier:
            self._copy_private(path, f"{EARLIER_TRAILS}/{path.name}")

    def _copy_site_ca(self) -> None:
        """The CA's key is root's: a backup run by another user says so instead of failing."""
        names = [name for name in ("ca.key", "ca.crt", "ca-chain.crt")
                 if (self.settings.tls_dir / name).exists()]
        if names:
            (self.snapshot_dir / "tls").mkdir(exist_ok=True, mode=0o700)
        for name in names:
            self._copy_private(self.settings.tls_dir / name, f"tls/{name}")

    def create(self) -> dict:
        """Back up now to every repository; prune the local one. Returns what was made. The
        outcome per repository, success or the reason for a failure, is kept for `pacs status`:
        the backup disk's as the box's backup state, HQ's apart (a clinic offline for days is
        no failing backup while its disk takes them), and a failure at HQ is in `remote_error`."""
        with self.locked():
            repos = self.repositories()
            if not repos:
                raise BackupError("no backup repository: set BACKUP_PATH to the backup disk "
                                  "(and REMOTE_BACKUP_URL for HQ)")
            made, remote_error = [], None
            try:
                self._prepare()
                index = self.snapshot()
            except Exception as exc:  # noqa: BLE001 - recorded whatever it is
                raise self._failed(repos[0], exc) from None
            self._update_status(lambda status: status.update(index=index))
            local_error = None
            for repo in repos:  # each one tried: a dead USB disk must not stop HQ's copy
                try:
                    made.append(self._create_in(repo))
                except Exception as exc:  # noqa: BLE001 - recorded, then said
                    error = self._failed(repo, exc)
                    if repo.label == REMOTE:
                        remote_error = str(error)
                    else:
                        local_error = error
            if local_error is not None or (remote_error and len(repos) == 1):
                error = local_error or BackupError(remote_error)
                if made:
                    raise BackupError(f"{error} (HQ's copy was made: {made[0]['archive']})")
                raise error
            return {"finished_at": time.time(), "archives": made, "remote_error": remote_error,
                    **index}

    def _failed(self, repo: Repository, exc: Exception) -> BackupError:
        error = exc if isinstance(exc, BackupError) else BackupError(f"backup failed: {exc}")
        self._record(repo, "last_failure", {"at": time.time(), "error": str(error)})
        return error

    def _create_in(self, repo: Repository) -> dict:
        if repo.label == LOCAL:
            self._check_disk(repo)
            self._ensure_repository(repo)
        else:  # borgmatic skips the creation when HQ's repository exists already
            self._run("repo-create", "--repository", repo.label, "--encryption",
                      "repokey-blake2" if self.settings.encryption else "none")
        started = time.time()
        done = self._run("create", "--repository", repo.label, "--json")
        archive = json.loads(done.stdout)[0]["archive"]
        if repo.label == LOCAL:  # HQ prunes its own copy: an append-only key could not
            self._run("prune", "--repository", repo.label)
        made = {"repository": repo.label, "archive": archive["name"],
                "seconds": round(time.time() - started, 1),
                "files": archive["stats"]["nfiles"],
                "original_bytes": archive["stats"]["original_size"],
                "added_bytes": archive["stats"]["deduplicated_size"]}
        self._record(repo, "last_success", {"finished_at": time.time(), "archives": [made]})
        return made

    def _record(self, repo: Repository, key: str, outcome: dict) -> None:
        """The box's state is the first repository's (the disk, or HQ when it is the only
        one); HQ's, when there is a disk too, is kept under "remote"."""
        remote = repo.label == REMOTE and self.settings.backup_path is not None
        self._update_status(lambda status: (status.setdefault("remote", {}) if remote
                                            else status).update({key: outcome}))

    def _update_status(self, change) -> None:
        """Read, `change(status)` in place, write back whole (status.json, 0600)."""
        status = self.last() or {}
        change(status)
        durable.replace_text(self.status_file, json.dumps(status, indent=2) + "\n", mode=0o600)

    def archives(self, only: str | None = None) -> list[dict]:
        """Every archive of every repository (or of the one labelled `only`), oldest first."""
        listed = []
        for repo in self.repositories():
            if only is not None and repo.label != only:
                continue
            if repo.label == LOCAL and not (Path(repo.path) / "config").exists():
                continue
            self._prepare()
            try:
                done = self._run("repo-list", "--repository", repo.label, "--json",
                                 "--match-archives", "sh:*")
            except BackupError as exc:
                if only is not None or repo.label != REMOTE:
                    raise
                log.warning("HQ's copy not listed: %s", exc)
                continue
            for answer in json.loads(done.stdout):
                listed += [{"repository": repo.label, "name": archive["name"],
                            "time": archive["time"]} for archive in answer["archives"]]
        return listed

    def check(self, verify_data: bool = False) -> None:
        """Check the repository read from (the backup disk, or HQ's copy without one) and its
        archives, or every chunk's data when asked (only on the disk: HQ verifies its copy's
        data itself). The outcome is kept for `pacs status`."""
        kind = "verify_data" if verify_data else "check"
        started = time.time()
        if verify_data and self.reading == REMOTE:
            error = ("no backup disk here, and verifying the data of HQ's copy from here would "
                     "read the whole repository over the link: HQ verifies its copy itself "
                     "(`pacs hq backups check --verify-data`); plug the backup disk back in to "
                     "verify it")
            self.note(kind, {"at": time.time(), "ok": False, "error": error})
            raise BackupError(error)
        with self.locked():
            try:
                repo = self.reading_repository()
                self._run("check", "--repository", repo.label, *check_arguments(verify_data),
                          warnings_fail=True)
            except BackupError as exc:
                self.note(kind, {"at": time.time(), "ok": False, "error": str(exc)})
                raise
        self.note(kind, {"at": time.time(), "ok": True,
                         "seconds": round(time.time() - started, 1)})

    def note(self, kind: str, outcome: dict) -> None:
        """The last outcome of a check ("check", "verify_data", "drill", "integrity")."""
        try:
            self._update_status(
                lambda status: status.setdefault("checks", {}).update({kind: outcome}))
        except PermissionError:  # run by hand as another user than the timers': said, not kept
            log.warning("the outcome of %s is not kept (only root writes the backup's state)",
                        kind)

    def last(self) -> dict | None:
        """The last success (time, archives) and the last failure (time, reason) of `create`."""
        try:
            return json.loads(self.status_file.read_text())
        except FileNotFoundError:
            return None

    def reading_repository(self) -> Repository:
        """The repository restores, checks, drills and repairs read: the backup disk, or HQ's
        copy when `reading` says so (or when there is no disk)."""
        repos = {repo.label: repo for repo in self.repositories()}
        if self.reading == REMOTE:
            if REMOTE not in repos:
                raise BackupError("REMOTE_BACKUP_URL is not set: there is no backup at HQ")
            self._prepare()
            return repos[REMOTE]
        if LOCAL not in repos:
            raise BackupError("BACKUP_PATH is not set: there is no backup")
        self._check_disk(repos[LOCAL])
        if not (Path(repos[LOCAL].path) / "config").exists():
            raise BackupError(f"no backup repository at {repos[LOCAL].path} yet")
        self._prepare()
        return repos[LOCAL]

    def newest(self) -> str | None:
        """The name of the newest regular archive (not a kept one), None if there is none."""
        repo = self.reading_repository()
        done = self._run("repo-list", "--repository", repo.label, "--json")
        archives = [archive for answer in json.loads(done.stdout)
                    for archive in answer["archives"]]
        return max(archives, key=lambda archive: archive["time"])["name"] if archives else None

    def keep(self, archive: str) -> str:
        """Take an archive out of pruning for good (renamed `kept.NAME`): it holds studies
        removed from this box since, and pruning would otherwise drop it within a day."""
        if archive.startswith(KEPT):
            return archive
        with self.locked():
            repo = self.reading_repository()
            self._run("borg", "--repository", repo.label, "rename", f"::{archive}",
                      KEPT + archive)
        return KEPT + archive

    def resolve(self, archive: str | None) -> str:
        """The archive named (it must exist), or the newest of all when None."""
        archives = self.archives(only=self.reading_repository().label)
        if not archives:
            raise BackupError(f"the {self.reading} repository holds no archive yet")
        if archive is None:
            return max(archives, key=lambda item: item["time"])["name"]
        if archive not in {item["name"] for item in archives}:
            raise BackupError(f"no archive named {archive!r} (see `pacs backup list`)")
        return archive

    def contents(self, archive: str) -> Contents:
        """Every file the archive holds, by the absolute path it was backed up from (another
        box's paths, maybe), with its size, and apart its links and special files. No MD5
        here: borg reads every chunk to compute one (over HQ's link, the whole archive);
        `held` asks it for chosen files."""
        repo = self.reading_repository()
        done = self._run("list", "--repository", repo.label, "--archive", archive,
                         "--format", "{type} {size} {path}{NL}")
        found = Contents()
        for line in done.stdout.splitlines():
            kind, size, path = (line.split(" ", 2) + ["", ""])[:3]
            if kind == "-" and size.isdigit() and path:
                found[Path("/") / path] = int(size)
            elif kind not in ("d", "-", "h") and path:  # links, devices, fifos: not trusted
                found.irregular.append(Path("/") / path)
        return found

    def extract(self, archive: str, paths: list[Path], destination: Path) -> None:
        """Extract these files (absolute paths as backed up) below `destination`, each at its
        full path there (destination/var/lib/...): never over the live files."""
        repo = self.reading_repository()
        destination.mkdir(parents=True, exist_ok=True, mode=0o700)
        names = [str(path).lstrip("/") for path in paths]
        for first in range(0, len(names), PATHS_PER_CALL):
            self._run("extract", "--repository", repo.label, "--archive", archive,
                      "--destination", str(destination),
                      *[arg for name in names[first:first + PATHS_PER_CALL]
                        for arg in ("--path", name)])

    def held(self, paths: list[Path], archive: str) -> dict[Path, str]:
        """Which of these files `archive` holds, with the MD5 of the content it holds (read
        back from the repository, not assumed)."""
        repo = self.reading_repository()
        found: dict[Path, str] = {}
        wanted = {str(path).lstrip("/"): path for path in paths}
        names = list(wanted)
        for first in range(0, len(names), PATHS_PER_CALL):
            batch = names[first:first + PATHS_PER_CALL]
            done = self._run("list", "--repository", repo.label, "--archive", archive,
                             "--format", "{md5} {size} {path}{NL}",
                             *[arg for name in batch for arg in ("--path", name)])
            for line in done.stdout.splitlines():
                match = _LISTED.match(line)
                if match and match.group(3) in wanted:
                    found[wanted[match.group(3)]] = match.group(1)
        return found
