"""`pacs hq ...`: the receiver, the site credentials and what HQ sends sites, at HQ."""

from __future__ import annotations

import logging
import re
import sys

import click
from werkzeug.serving import WSGIRequestHandler, run_simple

from ..clikit import Context, emit, json_option, pass_context
from .sites import Sites


@click.group()
def hq() -> None:
    """The HQ archive's receiver and site credentials."""


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


def _code(_ctx: click.Context, _param: click.Parameter, code: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,31}", code):
        raise click.BadParameter("2-32 characters a-z 0-9 - (the site's SITE_CODE)")
    return code


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
@click.option("--site", "code", callback=lambda c, p, v: v and _code(c, p, v),
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
