"""HQ's archive server as ansible/hq.yml makes it: Orthanc on PostgreSQL and the sync receiver.

Why it matters: every clinic's studies end up here. The playbook must install it, create the
index database on the running server (never in an image build), start Orthanc on that database
and not on a SQLite file beside it, and run the receiver sandboxed; a second push changes nothing.
The server is a Debian 13 tree booted with systemd-nspawn and reached through `nsenter`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from gotg_pacs.process import wait_until
from tests.support.container import ROOTFS, Container, push, recaps

pytestmark = pytest.mark.timeout(1500)

PASSWORD = "hq-admin-password"


@pytest.fixture(scope="module")
def hq_site(clinic_site) -> dict:
    return {"pacs_services_wheelhouse": clinic_site["pacs_services_wheelhouse"],
            "pacs_config_site_code": "hq", "pacs_config_orthanc_index": "postgresql",
            "pacs_config_postgresql_host": "/run/postgresql",
            "pacs_config_admin_password": PASSWORD,
            "orthanc_extra_packages": ["orthanc-postgresql"],
            "pacs_services_units": [{"name": "pacs-hq", "description": "HQ sync receiver",
                                     "args": "hq run", "memory_max": "1G"}]}


@pytest.fixture(scope="module")
def hq_tree(tmp_path_factory, hq_site):
    where = tmp_path_factory.mktemp("hq-server")
    (where / "vars.json").write_text(json.dumps(hq_site))
    with (where / "build.log").open("w") as log:
        subprocess.run([sys.executable, str(ROOTFS), "--target", "hq", "--out",
                        str(where / "rootfs"), "--vars", str(where / "vars.json")], check=True,
                       stdout=log, stderr=log, timeout=1200)
    return where / "rootfs"


def test_the_hq_playbook_brings_up_orthanc_on_postgresql_and_the_receiver(hq_tree, hq_site,
                                                                          tmp_path):
    box = Container(hq_tree, tmp_path / "console.log")
    try:
        # Built in a chroot, the server has no index database yet: Orthanc's start waits for
        # the push that makes it, so the boot is still "starting" when the push comes.
        assert box.wait_booted(states=("starting", "running", "degraded")), box.console_text()
        assert wait_until(lambda: box.active("postgresql"), 60)
        inventory = tmp_path / "hosts.yml"
        inventory.write_text(yaml.safe_dump({"hq": {"hosts": {"hq-archive": {
            "ansible_connection": "community.docker.nsenter",
            "ansible_nsenter_pid": box.init_pid}}, "vars": hq_site}}))
        pushed = push(inventory, "hq.yml")
        assert pushed.returncode == 0, pushed.stdout[-4000:]
        assert wait_until(lambda: box.active("orthanc") and box.active("pacs-hq"), 120), \
            box.run("journalctl", "--no-pager", "-u", "orthanc", "-n", "40").stdout

        system = json.loads(box.in_net("curl", "-sf", "-u", f"admin:{PASSWORD}",
                                       "http://127.0.0.1:8042/system").stdout)
        assert system["DatabaseBackendPlugin"], "Orthanc's index is in PostgreSQL"
        tables = box.run("runuser", "-u", "postgres", "--", "psql", "-tA", "-d", "orthanc",
                         "-c", "select count(*) from information_schema.tables "
                               "where table_name = 'resources'").stdout.strip()
        assert tables == "1", "Orthanc made its tables in the orthanc database"
        # The receiver answers on loopback, only to sites with a credential from the CLI.
        def holdings(*headers: str) -> str:
            return box.in_net("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *headers,
                              "-H", "Content-Type: application/json", "-d", '{"instances": []}',
                              "http://127.0.0.1:7000/api/v1/holdings").stdout

        assert holdings() == "401"
        added = box.run("pacs", "hq", "site", "add", "mobile-3", "--json")
        assert added.returncode == 0, added.stderr
        token = json.loads(added.stdout)["hq_token"]
        assert holdings("-H", f"Authorization: Bearer {token}") == "200"
        shown = dict(line.split("=", 1) for line in box.run(
            "systemctl", "show", "pacs-hq", "-p", "User", "-p", "ProtectSystem").stdout.split())
        assert shown == {"User": "gotg-pacs", "ProtectSystem": "strict"}

        again = push(inventory, "hq.yml")
        assert again.returncode == 0 and recaps(again.stdout)["hq-archive"]["changed"] == 0, \
            again.stdout[-4000:]
    finally:
        box.stop()
        box.kill()
