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
from .process import (
    Child,
    StartCancelled,
    StartError,
    check_ports_free,
    start_orthanc,
    start_proxy,
    wait_listening,
)

# Our services, as systemd runs them on the appliance (one unit each), Orthanc first.
# With the setting naming the port each listens on, waited for before "running" is said.
SERVICES = (("sync", ("sync", "run"), None), ("web", ("web", "run"), "web_api_port"),
            ("ris", ("ris", "run"), "hl7_port"))


def origin(settings: Settings) -> str:
    """The appliance's HTTPS origin as a browser on this machine reaches it."""
    port = "" if settings.https_port == 443 else f":{settings.https_port}"
    return f"https://localhost{port}"


def endpoints(settings: Settings) -> dict[str, object]:
    https = origin(settings)
    return {"name": settings.pacs_name, "aet": settings.pacs_aet, "dicom_port": settings.dicom_port,
            "dicom_access": settings.dicom_access, "origin": https,
            "orthanc_explorer": f"{https}/orthanc/app/explorer.html",
            "rest": f"{https}/orthanc/", "dicomweb": f"{https}/dicom-web/",
            "hl7_port": settings.hl7_port, "mpps_port": settings.mpps_port,
            "orthanc_loopback": f"{settings.orthanc_url}/",
            "ca_certificate": str(settings.tls_dir / "ca-chain.crt"),
            "data": str(settings.storage_path), "logs": str(settings.log_dir)}


def banner(settings: Settings) -> str:
    https = origin(settings)
    auth = " (login: admin / ADMIN_PASSWORD)" if settings.enable_auth else ""
    return "\n".join([
        f"GOTG PACS '{settings.pacs_name}' is running. Ctrl-C stops it.",
        f"  DICOM        AET {settings.pacs_aet} on port {settings.dicom_port} "
        f"(access: {settings.dicom_access})",
        f"  Orthanc      {https}/orthanc/app/explorer.html{auth}",
        f"  REST API     {https}/orthanc/  (loopback only: {settings.orthanc_url}/)",
        f"  DICOMweb     {https}/dicom-web/",
        f"  HL7 orders   MLLP on port {settings.hl7_port} (ORM^O01, OMI^O23: the worklist)",
        f"  MPPS         AET {settings.pacs_aet} on port {settings.mpps_port}",
        f"  Trust        {settings.tls_dir / 'ca-chain.crt'} (this site's CA; `pacs tls show`)",
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
    ports = {"DICOM_PORT": settings.dicom_port, "HTTP_PORT": settings.http_port,
             "HTTPS_PORT": settings.https_port, "HTTP_REDIRECT_PORT": settings.http_redirect_port,
             "WEB_API_PORT": settings.web_api_port, "HL7_PORT": settings.hl7_port,
             "MPPS_PORT": settings.mpps_port}
    check_ports_free({key: port for key, port in ports.items() if port}, env_file)
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
        children.append(start_proxy(settings, echo=echo))
        listening = []  # (service, the setting naming its port)
        for name, args, port in SERVICES:
            child = Child(name, [sys.executable, "-m", "gotg_pacs", "--env-file", env_file, *args],
                          settings.log_dir / f"{name}.log", echo=echo)
            child.start()
            children.append(child)
            if port:
                listening.append((child, port))
        for child, port in listening:
            if not wait_listening(child, getattr(settings, port), 60):
                raise StartError(f"the {child.name} service did not come up on port "
                                 f"{getattr(settings, port)}:\n{child.last_lines()}")
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
