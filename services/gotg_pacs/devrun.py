"""`pacs run`: the whole appliance in the foreground, for development and first trials.

It does what systemd does on the appliance, from the same settings: checks the ports, renders
Orthanc's configuration, starts real Orthanc and every service the project has, prints where to
reach them, and on Ctrl-C (or SIGTERM) stops them all cleanly. Data stays in STORAGE_PATH, so
running it again keeps every study.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading  # only for the Event the signal handlers set: no thread is started
from typing import TextIO

from .config import Settings
from .process import Child, StartCancelled, check_ports_free, start_orthanc

# Our services, as systemd runs them on the appliance (one unit each), Orthanc first.
SERVICES = (("sync", ("sync", "run")),)


def endpoints(settings: Settings) -> dict[str, object]:
    http = settings.orthanc_url
    return {"name": settings.pacs_name, "aet": settings.pacs_aet, "dicom_port": settings.dicom_port,
            "dicom_access": settings.dicom_access, "orthanc_explorer": f"{http}/app/explorer.html",
            "rest": f"{http}/", "dicomweb": f"{http}/dicom-web/",
            "data": str(settings.storage_path), "logs": str(settings.log_dir)}


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
        f"               storescu -aec {settings.pacs_aet} 127.0.0.1 {settings.dicom_port} "
        "FILE.dcm",
    ])


def run(settings: Settings, env_file: str, out: TextIO = sys.stdout, as_json: bool = False) -> int:
    """Run until interrupted; 0 after a clean stop, 1 if a process died on its own.

    With as_json, stdout carries one JSON line of endpoints once everything is up and nothing
    else; the logs still go to their files.
    """
    check_ports_free({"DICOM_PORT": settings.dicom_port, "HTTP_PORT": settings.http_port},
                     env_file)
    logging.basicConfig(stream=sys.stderr if as_json else out, level=logging.INFO,
                        format="[pacs] %(message)s")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    children: list[Child] = []
    try:
        echo = None if as_json else out
        try:
            children.append(start_orthanc(settings, echo=echo, cancelled=stop.is_set))
        except StartCancelled:
            print("Stopped during start-up.", file=sys.stderr, flush=True)
            return 0
        for name, args in SERVICES:
            child = Child(name, [sys.executable, "-m", "gotg_pacs", "--env-file", env_file, *args],
                          settings.log_dir / f"{name}.log", echo=echo)
            child.start()
            children.append(child)
        if as_json:
            print(json.dumps({"ready": True, **endpoints(settings)}), file=out, flush=True)
        else:
            print(banner(settings), file=out, flush=True)
        while not stop.wait(0.5):
            for child in children:
                child.pump()
            dead = [child for child in children if not child.running()]
            if dead:
                for child in dead:
                    print(f"{child.name} exited unexpectedly (code {child.process.returncode}); "
                          f"last log lines:\n{child.last_lines()}", file=sys.stderr, flush=True)
                return 1
        if not as_json:
            print("Stopping...", file=out, flush=True)
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if children and not as_json:
            print("Stopped. Data kept in " + str(settings.storage_path), file=out, flush=True)
