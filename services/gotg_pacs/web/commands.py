"""`pacs web serve|prepare` (nginx's unit: start and reload), `pacs web run` (the web service),
`pacs user ...` and `pacs tls ...`: what a tablet must trust, and HQ vouching for the site's
certificate authority."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from ..clikit import Context, emit, json_option, pass_context
from . import nginx
from .policy import ROLES
from .tls import Outcome, TLSError, fingerprint, names_of


@click.group()
def web() -> None:
    """The appliance's HTTPS origin (nginx)."""


_appliance = click.option(
    "--appliance", is_flag=True,
    help=f"As systemd runs it on the appliance: workers as {nginx.APPLIANCE_WORKER_USER}, "
         f"pid file {nginx.APPLIANCE_PID_FILE}.")
_hq = click.option("--hq", is_flag=True,
                   help="HQ's origin: also carry the clinics' uploads to the HQ receiver under "
                        "/sync/.")


def _report(path: Path, outcome: Outcome) -> list[str]:
    lines = [f"wrote {path}"]
    if outcome.ca_created:
        lines.append(f"created this site's certificate authority; fingerprint (SHA-256) "
                     f"{outcome.ca_fingerprint}")
    if outcome.server_issued:
        lines.append(f"issued the server certificate ({outcome.server_issued}) for "
                     + ", ".join(outcome.names))
    return lines


@web.command("prepare")
@_appliance
@_hq
@click.option("--reload", "reload_pid", type=int, default=None,
              help="Then have the nginx master with this pid load it (the unit's $MAINPID).")
@json_option
@pass_context
def web_prepare(ctx: Context, appliance: bool, hq: bool, reload_pid: int | None,
                as_json: bool) -> None:
    """Make or renew the site's TLS material, render nginx's configuration and have nginx test
    it (nginx's unit reloads with this every 10 minutes)."""
    from ..process import StartError, prepare_proxy

    prepared = {}
    try:  # a configuration nginx would refuse is never handed to the running one
        prepare_proxy(ctx.settings, appliance, hq,
                      report=lambda path, outcome: prepared.update(path=path, outcome=outcome))
    except StartError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    path, outcome = prepared["path"], prepared["outcome"]
    if reload_pid:
        os.kill(reload_pid, signal.SIGHUP)
    emit({"config": str(path), "ca_created": outcome.ca_created,
          "server_issued": outcome.server_issued, "names": outcome.names,
          "ca_fingerprint": outcome.ca_fingerprint}, as_json, "\n".join(_report(path, outcome)))


@web.command("serve")
@_appliance
@_hq
@json_option
@pass_context
def web_serve(ctx: Context, appliance: bool, hq: bool, as_json: bool) -> None:
    """Prepare, have nginx test its configuration, then become nginx in the foreground (the
    appliance's nginx unit runs this). What was prepared goes to stderr (the journal)."""
    from ..process import StartError, prepare_proxy

    def report(path: Path, outcome: Outcome) -> None:
        if as_json:
            click.echo(json.dumps({"config": str(path), "ca_created": outcome.ca_created,
                                   "server_issued": outcome.server_issued}), err=True)
        else:
            for line in _report(path, outcome):
                click.echo(line, err=True)

    try:
        argv = prepare_proxy(ctx.settings, appliance, hq, report=report)
    except StartError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    sys.stderr.flush()
    os.execv(argv[0], argv)


@web.command("run")
@json_option
@pass_context
def web_run(ctx: Context, as_json: bool) -> None:
    """Run the web service (logins, accounts, marking urgent) on WEB_API_PORT, loopback."""
    import logging

    from werkzeug.serving import run_simple

    from .app import create_app

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[web] %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # nginx logs every request
    settings = ctx.settings
    app = create_app(settings)
    emit({"listening": f"http://127.0.0.1:{settings.web_api_port}"}, as_json,
         f"web service on http://127.0.0.1:{settings.web_api_port}")
    sys.stdout.flush()
    run_simple("127.0.0.1", settings.web_api_port, app, threaded=True)


@click.group()
def user() -> None:
    """Accounts for the web pages: admin, clinician, radiographer, hq_operator."""


def _users(ctx: Context):
    from ..clikit import as_state_owner
    from .users import Users

    as_state_owner(ctx.settings)  # the service's database stays the service's
    return Users.from_settings(ctx.settings)


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True)
@json_option
@pass_context
def user_add(ctx: Context, name: str, role: str, as_json: bool) -> None:
    """A new account; its one-time password is shown once and must be changed at first login."""
    from .users import UserError

    try:
        password = _users(ctx).add(name, role)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    emit({"name": name, "role": role, "one_time_password": password}, as_json,
         f"{name} ({role}): one-time password {password} (changed at first login)")


@user.command("list")
@json_option
@pass_context
def user_list(ctx: Context, as_json: bool) -> None:
    """Every account, its role and state."""
    rows = _users(ctx).list()
    emit(rows, as_json, "\n".join(
        f"{row['name']:<20} {row['role']:<13}"
        + (" disabled" if row["disabled"] else "") + (" locked" if row["locked"] else "")
        + (" (must change password)" if row["must_change_password"] else "")
        for row in rows) or "no accounts yet (the web service makes admin at its first start)")


@user.command("reset")
@click.argument("name")
@json_option
@pass_context
def user_reset(ctx: Context, name: str, as_json: bool) -> None:
    """A new one-time password for NAME; their sessions end everywhere."""
    from .users import UserError

    try:
        password = _users(ctx).reset(name)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    emit({"name": name, "one_time_password": password}, as_json,
         f"{name}: one-time password {password} (changed at first login)")


@user.command("disable")
@click.argument("name")
@click.option("--enable", is_flag=True, help="Enable the account again instead.")
@json_option
@pass_context
def user_disable(ctx: Context, name: str, enable: bool, as_json: bool) -> None:
    """Disable NAME (their sessions end at once everywhere), or --enable it again."""
    from .users import UserError

    try:
        _users(ctx).set_disabled(name, not enable)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    emit({"name": name, "disabled": not enable}, as_json,
         f"{name} {'enabled' if enable else 'disabled; every session ended'}")


@click.group()
def tls() -> None:
    """The site's certificate authority: what tablets trust."""


@tls.command("show")
@json_option
@pass_context
def tls_show(ctx: Context, as_json: bool) -> None:
    """The CA fingerprint to compare on a tablet, the names the server certificate covers and
    when it expires."""
    material = nginx.site_tls(ctx.settings)
    try:
        ca, server = material.ca_cert(), material.server_cert()
    except FileNotFoundError:
        click.echo("no TLS material yet: it is made when the web server first starts "
                   "(`pacs web prepare`)", err=True)
        sys.exit(1)
    chain = material.ca_chain_file.read_text()
    report = {
        "ca": str(material.ca_chain_file), "ca_subject": ca.subject.rfc4514_string(),
        "ca_fingerprint": fingerprint(ca), "ca_expires": ca.not_valid_after_utc.isoformat(),
        "signed_by_hq": chain.count("BEGIN CERTIFICATE") > 1,
        "server_names": sorted(names_of(server)),
        "server_expires": server.not_valid_after_utc.isoformat(),
    }
    emit(report, as_json, "\n".join([
        f"site CA       {report['ca_subject']}",
        f"fingerprint   {report['ca_fingerprint']}",
        f"CA expires    {ca.not_valid_after_utc:%Y-%m-%d}"
        + ("  (signed by HQ)" if report["signed_by_hq"] else "  (self-signed)"),
        f"server names  {', '.join(report['server_names'])}",
        f"server cert   expires {server.not_valid_after_utc:%Y-%m-%d} (renewed automatically)",
        f"tablets       download {nginx.CA_DOWNLOAD} from this box and compare the fingerprint",
    ]))


@tls.command("csr")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@json_option
@pass_context
def tls_csr(ctx: Context, out: Path, as_json: bool) -> None:
    """A signing request for the site CA, to take to HQ (`pacs hq tls sign`)."""
    out.write_text(nginx.site_tls(ctx.settings).csr())
    emit({"written": str(out)}, as_json, f"wrote {out}: HQ signs it with `pacs hq tls sign`")


@tls.command("install-ca")
@click.argument("chain", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@pass_context
def tls_install_ca(ctx: Context, chain: Path, as_json: bool) -> None:
    """Put HQ's signature of this site's CA in place; restart nginx to serve it."""
    try:
        root = nginx.site_tls(ctx.settings).install_ca_chain(chain.read_text())
    except TLSError as exc:
        click.echo(f"not installed: {exc}", err=True)
        sys.exit(1)
    emit({"installed": str(chain), "hq_root_fingerprint": root}, as_json,
         f"installed; HQ root fingerprint {root}. Restart the web server (systemctl restart "
         "nginx) to serve it.")
