"""`pacs sync ...`: what staff and scripts ask of the sync to HQ."""

from __future__ import annotations

import logging
import sys
import time

import click

from ..clikit import Context, as_state_owner, emit, json_option, pass_context
from ..orthanc import Orthanc, OrthancError
from .outbox import MODES, Outbox, OutboxError


def _outbox(ctx: Context, readonly: bool = False) -> Outbox:
    try:
        return Outbox(ctx.settings.sync_outbox_file, readonly=readonly)
    except OutboxError as exc:
        raise click.ClickException(str(exc)) from None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@click.group()
@pass_context
def sync(ctx: Context) -> None:
    """Sync of every study to HQ."""
    as_state_owner(ctx.settings)


@sync.command("run")
@json_option
@pass_context
def sync_run(ctx: Context, as_json: bool) -> None:
    """The pacs-sync service (foreground): keeps the outbox level with Orthanc."""
    from .service import run

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format='{"sync": "%(message)s"}' if as_json
                        else "%(asctime)s [sync] %(message)s")
    sys.exit(run(ctx.settings))


@sync.command("status")
@json_option
@pass_context
def sync_status(ctx: Context, as_json: bool) -> None:
    """Mode, feed position, what is owed to HQ per priority, the oldest wait."""
    settings = ctx.settings
    with _outbox(ctx, readonly=True) as outbox:
        report = {"mode": outbox.mode(settings.offline_mode),
                  "configured_mode": settings.offline_mode, "hq_url": settings.hq_url or None,
                  "heartbeat_age_s": outbox.heartbeat_age(), "link": outbox.link(),
                  **outbox.summary(), "refusals": outbox.refusals(5)}
    try:
        last = Orthanc.from_settings(settings, timeout=5).get(
            "/changes", params={"last": ""})["Last"]
        report["feed_lag_changes"] = max(0, last - report["cursor"])
    except OrthancError as exc:
        report["feed_lag_changes"] = None
        report["orthanc_error"] = str(exc)
    link = report["link"]
    lines = [f"sync mode {report['mode']}"
             + (" (set here; OFFLINE_MODE says " + settings.offline_mode + ")"
                if report["mode"] != settings.offline_mode else "")
             + f", HQ {report['hq_url'] or 'not configured (HQ_URL)'}",
             ("link " + link["tier"]
              + (f", {link['throughput_mbps']} Mbit/s" if link.get("throughput_mbps") else "")
              + (f", {link['latency_ms']:.0f} ms" if link.get("latency_ms") else "")
              + (f", HQ unreachable for {_age(link['outage_s'])}"
                 if link.get("circuit") == "open" else "")
              if link.get("tier") else "link not measured yet")
             + f" (service last seen {_age(report['heartbeat_age_s'])} ago)",
             f"feed at change {report['cursor']}, "
             + (f"{report['feed_lag_changes']} behind Orthanc"
                if report["feed_lag_changes"] is not None else "Orthanc not answering"),
             f"oldest waiting {_age(report['oldest_pending_age_s'])}, "
             f"{report['overdue_studies']} studies past their deadline, "
             f"{report['refused_instances']} instances refused or failing"]
    for refusal in report["refusals"]:
        lines.append(f"  refused {refusal['sop_uid']} ({refusal['refusals']}x, next try in "
                     f"{_age(max(0.0, refusal['retry_at'] - time.time()))}): "
                     f"{refusal['last_error']}")
    for priority, counts in report["pending_by_priority"].items():
        lines.append(f"  {priority:<9}{counts['studies']:>6} studies {counts['instances']:>7} "
                     f"instances {counts['bytes'] / 2**20:>10.1f} MB waiting")
    emit(report, as_json, "\n".join(lines))


@sync.command("queue")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@json_option
@pass_context
def sync_queue(ctx: Context, limit: int, as_json: bool) -> None:
    """Studies waiting for HQ, in the order they will go."""
    with _outbox(ctx, readonly=True) as outbox:
        rows = outbox.queue(limit)
    now = time.time()

    def due(row: dict) -> str:
        return "now" if row["due_at"] <= now else "in " + _age(row["due_at"] - now)

    text = "\n".join(
        f"{row['priority']:<9} due {due(row):<10} {row['instances']:>5} instances "
        f"{row['bytes'] / 2**20:>8.1f} MB {'stable' if row['stable'] else 'arriving'}  "
        f"{row['study_uid']}"
        for row in rows) or "nothing waiting"
    emit(rows, as_json, text)


@sync.command("prioritize")
@click.argument("study")
@json_option
@pass_context
def sync_prioritize(ctx: Context, study: str, as_json: bool) -> None:
    """Send STUDY (Study Instance UID or Orthanc ID) first, even before it is complete."""
    from .outbox import mark_urgent

    with _outbox(ctx) as outbox:
        found = mark_urgent(outbox, Orthanc.from_settings(ctx.settings), study)
    if not found:
        raise click.ClickException(f"no study {study!r} in this archive")
    emit({"prioritized": found, "priority": "critical"}, as_json,
         f"{len(found)} study(ies) marked critical: sent first, even before complete")


def _hq_configured(ctx: Context) -> None:
    if not ctx.settings.hq_url:
        raise click.ClickException("no HQ configured (set HQ_URL and HQ_TOKEN)")


@sync.command("test-connection")
@json_option
@pass_context
def sync_test_connection(ctx: Context, as_json: bool) -> None:
    """Can this site reach HQ, and does HQ accept its credential? Exit 1 if not."""
    from .transport import HQClient, HQRefused, HQUnreachable

    _hq_configured(ctx)
    client = HQClient.from_settings(ctx.settings)
    started = time.monotonic()
    try:
        client.holdings([])
    except HQRefused as exc:
        why = ("HQ refused this site's credential (HQ_TOKEN)" if exc.status == 401
               else str(exc))
        emit({"ok": False, "hq_url": client.url, "error": why}, as_json, why)
        sys.exit(1)
    except HQUnreachable as exc:
        emit({"ok": False, "hq_url": client.url, "error": str(exc)}, as_json,
             f"HQ not reachable: {exc}")
        sys.exit(1)
    latency = time.monotonic() - started
    emit({"ok": True, "hq_url": client.url, "latency_ms": round(latency * 1000, 1)}, as_json,
         f"HQ at {client.url} reachable, credential accepted ({latency * 1000:.0f} ms)")


@sync.command("now")
@json_option
@pass_context
def sync_now(ctx: Context, as_json: bool) -> None:
    """Send everything that is ready, now, showing progress (waits for nothing else)."""
    from .feed import Feed
    from .sender import Sender, SenderBusy
    from .transport import HQClient, HQUnreachable

    _hq_configured(ctx)
    with _outbox(ctx) as outbox:
        if outbox.mode(ctx.settings.offline_mode) == "offline":
            raise click.ClickException("sync mode is offline here: `pacs sync mode auto` first")
        clinic = Orthanc.from_settings(ctx.settings)
        feed = Feed(clinic, outbox)
        while not feed.step():
            pass
        try:
            sender = Sender(ctx.settings, outbox, clinic, HQClient.from_settings(ctx.settings))
        except SenderBusy as exc:
            raise click.ClickException(str(exc)) from None
        totals = {"confirmed": 0, "already_held": 0, "refused": 0}
        try:
            while True:
                try:
                    sent = sender.send()
                except HQUnreachable as exc:
                    raise click.ClickException(
                        f"HQ not reachable ({exc}); everything stays queued, the sync service "
                        "keeps trying") from None
                for key in totals:
                    totals[key] += len(getattr(sent, key))
                if not (sent.confirmed or sent.already_held):
                    break
                if not as_json:
                    click.echo(f"  {totals['confirmed']} sent, {totals['already_held']} already "
                               "at HQ", err=True)
        finally:
            sender.close()
        totals["still_waiting"] = outbox.summary()["instances"].get(
            "pending", {}).get("instances", 0)
    emit(totals, as_json, f"{totals['confirmed']} sent and confirmed, {totals['already_held']} "
         f"already at HQ, {totals['refused']} refused, {totals['still_waiting']} still waiting "
         "(studies not yet complete wait for StableAge; refused ones wait for their next try)")


@sync.command("mode")
@click.argument("mode", type=click.Choice(MODES))
@json_option
@pass_context
def sync_mode(ctx: Context, mode: str, as_json: bool) -> None:
    """offline: never reach out to HQ from here; auto: whenever a network exists."""
    with _outbox(ctx) as outbox:
        outbox.set_mode(mode)
    emit({"mode": mode}, as_json, f"sync mode is now {mode}")



@sync.command("inbound")
@click.option("--limit", type=click.IntRange(1, 10000), default=20, show_default=True)
@json_option
@pass_context
def sync_inbound(ctx: Context, limit: int, as_json: bool) -> None:
    """What HQ sends this site (reports, prior studies): waiting, delivered, and progress."""
    from .inbound import Inbox, InboxError, partial_path

    directory = ctx.settings.state_path / "sync" / "inbound"
    try:
        with Inbox(directory / "inbound.sqlite", readonly=True) as inbox:
            report = {**inbox.summary(), "items": inbox.items(limit)}
    except InboxError:
        report = {"instances": {}, "received_bytes": 0, "last_poll_age_s": None, "items": []}
    for item in report["items"]:
        part = partial_path(directory, item["seq"], item["md5"])
        item["have_bytes"] = (item["size"] if item["state"] in ("stored", "delivered")
                              else part.stat().st_size if part.exists() else 0)
    counts = report["instances"]

    def count(state: str) -> str:
        found = counts.get(state, {"instances": 0, "bytes": 0})
        return f"{found['instances']} {state} ({found['bytes'] / 2**20:.1f} MB)"

    lines = [f"from HQ: {count('waiting')}, {count('stored')} not yet acknowledged, "
             f"{count('delivered')}, {count('conflict')}; HQ last asked "
             f"{_age(report['last_poll_age_s'])} ago"]
    for item in report["items"]:
        lines.append(f"  {item['state']:<9} {item['have_bytes'] / 2**20:>7.1f}/"
                     f"{item['size'] / 2**20:.1f} MB {'urgent ' if item['urgent'] else ''}"
                     f"{item['sop_uid']}" + (f"  ({item['last_error']})"
                                             if item["last_error"] else ""))
    emit(report, as_json, "\n".join(lines))
