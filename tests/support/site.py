"""A throw-away appliance configuration: an env file on free ports under a folder of its own."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_env(path: Path, **overrides: str) -> Path:
    """An env file for an appliance living under path.parent, on free ports."""
    values = {
        "PACS_NAME": "Test clinic",
        "SITE_CODE": "test-site",
        "PACS_AET": "GOTG_PACS",
        "DICOM_PORT": str(free_port()),
        "HTTP_PORT": str(free_port()),
        "DICOM_ACCESS": "open",
        "STORAGE_PATH": "orthanc",
        "STATE_PATH": "state",
        "BACKUP_PATH": "backup",
        "STABLE_AGE": "10s",
        "ENABLE_AUTH": "true",
        "ADMIN_PASSWORD": secrets.token_urlsafe(12),
        "OFFLINE_MODE": "offline",
    }
    values.update(overrides)
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path
