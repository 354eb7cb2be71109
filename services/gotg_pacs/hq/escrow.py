"""Backup passphrases kept at HQ, per site: a site's backups, on its USB disk or at HQ, cannot be
read without the passphrase its box made, and the box is what floods, burns or is stolen. Beside
them, the repository keys of the sites' backup disks (`borg key export`, sealed by the
passphrase): a disk whose copy of its key is damaged is read again with HQ's. And the recovery
passphrases of the sites' encrypted data disks, which HQ IT reads to a clinic whose key stick
is lost, or types itself over SSH.

Each site hands its passphrase over its own authenticated channel after a backup; HQ keeps every
passphrase a site ever used (archives made under an old one still need it), 0600 in a folder of
its own. A site reads back only its own (a new box for that site); HQ IT reads any with
`pacs hq site passphrase CODE`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from flask import Flask, Response, abort, g, jsonify, request

from .. import durable


class Escrow:
    """One 0600 JSON file per site and kind of secret, each a list kept in the order handed
    over: SITE.json (backup passphrases), SITE.keys.json (repository keys), SITE.disks.json
    (data disks' recovery passphrases)."""

    FILES = {"passphrases": "{site}.json", "keys": "{site}.keys.json",
             "disks": "{site}.disks.json"}

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _file(self, site: str, kind: str) -> Path:
        return self.folder / self.FILES[kind].format(site=site)

    def _kept(self, site: str, kind: str) -> list[dict]:
        try:
            return json.loads(self._file(site, kind).read_text())[kind]
        except FileNotFoundError:
            return []

    def _keep(self, site: str, kind: str, entry: dict[str, str]) -> bool:
        """Add `entry` (with the time HQ took it); False when HQ had this one already."""
        kept = self._kept(site, kind)
        if any(all(old.get(name) == value for name, value in entry.items()) for old in kept):
            return False
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept.append({**entry, "since": time.time()})
        durable.replace_text(self._file(site, kind), json.dumps({kind: kept}, indent=2),
                             mode=0o600)
        return True

    def kept(self, site: str) -> list[dict]:
        """Every backup passphrase the site handed over, oldest first ({"passphrase",
        "since"})."""
        return self._kept(site, "passphrases")

    def keep(self, site: str, passphrase: str) -> bool:
        return self._keep(site, "passphrases", {"passphrase": passphrase})

    def keys(self, site: str) -> list[dict]:
        """Every repository key the site handed over ({"repository", "key", "since"})."""
        return self._kept(site, "keys")

    def keep_key(self, site: str, repository: str, key: str) -> bool:
        return self._keep(site, "keys", {"repository": repository, "key": key})

    def disks(self, site: str) -> list[dict]:
        """Every data disk's recovery passphrase ({"luks_uuid", "passphrase", "since"})."""
        return self._kept(site, "disks")

    def keep_disk(self, site: str, luks_uuid: str, passphrase: str) -> bool:
        return self._keep(site, "disks", {"luks_uuid": luks_uuid, "passphrase": passphrase})


REPOSITORY_ID = re.compile(r"[0-9a-f]{64}")
LUKS_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
RECOVERY = re.compile(r"[A-Z2-9]{5}(-[A-Z2-9]{5}){5}")
MAX_KEY = 16 * 1024  # `borg key export` writes about 1 KB


def _fields(*names: str) -> list[object]:
    """These fields of the request's JSON object (None for each when it is not one)."""
    asked = request.get_json(silent=True)
    asked = asked if isinstance(asked, dict) else {}
    return [asked.get(name) for name in names]


def register(app: Flask, escrow: Escrow) -> None:
    @app.put("/api/v1/escrow")
    def hand_over() -> Response:
        [passphrase] = _fields("passphrase")
        if not isinstance(passphrase, str) or not 16 <= len(passphrase) <= 256 \
                or any(char.isspace() for char in passphrase):
            abort(400, "passphrase: 16 to 256 characters, no spaces")
        return jsonify({"kept": True, "new": escrow.keep(g.site, passphrase)})

    @app.get("/api/v1/escrow")
    def read_back() -> Response:
        kept = escrow.kept(g.site)
        if not kept:
            abort(404, "HQ holds no backup passphrase for this site")
        return jsonify({"passphrases": kept})

    @app.put("/api/v1/escrow/key")
    def hand_over_key() -> Response:
        repository, key = _fields("repository", "key")
        if not (isinstance(repository, str) and REPOSITORY_ID.fullmatch(repository)
                and isinstance(key, str) and len(key) <= MAX_KEY
                and key.startswith(f"BORG_KEY {repository}\n")):
            abort(400, "repository: its 64-digit ID; key: `borg key export` of that repository")
        return jsonify({"kept": True, "new": escrow.keep_key(g.site, repository, key)})

    # Handed over, never read back by a site: a box carried off with its HQ token must not
    # fetch what opens its own data disk. HQ IT reads it (`pacs hq site disk-passphrase`).
    @app.put("/api/v1/escrow/disk")
    def hand_over_disk() -> Response:
        uuid, passphrase = _fields("luks_uuid", "passphrase")
        if not (isinstance(uuid, str) and LUKS_UUID.fullmatch(uuid)
                and isinstance(passphrase, str) and RECOVERY.fullmatch(passphrase)):
            abort(400, "luks_uuid: the data disk's LUKS UUID; passphrase: its recovery "
                       "passphrase (six groups of five letters and digits)")
        return jsonify({"kept": True, "new": escrow.keep_disk(g.site, uuid, passphrase)})

    @app.get("/api/v1/escrow/keys")
    def read_back_keys() -> Response:
        kept = escrow.keys(g.site)
        if not kept:
            abort(404, "HQ holds no repository key for this site")
        return jsonify({"keys": kept})
