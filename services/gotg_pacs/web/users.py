"""People who log in to the appliance's web pages and APIs, their roles, and their sessions.

Passwords are hashed with Argon2id (argon2-cffi) at OWASP's minimum cost (19 MiB, two passes),
so a login costs a Pi a fraction of a second and a stolen database costs an attacker dearly.
An account is locked for LOCK_SECONDS after LOCK_AFTER wrong passwords in a row (the edge also
rate-limits logins per address). Sessions live on the server: the cookie holds a random token,
the database only its SHA-256, so logout (one session, or every session of a person) is
immediate everywhere, and a session ends after SESSION_IDLE_TIMEOUT without use or
SESSION_MAX_AGE in all.

The `admin` account is made from ADMIN_PASSWORD the first time the service starts, marked
"change at first login": that password sat in a file or on a console.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..sqlite_tx import immediate, open_store
from .policy import ROLES

ROLE_NAMES = {"admin": "administrator", "clinician": "clinician / radiologist",
              "radiographer": "radiographer", "hq_operator": "HQ operator"}
NAME_PATTERN = r"[a-z][a-z0-9._-]{1,31}"
MIN_PASSWORD = 10
# Left in STATE_PATH when the admin has replaced ADMIN_PASSWORD with their own: a root unit
# then erases the copy of it on the boot partition (`pacs firstboot --forget-password`).
ADMIN_CHANGED_MARKER = "web/admin-password-changed"
LOCK_AFTER = 5
LOCK_SECONDS = 15 * 60
HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Checked against when the account does not exist: the answer takes as long either way, so a
# login's timing does not tell which names exist.
_DUMMY_HASH = HASHER.hash(secrets.token_hex(16))

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    hash TEXT NOT NULL,
    must_change INTEGER NOT NULL DEFAULT 1,
    failures INTEGER NOT NULL DEFAULT 0,
    locked_until REAL NOT NULL DEFAULT 0,
    disabled INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 TEXT PRIMARY KEY,
    name TEXT NOT NULL REFERENCES users(name),
    created REAL NOT NULL,
    last_seen REAL NOT NULL,
    address TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_name ON sessions(name);
"""


class UserError(Exception):
    """A request about accounts that cannot be done; the message is for the person asking."""


class LoginRefused(Exception):
    """Wrong name or password, a disabled account (said the same way), or a locked one."""

    def __init__(self, reason: str, locked_for: float = 0.0) -> None:
        super().__init__(reason)
        self.locked_for = locked_for


@dataclass(frozen=True)
class Session:
    name: str
    role: str
    must_change: bool
    address: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_password_strength(password: str, name: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > 256:
        raise UserError("a password may have at most 256 characters")
    if name.lower() in password.lower():
        raise UserError("a password must not contain the account's name")


def _serialized(method):
    @functools.wraps(method)
    def under_lock(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return under_lock


class Users:
    """The accounts and sessions database (STATE_PATH/web/users.sqlite)."""

    def __init__(self, path: Path, idle_timeout: int, max_age: int,
                 clock=time.time) -> None:
        self.db = open_store(path, SCHEMA)
        # One connection, one caller at a time: the web service answers requests on threads,
        # and two transactions on one SQLite connection would collide.
        self._lock = threading.Lock()
        self.idle_timeout, self.max_age = idle_timeout, max_age
        self.clock = clock

    @classmethod
    def from_settings(cls, settings) -> Users:
        return cls(settings.users_file, settings.session_idle_timeout, settings.session_max_age)

    def close(self) -> None:
        self.db.close()

    # --- accounts ----------------------------------------------------------------------------

    @_serialized
    def bootstrap_admin(self, password: str) -> bool:
        """Make `admin` from ADMIN_PASSWORD if no account exists yet; True when made."""
        with immediate(self.db) as db:
            if db.execute("SELECT 1 FROM users LIMIT 1").fetchone():
                return False
            db.execute("INSERT INTO users (name, role, hash, must_change, created) "
                       "VALUES ('admin', 'admin', ?, 1, ?)", (HASHER.hash(password),
                                                              self.clock()))
        return True

    @_serialized
    def as_made(self) -> bool:
        """Whether nobody has made these accounts their own yet: none but `admin`, still on the
        password the box was given. Only then may a restore put a site's accounts back."""
        rows = self.db.execute("SELECT name, must_change FROM users").fetchall()
        return all(name == "admin" and must_change for name, must_change in rows)

    @_serialized
    def take_from(self, copy: Path) -> list[str]:
        """Every account replaced by those in `copy` (a backup's users.sqlite), passwords,
        roles and disabled state as they were; no session comes along, so everyone signs in
        again. Returns the names taken."""
        with closing(sqlite3.connect(f"file:{copy}?mode=ro", uri=True)) as source:
            rows = source.execute("SELECT name, role, hash, must_change, disabled, created "
                                  "FROM users").fetchall()
        for name, role, *_ in rows:
            if role not in ROLES or not re.fullmatch(NAME_PATTERN, str(name)):
                raise UserError(f"the copy holds an account {name!r} with role {role!r} that "
                                "this version does not know")
        with immediate(self.db) as db:
            db.execute("DELETE FROM sessions")
            db.execute("DELETE FROM users")
            db.executemany("INSERT INTO users (name, role, hash, must_change, disabled, created) "
                           "VALUES (?, ?, ?, ?, ?, ?)", rows)
        return [row[0] for row in rows]

    @_serialized
    def add(self, name: str, role: str) -> str:
        """A new account with a one-time password (returned, never stored in clear) that must be
        changed at first login."""
        if not re.fullmatch(NAME_PATTERN, name):
            raise UserError("a name is 2-32 characters a-z 0-9 . _ -, starting with a letter")
        if role not in ROLES:
            raise UserError(f"role must be one of {', '.join(ROLES)}")
        password = secrets.token_urlsafe(12)
        try:
            with immediate(self.db) as db:
                db.execute("INSERT INTO users (name, role, hash, must_change, created) "
                           "VALUES (?, ?, ?, 1, ?)", (name, role, HASHER.hash(password),
                                                      self.clock()))
        except sqlite3.IntegrityError:
            raise UserError(f"there is already an account {name!r}") from None
        return password

    @_serialized
    def reset(self, name: str) -> str:
        """A new one-time password for a person who forgot theirs; their sessions end."""
        password = secrets.token_urlsafe(12)
        with immediate(self.db) as db:
            changed = db.execute("UPDATE users SET hash = ?, must_change = 1, failures = 0, "
                                 "locked_until = 0 WHERE name = ?",
                                 (HASHER.hash(password), name)).rowcount
            db.execute("DELETE FROM sessions WHERE name = ?", (name,))
        if not changed:
            raise UserError(f"no account {name!r}")
        return password

    @_serialized
    def set_disabled(self, name: str, disabled: bool) -> None:
        with immediate(self.db) as db:
            if name == "admin" and disabled:
                raise UserError("the admin account cannot be disabled")
            changed = db.execute("UPDATE users SET disabled = ? WHERE name = ?",
                                 (int(disabled), name)).rowcount
            db.execute("DELETE FROM sessions WHERE name = ?", (name,))
        if not changed:
            raise UserError(f"no account {name!r}")

    @_serialized
    def list(self) -> list[dict]:
        now = self.clock()
        return [{"name": row["name"], "role": row["role"], "disabled": bool(row["disabled"]),
                 "must_change_password": bool(row["must_change"]),
                 "locked": row["locked_until"] > now}
                for row in self.db.execute("SELECT * FROM users ORDER BY name")]

    # --- logging in and out ------------------------------------------------------------------

    @_serialized
    def login(self, name: str, password: str, address: str) -> tuple[str, Session]:
        """A new session token for the right password; LoginRefused otherwise."""
        now = self.clock()
        row = self.db.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            try:
                HASHER.verify(_DUMMY_HASH, password)
            except VerificationError:
                pass
            raise LoginRefused("wrong name or password")
        if row["locked_until"] > now:
            raise LoginRefused("too many wrong passwords: try again later",
                               row["locked_until"] - now)
        try:
            HASHER.verify(row["hash"], password)
        except (VerificationError, InvalidHashError):
            with immediate(self.db) as db:
                failures = row["failures"] + 1
                locked = now + LOCK_SECONDS if failures >= LOCK_AFTER else 0
                db.execute("UPDATE users SET failures = ?, locked_until = ? WHERE name = ?",
                           (0 if locked else failures, locked, name))
            if locked:
                raise LoginRefused("too many wrong passwords: try again later",
                                   LOCK_SECONDS) from None
            raise LoginRefused("wrong name or password") from None
        if row["disabled"]:  # said like a wrong password: no oracle for a disabled account's
            raise LoginRefused("wrong name or password")
        token = secrets.token_urlsafe(32)
        with immediate(self.db) as db:
            db.execute("UPDATE users SET failures = 0 WHERE name = ?", (name,))
            if HASHER.check_needs_rehash(row["hash"]):
                db.execute("UPDATE users SET hash = ? WHERE name = ?",
                           (HASHER.hash(password), name))
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                       (_digest(token), name, now, now, address))
        return token, Session(name, row["role"], bool(row["must_change"]), address)

    @_serialized
    def session(self, token: str) -> Session | None:
        """The live session of a token (its idle clock restarted), or None."""
        if not token:
            return None
        now = self.clock()
        row = self.db.execute(
            "SELECT s.*, u.role, u.must_change, u.disabled FROM sessions s "
            "JOIN users u ON u.name = s.name WHERE s.token_sha256 = ?",
            (_digest(token),)).fetchone()
        if row is None:
            return None
        if (row["disabled"] or now - row["last_seen"] > self.idle_timeout
                or now - row["created"] > self.max_age):
            with immediate(self.db) as db:
                db.execute("DELETE FROM sessions WHERE token_sha256 = ?", (_digest(token),))
            return None
        if now - row["last_seen"] > 30:  # a write per half minute, not per image tile
            with immediate(self.db) as db:
                db.execute("UPDATE sessions SET last_seen = ? WHERE token_sha256 = ?",
                           (now, _digest(token)))
        return Session(row["name"], row["role"], bool(row["must_change"]), row["address"])

    @_serialized
    def logout(self, token: str, everywhere: bool = False) -> int:
        """End this session, or every session of its person; how many ended."""
        with immediate(self.db) as db:
            row = db.execute("SELECT name FROM sessions WHERE token_sha256 = ?",
                             (_digest(token),)).fetchone()
            if row is None:
                return 0
            if everywhere:
                return db.execute("DELETE FROM sessions WHERE name = ?",
                                  (row["name"],)).rowcount
            return db.execute("DELETE FROM sessions WHERE token_sha256 = ?",
                              (_digest(token),)).rowcount

    @_serialized
    def change_password(self, name: str, old: str, new: str, keep_token: str) -> None:
        """The person's own change (first login included); every other session ends."""
        row = self.db.execute("SELECT hash FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UserError(f"no account {name!r}")
        try:
            HASHER.verify(row["hash"], old)
        except (VerificationError, InvalidHashError):
            raise UserError("the current password is wrong") from None
        if old == new:
            raise UserError("the new password must differ from the current one")
        check_password_strength(new, name)
        with immediate(self.db) as db:
            db.execute("UPDATE users SET hash = ?, must_change = 0 WHERE name = ?",
                       (HASHER.hash(new), name))
            db.execute("DELETE FROM sessions WHERE name = ? AND token_sha256 != ?",
                       (name, _digest(keep_token)))
