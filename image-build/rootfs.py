"""Build the appliance's root filesystem: Debian 13 by mmdebstrap, then the same roles HQ pushes.

The roles reach the new tree through Ansible's chroot connection from mmdebstrap's customize
hook (when /proc, /sys and /dev are mounted inside), so an image and a pushed update are made by
one playbook. Nothing is started inside: the roles only enable services in a chroot.

    python image-build/rootfs.py --target nuc|pi4|container --out DIR [--vars FILE.json]

`container` is the NUC's tree without kernel and boot loader, booted by systemd-nspawn in tests.
(HQ's server is not imaged: HQ IT pushes ansible/hq.yml to a running Debian, as its role
scenario does.)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIRROR = os.environ.get("GOTG_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY = os.environ.get("GOTG_DEBIAN_SECURITY", "http://deb.debian.org/debian-security")
SUITE = "trixie"

# What every appliance needs before Ansible runs (Ansible itself needs python3 and python3-apt).
COMMON = ["systemd-sysv", "udev", "dbus", "systemd-resolved", "iproute2", "python3", "python3-apt",
          "ca-certificates", "locales", "netbase", "less", "nano"]
# cryptsetup and systemd's crypttab generator: `pacs data-disk prepare --encrypt` (LUKS2).
BOOTABLE = ["initramfs-tools", "e2fsprogs", "dosfstools", "cloud-guest-utils", "kmod", "fdisk",
            "cryptsetup-bin", "systemd-cryptsetup"]
TARGETS = {
    "container": {"arch": "amd64", "packages": [], "playbook": "clinic.yml"},
    "nuc": {"arch": "amd64", "packages": ["linux-image-amd64", "systemd-boot", "systemd-boot-efi",
                                          *BOOTABLE],
            "playbook": "image.yml", "boot": "/boot/efi"},
    "pi4": {"arch": "arm64", "packages": ["linux-image-arm64", "raspi-firmware", *BOOTABLE],
            "playbook": "image.yml", "boot": "/boot/firmware"},
}
# The CPU qemu-user emulates for a tree of another architecture. Its default ("max") emulates
# pointer authentication in software, and Debian's arm64 programs sign every return address:
# the Pi 4's own Cortex-A72 has no such instructions (they run as no-ops), and builds and runs
# an arm64 tree's programs about 15 times faster.
EMULATED_CPU = {"arm64": "cortex-a72"}
ROOT_LABEL = "gotg-root"
BOOT_LABEL = "GOTG-BOOT"
HOSTNAME = "gotg-pacs"
# A kernel's initramfs is made once, after the roles, not at every package that triggers it:
# each run costs minutes when the image is for another CPU (qemu-user), and only the last counts.
HOLD_INITRAMFS = ('chroot "$1" dpkg-divert --quiet --local --rename --add '
                  '/usr/sbin/update-initramfs && ln -s /bin/true "$1"/usr/sbin/update-initramfs')
MAKE_INITRAMFS = ('rm "$1"/usr/sbin/update-initramfs && chroot "$1" dpkg-divert --quiet --local '
                  '--rename --remove /usr/sbin/update-initramfs && '
                  'chroot "$1" update-initramfs -c -k all')


def sources() -> str:
    return "\n".join([f"deb {MIRROR} {SUITE} main non-free-firmware",
                      f"deb {MIRROR} {SUITE}-updates main non-free-firmware",
                      f"deb {SECURITY} {SUITE}-security main non-free-firmware"])


def playbook_command(root_dir: str, vars_file: Path | None,
                     playbook: str = "clinic.yml") -> list[str]:
    """ansible-playbook applying `playbook` to the tree at root_dir through a chroot."""
    inventory = (f"clinics:\n  hosts:\n    '{root_dir}':\n"
                 "      ansible_connection: community.general.chroot\n")
    inventory_file = Path(tempfile.mkdtemp(prefix="gotg-inventory-")) / "hosts.yml"
    inventory_file.write_text(inventory)
    command = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory_file),
               str(ROOT / "ansible" / playbook)]
    if vars_file:
        command += ["-e", f"@{vars_file}"]
    return command


def prepare_bootable(tree: Path, target: str) -> None:
    """What a booting box needs before the roles run: file systems, host name, network."""
    boot = TARGETS[target]["boot"]
    (tree / "etc/fstab").write_text(
        f"LABEL={ROOT_LABEL} / ext4 defaults,noatime 0 1\n"
        f"LABEL={BOOT_LABEL} {boot} vfat umask=0077,nofail 0 2\n")
    (tree / boot.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (tree / "etc/hostname").write_text(HOSTNAME + "\n")
    (tree / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n"
                                    "::1 localhost ip6-localhost ip6-loopback\n")
    network = tree / "etc/systemd/network/20-wired.network"
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text("[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n")
    subprocess.run(["chroot", str(tree), "systemctl", "enable", "systemd-networkd.service",
                    "systemd-resolved.service"], check=True, capture_output=True)
    if target == "pi4":
        pin_pi_boot_settings(tree)


def pin_pi_boot_settings(tree: Path) -> None:
    """raspi-firmware writes config.txt and cmdline.txt again at every kernel update on the box.
    Pinned here, it writes what the image ships: the root by label (an SD card or a USB disk
    alike), the Pi 4's consoles, and no CMA pool (a Pi 4 gets none; a headless box needs none),
    whatever machine the image happened to be built on."""
    defaults = tree / "etc/default/raspi-firmware"
    text = defaults.read_text()
    for name, value in (("ROOTPART", f"LABEL={ROOT_LABEL}"), ("CONSOLES", '"tty1 ttyS1,115200"'),
                        ("CMA", "0")):
        text += f"{name}={value}\n"
    defaults.write_text(text)


def _architecture(*root: str) -> str:
    return subprocess.run([*root, "dpkg", "--print-architecture"], check=True,
                          capture_output=True, text=True).stdout.strip()


def foreign(tree: Path) -> bool:
    """Whether the tree is for another CPU than this one (its programs run under qemu-user)."""
    return _architecture("chroot", str(tree)) != _architecture()


def emulation_env(env: dict[str, str], arch: str) -> dict[str, str]:
    """`env` for programs of `arch` run through qemu-user on this machine (EMULATED_CPU)."""
    if arch != _architecture() and arch in EMULATED_CPU:
        return {**env, "QEMU_CPU": EMULATED_CPU[arch]}
    return env


def apply(root_dir: Path, vars_file: Path | None, check: bool = False,
          playbook: str = "clinic.yml") -> None:
    command = playbook_command(str(root_dir), vars_file, playbook) + (["--check"] if check
                                                                     else [])
    env = {**ansible_env(), "ANSIBLE_PIPELINING": "1"}
    if foreign(root_dir):  # qemu-user has no netfilter netlink for `nft -c`
        command += ["-e", json.dumps({"base_firewall_validate": False})]
        env = emulation_env(env, _architecture("chroot", str(root_dir)))
    subprocess.run(command, check=True, env=env)


def ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible" / "ansible.cfg")
    env["ANSIBLE_NOCOLOR"] = "1"
    env.setdefault("ANSIBLE_FORCE_COLOR", "0")
    return env


def _with_placeholder_password(vars_file: Path | None, scratch: Path) -> Path:
    """An image needs some ADMIN_PASSWORD to pass `pacs config check`; a random one is fine
    because the first boot replaces it (no two boxes from one image share a password)."""
    values = json.loads(vars_file.read_text()) if vars_file else {}
    values.setdefault("pacs_config_admin_password", secrets.token_urlsafe(18))
    handle, path = tempfile.mkstemp(dir=scratch, prefix=".image-vars-", suffix=".json")
    with os.fdopen(handle, "w") as out:
        json.dump(values, out)
    return Path(path)


def build(target: str, out: Path, vars_file: Path | None, log=sys.stderr,
          bare: bool = False, extra_packages: tuple[str, ...] = ()) -> None:
    """The target's tree in `out`. `bare`: the same Debian, packages and preparation without the
    playbook (the baseline `make bench-image` boots beside the appliance, or a box a role
    scenario converges, with the role's `extra_packages` so it needs no network)."""
    spec = TARGETS[target]
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: give a new folder")
    # mmdebstrap passes the tree as $1; this same script prepares it and applies the playbook.
    me = [sys.executable, str(Path(__file__).resolve())]
    hooks = []
    if "boot" in spec:
        hooks.append("--essential-hook=" + HOLD_INITRAMFS)
        prepare = shlex.join([*me, "--prepare", target, "DIR"]).replace(" DIR", ' "$1"')
        hooks.append("--customize-hook=" + prepare)
    placeholder = None
    if not bare:
        if "boot" in spec:
            placeholder = _with_placeholder_password(vars_file, out.parent)
        vars_file = placeholder or vars_file
        apply = shlex.join([*me, "--apply-to", "DIR", "--playbook", spec["playbook"],
                            *(["--vars", str(vars_file.resolve())] if vars_file else [])])
        hooks.append("--customize-hook=" + apply.replace(" DIR", ' "$1"'))
    if "boot" in spec:
        hooks.append("--customize-hook=" + MAKE_INITRAMFS)
    command = ["mmdebstrap", "--variant=minbase", f"--architectures={spec['arch']}",
               "--include=" + ",".join([*COMMON, *spec["packages"], *extra_packages]),
               "--components=main,non-free-firmware",
               *hooks,
               "--customize-hook=rm -f \"$1\"/etc/machine-id && touch \"$1\"/etc/machine-id",
               SUITE, str(out), sources()]
    env = emulation_env(ansible_env(), spec["arch"])
    if os.environ.get("SOURCE_DATE_EPOCH"):
        env["SOURCE_DATE_EPOCH"] = os.environ["SOURCE_DATE_EPOCH"]
    try:
        subprocess.run(command, check=True, env=env, stdout=log, stderr=log)
    finally:
        if placeholder:
            placeholder.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=sorted(TARGETS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--apply-to", type=Path, default=None,
                        help="Only apply a playbook to this existing tree (a chroot).")
    parser.add_argument("--playbook", default="clinic.yml",
                        help="With --apply-to: the playbook in ansible/ (clinic.yml, image.yml).")
    parser.add_argument("--prepare", nargs=2, metavar=("TARGET", "TREE"), default=None,
                        help="Only write a bootable tree's fstab, host name and network.")
    parser.add_argument("--check", action="store_true",
                        help="With --apply-to: Ansible's check mode, changing nothing.")
    parser.add_argument("--vars", type=Path, default=None,
                        help="JSON file of Ansible variables (site settings).")
    parser.add_argument("--bare", action="store_true",
                        help="The target's Debian without the playbook (a baseline, or a box "
                             "for the role scenarios to converge).")
    args = parser.parse_args()
    if args.prepare:
        prepare_bootable(Path(args.prepare[1]), args.prepare[0])
        return 0
    if args.apply_to:
        apply(args.apply_to, args.vars, check=args.check, playbook=args.playbook)
        return 0
    if not args.target or not args.out:
        parser.error("--target and --out are required")
    if shutil.which("mmdebstrap") is None:
        raise SystemExit("mmdebstrap is not installed: apt-get install mmdebstrap")
    build(args.target, args.out, args.vars, bare=args.bare)
    print(json.dumps({"target": args.target, "rootfs": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
