"""Accounts and sessions: hashed passwords, lockout, expiry and logout, on a clock we move."""

from __future__ import annotations

import pytest

from gotg_pacs.web import users as users_module
from gotg_pacs.web.users import LOCK_AFTER, LOCK_SECONDS, LoginRefused, UserError, Users


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    made = Users(tmp_path / "users.sqlite", idle_timeout=3600, max_age=12 * 3600, clock=clock)
    yield made
    made.close()


def test_the_admin_is_made_once_from_admin_password_and_must_change_it(store, tmp_path):
    assert store.bootstrap_admin("from the site file")
    assert not store.bootstrap_admin("another one")  # a restart changes nothing
    _, session = store.login("admin", "from the site file", "10.0.0.9")
    assert session.role == "admin" and session.must_change
    stored = store.db.execute("SELECT hash FROM users").fetchone()["hash"]
    assert stored.startswith("$argon2id$") and "from the site file" not in stored
    assert b"from the site file" not in (tmp_path / "users.sqlite").read_bytes()


def test_a_password_change_clears_the_flag_and_ends_the_other_sessions(store):
    password = store.add("amina", "clinician")
    laptop, _ = store.login("amina", password, "a")
    tablet, _ = store.login("amina", password, "b")
    with pytest.raises(UserError, match="at least 10"):
        store.change_password("amina", password, "short", laptop)
    with pytest.raises(UserError, match="name"):
        store.change_password("amina", password, "amina-is-my-name", laptop)
    with pytest.raises(UserError, match="current password is wrong"):
        store.change_password("amina", "not it", "a good long passphrase", laptop)
    store.change_password("amina", password, "a good long passphrase", laptop)
    assert store.session(laptop).must_change is False
    assert store.session(tablet) is None
    with pytest.raises(LoginRefused):
        store.login("amina", password, "a")


def test_sessions_end_when_idle_or_too_old_and_at_logout(store, clock):
    password = store.add("amina", "clinician")
    token, _ = store.login("amina", password, "a")
    for _ in range(12):  # used every 59 minutes: alive until the shift (12 h) is over
        clock.now += 59 * 60
        assert store.session(token) is not None
    clock.now += 59 * 60  # 12 h 47 min after it began
    assert store.session(token) is None
    idle, _ = store.login("amina", password, "a")
    clock.now += 3601
    assert store.session(idle) is None
    one, _ = store.login("amina", password, "a")
    two, _ = store.login("amina", password, "b")
    assert store.logout(one) == 1 and store.session(one) is None and store.session(two)
    assert store.logout(two, everywhere=True) == 1
    assert store.logout("never issued") == 0


def test_wrong_passwords_lock_the_account_for_a_while(store, clock):
    password = store.add("amina", "clinician")
    for _ in range(LOCK_AFTER - 1):
        with pytest.raises(LoginRefused, match="wrong name or password"):
            store.login("amina", "guess", "x")
    with pytest.raises(LoginRefused, match="try again later") as locked:
        store.login("amina", "guess", "x")
    assert locked.value.locked_for == LOCK_SECONDS
    with pytest.raises(LoginRefused, match="try again later"):
        store.login("amina", password, "x")  # even the right one, while locked
    clock.now += LOCK_SECONDS + 1
    assert store.login("amina", password, "x")[1].name == "amina"


def test_unknown_and_disabled_accounts_are_refused_alike(store):
    password = store.add("amina", "clinician")
    token, _ = store.login("amina", password, "x")
    store.set_disabled("amina", True)
    assert store.session(token) is None
    for name, given in (("amina", password), ("nobody", "anything")):
        with pytest.raises(LoginRefused, match="^wrong name or password$"):
            store.login(name, given, "x")
    with pytest.raises(UserError, match="cannot be disabled"):
        store.set_disabled("admin", True)
    store.set_disabled("amina", False)
    assert store.login("amina", password, "x")


def test_names_and_roles_are_checked(store):
    for name in ("", "A", "../etc", "<b>x</b>", "a" * 40):
        with pytest.raises(UserError):
            store.add(name, "clinician")
    with pytest.raises(UserError, match="role"):
        store.add("amina", "superuser")
    store.add("amina", "clinician")
    with pytest.raises(UserError, match="already"):
        store.add("amina", "radiographer")


def test_a_reset_gives_a_new_one_time_password_and_ends_sessions(store):
    first = store.add("amina", "clinician")
    token, _ = store.login("amina", first, "x")
    again = store.reset("amina")
    assert again != first and store.session(token) is None
    assert store.login("amina", again, "x")[1].must_change
    with pytest.raises(UserError):
        store.reset("nobody")


def test_hashes_made_at_an_older_cost_are_upgraded_at_login(store, monkeypatch):
    weak = users_module.PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)
    store.add("amina", "clinician")
    store.db.execute("UPDATE users SET hash = ? WHERE name = 'amina'",
                     (weak.hash("an old password here"),))
    store.login("amina", "an old password here", "x")
    upgraded = store.db.execute("SELECT hash FROM users WHERE name = 'amina'").fetchone()[0]
    assert "m=19456,t=2,p=1" in upgraded


def test_requests_on_many_threads_at_once_share_the_store_safely(store):
    """The web service answers on threads: every tile a viewer loads asks for its session."""
    import threading

    password = store.add("amina", "clinician")
    token, _ = store.login("amina", password, "x")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                assert store.session(token).name == "amina"
                other, _ = store.login("amina", password, "y")
                store.logout(other)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
