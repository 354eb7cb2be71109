"""Backup passphrases kept at HQ, per site: a site's backups, on its USB disk or at HQ, cannot be
read without the passphrase its box made, and the box is what floods, burns or is stolen. Beside
them, the repository keys of the sites' backup disks (`borg key export`, sealed by the
passphrase): a disk whose copy of its key is damaged is read again with HQ's.

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
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _file(self, site: str) -> Path:
        return self.folder / f"{site}.json"

    def kept(self, site: str) -> list[dict]:
        """Every passphrase the site handed over, oldest first ({"passphrase", "since"})."""
        try:
            return json.loads(self._file(site).read_text())["passphrases"]
        except FileNotFoundError:
            return []

    def keep(self, site: str, passphrase: str) -> bool:
        """Keep the site's passphrase; False when HQ had it already."""
        kept = self.kept(site)
        if any(entry["passphrase"] == passphrase for entry in kept):
            return False
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept.append({"passphrase": passphrase, "since": time.time()})
        durable.replace_text(self._file(site), json.dumps({"passphrases": kept}, indent=2),
                             mode=0o600)
        return True


    def _keys_file(self, site: str) -> Path:
        return self.folder / f"{site}.keys.json"

    def keys(self, site: str) -> list[dict]:
        """Every repository key the site handed over, oldest first ({"repository", "key",
        "since"})."""
        try:
            return json.loads(self._keys_file(site).read_text())["keys"]
        except FileNotFoundError:
            return []

    def keep_key(self, site: str, repository: str, key: str) -> bool:
        """Keep a repository's key; False when HQ had this one already."""
        kept = self.keys(site)
        if any(entry["repository"] == repository and entry["key"] == key for entry in kept):
            return False
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept.append({"repository": repository, "key": key, "since": time.time()})
        durable.replace_text(self._keys_file(site), json.dumps({"keys": kept}, indent=2),
                             mode=0o600)
        return True


REPOSITORY_ID = re.compile(r"[0-9a-f]{64}")
MAX_KEY = 16 * 1024  # `borg key export` writes about 1 KB


def register(app: Flask, escrow: Escrow) -> None:
    @app.put("/api/v1/escrow")
    def hand_over() -> Response:
        asked = request.get_json(silent=True)
        passphrase = asked.get("passphrase") if isinstance(asked, dict) else None
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
        asked = request.get_json(silent=True)
        asked = asked if isinstance(asked, dict) else {}
        repository, key = asked.get("repository"), asked.get("key")
        if not (isinstance(repository, str) and REPOSITORY_ID.fullmatch(repository)
                and isinstance(key, str) and len(key) <= MAX_KEY
                and key.startswith(f"BORG_KEY {repository}\n")):
            abort(400, "repository: its 64-digit ID; key: `borg key export` of that repository")
        return jsonify({"kept": True, "new": escrow.keep_key(g.site, repository, key)})

    @app.get("/api/v1/escrow/keys")
    def read_back_keys() -> Response:
        kept = escrow.keys(g.site)
        if not kept:
            abort(404, "HQ holds no repository key for this site")
        return jsonify({"keys": kept})
