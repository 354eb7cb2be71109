"""The clinic as it ships: a Debian 13 tree made by the image builder and the clinic playbook,
booted with its own systemd, network and firewall.

Why it matters: this is what a clinic receives and what HQ pushes. The roles must build it from
nothing, a second push must change nothing, the units must start Orthanc the appliance's way
(storage locked, configuration from pacs.env, recovery after an unclean stop) and keep every
service sandboxed, and a modality on the LAN must reach DICOM and nothing else.
"""

from __future__ import annotations

import json
import re
import socket
import ssl

import pydicom
import pytest
from hl7.client import MLLPClient
from pydicom.uid import generate_uid

from gotg_pacs.process import wait_until
from tests.support import corpus, mpps
from tests.support.container import CLINIC_SITE, Container, apply_again, recaps
from tests.support.dcmtk import Modality, acknowledged_before
from tests.support.mpps import MppsModality

pytestmark = pytest.mark.timeout(1500)

PASSWORD = CLINIC_SITE["pacs_config_admin_password"]
HL7_ORDER = "\r".join([
    "MSH|^~\\&|RIS|LAN|GOTG_PACS|FIELD7|20261127101500||ORM^O01|BOX-1|P|2.5.1",
    "PID|1||PAT-BOX^^^FIELD7^MR||Doe^Jane||19800102|F",
    "ORC|NW|PL1|FL1||SC||^^^20261127110000",
    "OBR|1|PL1|FL1|CXR^Chest X-ray^LOCAL||||||||||||||ACC-BOX-1|RP1|SPS1||||CR",
])


def _rest(box: Container, path: str) -> object:
    answer = box.in_net("curl", "-sf", "-u", f"admin:{PASSWORD}", f"http://127.0.0.1:8042{path}")
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)


def _reachable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return True
    except OSError:
        return False


def test_a_second_push_changes_nothing(clinic_tree, clinic_site):
    again = apply_again(clinic_tree, clinic_site)
    assert again.returncode == 0, again.stdout[-3000:]
    recap = next(iter(recaps(again.stdout).values()))
    assert recap["failed"] == 0 and recap["changed"] == 0, again.stdout[-3000:]
    checked = apply_again(clinic_tree, clinic_site, "--check")
    assert checked.returncode == 0, checked.stdout[-3000:]
    assert next(iter(recaps(checked.stdout).values()))["changed"] == 0, checked.stdout[-3000:]


def test_the_tree_is_built_for_a_clinic(clinic_tree):
    env = clinic_tree / "etc/gotg-pacs/pacs.env"
    assert oct(env.stat().st_mode & 0o777) == "0o640"
    assert 'PACS_NAME="Field hospital 7 <b>é</b>"' in env.read_text(encoding="utf-8")
    # Installed from the shipped wheelhouse only, and the packaged Orthanc unit is replaced.
    version = (clinic_tree / "opt/gotg-pacs/wheelhouse").iterdir().__next__()
    assert (version / "VERSION").read_text().strip() == version.name
    assert (clinic_tree / "opt/gotg-pacs/venv/bin/pacs").exists()
    unit = (clinic_tree / "etc/systemd/system/orthanc.service").read_text()
    assert "ExecStart=/opt/gotg-pacs/venv/bin/pacs orthanc serve" in unit
    firewall = (clinic_tree / "etc/nftables.conf").read_text()
    assert "ip saddr { 10.99.0.0/24 } tcp dport 22 accept" in firewall
    assert "tcp dport $gotg_open_tcp accept" in firewall
    ports = (clinic_tree / "etc/nftables.d/gotg-open-ports.nft").read_text()
    assert "define gotg_open_tcp = { 4242, 80, 443, 2575, 4243 }" in ports, \
        "DICOM, the HTTPS origin, HL7 and MPPS"
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in unit, "DICOM_PORT 104 can be bound"
    journald = clinic_tree / "etc/systemd/journald.conf.d/10-gotg.conf"
    assert "Storage=volatile" in journald.read_text()
    fstab = (clinic_tree / "etc/fstab").read_text()
    assert re.search(r"^tmpfs\s+/tmp\s+tmpfs\s+\S*size=", fstab, re.M)
    assert (clinic_tree / "etc/machine-id").read_text() == "", "every box makes its own machine id"
    unit = (clinic_tree / "etc/systemd/system/nginx.service").read_text()
    assert "ExecStart=/opt/gotg-pacs/venv/bin/pacs web serve --appliance\n" in unit


def test_the_booted_clinic_takes_images_through_its_firewall(clinic_tree, tmp_path):
    box = Container(clinic_tree, tmp_path / "console.log")
    try:
        assert box.wait_booted(), box.console_text()
        assert wait_until(lambda: box.active("orthanc") and box.active("pacs-sync"), 60), \
            box.run("systemctl", "--no-pager", "status", "orthanc", "pacs-sync").stdout
        modality = Modality("FIELD7", 4242, host=box.address)
        assert modality.echo().ok
        files = corpus.representative()[:4]
        assert modality.store(files).ok
        stats = _rest(box, "/statistics")
        assert stats["CountInstances"] == len(files)
        # The LAN reaches DICOM and the HTTPS origin, whose CA the box made at its first start;
        # Orthanc's REST API and everything else are closed to it.
        # nginx's unit is active from the moment `pacs web serve` runs, before it has made the
        # CA and become nginx: the origin is ready when it listens.
        assert wait_until(lambda: _reachable(box.address, 443), 60), box.run(
            "journalctl", "--no-pager", "-u", "nginx").stdout[-2000:]
        ca = box.run("cat", "/var/lib/gotg-pacs/state/tls/ca-chain.crt")
        assert "BEGIN CERTIFICATE" in ca.stdout, ca.stderr  # empty would trust the system's CAs
        context = ssl.create_default_context(cadata=ca.stdout)
        context.check_hostname = False  # the chain only: the address may postdate the start
        with socket.create_connection((box.address, 443), timeout=10) as raw, \
                context.wrap_socket(raw) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert _reachable(box.address, 80)
        assert _reachable(box.address, 4242)
        # A RIS on the LAN sends an order over HL7: pacs-ris keeps it and writes the item,
        # Orthanc (another user) answers the modality's worklist query with it.
        assert wait_until(lambda: _reachable(box.address, 2575), 60), box.run(
            "journalctl", "--no-pager", "-u", "pacs-ris").stdout[-2000:]
        with MLLPClient(box.address, 2575) as ris:
            ack = ris.send_message(HL7_ORDER.encode())
        assert b"MSA|AA|BOX-1" in ack, ack
        [item] = modality.find_worklist({"PatientName": "", "AccessionNumber": ""},
                                        tmp_path / "worklist")
        assert (str(item.PatientName), str(item.AccessionNumber)) == ("Doe^Jane", "ACC-BOX-1")
        # The modality reports the exam done (MPPS, through the firewall): the item expires.
        performed, uid = MppsModality(4243, "FIELD7", host=box.address), generate_uid()
        assert performed.create(uid, mpps.step("ACC-BOX-1")) == 0x0000
        assert performed.set(uid, "COMPLETED") == 0x0000
        assert modality.find_worklist({"AccessionNumber": ""}, tmp_path / "worklist-after") == []
        assert not _reachable(box.address, 8042)
        assert not _reachable(box.address, 5432)
        for unit, user in (("orthanc", "orthanc"), ("pacs-sync", "gotg-pacs"),
                           ("pacs-ris", "gotg-pacs")):
            shown = dict(line.split("=", 1) for line in box.run(
                "systemctl", "show", unit, "-p", "User", "-p", "NoNewPrivileges", "-p",
                "ProtectSystem", "-p", "PrivateTmp", "-p", "MemoryMax").stdout.split())
            assert shown["User"] == user and shown["NoNewPrivileges"] == "yes"
            assert shown["ProtectSystem"] == "strict" and shown["PrivateTmp"] == "yes"
            assert shown["MemoryMax"] != "infinity"
        box.stop()
        assert box.process.returncode is not None
        assert (clinic_tree / "var/lib/gotg-pacs/orthanc/storage/.pacs-clean-stop").exists(), \
            "an orderly shutdown is recorded as a clean stop"
    finally:
        box.kill()


def test_every_acknowledged_image_survives_all_processes_dying_at_once(clinic_tree, tmp_path):
    sources = corpus.renumbered_copies(corpus.representative()[:3], 12, tmp_path / "copies")
    box = Container(clinic_tree, tmp_path / "console-1.log")
    try:
        assert box.wait_booted(), box.console_text()
        assert wait_until(lambda: box.active("orthanc"), 60)
        before = _rest(box, "/statistics")["CountInstances"]
        modality = Modality("FIELD7", 4242, host=box.address, timeout=30)
        acknowledged = acknowledged_before(modality, sources, box.kill, after=8)
    finally:
        box.kill()
    assert len(acknowledged) < len(sources), "the cut came in the middle of the storing"
    assert not (clinic_tree / "var/lib/gotg-pacs/orthanc/storage/.pacs-clean-stop").exists()

    box = Container(clinic_tree, tmp_path / "console-2.log")
    try:
        assert box.wait_booted(), box.console_text()
        assert wait_until(lambda: box.active("orthanc"), 120), box.console_text()
        held = {row for row in _rest(box, "/instances")}
        assert len(held) >= before + len(acknowledged)
        for path in acknowledged:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            found = box.in_net("curl", "-sf", "-u", f"admin:{PASSWORD}", "-X", "POST",
                               "-d", json.dumps({"Level": "Instance",
                                                 "Query": {"SOPInstanceUID": uid}}),
                               "http://127.0.0.1:8042/tools/find")
            assert json.loads(found.stdout), f"{path.name} was acknowledged, then lost"
        journal = box.run("journalctl", "--no-pager", "-u", "orthanc").stdout
        assert "Orthanc is up;" in journal, journal[-2000:]
    finally:
        box.stop()
        box.kill()
