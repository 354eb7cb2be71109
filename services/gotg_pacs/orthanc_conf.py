"""Orthanc's JSON configuration, rendered from the one settings model.

Dev mode, the tests, the benchmarks and the Ansible role all write Orthanc's configuration with
`render()`, so there is exactly one place where the archive's behaviour is decided. The values are
chosen for a Raspberry Pi 4 with 2 GB that must never lose an image:

* files stay uncompressed and un-transcoded on disk (carvable after a disk failure, deduplicated by
  Borg, originals untouched: invariant 3);
* every attachment carries an MD5 and every write is fsynced before the modality gets its C-STORE
  success (invariant 1);
* recycling is pinned off: `MaximumStorageSize`/`MaximumPatientCount` are written as 0 so no
  included file or default can ever turn deletion on (invariant 2);
* threads and malloc arenas are bounded to keep Orthanc's resident memory small.

HQ keeps Orthanc's index in PostgreSQL (`ORTHANC_INDEX=postgresql`, Debian's orthanc-postgresql):
the index plugin only, so image files stay in the storage folder like a clinic's, where the
backups read them. A PostgreSQL commit is durable when Orthanc answers (fsync and
synchronous_commit at their defaults), so SQLite's power-cut gap, and the recovery scan for it,
do not apply. Choices, for Orthanc 1.10 with plugin 4.0 (Debian 12) and later:

* `Lock` stays on: exactly one Orthanc writes to one index database. Its files live in a local
  folder, so a second Orthanc on the same database (a restored copy, a test box pointed at the
  wrong server) would index images it cannot read; with the lock it refuses to start instead.
  Several writers (Orthanc 1.9.2+ with plugin 4.0+, `Lock` off, one `DatabaseServerIdentifier`
  each) first need a storage folder every one of them shares.
* the connection is a URI with every part percent-encoded: the plugin pastes separate
  Host/Password options into a libpq string unquoted, so a space in a password would cut it.
* connection attempts are bounded (`POSTGRES_CONNECT`): PostgreSQL down or a wrong password
  makes Orthanc exit after about 20 s with PostgreSQL's own words in its log, never a silent
  start on SQLite; `process.start_orthanc` turns that into one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import durable, senders
from .config import Settings

PLUGINS_DIR = Path("/usr/share/orthanc/plugins")
# Debian's plugin packages: orthanc (worklists), orthanc-dicomweb, orthanc-gdcm.
PLUGIN_FILES = ("libOrthancDicomWeb.so", "libOrthancGdcm.so", "libModalityWorklists.so")
# From orthanc-postgresql, loaded when ORTHANC_INDEX=postgresql (its storage plugin never is).
POSTGRESQL_INDEX_PLUGIN = "libOrthancPostgreSQLIndex.so"
# Connection attempts at start-up (10 x 2 s, each at most 10 s): long enough for a PostgreSQL
# that starts beside Orthanc, short enough that a wrong address is reported while someone waits.
# The plugin also uses the retry count for transactions that collide between its connections.
POSTGRES_CONNECT = {"MaximumConnectionRetries": 10, "ConnectionRetryInterval": 2}
POSTGRES_CONNECT_TIMEOUT = 10
# Index connections: a few stores (receivers, several clinics at once) and reads run in
# parallel instead of queuing behind one; far below PostgreSQL's default of 100 connections.
POSTGRES_INDEX_CONNECTIONS = 5

# Settings that must hold whatever else changes; tests assert every one of them.
DURABILITY = {
    "StorageCompression": False,
    "MaximumStorageSize": 0,
    "MaximumPatientCount": 0,
    "StoreMD5ForAttachments": True,
    "SyncStorageArea": True,
    "OverwriteInstances": False,
    "SaveJobs": True,
}
# Never written: each would let Orthanc replace or drop what a modality sent.
FORBIDDEN = (
    "IngestTranscoding", "IngestTranscodingOfUncompressed", "IngestTranscodingOfCompressed",
)


USER_METADATA = {"GotgOriginalMd5": 1024, "GotgSite": 1025, "GotgCodec": 1026,
                 "GotgOriginalPatch": 1027}


def render(settings: Settings) -> dict[str, Any]:
    """Orthanc's configuration as a dict (written as JSON by `write`)."""
    open_access = settings.dicom_access == "open"
    config: dict[str, Any] = {
        "Name": settings.pacs_name,
        "StorageDirectory": str(settings.orthanc_storage_dir),
        "IndexDirectory": str(settings.orthanc_index_dir),
        **DURABILITY,
        "MaximumStorageCacheSize": 16,
        "Plugins": [str(PLUGINS_DIR / name) for name in PLUGIN_FILES],
        # A Pi 4 has 4 cores and 2 GB shared with every other service.
        "ConcurrentJobs": 2,
        "HttpThreadsCount": 16,
        "DicomThreadsCount": 4,
        "MallocArenaMax": 2,
        "JobsHistorySize": 10,
        # HTTP: loopback only; the HTTPS origin (nginx) fronts it on the appliance.
        "HttpServerEnabled": True,
        "HttpPort": settings.http_port,
        "RemoteAccessAllowed": False,
        "HttpDescribeErrors": True,
        "HttpCompressionEnabled": False,
        # Off: Orthanc 1.10 drops idle keep-alive connections after half a second, so a pooled
        # one can be dead on arrival, and a client's "Connection: close" makes it drop requests
        # at random (measured: 8 of 42). One loopback connection per request costs little.
        "KeepAlive": False,
        "TcpNoDelay": True,
        "WebDavEnabled": False,
        "ExecuteLuaEnabled": False,
        "OrthancExplorerEnabled": True,
        "AuthenticationEnabled": settings.enable_auth,
        "RegisteredUsers": ({"admin": settings.admin_password} if settings.enable_auth else {}),
        # DICOM: a modality the site has never declared may store (a new portable X-ray in a
        # disaster must not lose images) unless the site chose strict mode; it is noted and
        # listed (senders.py). Queries, retrievals and the worklist (it holds patient names)
        # need a declared modality calling from its declared IP address, unless the site runs
        # in open (development) mode.
        "DicomServerEnabled": True,
        "DicomAet": settings.pacs_aet,
        "DicomPort": settings.dicom_port,
        "DicomCheckCalledAet": not open_access,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": settings.dicom_access != "strict",
        "DicomAlwaysAllowFind": open_access,
        "DicomAlwaysAllowFindWorklist": open_access,
        "DicomAlwaysAllowGet": open_access,
        "DicomAlwaysAllowMove": open_access,
        "DicomCheckModalityHost": not open_access,
        "DicomModalitiesInDatabase": True,
        "OrthancPeersInDatabase": True,
        "DicomModalities": {},
        "UnknownSopClassAccepted": True,
        # Notes every new sender and refuses blocked ones (senders.py).
        "LuaScripts": [str(senders.lua_file(settings))],
        "DicomScpTimeout": 30,
        "StableAge": settings.stable_age,
        # Recorded by the HQ receiver on every instance it confirms (harmless at a clinic).
        "UserMetadata": USER_METADATA,
        "DeidentifyLogs": True,
        "MetricsEnabled": True,
        "HttpsCACertificates": "/etc/ssl/certs/ca-certificates.crt",
        "SynchronousCMove": True,
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Ssl": False,
        },
        "Gdcm": {"Enable": True, "Throttling": 2},
        "Worklists": {"Enable": True, "Database": str(settings.worklists_dir)},
    }
    if settings.orthanc_index == "postgresql":
        config["Plugins"].append(str(PLUGINS_DIR / POSTGRESQL_INDEX_PLUGIN))
        config["PostgreSQL"] = {
            "EnableIndex": True,
            "EnableStorage": False,  # files stay on disk: the storage folder is what backups copy
            "ConnectionUri": postgresql_uri(settings),
            "Lock": True,
            **POSTGRES_CONNECT,
            "IndexConnectionsCount": POSTGRES_INDEX_CONNECTIONS,
        }
    return config


def postgresql_uri(settings: Settings, hide_password: bool = False) -> str:
    """libpq URI of the index database; a host starting with / is the server's socket folder."""
    host = settings.postgresql_host
    if host.startswith("/"):
        host = quote(host, safe="")
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    login = quote(settings.postgresql_user, safe="")
    if settings.postgresql_password:
        login += ":" + ("(hidden)" if hide_password else quote(settings.postgresql_password,
                                                                 safe=""))
    return (f"postgresql://{login}@{host}:{settings.postgresql_port}/"
            f"{quote(settings.postgresql_database, safe='')}"
            f"?connect_timeout={POSTGRES_CONNECT_TIMEOUT}")


def postgresql_place(settings: Settings) -> str:
    """Where the index lives, as people read it (no password)."""
    return (f"database {settings.postgresql_database} on {settings.postgresql_host}:"
            f"{settings.postgresql_port} as {settings.postgresql_user}")


def private_dir(directory: Path) -> None:
    """mkdir -p, with every folder it creates readable by the appliance's user only."""
    for folder in (*reversed(directory.parents), directory):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            if not folder.is_dir():
                raise


def write(settings: Settings, path: Path | None = None) -> Path:
    """Write Orthanc's configuration atomically (never a half-written file after a power cut)."""
    path = Path(path or settings.orthanc_config_file)
    private_dir(path.parent)
    text = json.dumps(render(settings), indent=2, sort_keys=False) + "\n"
    private_dir(senders.lua_file(settings).parent)
    senders.write_lua(settings)
    durable.replace_text(path, text, mode=0o600)  # holds the admin password
    return path


def prepare_directories(settings: Settings) -> None:
    """Create the folders Orthanc and its plugins expect, private to the appliance."""
    for directory in (settings.orthanc_storage_dir, settings.orthanc_index_dir,
                      settings.worklists_dir, settings.log_dir):
        try:
            private_dir(directory)
        except OSError as exc:
            raise OSError(f"cannot create the folder {directory}: {exc.strerror}") from exc
