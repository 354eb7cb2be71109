"""Per-site credentials at HQ: one random token per site, stored only as a SHA-256 hash.

No two sites share a secret (invariant 6): a stolen clinic box exposes only its own token, which
HQ revokes with `pacs hq site revoke CODE` without touching any other site.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sites:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def _save(self, sites: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(sites, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def add(self, code: str) -> str:
        """A new token for the site (replacing any old one); shown once, never stored."""
        token = secrets.token_urlsafe(32)
        sites = self._load()
        sites[code] = {"sha256": _hash(token), "created": time.time()}
        self._save(sites)
        return token

    def revoke(self, code: str) -> bool:
        sites = self._load()
        if sites.pop(code, None) is None:
            return False
        self._save(sites)
        return True

    def list(self) -> list[str]:
        return sorted(self._load())

    def site_of(self, token: str) -> str | None:
        """The site this token belongs to, compared in constant time."""
        wanted = _hash(token)
        for code, entry in self._load().items():
            if hmac.compare_digest(entry["sha256"], wanted):
                return code
        return None
