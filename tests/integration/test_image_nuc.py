"""The NUC image as a clinic flashes it: built, booted under qemu, used, and unplugged.

Why it matters: the image is what a clinic receives. It must boot by itself (UEFI, systemd-boot),
grow to the disk it was written to, make its own SSH keys, answer DICOM from the LAN and nothing
else, and keep every image it acknowledged when the power goes mid-transfer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests

from gotg_pacs.process import wait_until
from tests.support import corpus
from tests.support.container import REPO
from tests.support.dcmtk import Modality
from tests.support.site import free_port
from tests.support.vm import VM

pytestmark = pytest.mark.timeout(2400)

AET = "GOTG_PACS"


@pytest.fixture(scope="module")
def nuc_image(tmp_path_factory, clinic_site) -> Path:
    where = tmp_path_factory.mktemp("nuc-image")
    site = {**clinic_site, "pacs_config_pacs_aet": AET, "pacs_config_site_code": "nuc-test"}
    (where / "site.json").write_text(json.dumps(site))
    with (where / "build.log").open("w") as log:
        built = subprocess.run([sys.executable, str(REPO / "image-build" / "image.py"),
                                "--target", "nuc", "--out", str(where), "--vars",
                                str(where / "site.json")], stdout=subprocess.PIPE, stderr=log,
                               text=True, timeout=1800)
    assert built.returncode == 0, (where / "build.log").read_text()[-3000:]
    return Path(json.loads(built.stdout.splitlines()[-1])["image"])


def _partitions(image: Path) -> list[dict]:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True,
                                      capture_output=True, text=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    return table["partitions"]


def test_the_image_is_laid_out_for_uefi_and_checksummed(nuc_image):
    sums = subprocess.run(["sha256sum", "-c", nuc_image.name + ".sha256"], cwd=nuc_image.parent,
                          capture_output=True, text=True)
    assert sums.returncode == 0, sums.stdout + sums.stderr
    esp, root = _partitions(nuc_image)
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    probe = subprocess.run(["blkid", "-p", "-O", str(root["start"] * 512), "-o", "export",
                            str(nuc_image)], capture_output=True, text=True).stdout
    assert "LABEL=gotg-root" in probe and "TYPE=ext4" in probe
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
    where = f"{nuc_image}@@{esp['start'] * 512}"
    entry = subprocess.run(["mtype", "-i", where, "::/loader/entries/gotg.conf"], env=env,
                           capture_output=True, text=True).stdout
    assert "root=LABEL=gotg-root" in entry and "linux /vmlinuz" in entry
    listing = subprocess.run(["mdir", "-i", where, "-b", "::/EFI/BOOT"], env=env,
                             capture_output=True, text=True).stdout
    assert "BOOTX64.EFI" in listing.upper()


def _echo(modality: Modality) -> bool:
    return modality.echo().ok


def _held(modality: Modality, uid: str, scratch: Path) -> bool:
    answers = modality.find({"SOPInstanceUID": uid}, scratch / uid, level="IMAGE")
    return any(str(a.get("SOPInstanceUID", "")) == uid for a in answers)


def test_the_flashed_box_boots_answers_dicom_and_keeps_what_it_acknowledged(nuc_image, tmp_path):
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(nuc_image), str(disk)], check=True)
    with disk.open("r+b") as handle:  # the clinic's disk is larger than the image
        handle.truncate(disk.stat().st_size + 2 * 1024**3)
    dicom, http = free_port(), free_port()
    vm = VM(disk, tmp_path, {4242: dicom, 8042: http})
    modality = Modality(AET, dicom, timeout=60)
    try:
        vm.start()
        assert wait_until(lambda: _echo(modality), 900, interval=5), vm.console_text()[-3000:]
        console = vm.console_text()
        assert "gotg-firstboot: root partition grown" in console, console[-3000:]
        assert "gotg-firstboot: SSH host keys made" in console

        files = corpus.representative()[:3]
        assert modality.store(files).ok
        for path in files:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert _held(modality, uid, tmp_path / "find")
        with pytest.raises(requests.RequestException):  # Orthanc's REST is not for the LAN
            requests.get(f"http://127.0.0.1:{http}/system", timeout=5)

        # Unplug it while a modality is sending, one image per association.
        copies = corpus.renumbered_copies(corpus.representative()[:2], 20, tmp_path / "copies")
        acknowledged: list[Path] = []
        stop = threading.Event()

        def send() -> None:
            for path in copies:
                if stop.is_set():
                    return
                if Modality(AET, dicom, timeout=30).store([path]).ok:
                    acknowledged.append(path)

        sender = threading.Thread(target=send)
        sender.start()
        assert wait_until(lambda: len(acknowledged) >= 5, 600, interval=0.1)
        vm.power_off()
        stop.set()
        sender.join(120)
        assert len(acknowledged) < len(copies), "the power went in the middle of the sending"
        time.sleep(1)

        vm.start()
        assert wait_until(lambda: _echo(modality), 900, interval=5), vm.console_text()[-3000:]
        assert "gotg-firstboot" not in vm.console_text(), "the first boot happens once"
        for path in acknowledged:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert _held(modality, uid, tmp_path / "find-after"), \
                f"{path.name} was acknowledged before the power went, then lost"
    finally:
        vm.power_off()
        shutil.rmtree(tmp_path / "copies", ignore_errors=True)
