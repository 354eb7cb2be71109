"""`pacs status`: is every part up, how full is the disk, how much is archived, which versions.

One dict feeds both the `--json` output (scripts, HQ) and the text a person reads. Nothing here
may fail because a part is down: a down part is a fact to report, not an exception.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from . import __version__
from .clikit import size_text
from .config import Settings
from .data_disk.move import status as data_disk_status
from .orthanc import Orthanc, OrthancError


def _disk(path: Path) -> dict[str, Any]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # report the filesystem the folder will live on
    usage = shutil.disk_usage(probe)
    return {"path": str(path), "total_bytes": usage.total, "used_bytes": usage.used,
            "free_bytes": usage.free}


def _dcmtk_version() -> str | None:
    """DCMTK's version, from the tools kept on the box for diagnosing modalities."""
    try:
        out = subprocess.run(["storescu", "--version"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"storescu v(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else None


def _orthanc(settings: Settings) -> dict[str, Any]:
    client = Orthanc.from_settings(settings, timeout=5.0)
    try:
        system = client.system()
        statistics = client.statistics()
        plugins = client.plugins()
    except OrthancError as exc:
        return {"name": "orthanc", "up": False, "error": str(exc), "url": client.url}
    return {
        "name": "orthanc", "up": True, "url": client.url,
        "version": system.get("Version"), "aet": system.get("DicomAet"),
        "dicom_port": system.get("DicomPort"), "plugins": plugins,
        "counts": {key: statistics.get(f"Count{key.capitalize()}")
                   for key in ("patients", "studies", "series", "instances")},
        "stored_bytes": int(statistics.get("TotalDiskSize", 0)),
    }


SYNC_SILENT_AFTER = 90  # seconds without a heartbeat (it beats every 30 s)


def _sync(settings: Settings) -> dict[str, Any]:
    from .sync.outbox import Outbox

    if not settings.sync_outbox_file.exists():
        return {"name": "sync", "up": False, "error": "has never run (no outbox yet)"}
    with Outbox(settings.sync_outbox_file, readonly=True) as outbox:
        age = outbox.heartbeat_age()
    if age is None or age > SYNC_SILENT_AFTER:
        silent = "never" if age is None else f"{age:.0f}s ago"
        return {"name": "sync", "up": False, "error": f"not running (last heartbeat {silent})"}
    return {"name": "sync", "up": True, "heartbeat_age_s": round(age, 1)}


def _ris(settings: Settings) -> dict[str, Any]:
    """The worklist and what waits for a person or for the RIS (not counted as a part that
    is up or down: a clinic may have no RIS at all)."""
    from .ris.demographics import DemographicsQueue
    from .ris.orders import Orders
    from .ris.reports import ReportQueue

    with Orders(settings.ris_orders_file, readonly=True) as orders:
        counts = orders.counts()
        unmatched = orders.unmatched_count()
        waiting = orders.counts("statuses").get("waiting", 0)
        reports = ReportQueue(orders).counts()
        held = DemographicsQueue(orders).counts().get("held", 0)
    return {"orders": counts, "on_worklist": counts.get("scheduled", 0)
            + counts.get("in_progress", 0), "unmatched_studies": unmatched,
            "statuses_waiting": waiting, "reports_waiting": reports.get("waiting", 0),
            "merges_held": held,
            "ris_url": settings.ris_url or None,
            "ris_hl7_address": settings.ris_hl7_address or None}


def _outcome(last: dict, now: float) -> dict[str, Any]:
    """One repository's state from its last success and last failure."""
    success, failure = last.get("last_success"), last.get("last_failure")
    failing = bool(failure and (not success or failure["at"] > success["finished_at"]))
    return {"last_success_at": success["finished_at"] if success else None,
            "age_s": round(now - success["finished_at"]) if success else None,
            "archives": [made["archive"] for made in success["archives"]] if success else [],
            "failing": failing, "last_error": failure["error"] if failing else None}


def _backup(settings: Settings, now: float | None = None) -> dict[str, Any]:
    """The last backup and whether backups are failing now (not a running part: never "down").
    With both a backup disk and HQ, the disk's state is the box's; HQ's is shown beside it (a
    clinic offline for a week has no failing backup while the disk takes them)."""
    from .backup.borgmatic import Backups

    if settings.backup_path is None and not settings.remote_backup_url:
        return {"configured": False}
    try:
        last = Backups(settings).last() or {}
    except PermissionError:
        return {"configured": True, "error": "only root may read the backup's state"}
    now = time.time() if now is None else now
    state = _outcome(last, now)
    # Two intervals without a success: the timer, the disk or the run is stuck.
    overdue = bool(settings.backup_enabled and state["last_success_at"]
                   and now - state["last_success_at"] > 2 * settings.backup_interval)
    where = str(settings.backup_path) if settings.backup_path else settings.remote_backup_url
    report = {"configured": True, "enabled": settings.backup_enabled, "overdue": overdue,
              "path": where, **state}
    report["checks"] = {kind: {"ok": outcome.get("ok", False),
                               "age_s": round(now - outcome["at"]),
                               "error": outcome.get("error")}
                        for kind, outcome in last.get("checks", {}).items()}
    # The last backup's copy of Orthanc's index: how long Orthanc paused, or why none was made.
    report["index"] = last.get("index", {})
    if settings.backup_path and settings.remote_backup_url:
        report["remote"] = {"url": settings.remote_backup_url,
                            **_outcome(last.get("remote", {}), now)}
    return report


def collect(settings: Settings) -> dict[str, Any]:
    orthanc = _orthanc(settings)
    services = [orthanc, _sync(settings)]  # each capability adds its service here
    return {
        "site": {"name": settings.pacs_name, "code": settings.site_code,
                 "aet": settings.pacs_aet},
        "ok": all(service["up"] for service in services),
        "services": services,
        "storage": {
            **_disk(settings.storage_path),
            "archive_bytes": orthanc.get("stored_bytes"),
            "max_storage_gb": settings.max_storage_gb,
            "data_disk": data_disk_status(settings),
        },
        "counts": orthanc.get("counts"),
        "backup": _backup(settings),
        "ris": _ris(settings),
        "versions": {"gotg_pacs": __version__, "python": platform.python_version(),
                     "orthanc": orthanc.get("version"), "dcmtk": _dcmtk_version(),
                     "plugins": orthanc.get("plugins", {})},
    }


def render_text(report: dict[str, Any]) -> str:
    site = report["site"]
    lines = [f"{site['name']} (site {site['code']}, AET {site['aet']}): "
             + ("all parts up" if report["ok"] else "SOMETHING IS DOWN")]
    for service in report["services"]:
        if service["up"] and "url" in service:
            lines.append(f"  {service['name']:<10} up    {service.get('version', '')} "
                         f"at {service['url']}")
        elif service["up"]:
            lines.append(f"  {service['name']:<10} up    (heartbeat "
                         f"{service['heartbeat_age_s']:.0f}s ago)")
        else:
            lines.append(f"  {service['name']:<10} DOWN  {service['error']}")
    storage = report["storage"]
    lines.append(f"  storage    {size_text(storage['archive_bytes'])} archived, "
                 f"{size_text(storage['free_bytes'])} free of {size_text(storage['total_bytes'])} "
                 f"on {storage['path']}")
    disk = storage["data_disk"]
    if disk["data_disk"]:
        lines.append("  data disk  " + ("encrypted, " if disk["encrypted"] else "")
                     + ("open, " if disk["unlocked"] else "LOCKED (pacs data-disk unlock), ")
                     + ("mounted" if disk["mounted"] else "NOT MOUNTED"))
    counts = report["counts"]
    if counts:
        lines.append(f"  archive    {counts['patients']} patients, {counts['studies']} studies, "
                     f"{counts['series']} series, {counts['instances']} instances")
    lines.append("  backup     " + _backup_text(report["backup"]))
    ris = report["ris"]
    lines.append(f"  worklist   {ris['on_worklist']} on the list; "
                 f"{ris['unmatched_studies']} stud{'y' if ris['unmatched_studies'] == 1 else 'ies'}"
                 " without an order (pacs ris unmatched); "
                 f"{ris['statuses_waiting']} status(es) waiting for "
                 + ("the RIS" if ris["ris_url"] or ris["ris_hl7_address"]
                    else "a RIS (RIS_URL not set)")
                 + (f"; {ris['reports_waiting']} report(s) waiting for their study"
                    if ris["reports_waiting"] else "")
                 + (f"; {ris['merges_held']} patient merge(s) to confirm (pacs ris "
                    "demographics)" if ris["merges_held"] else ""))
    versions = report["versions"]
    plugins = ", ".join(f"{name} {ver}" for name, ver in sorted(versions["plugins"].items()))
    lines.append(f"  versions   gotg-pacs {versions['gotg_pacs']}, Orthanc "
                 f"{versions['orthanc'] or '?'}, DCMTK {versions['dcmtk'] or 'not installed'}, "
                 f"Python {versions['python']}" + (f"; plugins: {plugins}" if plugins else ""))
    return "\n".join(lines)


def _backup_text(backup: dict[str, Any]) -> str:
    if not backup["configured"]:
        return "NOT CONFIGURED (BACKUP_PATH is empty)"
    if "error" in backup:
        return f"unknown: {backup['error']}"
    hours = None if backup["age_s"] is None else backup["age_s"] / 3600
    last = ("never made" if hours is None
            else f"last {hours:.1f} h ago ({', '.join(backup['archives'])})")
    failing = f"; FAILING: {backup['last_error']}" if backup["failing"] else ""
    failing += "; OVERDUE" if backup["overdue"] else ""
    disabled = "" if backup["enabled"] else " (scheduled backups off: BACKUP_ENABLED)"
    text = f"{last} to {backup['path']}{disabled}{failing}"
    if error := backup.get("index", {}).get("index_error"):
        text += f"; WITHOUT Orthanc's index ({error})"
    for problem in backup.get("index", {}).get("state_errors", []):
        text += f"; NOT CURRENT in it: {problem}"
    names = {"check": "checked", "verify_data": "data verified", "drill": "restore drill",
             "integrity": "integrity check"}
    for kind, outcome in backup.get("checks", {}).items():
        text += (f"; {names.get(kind, kind)} {outcome['age_s'] / 86400:.1f} d ago"
                 + ("" if outcome["ok"] else " FAILED"))
    if remote := backup.get("remote"):
        hours = None if remote["age_s"] is None else remote["age_s"] / 3600
        text += ("; at HQ: " + ("none yet" if hours is None else f"last {hours:.1f} h ago")
                 + (f" (failing: {remote['last_error']})" if remote["failing"] else ""))
    return text
