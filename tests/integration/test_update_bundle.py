"""A USB update bundle applied at a clinic no push can reach.

Why it matters: a site may be offline for weeks. HQ writes a bundle for it (image-build/bundle.py)
and someone at the site runs its `apply`: the same clinic playbook, run on the box with no network.
The bundle must carry no secret (a stick gets lost), keep the box's own, refuse a damaged copy or
another site's bundle without changing anything, and a second run must change nothing. The box is
a booted appliance tree (systemd-nspawn) whose only link is to this machine: no internet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest
import yaml

from gotg_pacs.process import wait_until
from tests.support.container import REPO, Container, Overlay, recaps

pytestmark = pytest.mark.timeout(1500)

BUNDLE = REPO / "image-build" / "bundle.py"
HQ_SECRET = "only-in-hq-vault-7c1e"


def _make_bundle(host: str, site: dict, where) -> dict:
    """A bundle from an HQ inventory holding this site, its secrets behind the vault names."""
    where.mkdir()
    inventory = where / "hosts.yml"
    variables = {key: value for key, value in site.items()
                 if key not in ("pacs_config_admin_password", "pacs_services_wheelhouse")}
    variables.update(pacs_config_admin_password="{{ vault_admin_password }}",
                     vault_admin_password=HQ_SECRET, ansible_user="gotgadmin",
                     ansible_host="10.20.9.1")
    inventory.write_text(yaml.safe_dump({"clinics": {"hosts": {host: variables}}}))
    made = subprocess.run([sys.executable, str(BUNDLE), "--host", host, "--inventory",
                           str(inventory), "--wheelhouse", site["pacs_services_wheelhouse"],
                           "--out", str(where)], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    return json.loads(made.stdout.splitlines()[-1])


def _unpack(bundle: dict, into) -> str:
    """Onto the 'USB stick' inside the box; returns the apply command's path there."""
    with tarfile.open(bundle["bundle"]) as tar:
        tar.extractall(into, filter="tar")
    name = f"gotg-update-{bundle['host']}-{bundle['version']}"
    return f"/media/usb/{name}/apply"


def test_a_bundle_updates_an_offline_clinic_and_keeps_its_secrets(clinic_tree, clinic_site,
                                                                   tmp_path):
    release = {**clinic_site, "pacs_config_pacs_name": "Field hospital 7, ward B"}
    bundle = _make_bundle("field-7", release, tmp_path / "hq")
    other = _make_bundle("field-9", {**release, "pacs_config_site_code": "field-9"},
                         tmp_path / "hq-other")
    with tarfile.open(bundle["bundle"]) as tar:
        carried = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()
                           and not m.name.endswith((".whl", ".so")))
    assert HQ_SECRET.encode() not in carried, "a lost stick must not hold the site's secrets"
    assert clinic_site["pacs_config_admin_password"].encode() not in carried
    assert b"10.20.9.1" not in carried, "nor how HQ reaches the site"

    overlay = Overlay(clinic_tree, tmp_path / "box")
    box = None
    try:
        usb = overlay.merged / "media/usb"
        usb.mkdir(parents=True)
        apply = _unpack(bundle, usb)
        apply_other = _unpack(other, usb)
        box = Container(overlay.merged, tmp_path / "console.log")
        assert box.wait_booted(), box.console_text()
        assert wait_until(lambda: box.active("orthanc"), 60)
        env = overlay.merged / "etc/gotg-pacs/pacs.env"
        before = env.read_text()
        assert box.run("ip", "route", "get", "1.1.1.1").returncode != 0, "the box is offline"

        refused = box.run(apply_other, timeout=120)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "for site 'field-9', this box is site 'field-7'" in refused.stderr
        assert "nothing changed" in refused.stderr

        top = usb / f"gotg-update-field-7-{bundle['version']}"
        role_defaults = top / "roles/base/defaults/main.yml"
        original = role_defaults.read_text()
        role_defaults.write_text(original + "base_ssh_allowed_from: []\n")  # tampered
        damaged = box.run(apply, timeout=120)
        assert damaged.returncode == 2 and "damaged" in damaged.stderr, damaged.stderr
        role_defaults.write_text(original)
        assert env.read_text() == before

        applied = box.run(apply, timeout=900)
        assert applied.returncode == 0, applied.stdout[-4000:] + applied.stderr[-2000:]
        recap = recaps(applied.stdout)["field-7"]
        assert recap["failed"] == 0 and recap["changed"] > 0, applied.stdout[-3000:]
        after = env.read_text()
        assert 'PACS_NAME="Field hospital 7, ward B"' in after
        assert f'ADMIN_PASSWORD="{clinic_site["pacs_config_admin_password"]}"' in after, \
            "the box keeps its own password"
        assert wait_until(lambda: box.active("orthanc") and box.active("pacs-sync"), 120)
        logs = list((overlay.merged / "var/lib/gotg-pacs/updates").glob("*.log"))
        assert len(logs) == 1 and "PLAY RECAP" in logs[0].read_text()

        again = box.run(apply, timeout=900)
        assert again.returncode == 0, again.stdout[-3000:]
        assert recaps(again.stdout)["field-7"]["changed"] == 0, again.stdout[-3000:]
    finally:
        if box:
            box.stop()
        overlay.close()
