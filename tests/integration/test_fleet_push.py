"""HQ pushing an update to several clinics: a canary first, offline sites left for later.

Why it matters: HQ updates every site over whatever link exists. A bad change must stop at the
first site instead of breaking the fleet, and a site that is offline for weeks must not fail
the rollout. The sites are booted appliance trees (systemd-nspawn, each its own network) reached
by Ansible through `nsenter`, the way a push reaches a running box; the playbook is the real
ansible/clinic.yml.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from gotg_pacs.process import wait_until
from tests.support.container import Container, Overlay, push, recaps

pytestmark = pytest.mark.timeout(1500)

SITES = ("site-a", "site-b")  # site-a comes first in the inventory: it is the canary


def _inventory(path, pids: dict[str, int], site: dict, per_host: dict[str, dict]) -> None:
    hosts = {name: {"ansible_connection": "community.docker.nsenter", "ansible_nsenter_pid": pid,
                    **per_host.get(name, {})} for name, pid in pids.items()}
    path.write_text(yaml.safe_dump({"clinics": {"hosts": hosts,
                                                "vars": {**site, "clinic_reach_timeout": 5}}}))


def _name(box: Container) -> str:
    answer = box.in_net("curl", "-sf", "-u", "admin:container-admin-pw",
                        "http://127.0.0.1:8042/system")
    return json.loads(answer.stdout)["Name"] if answer.returncode == 0 else ""


def test_a_push_goes_canary_first_leaves_offline_sites_and_settles(clinic_tree, clinic_site,
                                                                   tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a site that does not answer: its process is gone
    overlays, boxes = [], {}
    try:
        for name in SITES:
            overlays.append(Overlay(clinic_tree, tmp_path / name))
            boxes[name] = Container(overlays[-1].merged, tmp_path / f"{name}.console")
        for box in boxes.values():
            assert box.wait_booted(), box.console_text()
            assert wait_until(lambda box=box: box.active("orthanc"), 60)
        before = {name: _name(box) for name, box in boxes.items()}
        pids = {**{name: box.init_pid for name, box in boxes.items()}, "site-c": gone.pid}
        inventory = tmp_path / "hosts.yml"

        # A release with a setting the canary's pacs refuses: the rollout stops at the canary.
        release = {**clinic_site, "pacs_config_pacs_name": "Release 2"}
        _inventory(inventory, pids, release, {"site-a": {"pacs_config_dicom_port": "99999"}})
        stopped = push(inventory, "clinic.yml")
        assert stopped.returncode != 0
        assert "DICOM_PORT" in stopped.stdout, stopped.stdout[-3000:]
        hosts = recaps(stopped.stdout)
        assert hosts["site-a"]["failed"] == 1
        assert hosts["site-b"]["changed"] == 0, "no site after a failed canary is touched"
        assert {name: _name(box) for name, box in boxes.items()} == before
        assert all(box.active("orthanc") for box in boxes.values()), "the canary keeps running"

        # The fixed release: every reachable site updated and restarted, the offline one left.
        _inventory(inventory, pids, release, {})
        pushed = push(inventory, "clinic.yml")
        hosts = recaps(pushed.stdout)
        assert hosts["site-a"]["failed"] == 0 and hosts["site-b"]["failed"] == 0, \
            pushed.stdout[-3000:]
        assert pushed.returncode == 0, "an offline site does not fail the rollout"
        assert hosts["site-c"]["changed"] == 0 and hosts["site-c"]["ignored"] == 1
        update = pushed.stdout.split("PLAY [Update the clinics", 1)[1]
        assert "[site-c]" not in update, "the offline site waits for the next push"
        for box in boxes.values():
            assert wait_until(lambda box=box: _name(box) == "Release 2", 60), \
                "the new settings are in force after the push"
            assert box.active("pacs-sync")
        batches = [line for line in pushed.stdout.splitlines()
                   if line.startswith("PLAY [Update the clinics")]
        assert len(batches) == 2, "a canary batch, then the rest"
        # The same release pushed again changes nothing: clinic.yml's roles are proven so on
        # booted boxes by the role scenarios' idempotence step (molecule base and clinic), and
        # the whole playbook on the built tree by test_appliance_container.
    finally:
        for box in boxes.values():
            box.stop()
            box.kill()
        for overlay in overlays:
            overlay.close()
