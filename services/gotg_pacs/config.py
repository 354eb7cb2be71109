"""The one configuration model of the appliance.

Every setting a site can change lives in `Settings`, declared once with its env-file name, type,
default and documentation. Everything else is derived from it: validation at start-up, Orthanc's
JSON (`orthanc_conf`), the README's config reference, the sample env file and the Ansible role's
defaults (`reference`). Site IT edits one file (`/etc/gotg-pacs/pacs.env`); a typo there must stop
start-up with one clear line rather than silently run with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dotenv.parser import parse_stream

APPLIANCE_ENV_FILE = Path("/etc/gotg-pacs/pacs.env")
ENV_FILE_VARIABLE = "PACS_ENV_FILE"


class ConfigError(Exception):
    """A configuration problem, worded as the one line site IT will read."""


# --- value kinds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """How one setting's text is parsed; `allowed` is shown in errors and in the reference."""

    allowed: str

    def parse(self, text: str) -> Any:  # pragma: no cover - every kind overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class Text(Kind):
    allowed: str = "text"
    max_length: int = 256
    pattern: str | None = None
    optional: bool = True

    def parse(self, text: str) -> str:
        if not text and not self.optional:
            raise ValueError("must not be empty")
        if len(text) > self.max_length:
            raise ValueError(f"is longer than {self.max_length} characters")
        if any(ord(c) < 32 for c in text):
            raise ValueError("contains control characters")
        if text and self.pattern and not re.fullmatch(self.pattern, text):
            raise ValueError("has characters that are not allowed")
        return text


@dataclass(frozen=True)
class Integer(Kind):
    allowed: str = ""
    minimum: int = 0
    maximum: int = 2**31

    def __post_init__(self) -> None:
        if not self.allowed:
            object.__setattr__(self, "allowed", f"a whole number {self.minimum}-{self.maximum}")

    def parse(self, text: str) -> int:
        if not re.fullmatch(r"-?\d+", text):
            raise ValueError("is not a whole number")
        value = int(text)
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"is outside {self.minimum}..{self.maximum}")
        return value


@dataclass(frozen=True)
class Number(Kind):
    allowed: str = ""
    minimum: float = 0.0
    maximum: float = 1e9

    def __post_init__(self) -> None:
        if not self.allowed:
            object.__setattr__(self, "allowed", f"a number {self.minimum:g}-{self.maximum:g}")

    def parse(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("is not a number") from None
        if value != value or not self.minimum <= value <= self.maximum:
            raise ValueError(f"is outside {self.minimum:g}..{self.maximum:g}")
        return value


@dataclass(frozen=True)
class Port(Integer):
    allowed: str = "a TCP port 1-65535"
    minimum: int = 1
    maximum: int = 65535


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Boolean(Kind):
    allowed: str = "true or false"

    def parse(self, text: str) -> bool:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("is not true or false")


@dataclass(frozen=True)
class Choice(Kind):
    allowed: str = ""
    values: tuple[str, ...] = ()

    def parse(self, text: str) -> str:
        if text.lower() not in self.values:
            raise ValueError("is not one of the allowed values")
        return text.lower()


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Duration(Kind):
    """Seconds, written `90`, `30s`, `15m`, `6h` or `7d`; parsed to whole seconds."""

    allowed: str = "a duration such as 30s, 15m, 6h, 7d (plain numbers are seconds)"
    minimum: int = 1
    maximum: int = 365 * 86400

    def parse(self, text: str) -> int:
        match = re.fullmatch(r"(\d+)\s*([smhd]?)", text.lower())
        if not match:
            raise ValueError("is not a duration")
        seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
        if not self.minimum <= seconds <= self.maximum:
            raise ValueError(f"is outside {self.minimum}s..{self.maximum}s")
        return seconds


@dataclass(frozen=True)
class TimeWindow(Kind):
    """A daily window of local time `HH:MM-HH:MM` (may cross midnight), or empty for none;
    parsed to (start, end) minutes after midnight."""

    allowed: str = "HH:MM-HH:MM in local time, e.g. 22:00-06:00 (empty: none)"

    def parse(self, text: str) -> tuple[int, int] | None:
        if not text:
            return None
        match = re.fullmatch(r"(\d\d):(\d\d)-(\d\d):(\d\d)", text)
        if not match:
            raise ValueError("is not HH:MM-HH:MM")
        values = [int(v) for v in match.groups()]
        hours, minutes = values[::2], values[1::2]
        if any(h > 23 for h in hours) or any(m > 59 for m in minutes):
            raise ValueError("is not a time of day")
        start, end = (h * 60 + m for h, m in zip(hours, minutes, strict=True))
        if start == end:
            raise ValueError("is empty (start and end are the same)")
        return start, end


@dataclass(frozen=True)
class PathValue(Kind):
    """A filesystem path; relative paths are taken from the env file's own folder."""

    allowed: str = "a filesystem path"
    optional: bool = False

    def parse(self, text: str) -> Path | None:
        if not text:
            if self.optional:
                return None
            raise ValueError("must not be empty")
        if "\x00" in text or "\n" in text:
            raise ValueError("is not a usable path")
        return Path(text)


@dataclass(frozen=True)
class Url(Kind):
    allowed: str = "an http:// or https:// URL, or empty"
    schemes: tuple[str, ...] = ("http", "https")

    def parse(self, text: str) -> str:
        if not text:
            return ""
        parsed = urlparse(text)
        if parsed.scheme not in self.schemes or not parsed.netloc:
            raise ValueError("is not a URL")
        return text


@dataclass(frozen=True)
class AETitle(Kind):
    """DICOM Application Entity title (PS3.5 AE VR): 1-16 characters, no backslash or controls."""

    allowed: str = "1-16 characters A-Z 0-9 _ - . (a DICOM AE title)"

    def parse(self, text: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,16}", text):
            raise ValueError("is not a valid AE title")
        return text


# --- the model -----------------------------------------------------------------------------------


def setting(env: str, kind: Kind, default: str, doc: str, section: str,
            secret: bool = False) -> Any:
    """Declare one setting: its env-file name, how it parses, its default as written in the file."""
    try:
        parsed = kind.parse(default)
    except ValueError as exc:  # a bad default is a programming error, caught by the unit tests
        raise AssertionError(f"default of {env} {exc}") from None
    return field(
        default=parsed,
        metadata={"env": env, "kind": kind, "default_text": default, "doc": doc, "section": section,
                  "secret": secret},
    )


@dataclass(frozen=True)
class Settings:
    # Identity
    pacs_name: str = setting(
        "PACS_NAME", Text(max_length=64, optional=False), "GOTG PACS",
        "Name of this site as people see it (dashboard, viewer, Orthanc).", "Identity")
    site_code: str = setting(
        "SITE_CODE", Text(allowed="2-32 characters a-z 0-9 -", max_length=32,
                          pattern=r"[a-z0-9][a-z0-9-]{1,31}"), "dev",
        "Short unique code of this site; HQ files its studies and credentials under it.",
        "Identity")

    # DICOM
    pacs_aet: str = setting(
        "PACS_AET", AETitle(), "GOTG_PACS",
        "AE title modalities send to (C-STORE) and query (C-FIND, C-MOVE, C-GET, worklist).",
        "DICOM")
    dicom_port: int = setting("DICOM_PORT", Port(), "4242", "DICOM listening port.", "DICOM")
    dicom_access: str = setting(
        "DICOM_ACCESS", Choice(allowed="open, standard or strict",
                               values=("open", "standard", "strict")),
        "standard",
        "`standard`: any modality may store (never lose images from an unknown device; each new "
        "sender is noted and listed by `pacs modality senders` to be declared or blocked) but "
        "only declared modalities, calling from their declared IP address, may query, retrieve "
        "and read the worklist, and the called AE title is checked. `strict`: the same, and "
        "only declared modalities may store. `open`: any caller may do all of it, called AE "
        "title not checked (development and first trials only).", "DICOM")
    stable_age: int = setting(
        "STABLE_AGE", Duration(minimum=10, maximum=3600), "2m",
        "Quiet time after the last image before a study counts as complete and is queued for HQ. "
        "Portable modalities often send in bursts; two minutes avoids sending half studies.",
        "DICOM")

    # Storage
    storage_path: Path = setting(
        "STORAGE_PATH", PathValue(), "/var/lib/gotg-pacs/orthanc",
        "Where Orthanc keeps images and its index (put it on the USB SSD when there is one).",
        "Storage")
    state_path: Path = setting(
        "STATE_PATH", PathValue(), "/var/lib/gotg-pacs/state",
        "The appliance's own state: queues, rendered Orthanc configuration, development logs.",
        "Storage")
    max_storage_gb: float = setting(
        "MAX_STORAGE_GB", Number(minimum=0, maximum=1e6), "0",
        "Space the archive may use before alerts and cleanup of HQ-confirmed, backed-up studies "
        "start (0: the whole disk). Orthanc never recycles: nothing is deleted to make room.",
        "Storage")
    auto_cleanup: bool = setting(
        "AUTO_CLEANUP", Boolean(), "false",
        "Let cleanup remove local copies older than RETENTION_DAYS once HQ confirmed them and a "
        "backup holds them.", "Storage")
    retention_days: int = setting(
        "RETENTION_DAYS", Integer(minimum=1, maximum=36500), "365",
        "Minimum age of a study before cleanup may remove its local copy.", "Storage")

    # Web
    http_port: int = setting(
        "HTTP_PORT", Port(), "8042",
        "Orthanc REST and DICOMweb port, reachable on loopback only.", "Web")
    enable_auth: bool = setting(
        "ENABLE_AUTH", Boolean(), "true",
        "Require a login for Orthanc's REST API and the web pages.", "Web")
    admin_password: str = setting(
        "ADMIN_PASSWORD", Text(max_length=128), "",
        "Password of the `admin` user. Required when ENABLE_AUTH is true; there is no default.",
        "Web", secret=True)
    https_port: int = setting(
        "HTTPS_PORT", Port(), "443",
        "The appliance's one HTTPS origin (nginx): Orthanc's REST API and DICOMweb, the viewer "
        "and the dashboard, on every network interface. TLS 1.2 and 1.3 only, with a "
        "certificate from the site's own certificate authority.", "Web")
    http_redirect_port: int = setting(
        "HTTP_REDIRECT_PORT", Integer(allowed="a TCP port 1-65535, or 0 for none", maximum=65535),
        "80",
        "Plain HTTP port that only redirects to HTTPS_PORT and hands out the site's CA "
        "certificate (`/gotg-pacs-ca.crt`) for tablets to trust. 0: not opened.", "Web")
    web_api_port: int = setting(
        "WEB_API_PORT", Port(), "5002",
        "The appliance's web service (logins, accounts, marking urgent; `pacs-web`), on "
        "loopback behind the HTTPS origin, which asks it before every request to a backend.",
        "Web")
    session_idle_timeout: int = setting(
        "SESSION_IDLE_TIMEOUT", Duration(minimum=60, maximum=7 * 86400), "1h",
        "A login ends after this long without use.", "Web")
    session_max_age: int = setting(
        "SESSION_MAX_AGE", Duration(minimum=300, maximum=30 * 86400), "12h",
        "A login ends this long after it began, used or not (a shift).", "Web")
    server_names: str = setting(
        "SERVER_NAMES", Text(allowed="host names and IP addresses, separated by spaces",
                             max_length=1024, pattern=r"[A-Za-z0-9.:\- ]+"), "",
        "Extra names and addresses people use to reach this box, written into its TLS "
        "certificate beside the host name, `<host name>.local`, `localhost` and the addresses it "
        "has when the web server starts.", "Web")

    # Sync to HQ
    hq_url: str = setting(
        "HQ_URL", Url(), "", "HQ receiver this site syncs to (empty: no sync configured).",
        "Sync")
    hq_token: str = setting(
        "HQ_TOKEN", Text(max_length=256), "",
        "This site's own credential at HQ (`pacs hq site add SITE_CODE` prints it once). "
        "No two sites share one.", "Sync", secret=True)
    hq_ca_file: Path | None = setting(
        "HQ_CA_FILE", PathValue(optional=True), "",
        "PEM file of the certificate authority HQ's HTTPS certificate must chain to (HQ's root, "
        "`pacs hq tls init`). Empty: the system's trusted authorities. Plain http:// in "
        "HQ_URL is accepted only to loopback or private addresses (a VPN); the site's "
        "credential never crosses the internet in clear.", "Sync")
    offline_mode: str = setting(
        "OFFLINE_MODE", Choice(allowed="auto or offline", values=("auto", "offline")), "auto",
        "`auto`: sync whenever a network exists. `offline`: never try to reach HQ.", "Sync")
    sync_interval: int = setting(
        "SYNC_INTERVAL", Duration(minimum=5, maximum=86400), "5m",
        "How often the sync service looks for work when idle.", "Sync")
    max_bandwidth_mbps: float = setting(
        "MAX_BANDWIDTH_MBPS", Number(minimum=0, maximum=100000), "0",
        "Hard cap on upload bandwidth in Mbit/s (0: no cap).", "Sync")
    compression_level: int = setting(
        "COMPRESSION_LEVEL", Integer(minimum=0, maximum=9), "6",
        "Lossless compression effort for transfers, 0 (none) to 9 (smallest, slowest).", "Sync")
    lossy_previews: bool = setting(
        "SYNC_LOSSY_PREVIEWS", Boolean(), "true",
        "On a poor link (under 1 Mbit/s), send a lossy preview of each new or urgent CR, DX, CT "
        "and MR image first (a new derived instance, within the published ratio ceilings) so "
        "HQ can triage; the lossless original always follows. false: originals only.", "Sync")
    offpeak_window: tuple[int, int] | None = setting(
        "SYNC_OFFPEAK_WINDOW", TimeWindow(), "",
        "When back-fill (studies older than a day when sync first saw them) may be sent, e.g. "
        "22:00-06:00 where daytime bandwidth is paid or shared. Empty: any time. New and "
        "urgent studies are never held back.", "Sync")

    # HQ (only on the central archive)
    hq_receiver_port: int = setting(
        "HQ_RECEIVER_PORT", Port(), "7000",
        "Port of the HQ receiver the clinics sync to (behind the HTTPS origin), on loopback.",
        "HQ")

    hq_backup_path: Path | None = setting(
        "HQ_BACKUP_PATH", PathValue(optional=True), "",
        "Folder holding every site's backup repository (SITE_CODE.borg, written by the sites "
        "over SSH, append-only): `pacs hq backups prune` audits, prunes and compacts them here. "
        "Empty: this HQ keeps no site backups.", "HQ")

    # Index database: which database Orthanc keeps its index in (images stay files either way)
    orthanc_index: str = setting(
        "ORTHANC_INDEX", Choice(allowed="sqlite or postgresql", values=("sqlite", "postgresql")),
        "sqlite",
        "Where Orthanc keeps its index (patients, studies, instances, changes): `sqlite`, a file "
        "in STORAGE_PATH (clinics); `postgresql`, the PostgreSQL database below (HQ; Debian "
        "package orthanc-postgresql). Image files stay in STORAGE_PATH either way, where the "
        "backups read them. Orthanc refuses to start if PostgreSQL is chosen but unreachable.",
        "Index database")
    postgresql_host: str = setting(
        "POSTGRESQL_HOST", Text(allowed="a host name, IP address or unix socket folder",
                                max_length=255, pattern=r"[A-Za-z0-9._:/\-]+", optional=False),
        "localhost",
        "PostgreSQL server of Orthanc's index; a folder such as /run/postgresql connects "
        "through the local socket.", "Index database")
    postgresql_port: int = setting(
        "POSTGRESQL_PORT", Port(), "5432", "PostgreSQL server port.", "Index database")
    postgresql_database: str = setting(
        "POSTGRESQL_DATABASE", Text(allowed="1-63 characters a-z 0-9 _ (a PostgreSQL name)",
                                    max_length=63, pattern=r"[a-z_][a-z0-9_]*", optional=False),
        "orthanc",
        "Database holding Orthanc's index; it must exist, owned by POSTGRESQL_USER (Orthanc "
        "creates its tables).", "Index database")
    postgresql_user: str = setting(
        "POSTGRESQL_USER", Text(allowed="1-63 characters a-z 0-9 _ (a PostgreSQL name)",
                                max_length=63, pattern=r"[a-z_][a-z0-9_]*", optional=False),
        "orthanc", "PostgreSQL role Orthanc logs in as.", "Index database")
    postgresql_password: str = setting(
        "POSTGRESQL_PASSWORD", Text(max_length=128), "",
        "Password of POSTGRESQL_USER. Required with ORTHANC_INDEX=postgresql unless "
        "POSTGRESQL_HOST is a socket folder (peer login); there is no default.",
        "Index database", secret=True)

    # RIS
    ris_url: str = setting(
        "RIS_URL", Url(), "",
        "GOTG RIS REST API (empty: none): appointments become worklist orders, and what the "
        "modalities and the archive report goes back to it (the contract: "
        "services/gotg_pacs/ris/openapi.yaml).", "RIS")
    ris_api_key: str = setting(
        "RIS_API_KEY", Text(max_length=512), "", "API key for the RIS.", "RIS", secret=True)
    worklist_sync: bool = setting(
        "WORKLIST_SYNC", Boolean(), "true",
        "Turn RIS orders into DICOM worklist items for the modalities.", "RIS")
    ris_poll_interval: int = setting(
        "RIS_POLL_INTERVAL", Duration(minimum=5, maximum=86400), "1m",
        "How often new and changed appointments are read from RIS_URL (statuses go back "
        "within seconds while it answers).", "RIS")
    hl7_port: int = setting(
        "HL7_PORT", Port(minimum=1024, allowed="a TCP port 1024-65535 (pacs-ris holds no "
                                                "privilege to bind a lower one)"), "2575",
        "Port the RIS sends HL7 v2 to (MLLP): orders (ORM^O01, OMI^O23), final reports "
        "(ORU^R01), patient updates and merges (ADT^A08, A31, A40).", "RIS")
    ris_hl7_address: str = setting(
        "RIS_HL7_ADDRESS", Text(allowed="host:port of the RIS's MLLP listener, or empty",
                                max_length=260, pattern=r"[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}"),
        "",
        "Where statuses go for a RIS that speaks only HL7 (empty: none; RIS_URL, when set, is "
        "used instead): ORM^O01 order status changes over MLLP, in order, waiting while it "
        "is unreachable.", "RIS")
    mpps_port: int = setting(
        "MPPS_PORT", Port(minimum=1024, allowed="a TCP port 1024-65535 (pacs-ris holds no "
                                                "privilege to bind a lower one)"), "4243",
        "Port modalities report performed procedure steps to (DICOM MPPS, AE title PACS_AET): "
        "a started order stays on the worklist, a completed or discontinued one leaves it.",
        "RIS")

    # Backup
    backup_enabled: bool = setting(
        "BACKUP_ENABLED", Boolean(), "true", "Run scheduled backups.", "Backup")
    backup_interval: int = setting(
        "BACKUP_INTERVAL", Duration(minimum=900, maximum=7 * 86400), "6h",
        "Time between backups.", "Backup")
    backup_path: Path | None = setting(
        "BACKUP_PATH", PathValue(optional=True), "/mnt/backup",
        "Local backup repository folder (the USB backup disk).", "Backup")
    remote_backup_url: str = setting(
        "REMOTE_BACKUP_URL", Text(allowed="ssh://[user@]host[:port]/path (a plain folder "
                                          "path), or empty",
                                  pattern=r"ssh://([A-Za-z0-9._-]+@)?([A-Za-z0-9.-]+|"
                                          r"\[[0-9A-Fa-f:]+\])(:[0-9]{1,5})?/[A-Za-z0-9._/-]+"),
        "",
        "HQ's backup server: each backup also goes to URL/SITE_CODE.borg over SSH, with a "
        "key HQ allows only to append (`pacs backup key`).", "Backup")
    encryption: bool = setting(
        "ENCRYPTION", Boolean(), "true",
        "Encrypt backups (keys escrowed at HQ) and, where set up, the data partition.", "Backup")

    # --- derived places (one obvious place for each file the appliance writes) ---

    @property
    def orthanc_storage_dir(self) -> Path:
        return self.storage_path / "storage"

    @property
    def orthanc_index_dir(self) -> Path:
        return self.storage_path / "index"

    @property
    def worklists_dir(self) -> Path:
        """Orthanc's worklists plugin answers from here; the RIS bridge writes it (its own
        state, readable by Orthanc through the services' group)."""
        return self.state_path / "ris" / "worklists"

    @property
    def orthanc_config_file(self) -> Path:
        return self.state_path / "orthanc" / "orthanc.json"

    @property
    def ris_orders_file(self) -> Path:
        return self.state_path / "ris" / "orders.sqlite"

    @property
    def sync_outbox_file(self) -> Path:
        return self.state_path / "sync" / "outbox.sqlite"

    @property
    def hq_dir(self) -> Path:
        """HQ receiver state: site credentials and uploads in progress (shared by receivers)."""
        return self.state_path / "hq"

    @property
    def tls_dir(self) -> Path:
        """The site's certificate authority and the web server's certificate (made on the box)."""
        return self.state_path / "tls"

    @property
    def proxy_dir(self) -> Path:
        """nginx's rendered configuration, pid file and temporary files."""
        return self.state_path / "proxy"

    @property
    def users_file(self) -> Path:
        """Web accounts and sessions (web/users.py); backed up with the studies."""
        return self.state_path / "web" / "users.sqlite"

    @property
    def audit_file(self) -> Path:
        """Who did what to which study (audit.py), appended to only, shipped to HQ."""
        return self.state_path / "audit" / "audit.jsonl"

    @property
    def log_dir(self) -> Path:
        return self.state_path / "logs"

    @property
    def orthanc_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def orthanc_credentials(self) -> tuple[str, str] | None:
        return ("admin", self.admin_password) if self.enable_auth else None


@dataclass(frozen=True)
class SettingInfo:
    """One setting as the reference documents it."""

    attribute: str
    env: str
    kind: Kind
    default_text: str
    doc: str
    section: str
    secret: bool


def schema() -> list[SettingInfo]:
    """Every setting, in declaration order."""
    return [
        SettingInfo(f.name, f.metadata["env"], f.metadata["kind"], f.metadata["default_text"],
                    f.metadata["doc"], f.metadata["section"], f.metadata["secret"])
        for f in dataclasses.fields(Settings)
    ]


def _by_env() -> dict[str, SettingInfo]:
    return {info.env: info for info in schema()}


def _unknown_key_message(key: str) -> str:
    known = sorted(_by_env())
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key {key}{hint}; known keys: {', '.join(known)}"


def _hq_url_protected(url: str) -> bool:
    """TLS, or an address that never leaves this box or a private network."""
    parsed = urlparse(url)
    if parsed.scheme == "https":
        return True
    try:
        address = ipaddress.ip_address(parsed.hostname or "")
    except ValueError:
        return parsed.hostname == "localhost"
    return address.is_loopback or (address.is_private and not address.is_global)


def _cross_checks(settings: Settings) -> list[tuple[str, str]]:
    """Rules that involve more than one key, as (key, problem)."""
    problems = []
    if settings.enable_auth and not settings.admin_password:
        problems.append(("ADMIN_PASSWORD", "must be set when ENABLE_AUTH is true "
                                           "(there is no default password)"))
    if settings.enable_auth and len(settings.admin_password) < 8:
        if settings.admin_password:
            problems.append(("ADMIN_PASSWORD", "must be at least 8 characters"))
    if settings.hq_url and not settings.hq_token:
        problems.append(("HQ_TOKEN", "must be set when HQ_URL is set (ask HQ for this site's "
                                     "credential)"))
    if settings.hq_url and not _hq_url_protected(settings.hq_url):
        problems.append(("HQ_URL", "must be https:// (http:// only to a loopback or private "
                                   "address, such as HQ across a VPN)"))
    if settings.hq_ca_file and not settings.hq_ca_file.is_file():
        problems.append(("HQ_CA_FILE", f"{settings.hq_ca_file} is not a file"))
    if settings.hq_url and settings.site_code == "dev":
        problems.append(("SITE_CODE", "must be this site's own code when HQ_URL is set "
                                      "(HQ keeps each site's studies and credentials under it)"))
    if (settings.orthanc_index == "postgresql" and not settings.postgresql_password
            and not settings.postgresql_host.startswith("/")):
        problems.append(("POSTGRESQL_PASSWORD", "must be set when ORTHANC_INDEX is postgresql "
                                                "(or log in through the server's socket folder, "
                                                "e.g. POSTGRESQL_HOST=/run/postgresql)"))
    taken = {"DICOM_PORT": settings.dicom_port, "HTTP_PORT": settings.http_port}
    for key, port in (("HTTPS_PORT", settings.https_port),
                      ("HTTP_REDIRECT_PORT", settings.http_redirect_port),
                      ("WEB_API_PORT", settings.web_api_port),
                      ("HL7_PORT", settings.hl7_port), ("MPPS_PORT", settings.mpps_port)):
        clash = next((name for name, used in taken.items() if used == port), None)
        if clash:
            problems.append((key, f"is the same port as {clash} ({port})"))
        taken[key] = port
    if settings.http_port == settings.dicom_port:
        problems.append(("HTTP_PORT", f"is the same port as DICOM_PORT ({settings.dicom_port})"))
    return problems


def parse_values(values: dict[str, str], base_dir: Path, source: str = "config",
                 lines: dict[str, int] | None = None) -> Settings:
    """Typed settings from raw KEY -> text pairs; the first problem raises ConfigError."""
    lines = lines or {}
    by_env = _by_env()
    kwargs: dict[str, Any] = {}
    for key, text in values.items():
        where = f"{source}:{lines[key]}" if key in lines else source
        info = by_env.get(key)
        if info is None:
            raise ConfigError(f"{where}: {_unknown_key_message(key)}")
        try:
            value = info.kind.parse(text)
        except ValueError as exc:
            shown = "(hidden)" if info.secret else repr(text)
            raise ConfigError(
                f"{where}: {key}={shown} {exc}; allowed: {info.kind.allowed}") from None
        if isinstance(value, Path) and not value.is_absolute():
            value = (base_dir / value).resolve()
        kwargs[info.attribute] = value
    settings = Settings(**kwargs)
    for key, problem in _cross_checks(settings):
        where = f"{source}:{lines[key]}" if key in lines else source
        raise ConfigError(f"{where}: {key} {problem}")
    return settings


def read_env_file(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """KEY -> value and KEY -> line number from an env file (systemd EnvironmentFile syntax)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration file ({exc})") from None
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for binding in parse_stream(io.StringIO(text)):
        raw = binding.original.string
        here = binding.original.line + len(raw) - len(raw.lstrip("\n"))
        if binding.error:
            # Name at most what looks like the key: the rest of the line may be a password.
            if "=" in raw:
                key = raw.strip().split("=", 1)[0][:40]
                raise ConfigError(f"{path}:{here}: cannot read the value of {key} "
                                  "(an unclosed quote?)")
            raise ConfigError(f"{path}:{here}: cannot read this line; expected KEY=value")
        if binding.key is None:
            continue
        if binding.key in values:
            raise ConfigError(f"{path}:{here}: {binding.key} is set twice "
                              f"(first on line {lines[binding.key]})")
        values[binding.key] = binding.value or ""
        lines[binding.key] = here
    return values, lines


def default_env_file() -> Path:
    """The env file in force: $PACS_ENV_FILE, else the appliance's."""
    return Path(os.environ.get(ENV_FILE_VARIABLE) or APPLIANCE_ENV_FILE)


def load(path: Path | None = None) -> Settings:
    """Settings from an env file; raises ConfigError with one clear line on any problem."""
    path = Path(path) if path else default_env_file()
    values, lines = read_env_file(path)
    return parse_values(values, base_dir=path.resolve().parent, source=str(path), lines=lines)
