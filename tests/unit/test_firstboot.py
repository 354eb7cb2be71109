"""First boot from the site file on the boot partition.

Why it matters: this file is how a clinician with a laptop turns a flashed image into their
site. A mistake in it must change nothing and say what is wrong; a good one must give the box
its settings, its network and a password of its own, and leave no secret on the FAT partition.
"""

from __future__ import annotations

import jinja2
import pytest

from gotg_pacs.config import load
from gotg_pacs.firstboot import NETWORK_FILE, PASSWORD_FILE, SiteFileError, apply, forget_password
from tests.conftest import REPO

IMAGE_ENV = ('PACS_NAME="GOTG PACS"\nPACS_AET="GOTG_PACS"\nADMIN_PASSWORD="image-placeholder"\n'
             'STORAGE_PATH="/var/lib/gotg-pacs/orthanc"\n')


@pytest.fixture
def env_file(tmp_path):
    path = tmp_path / "pacs.env"
    path.write_text(IMAGE_ENV)
    path.chmod(0o640)
    return path


def test_a_good_site_file_becomes_the_sites_configuration(env_file, tmp_path):
    site = tmp_path / "gotg-site.txt"
    site.write_text("# Mobile clinic 3\nPACS_NAME=Mobile clinic 3 <i>é</i>\nPACS_AET=MOBILE3\n"
                    "SITE_CODE=mobile-3\nHQ_URL=https://hq.example.org/sync\n"
                    "HQ_TOKEN=site-secret-token\nNETWORK_ADDRESS=192.168.8.20/24\n"
                    "NETWORK_GATEWAY=192.168.8.1\nNETWORK_DNS=192.168.8.1, 9.9.9.9\n")
    report = apply(env_file, site, tmp_path / "network")
    settings = load(env_file)
    assert settings.pacs_name == "Mobile clinic 3 <i>é</i>" and settings.pacs_aet == "MOBILE3"
    assert settings.hq_token == "site-secret-token"
    assert settings.admin_password == report.admin_password != "image-placeholder"
    assert len(report.admin_password) >= 12
    assert oct(env_file.stat().st_mode & 0o777) == "0o640"
    network = (tmp_path / "network" / NETWORK_FILE).read_text()
    assert "Address=192.168.8.20/24" in network and "Gateway=192.168.8.1" in network
    assert "DNS=9.9.9.9" in network
    left = site.read_text()
    assert "site-secret-token" not in left and "PACS_AET=MOBILE3" in left
    assert report.scrubbed == ["HQ_TOKEN"]
    assert "DICOM AE title MOBILE3 on port 4242" in report.summary()


def test_no_site_file_still_gives_the_box_its_own_password(env_file, tmp_path):
    first = apply(env_file, None, tmp_path / "network", boot_dirs=()).admin_password
    second = apply(env_file, None, tmp_path / "network", boot_dirs=()).admin_password
    assert first != second and load(env_file).admin_password == second
    assert not (tmp_path / "network").exists(), "no static address: DHCP stays"


@pytest.mark.parametrize(("text", "named"), [
    ("PACS_ATE=MOBILE3\n", "PACS_AET"),                         # a typo: did you mean
    ("PACS_AET=THIS-AE-TITLE-IS-FAR-TOO-LONG\n", "PACS_AET"),
    ("STORAGE_PATH=/mnt/usb\n", "STORAGE_PATH"),
    ("NETWORK_ADDRESS=192.168.8.20\n", "NETWORK_ADDRESS"),      # no prefix length
    ("NETWORK_ADDRESS=192.168.8.20/24\nNETWORK_GATEWAY=10.0.0.1\n", "NETWORK_GATEWAY"),
    ("HQ_URL=https://hq.example.org/sync\n", "HQ_TOKEN"),       # a URL without credential
    ('PACS_NAME="unclosed\n', "PACS_NAME"),
])
def test_a_mistake_changes_nothing_and_is_named(env_file, tmp_path, text, named):
    site = tmp_path / "gotg-site.txt"
    site.write_text(text)
    with pytest.raises(SiteFileError, match=named):
        apply(env_file, site, tmp_path / "network")
    assert env_file.read_text() == IMAGE_ENV
    assert site.read_text() == text
    assert not (tmp_path / "network").exists()


def test_a_password_chosen_in_the_site_file_is_kept_and_removed_from_the_card(env_file,
                                                                               tmp_path):
    site = tmp_path / "gotg-site.txt"
    site.write_text("ADMIN_PASSWORD=chosen-by-the-clinic\n")
    report = apply(env_file, site, tmp_path / "network")
    assert load(env_file).admin_password == "chosen-by-the-clinic"
    assert report.admin_password == "" and report.scrubbed == ["ADMIN_PASSWORD"]
    assert "chosen-by-the-clinic" not in site.read_text()


def test_a_made_password_waits_on_the_boot_partition_until_the_admin_has_their_own(env_file,
                                                                                  tmp_path):
    boot = tmp_path / "boot"
    boot.mkdir()
    report = apply(env_file, None, tmp_path / "network", boot_dirs=(boot,))
    copy = boot / PASSWORD_FILE
    assert report.password_file == str(copy)
    assert report.admin_password in copy.read_text()
    assert forget_password((boot,)) == [str(copy)]
    assert not copy.exists() and forget_password((boot,)) == []


def test_a_password_the_site_chose_is_not_copied_anywhere(env_file, tmp_path):
    site = tmp_path / "gotg-site.txt"
    site.write_text("ADMIN_PASSWORD=chosen-by-the-site\n")
    report = apply(env_file, site, tmp_path / "network")
    assert report.admin_password == "" and report.password_file == ""
    assert not (tmp_path / PASSWORD_FILE).exists()
    assert "chosen-by-the-site" not in site.read_text()


def test_the_firewall_follows_a_port_the_site_file_moves(env_file, tmp_path):
    """Many modalities are set to send to port 104: a site file saying DICOM_PORT=104 must open
    104 in the firewall the image was built with (4242), or every image is refused at the door."""
    ports = tmp_path / "gotg-open-ports.nft"
    ports.write_text(_base_role_ports(4242, [80, 443, 2575, 4243]))
    site = tmp_path / "gotg-site.txt"
    site.write_text("DICOM_PORT=104\nHTTPS_PORT=8443\nHL7_PORT=6661\n")
    report = apply(env_file, site, tmp_path / "network", boot_dirs=(), firewall_ports=ports)
    assert report.open_ports == [104, 80, 8443, 6661, 4243]
    assert ports.read_text() == _base_role_ports(104, [80, 8443, 6661, 4243]), \
        "as the role writes it"
    assert "firewall opens 104, 80, 8443, 6661, 4243" in report.summary()
    # The same ports again (a first boot repeated after a power cut): nothing rewritten.
    again = apply(env_file, None, tmp_path / "network", boot_dirs=(), firewall_ports=ports)
    assert again.open_ports == []
    # No such file (not the appliance): none is made.
    apply(env_file, site, tmp_path / "network", boot_dirs=(),
          firewall_ports=tmp_path / "absent.nft")
    assert not (tmp_path / "absent.nft").exists()


def _base_role_ports(dicom: int, others: list[int]) -> str:
    """The base role's template rendered as Ansible renders it (its filters are Jinja's own)."""
    template = (REPO / "roles/base/templates/etc/nftables.d/gotg-open-ports.nft.j2").read_text()
    return jinja2.Template(template, keep_trailing_newline=True).render(
        base_dicom_port=str(dicom), base_open_tcp_ports=[str(port) for port in others])
