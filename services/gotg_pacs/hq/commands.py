"""`pacs hq ...`: the receiver, site and operator credentials, what HQ sends sites, and the
reconciliation list."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import click
from werkzeug.serving import WSGIRequestHandler, run_simple

from ..clikit import Context, as_state_owner, emit, json_option, matching, pass_context
from .sites import Sites


@click.group()
@pass_context
def hq(ctx: Context) -> None:
    """The HQ archive's receiver and site credentials."""
    # `backups` keeps root: it reads the escrow, then runs borg as the repositories' owner;
    # `tls` too: HQ's root key is root's alone, never readable by the network-facing receiver.
    if click.get_current_context().invoked_subcommand not in ("backups", "tls"):
        as_state_owner(ctx.settings)


class _StallingClientsTimeOut(WSGIRequestHandler):
    """A clinic that lost its link mid-chunk sends no FIN: without a socket timeout its
    request would hold the upload's lock forever. A minute without a byte ends it (what
    arrived is kept; the clinic resumes from there)."""

    timeout = 60


@hq.command("run")
@json_option
@pass_context
def hq_run(ctx: Context, as_json: bool) -> None:
    """Run the receiver in the foreground on HQ_RECEIVER_PORT (loopback)."""
    from .receiver import create_app

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[hq] %(message)s")
    settings = ctx.settings
    emit({"listening": f"http://127.0.0.1:{settings.hq_receiver_port}"}, as_json,
         f"HQ receiver on http://127.0.0.1:{settings.hq_receiver_port}")
    sys.stdout.flush()
    run_simple("127.0.0.1", settings.hq_receiver_port, create_app(settings), threaded=True,
               request_handler=_StallingClientsTimeOut)


@hq.group("site")
def site() -> None:
    """Sites allowed to sync here, each with its own credential."""


_code = matching(r"[a-z0-9][a-z0-9-]{1,31}", "2-32 characters a-z 0-9 - (the site's SITE_CODE)")


@site.command("add")
@click.argument("code", callback=_code)
@json_option
@pass_context
def site_add(ctx: Context, code: str, as_json: bool) -> None:
    """Create (or replace) CODE's credential; shown once: put it in the site's HQ_TOKEN."""
    token = Sites(ctx.settings.hq_dir / "sites.json").add(code)
    emit({"site": code, "hq_token": token}, as_json,
         f"HQ_TOKEN={token}\n(set it in {code}'s pacs.env; HQ keeps only its hash)")


@site.command("list")
@json_option
@pass_context
def site_list(ctx: Context, as_json: bool) -> None:
    """Sites with a credential."""
    codes = Sites(ctx.settings.hq_dir / "sites.json").list()
    emit(codes, as_json, "\n".join(codes) or "no sites")


@site.command("revoke")
@click.argument("code", callback=_code)
@json_option
@pass_context
def site_revoke(ctx: Context, code: str, as_json: bool) -> None:
    """Revoke CODE's credential at once (a stolen box can no longer upload)."""
    if not Sites(ctx.settings.hq_dir / "sites.json").revoke(code):
        raise click.ClickException(f"no site {code!r}")
    emit({"revoked": code}, as_json, f"revoked {code}")


@site.command("passphrase")
@click.argument("code", callback=_code)
@json_option
@pass_context
def site_passphrase(ctx: Context, code: str, as_json: bool) -> None:
    """CODE's backup passphrases as HQ keeps them (newest last): what reads its backups once
    its box is gone (`pacs backup passphrase --set` on the new box)."""
    from .escrow import Escrow

    kept = Escrow(ctx.settings.hq_dir / "escrow").kept(code)
    if not kept:
        raise click.ClickException(f"HQ holds no backup passphrase for {code!r}")
    emit(kept, as_json, "\n".join(entry["passphrase"] for entry in kept))


@site.command("keys")
@click.argument("code", callback=_code)
@json_option
@pass_context
def site_keys(ctx: Context, code: str, as_json: bool) -> None:
    """The repository keys of CODE's backup disks as HQ keeps them (newest last), sealed by its
    passphrase: what reads a disk whose own copy of its key is damaged."""
    from .escrow import Escrow

    kept = Escrow(ctx.settings.hq_dir / "escrow").keys(code)
    if not kept:
        raise click.ClickException(f"HQ holds no repository key for {code!r}")
    emit(kept, as_json, "\n".join(entry["key"].rstrip("\n") for entry in kept))


@site.command("disk-passphrase")
@click.argument("code", callback=_code)
@json_option
@pass_context
def site_disk_passphrase(ctx: Context, code: str, as_json: bool) -> None:
    """The recovery passphrases of CODE's encrypted data disks (newest last): what opens one
    whose key stick is lost (`pacs data-disk unlock --passphrase` on the box)."""
    from .escrow import Escrow

    kept = Escrow(ctx.settings.hq_dir / "escrow").disks(code)
    if not kept:
        raise click.ClickException(f"HQ holds no data disk passphrase for {code!r}")
    emit(kept, as_json, "\n".join(f"{entry['luks_uuid']}  {entry['passphrase']}"
                                  for entry in kept))


@site.command("audit")
@click.argument("code", callback=_code)
@json_option
@pass_context
def site_audit(ctx: Context, code: str, as_json: bool) -> None:
    """CODE's audit trails as HQ holds them (one per box the site ran on): how many events,
    from when to when, and whether each chain is intact (exit 1 if one is not)."""
    from .. import audit
    from .audit import Trails

    shown, broken = [], False
    for path in Trails(ctx.settings.hq_dir / "audit").of(code):
        events, _ = audit.read(path)
        problems = audit.verify(events)
        broken = broken or bool(problems)
        shown.append({"trail": path.stem, "events": len(events),
                      "host": events[0].get("host", "") if events else "",
                      "first": events[0].get("time") if events else None,
                      "last": events[-1].get("time") if events else None,
                      "chain_problems": problems, "file": str(path)})
    if not shown:
        raise click.ClickException(f"HQ holds no audit trail of {code!r}")
    emit(shown, as_json, "\n".join(
        f"{t['trail']} {t['host'] or '?'}: {t['events']} events, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(t['first'] or 0))} to "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(t['last'] or 0))}, "
        + ("chain intact" if not t["chain_problems"]
           else "CHAIN BROKEN: " + "; ".join(t["chain_problems"])) + f" ({t['file']})"
        for t in shown))
    sys.exit(1 if broken else 0)


@hq.group("backups")
def backups() -> None:
    """The sites' backup repositories kept at HQ (HQ_BACKUP_PATH)."""


@backups.command("prune")
@click.option("--site", "code", callback=_code, help="Only this site (default: every site).")
@json_option
@pass_context
def backups_prune(ctx: Context, code: str | None, as_json: bool) -> None:
    """Audit each site's repository (no archive may vanish that HQ did not prune), then prune
    it with the sites' retention and compact it. A failed audit leaves that repository as it is
    and exits 1."""
    from .backups import AuditFailed, SiteBackups, sites

    if ctx.settings.hq_backup_path is None:
        raise click.ClickException("HQ_BACKUP_PATH is not set: this HQ keeps no site backups")
    outcomes, failed = [], False
    for site_code in [code] if code else sites(ctx.settings):
        try:
            outcomes.append(SiteBackups(ctx.settings, site_code).prune())
        except (AuditFailed, RuntimeError) as exc:
            outcomes.append({"site": site_code, "error": str(exc)})
            failed = True
    emit(outcomes, as_json, "\n".join(
        f"{o['site']}: FAILED: {o['error']}" if "error" in o else
        f"{o['site']}: {len(o['pruned'])} pruned, {len(o['kept'])} kept"
        + (" (first audit)" if o["first_audit"] else "") for o in outcomes)
        or "no site repository in HQ_BACKUP_PATH")
    if failed:
        sys.exit(1)


@backups.command("check")
@click.option("--site", "code", callback=_code, help="Only this site (default: every site).")
@click.option("--verify-data", is_flag=True,
              help="Read and verify every chunk's data (long: HQ's disks, not a site's link).")
@json_option
@pass_context
def backups_check(ctx: Context, code: str | None, verify_data: bool, as_json: bool) -> None:
    """borg's check of each site's repository at HQ: segments and archives, or with
    --verify-data every chunk's data. Exits 1 if any check fails."""
    from .backups import SiteBackups, sites

    if ctx.settings.hq_backup_path is None:
        raise click.ClickException("HQ_BACKUP_PATH is not set: this HQ keeps no site backups")
    outcomes = [SiteBackups(ctx.settings, site_code).check(verify_data)
                for site_code in ([code] if code else sites(ctx.settings))]
    emit(outcomes, as_json, "\n".join(
        f"{o['site']}: {'ok' if o['ok'] else 'FAILED: ' + o['error']}"
        + (f" ({o['seconds']} s)" if o["ok"] else "") for o in outcomes)
        or "no site repository in HQ_BACKUP_PATH")
    if not all(o["ok"] for o in outcomes):
        sys.exit(1)


@hq.command("send")
@click.option("--site", "code", required=True, callback=_code, help="The site to send to.")
@click.option("--urgent", is_flag=True, help="Before anything else waiting for the site.")
@click.option("--again", is_flag=True,
              help="Also what the site already acknowledged (it lost it: an old restore).")
@click.argument("refs", nargs=-1, required=True)
@json_option
@pass_context
def hq_send(ctx: Context, code: str, urgent: bool, again: bool, refs: tuple[str, ...],
            as_json: bool) -> None:
    """Queue studies, series or instances HQ holds (UIDs or Orthanc IDs) for a site: a report,
    a prior study. The site fetches them on its own link and time, and acknowledges each."""
    from ..orthanc import Orthanc, OrthancError
    from .outbound import Outbound, resolve

    settings = ctx.settings
    if code not in Sites(settings.hq_dir / "sites.json").list():
        raise click.ClickException(f"no site {code!r} (`pacs hq site add {code}` first)")
    orthanc = Orthanc.from_settings(settings, timeout=60)
    instances, unknown = [], []
    try:
        for ref in refs:
            found = resolve(orthanc, ref)
            instances += found
            if not found:
                unknown.append(ref)
    except OrthancError as exc:
        raise click.ClickException(f"HQ's archive: {exc}") from None
    if unknown:
        raise click.ClickException(f"HQ holds nothing named {', '.join(unknown)}; "
                                   "nothing queued")
    counts = Outbound(settings.hq_dir / "outbound.sqlite").queue(code, instances, urgent, again)
    size = sum(item["size"] for item in instances)
    emit({"site": code, "instances": len(instances), "bytes": size, **counts}, as_json,
         f"{counts['queued'] + counts['requeued']} instances ({size / 2**20:.1f} MB in all) "
         f"queued for {code}; {counts['waiting']} were already waiting, {counts['delivered']} "
         "already delivered" + (" (--again sends those too)" if counts["delivered"] else ""))


@hq.command("outbound")
@click.option("--site", "code", callback=_code,
              help="Only this site.")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@json_option
@pass_context
def hq_outbound(ctx: Context, code: str | None, limit: int, as_json: bool) -> None:
    """What HQ sends to sites: waiting or delivered, newest first, bytes served per instance."""
    from .outbound import Outbound

    rows = Outbound(ctx.settings.hq_dir / "outbound.sqlite").listing(code, limit)
    emit(rows, as_json, "\n".join(
        f"{row['site']:<12} {'delivered' if row['delivered_at'] else 'waiting':<9} "
        f"{row['size'] / 2**20:>8.2f} MB served {row['served'] / 2**20:>8.2f} MB "
        f"{'urgent ' if row['urgent'] else ''}{row['sop_uid']}" for row in rows)
        or "nothing sent to sites")


@hq.group("operator")
def operator() -> None:
    """HQ operators: people who read and resolve the reconciliation list over HTTP."""


_operator_name = matching(r"[a-z0-9][a-z0-9._-]{1,31}",
                          "2-32 characters a-z 0-9 . _ - (who resolves, in the audit)")


def _operators(ctx: Context) -> Sites:
    return Sites(ctx.settings.hq_dir / "operators.json")


@operator.command("add")
@click.argument("name", callback=_operator_name)
@json_option
@pass_context
def operator_add(ctx: Context, name: str, as_json: bool) -> None:
    """Create (or replace) NAME's token; shown once, HQ keeps only its hash."""
    token = _operators(ctx).add(name)
    emit({"operator": name, "token": token}, as_json,
         f"{token}\n({name}'s bearer token for /api/v1/reconciliation; HQ keeps only its "
         "hash)")


@operator.command("list")
@json_option
@pass_context
def operator_list(ctx: Context, as_json: bool) -> None:
    """Operators with a token."""
    names = _operators(ctx).list()
    emit(names, as_json, "\n".join(names) or "no operators")


@operator.command("revoke")
@click.argument("name", callback=_operator_name)
@json_option
@pass_context
def operator_revoke(ctx: Context, name: str, as_json: bool) -> None:
    """Revoke NAME's token at once."""
    if not _operators(ctx).revoke(name):
        raise click.ClickException(f"no operator {name!r}")
    emit({"revoked": name}, as_json, f"revoked {name}")


@hq.group("reconcile")
def reconcile() -> None:
    """The reconciliation list: disagreements between sites and versions, for a person."""


def _ledger(ctx: Context):
    from .conflicts import Ledger

    return Ledger(ctx.settings.hq_dir)


def _describe(entry: dict, detail: bool) -> str:
    from ..clikit import printable

    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["updated"]))
    line = (f"#{entry['id']} {entry['state']:8} {entry['kind']:22} {when}  "
            f"{printable(entry['subject'])}  ({len(entry['variants'])} variants)")
    if not detail:
        return line
    lines = [line]
    for variant in entry["variants"]:
        lines.append("    " + "  ".join(f"{key}={printable(value)}"
                                        for key, value in variant.items()))
    for resolution in entry["resolutions"]:
        at = time.strftime("%Y-%m-%d %H:%M", time.localtime(resolution["at"]))
        lines.append(f"  resolved {at} by {printable(resolution['by'])}: "
                     f"{resolution['decision']} {printable(resolution['note'])}")
    return "\n".join(lines)


@reconcile.command("list")
@click.option("--state", type=click.Choice(["open", "resolved", "all"]), default="open",
              show_default=True)
@json_option
@pass_context
def reconcile_list(ctx: Context, state: str, as_json: bool) -> None:
    """Entries waiting for a decision (or resolved, or all)."""
    entries = _ledger(ctx).entries(None if state == "all" else state)
    emit(entries, as_json,
         "\n".join(_describe(entry, False) for entry in entries) or f"no {state} entries")


@reconcile.command("show")
@click.argument("entry_id", type=int)
@json_option
@pass_context
def reconcile_show(ctx: Context, entry_id: int, as_json: bool) -> None:
    """One entry with every variant seen and every decision taken."""
    entry = _ledger(ctx).entry(entry_id)
    if entry is None:
        raise click.ClickException(f"no entry {entry_id}")
    emit(entry, as_json, _describe(entry, True))


@reconcile.command("resolve")
@click.argument("entry_id", type=int)
@click.option("--decision", required=True,
              type=click.Choice(["same-patient", "different-patients", "acknowledged"]))
@click.option("--note", default="", help="Why (kept in the audit log).")
@click.option("--by", "by", default=lambda: os.environ.get("SUDO_USER") or
              os.environ.get("USER") or "hq", show_default="the login name",
              help="Who decides (kept in the audit log).")
@json_option
@pass_context
def reconcile_resolve(ctx: Context, entry_id: int, decision: str, note: str, by: str,
                      as_json: bool) -> None:
    """Record a decision; no image is changed."""
    entry = _ledger(ctx).resolve(entry_id, decision, note, by)
    if entry is None:
        raise click.ClickException(f"no entry {entry_id}")
    emit(entry, as_json, _describe(entry, True))


@hq.group("tls")
def hq_tls() -> None:
    """HQ's root certificate authority, which vouches for every site's own CA."""


def _authority(ctx: Context):
    from .authority import Authority

    return Authority(ctx.settings.hq_dir / "authority")


@hq_tls.command("init")
@json_option
@pass_context
def hq_tls_init(ctx: Context, as_json: bool) -> None:
    """Make HQ's root CA once (kept if it exists); install root.crt on HQ's devices."""
    authority = _authority(ctx)
    created, root_print = authority.init()
    emit({"created": created, "root": str(authority.cert_file), "fingerprint": root_print},
         as_json, f"{'created' if created else 'kept'} {authority.cert_file}\n"
                  f"fingerprint (SHA-256) {root_print}")


@hq_tls.command("sign")
@click.argument("csr", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--site", "code", callback=_code, required=True,
              help="The site whose CA this is (its SITE_CODE).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@json_option
@pass_context
def hq_tls_sign(ctx: Context, csr: Path, code: str, out: Path, as_json: bool) -> None:
    """Sign a site CA's request (`pacs tls csr` at the site); take OUT back to the site for
    `pacs tls install-ca`."""
    from ..web.tls import TLSError

    try:
        chain = _authority(ctx).sign_site(csr.read_text(), code)
    except TLSError as exc:
        raise click.ClickException(str(exc)) from None
    out.write_text(chain)
    emit({"site": code, "written": str(out)}, as_json,
         f"wrote {out}: on {code}, `pacs tls install-ca {out.name}`")
