"""`pacs hq ...`: the receiver and the site credentials, on the HQ archive."""

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
