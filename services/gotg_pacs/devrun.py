"""`pacs run`: the whole appliance in the foreground, for development and first trials.

It does what systemd does on the appliance, from the same settings: checks the ports, renders
Orthanc's configuration, starts real Orthanc and every service the project has, prints where to
reach them, and on Ctrl-C (or SIGTERM) stops them all cleanly. Data stays in STORAGE_PATH, so
running it again keeps every study.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import TextIO

from .config import Settings
from .process import Child, check_ports_free, start_orthanc


def banner(settings: Settings) -> str:
    http = settings.orthanc_url
    auth = " (login: admin / ADMIN_PASSWORD)" if settings.enable_auth else ""
    return "\n".join([
        f"GOTG PACS '{settings.pacs_name}' is running. Ctrl-C stops it.",
        f"  DICOM        AET {settings.pacs_aet} on port {settings.dicom_port} "
        f"(access: {settings.dicom_access})",
        f"  Orthanc      {http}/app/explorer.html{auth}",
        f"  REST API     {http}/",
        f"  DICOMweb     {http}/dicom-web/",
        f"  Data         {settings.storage_path}",
        f"  Logs         {settings.log_dir}",
        f"  Try it       echoscu -aec {settings.pacs_aet} 127.0.0.1 {settings.dicom_port}",
        f"               storescu -aec {settings.pacs_aet} 127.0.0.1 {settings.dicom_port} FILE.dcm",
    ])


def run(settings: Settings, env_file: str, out: TextIO = sys.stdout) -> int:
    """Run until interrupted; 0 after a clean stop, 1 if a process died on its own."""
    check_ports_free({"DICOM_PORT": settings.dicom_port, "HTTP_PORT": settings.http_port},
                     env_file)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    children: list[Child] = []
    try:
        children.append(start_orthanc(settings, echo=out))
        print(banner(settings), file=out, flush=True)
        while not stop.wait(0.5):
            dead = [child for child in children if not child.running()]
            if dead:
                for child in dead:
                    print(f"{child.name} exited unexpectedly (code {child.process.returncode}); "
                          f"last log lines:\n{child.last_lines()}", file=out, flush=True)
                return 1
        print("Stopping...", file=out, flush=True)
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if children:
            print("Stopped. Data kept in " + str(settings.storage_path), file=out, flush=True)
