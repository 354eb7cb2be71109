"""First boot of a flashed box: the site's own settings and secrets, from one file a person edits.

A clinician flashes the image, opens the boot partition (FAT: readable on any laptop), edits
`gotg-site.txt` (site name, AE title, HQ address and credential, static network if there is no
DHCP) and plugs the box in. On its first boot the box merges that file into pacs.env, validated
as a whole by the one settings model, makes a new ADMIN_PASSWORD (an image never carries a
password two sites share), writes the network, and removes secrets from the FAT file, which
anyone holding the card can read. A file with a mistake changes nothing: the error is reported
and the next boot tries again, so fixing the file is all it takes.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from . import durable
from .config import ConfigError, parse_values, read_env_file, schema

SITE_FILE = "gotg-site.txt"
# The made password, written once beside the site file for whoever set the box up, and erased
# when the admin has chosen their own (pacs-web marks it, `pacs firstboot --forget-password`).
PASSWORD_FILE = "gotg-admin-password.txt"
BOOT_DIRS = (Path("/boot/firmware"), Path("/boot/efi"))
# Network of the box, beside the settings: without them the box asks DHCP.
NETWORK_KEYS = ("NETWORK_ADDRESS", "NETWORK_GATEWAY", "NETWORK_DNS")
# Where the image put the data is not the site file's to change.
FIXED_KEYS = ("STORAGE_PATH", "STATE_PATH")
NETWORK_FILE = "20-wired.network"
# The ports the firewall opens to the clinic's network, as the base role writes them: the site
# file may move DICOM_PORT (to 104, say), the HTTPS origin's, HL7's or MPPS's, and the firewall
# must follow.
FIREWALL_PORTS_FILE = Path("/etc/nftables.d/gotg-open-ports.nft")


class SiteFileError(Exception):
    """The site file cannot be applied; the message names the line or key."""


@dataclass
class FirstBoot:
    applied: list[str] = field(default_factory=list)       # keys taken from the site file
    admin_password: str = ""  # made here, shown once; empty when the site file chose one
    network: str = "dhcp"                                    # or the static address
    scrubbed: list[str] = field(default_factory=list)       # secrets removed from the FAT file
    box: str = ""                                            # what the box now is, in one line
    password_file: str = ""           # where the made password was written for the person
    open_ports: list[int] = field(default_factory=list)     # the firewall's, when rewritten

    def summary(self) -> str:
        keys = ", ".join(self.applied) or "none"
        ports = (f"; firewall opens {', '.join(map(str, self.open_ports))}"
                 if self.open_ports else "")
        return (f"{self.box}\nsite settings applied: {keys}; network: {self.network}{ports}; "
                f"secrets removed from the site file: {', '.join(self.scrubbed) or 'none'}")


def find_site_file(boot_dirs: tuple[Path, ...] = BOOT_DIRS) -> Path | None:
    for folder in boot_dirs:
        if (folder / SITE_FILE).is_file():
            return folder / SITE_FILE
    return None


def _network(values: dict[str, str]) -> str | None:
    """systemd-networkd settings for a static address, or None for DHCP."""
    address = values.get("NETWORK_ADDRESS", "").strip()
    if not address:
        if values.get("NETWORK_GATEWAY") or values.get("NETWORK_DNS"):
            raise SiteFileError("NETWORK_GATEWAY and NETWORK_DNS need NETWORK_ADDRESS "
                                "(e.g. NETWORK_ADDRESS=192.168.1.20/24)")
        return None
    try:
        interface = ipaddress.ip_interface(address)
        if "/" not in address:
            raise ValueError("no prefix length")
    except ValueError:
        raise SiteFileError(f"NETWORK_ADDRESS {address!r} is not an address with its prefix "
                            "length, e.g. 192.168.1.20/24") from None
    lines = ["[Match]", "Name=en* eth*", "", "[Network]", f"Address={interface}"]
    gateway = values.get("NETWORK_GATEWAY", "").strip()
    if gateway:
        try:
            if ipaddress.ip_address(gateway) not in interface.network:
                raise SiteFileError(f"NETWORK_GATEWAY {gateway} is outside {interface.network}")
        except ValueError:
            raise SiteFileError(f"NETWORK_GATEWAY {gateway!r} is not an IP address") from None
        lines.append(f"Gateway={gateway}")
    for server in values.get("NETWORK_DNS", "").replace(",", " ").split():
        try:
            lines.append(f"DNS={ipaddress.ip_address(server)}")
        except ValueError:
            raise SiteFileError(f"NETWORK_DNS {server!r} is not an IP address") from None
    return "\n".join(lines) + "\n"


def render_env(values: dict[str, str]) -> str:
    """pacs.env in the model's order, quoted the way the pacs_config role writes it."""
    out = ["# GOTG PACS configuration, written at first boot from the site file; reference: "
           "README.md"]
    for info in schema():
        if info.env in values:
            out.append(f"{info.env}={json.dumps(values[info.env], ensure_ascii=False)}")
    return "\n".join(out) + "\n"


def open_ports_text(ports: list[int]) -> str:
    """The firewall's ports file, exactly as the base role's template writes it."""
    return ("# Open to the clinic's network: DICOM, then the HTTPS origin's redirect and itself, "
            "then HL7 and MPPS.\n"
            "# Written by the base role and again by `pacs firstboot` when the site file moves a "
            "port.\n"
            f"define gotg_open_tcp = {{ {', '.join(str(port) for port in ports)} }}\n")


def apply(env_file: Path, site_file: Path | None, network_dir: Path,
          boot_dirs: tuple[Path, ...] = BOOT_DIRS,
          firewall_ports: Path | None = None) -> FirstBoot:
    """Merge the site file into env_file with a new ADMIN_PASSWORD; raise SiteFileError.
    `firewall_ports`: the firewall's ports file, rewritten for the settings if it exists."""
    report = FirstBoot()
    current, _ = read_env_file(env_file)
    site: dict[str, str] = {}
    if site_file is not None:
        try:
            site, _ = read_env_file(site_file)
        except ConfigError as exc:
            raise SiteFileError(str(exc)) from None
    network_values = {key: site.pop(key) for key in NETWORK_KEYS if key in site}
    fixed = [key for key in FIXED_KEYS if key in site]
    if fixed:
        raise SiteFileError(f"{site_file}: {', '.join(fixed)} cannot be set here (the image "
                            "decides where data lives)")
    network = _network(network_values)
    merged = {**current, **site}
    if not site.get("ADMIN_PASSWORD"):  # the person chose none: one of the box's own
        report.admin_password = merged["ADMIN_PASSWORD"] = secrets.token_urlsafe(12)
    try:  # the whole result must be a valid configuration, or nothing is written
        settings = parse_values(merged, base_dir=env_file.resolve().parent,
                                source=str(site_file))
    except ConfigError as exc:
        raise SiteFileError(str(exc)) from None
    report.box = (f"this box: {settings.pacs_name!r} (site {settings.site_code}), DICOM AE title "
                  f"{settings.pacs_aet} on port {settings.dicom_port}, HQ "
                  f"{settings.hq_url or 'not set'}")
    report.applied = sorted(site)
    durable.replace_text(env_file, render_env(merged), mode=0o640, like=env_file)
    if network is not None:
        network_dir.mkdir(parents=True, exist_ok=True)
        durable.replace_text(network_dir / NETWORK_FILE, network, mode=0o644)
        report.network = network_values["NETWORK_ADDRESS"]
    if firewall_ports is not None and firewall_ports.exists():
        ports = list(dict.fromkeys([settings.dicom_port, settings.http_redirect_port,
                                    settings.https_port, settings.hl7_port,
                                    settings.mpps_port]))
        if firewall_ports.read_text() != open_ports_text(ports):
            durable.replace_text(firewall_ports, open_ports_text(ports), mode=0o644)
            report.open_ports = ports
    if site_file is not None:
        report.scrubbed = _scrub(site_file, site)
    boot = site_file.parent if site_file is not None else find_boot_dir(boot_dirs)
    if report.admin_password and boot is not None:
        durable.replace_text(boot / PASSWORD_FILE, (
            f"Administrator password of {settings.pacs_name} (site {settings.site_code}):\n"
            f"{report.admin_password}\n\nSign in as admin at https://<this box>/ and choose "
            "your own password; this file is then erased.\n"), mode=None)
        report.password_file = str(boot / PASSWORD_FILE)
    return report


def find_boot_dir(boot_dirs: tuple[Path, ...] = BOOT_DIRS) -> Path | None:
    """The boot partition (FAT) as mounted on this box, if it is."""
    return next((folder for folder in boot_dirs if folder.is_dir()), None)


def forget_password(boot_dirs: tuple[Path, ...] = BOOT_DIRS) -> list[str]:
    """Erase the boot partition's copy of the made password (overwritten, then removed): the
    admin has chosen their own. Returns the files erased."""
    erased = []
    for folder in boot_dirs:
        copy = folder / PASSWORD_FILE
        if copy.is_file():
            durable.replace_text(copy, "erased\n", mode=None)
            copy.unlink()
            durable.fsync_dir(folder)
            erased.append(str(copy))
    return erased


def _scrub(site_file: Path, site: dict[str, str]) -> list[str]:
    """Blank the secrets in the FAT file, keeping the rest as the person wrote it."""
    hidden = {info.env for info in schema() if info.secret}
    found = sorted(key for key, value in site.items() if key in hidden and value)
    if not found:
        return []
    kept = []
    for line in site_file.read_text(encoding="utf-8").splitlines():
        key = line.split("=", 1)[0].strip().removeprefix("export ").strip()
        if key in found:
            kept.append(f"# {key} was read at first boot and removed from this file")
        else:
            kept.append(line)
    durable.replace_text(site_file, "\n".join(kept) + "\n", mode=None)
    return found
