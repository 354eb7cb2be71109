"""The base role as HQ's box runs it (ansible/hq.yml puts it first), seen from inside through
Ansible's nsenter connection. Clinics get the same role from the image's playbook, checked on
the booted tree (tests/integration/test_appliance_container.py) and the flashed image."""

from __future__ import annotations


def test_the_administrator_gets_in_with_hqs_key_and_sudo_only(host):
    admin = host.user("gotgadmin")
    assert "sudo" in admin.groups
    assert admin.password == "!", "no password to guess"
    assert host.file("/home/gotgadmin/.ssh/authorized_keys").contains(" hq$")
    effective = host.run("sshd -T").stdout.lower()  # what sshd will really do
    for line in ("permitrootlogin no", "passwordauthentication no",
                 "kbdinteractiveauthentication no", "allowusers gotgadmin",
                 "allowusers gotg-backup"):
        assert line in effective.splitlines(), line
    assert host.service("ssh").is_running


def test_the_firewall_answers_dicom_and_https_and_ssh_from_hq_only(host):
    rules = host.run("nft list chain inet gotg input").stdout
    assert "policy drop;" in rules
    assert "tcp dport { 80, 443, 4242 } accept" in rules
    assert "ip saddr 10.99.0.0/24 tcp dport 22 accept" in rules
    assert "tcp dport 22 accept" not in rules.replace("ip saddr 10.99.0.0/24 tcp dport 22", "")
    assert host.service("nftables").is_enabled


def test_the_sd_card_is_spared(host):
    assert host.file("/etc/systemd/journald.conf.d/10-gotg.conf").contains("^Storage=volatile")
    in_fstab = host.run("findmnt --fstab --noheadings --output FSTYPE,OPTIONS /tmp").stdout
    assert in_fstab.split()[0] == "tmpfs" and "size=" in in_fstab, "/tmp in RAM, capped"
    assert host.run("swapon --show --noheadings").stdout.strip() == ""
    assert host.service("chrony").is_enabled
