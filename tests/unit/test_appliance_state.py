"""What a restore puts back besides the studies, and when it must not.

Why it matters: a rebuilt site needs its people's accounts and the CA its tablets trust, but a
box already in use must keep its own, and another site's archive must not bring that site's
accounts, CA or audit trail into this one.
"""

from __future__ import annotations

import pytest

from gotg_pacs import audit
from gotg_pacs.audit import AuditLog
from gotg_pacs.backup import appliance_state
from gotg_pacs.config import Settings
from gotg_pacs.web.tls import SiteTLS
from gotg_pacs.web.users import Users


def _settings(root, site: str = "field-7") -> Settings:
    return Settings(storage_path=root / "orthanc", state_path=root / "state", site_code=site,
                    admin_password="the box's own first one")


@pytest.fixture
def snapshot(tmp_path):
    """The old box's snapshot folder as an archive holds it: accounts, CA, audit trail."""
    old = _settings(tmp_path / "old")
    users = Users.from_settings(old)
    users.bootstrap_admin(old.admin_password)
    users.add("amina", "clinician")
    users.close()
    SiteTLS(old.tls_dir, old.site_code).ensure(["localhost"])
    AuditLog(old.audit_file).record("export", "amina", "10.0.0.5", kind="studies",
                                    resource="s1")
    folder = tmp_path / "snapshot"
    (folder / "tls").mkdir(parents=True)
    (folder / "users.sqlite").write_bytes(old.users_file.read_bytes())
    (folder / "audit.jsonl").write_bytes(old.audit_file.read_bytes())
    for name in ("ca.key", "ca.crt", "ca-chain.crt"):
        (folder / "tls" / name).write_bytes((old.tls_dir / name).read_bytes())
    return folder


def _flashed(root, site: str = "field-7") -> Settings:
    settings = _settings(root, site)
    users = Users.from_settings(settings)
    users.bootstrap_admin(settings.admin_password)
    users.close()
    SiteTLS(settings.tls_dir, settings.site_code).ensure(["localhost"])
    return settings


def _names(settings: Settings) -> set[str]:
    users = Users.from_settings(settings)
    try:
        return {user["name"] for user in users.list()}
    finally:
        users.close()


def test_a_new_box_of_the_same_site_takes_accounts_ca_and_trail(snapshot, tmp_path):
    box = _flashed(tmp_path / "new")
    said = appliance_state.put_back(box, snapshot, "field-7-2026", whole=True, site="field-7")
    assert said["accounts"].startswith("2 put back") and _names(box) == {"admin", "amina"}
    assert said["site_ca"].startswith("put back")
    assert (box.tls_dir / "ca.key").read_bytes() == (snapshot / "tls/ca.key").read_bytes()
    trail = audit.trail_of(snapshot / "audit.jsonl")
    assert (audit.earlier_folder(box.audit_file) / f"{trail}.jsonl").exists()
    # Run again (a restore repeated): nothing changes, and it says so.
    again = appliance_state.put_back(box, snapshot, "field-7-2026", whole=True, site="field-7")
    assert again["accounts"].startswith("this box's own kept")  # admin's password is its own


@pytest.mark.parametrize(("whole", "site", "why"), [
    (False, "field-7", "merged into a box in use"),
    (True, "field-9", "site field-9's"),
])
def test_a_box_in_use_or_another_sites_archive_keeps_this_boxs_own(snapshot, tmp_path, whole,
                                                                    site, why):
    box = _flashed(tmp_path / "new")
    own_ca = (box.tls_dir / "ca.key").read_bytes()
    said = appliance_state.put_back(box, snapshot, f"{site}-2026", whole=whole, site=site)
    assert why in said["accounts"] and why in said["site_ca"]
    assert _names(box) == {"admin"} and (box.tls_dir / "ca.key").read_bytes() == own_ca
    kept = list(audit.earlier_folder(box.audit_file).glob("*.jsonl"))
    assert kept == [] if site != "field-7" else len(kept) == 1
    [restore] = [e for e in audit.read(box.audit_file)[0] if e["action"] == "restore"]
    assert restore["archive"] == f"{site}-2026"


def test_a_box_whose_people_chose_their_passwords_keeps_its_accounts(snapshot, tmp_path):
    box = _flashed(tmp_path / "new")
    users = Users.from_settings(box)
    token, _ = users.login("admin", box.admin_password, "x")
    users.change_password("admin", box.admin_password, "chosen here, 2026", token)
    users.close()
    said = appliance_state.put_back(box, snapshot, "field-7-2026", whole=True, site="field-7")
    assert said["accounts"].startswith("this box's own kept") and _names(box) == {"admin"}
