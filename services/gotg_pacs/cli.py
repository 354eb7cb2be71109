"""`pacs`: the one command site IT, HQ IT and scripts use.

Each capability adds its group here and keeps the work in its own package. Every command takes
`--json`; configuration problems end the command with exit status 2 and one line on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from . import __version__, durable, orthanc_conf, reference
from .backup import commands as backup_commands
from .clikit import Context, emit, json_option, matching, pass_context, printable
from .config import AETitle, ConfigError, default_env_file, read_env_file, schema
from .data_disk import commands as data_disk_commands
from .hq import commands as hq_commands
from .orthanc import Orthanc, OrthancError
from .process import StartError
from .ris import commands as ris_commands
from .sync import commands as sync_commands
from .web import commands as web_commands

EXIT_CONFIG = 2


@click.group()
@click.version_option(__version__, prog_name="pacs")
@click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Configuration file [default: $PACS_ENV_FILE, else "
                   "/etc/gotg-pacs/pacs.env].")
@click.pass_context
def cli(ctx: click.Context, env_file: Path | None) -> None:
    """GOTG PACS appliance."""
    ctx.obj = Context(env_file or default_env_file())


# --- run / status ---------------------------------------------------------------------------------


@cli.command()
@json_option
@pass_context
def run(ctx: Context, as_json: bool) -> None:
    """Run the whole appliance in the foreground (development mode); Ctrl-C stops it."""
    from .devrun import run as run_appliance

    sys.exit(run_appliance(ctx.settings, str(ctx.env_file), as_json=as_json))


@cli.command()
@json_option
@pass_context
def status(ctx: Context, as_json: bool) -> None:
    """Which parts are up, storage used and free, counts, versions. Exit 1 if a part is down."""
    from .status import collect, render_text

    report = collect(ctx.settings)
    emit(report, as_json, render_text(report))
    sys.exit(0 if report["ok"] else 1)


# --- config ---------------------------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Check and render the configuration."""


@config.command("check")
@json_option
@pass_context
def config_check(ctx: Context, as_json: bool) -> None:
    """Validate the env file (exit 2 with one line naming the bad key)."""
    settings = ctx.settings
    values = {info.env: ("(hidden)" if info.secret and getattr(settings, info.attribute)
                         else getattr(settings, info.attribute)) for info in schema()}
    emit({"ok": True, "file": str(ctx.env_file), "settings": values}, as_json,
          f"{ctx.env_file}: ok")


@config.command("ansible-vars")
@click.option("--secrets-only", is_flag=True,
              help="Only the secret keys: what a USB update keeps from the box itself.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Write here (atomically, mode 0600): secrets never go to a terminal.")
@json_option
@pass_context
def config_ansible_vars(ctx: Context, secrets_only: bool, out: Path, as_json: bool) -> None:
    """The keys set in the env file as the pacs_config role's variables (JSON)."""
    _ = ctx.settings  # the whole file is valid, or exit 2 naming the bad key
    values, _ = read_env_file(ctx.env_file)
    chosen = {reference.role_variable(info): values[info.env] for info in schema()
              if info.env in values and (info.secret or not secrets_only)}
    durable.replace_text(out, json.dumps(chosen, indent=1) + "\n", mode=0o600)
    emit({"written": str(out), "variables": sorted(chosen)}, as_json,
         f"wrote {len(chosen)} variable(s) to {out}")


@config.command("orthanc")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here (atomically, mode 0600) instead of printing.")
@json_option
@pass_context
def config_orthanc(ctx: Context, out: Path | None, as_json: bool) -> None:
    """Orthanc's JSON configuration rendered from the settings (JSON either way)."""
    if out:
        orthanc_conf.write(ctx.settings, out)
        emit({"written": str(out)}, as_json, f"wrote {out}")
    else:  # for reading: the password only ever goes into the 0600 file written by --out
        rendered = orthanc_conf.render(ctx.settings)
        rendered["RegisteredUsers"] = {user: "(hidden)" for user in rendered["RegisteredUsers"]}
        if "PostgreSQL" in rendered:
            rendered["PostgreSQL"]["ConnectionUri"] = orthanc_conf.postgresql_uri(
                ctx.settings, hide_password=True)
        click.echo(json.dumps(rendered, indent=2))


@config.command("reference")
@click.option("--write", "write_files", is_flag=True,
              help="Rewrite the generated files in the source tree.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("."))
@json_option
def config_reference(write_files: bool, root: Path, as_json: bool) -> None:
    """The config reference (README table, sample env, Ansible role defaults)."""
    if write_files:
        if not (root / "pyproject.toml").is_file() or not (root / "README.md").is_file():
            raise click.UsageError(f"{root.resolve()} is not the gotg-pacs source tree "
                                   "(run it from the repository, or give --root)")
        written = [str(path) for path in reference.write_all(root)]
        emit({"updated": written}, as_json, "\n".join(f"updated {p}" for p in written))
    else:
        emit([{"key": i.env, "default": i.default_text, "allowed": i.kind.allowed,
                "doc": i.doc, "section": i.section, "secret": i.secret} for i in schema()],
              as_json, reference.readme_table())


# --- Orthanc under systemd ------------------------------------------------------------------------


@cli.group("orthanc")
def orthanc_group() -> None:
    """Orthanc's start and stop steps for its systemd unit (the appliance's orthanc.service)."""


@orthanc_group.command("serve")
@json_option
@pass_context
def orthanc_serve(ctx: Context, as_json: bool) -> None:
    """Lock the storage, render the configuration, set aside what a power cut hid, exec Orthanc."""
    from .orthanc_unit import serve

    def announce(facts: dict) -> None:
        emit(facts, as_json, f"starting {facts['orthanc']} with {facts['config']}; "
             f"{facts['set_aside']} file(s) a power cut hid set aside to store again")

    serve(ctx.settings, announce)


@orthanc_group.command("ready")
@click.option("--timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds to wait for Orthanc to answer.")
@click.option("--main-pid", type=click.IntRange(min=1), envvar="MAINPID", default=None,
              help="Orthanc's process: stop waiting once it has exited [default: $MAINPID, "
                   "which systemd sets].")
@json_option
@pass_context
def orthanc_ready(ctx: Context, timeout: float, main_pid: int | None, as_json: bool) -> None:
    """Wait until Orthanc answers, then store again what a power cut hid from its index."""
    from .orthanc_unit import ready

    report = ready(ctx.settings, timeout, main_pid)
    emit({"ready": True, "stored_again": len(report.stored), "duplicates": len(report.duplicates),
          "kept_aside": [str(p) for p in report.unresolved], "waiting": report.waiting},
         as_json, f"Orthanc is up; {report.summary()}")


@orthanc_group.command("stopped")
@json_option
@pass_context
def orthanc_stopped(ctx: Context, as_json: bool) -> None:
    """After Orthanc exits: mark the stop clean only if systemd saw it exit with status 0."""
    from .orthanc_unit import stopped

    clean = stopped(ctx.settings)
    emit({"clean": clean}, as_json, "clean stop recorded" if clean else
         "Orthanc did not stop cleanly: its storage is checked at the next start")


@cli.command("firstboot")
@click.option("--site-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The site file [default: gotg-site.txt on the boot partition, if present].")
@click.option("--network-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/etc/systemd/network"), show_default=True)
@click.option("--firewall-ports", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The firewall's ports file, rewritten when the site file moves "
                                 "a port [default: the appliance's, if there is one].")
@click.option("--forget-password", is_flag=True,
              help="Only erase the boot partition's copy of the made admin password (run once "
                   "the admin chose their own).")
@json_option
@pass_context
def firstboot_command(ctx: Context, site_file: Path | None, network_dir: Path,
                      firewall_ports: Path | None, forget_password: bool, as_json: bool) -> None:
    """First boot: merge the site file into the configuration, make a new ADMIN_PASSWORD."""
    import subprocess

    from . import units
    from .firstboot import FIREWALL_PORTS_FILE, SiteFileError, apply, find_site_file

    if forget_password:
        from .firstboot import forget_password as forget
        from .web.users import ADMIN_CHANGED_MARKER

        erased = forget()
        (ctx.settings.state_path / ADMIN_CHANGED_MARKER).unlink(missing_ok=True)
        emit({"erased": erased}, as_json,
             "\n".join(f"erased {path}" for path in erased) or "no copy of the password left")
        return

    site_file = site_file or find_site_file()
    try:
        report = apply(ctx.env_file, site_file, network_dir,
                       firewall_ports=firewall_ports or FIREWALL_PORTS_FILE)
    except SiteFileError as exc:
        click.echo(f"pacs: site file not applied, nothing changed: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    # At first boot the firewall is not loaded yet (the unit runs before it); run again later
    # by hand, the loaded one is replaced now.
    if report.open_ports and units.active("nftables.service"):
        subprocess.run(["systemctl", "reload", "nftables.service"], check=False)
    password = (f"  Administrator password for this box: {report.admin_password}\n"
                f"  (also in {report.password_file or 'no file: no boot partition'} until the "
                "admin chooses their own)" if report.admin_password else
                "  Administrator password: the one in the site file (now removed from it)")
    text = "\n".join([report.summary(), "", password, ""])
    emit({"site_file": str(site_file) if site_file else None, "applied": report.applied,
          "network": report.network, "scrubbed": report.scrubbed,
          "admin_password": report.admin_password,
          "password_file": report.password_file, "open_ports": report.open_ports}, as_json,
         text)


# --- modalities -----------------------------------------------------------------------------------


@cli.group()
def modality() -> None:
    """Modalities declared to the archive (kept in Orthanc's database)."""


@modality.command("list")
@json_option
@pass_context
def modality_list(ctx: Context, as_json: bool) -> None:
    """Declared modalities."""
    found = Orthanc.from_settings(ctx.settings).modalities()
    text = "\n".join(f"{name}: {m['AET']} at {m['Host']}:{m['Port']}"
                     for name, m in sorted(found.items())) or "no modalities declared"
    emit(found, as_json, text)


# A name that is safe in Orthanc's REST paths.
_modality_name = matching(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", "use 1-64 letters, digits, - and _")


@modality.command("add")
@click.argument("name", callback=_modality_name)
@click.argument("aet")
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@json_option
@pass_context
def modality_add(ctx: Context, name: str, aet: str, host: str, port: int, as_json: bool) -> None:
    """Declare a modality so it may query and retrieve (and be a C-MOVE destination)."""
    try:
        AETitle().parse(aet)
    except ValueError:
        raise click.BadParameter(f"{aet!r} is not a valid AE title "
                                 f"({AETitle.allowed})", param_hint="AET") from None
    Orthanc.from_settings(ctx.settings).put_modality(name, aet, host, port)
    emit({"name": name, "aet": aet, "host": host, "port": port}, as_json,
          f"declared {name}: {aet} at {host}:{port}")


@modality.command("remove")
@click.argument("name", callback=_modality_name)
@json_option
@pass_context
def modality_remove(ctx: Context, name: str, as_json: bool) -> None:
    """Forget a declared modality (its images stay)."""
    Orthanc.from_settings(ctx.settings).delete_modality(name)
    emit({"removed": name}, as_json, f"removed {name}")


@modality.command("senders")
@click.option("--undeclared", is_flag=True, help="Only senders no declared modality matches.")
@json_option
@pass_context
def modality_senders(ctx: Context, undeclared: bool, as_json: bool) -> None:
    """Every device that sent images (AE title and address), whether a declared modality matches
    it, and whether it is blocked: what an admin declares (`modality add`) or blocks."""
    from . import senders

    listed = senders.seen(ctx.settings,
                          list(Orthanc.from_settings(ctx.settings).modalities().values()))
    if undeclared:
        listed = [sender for sender in listed if not sender["declared"]]
    text = "\n".join(
        f"{s['printable_aet']:<16} {s['ip']:<39} since "
        f"{datetime.fromtimestamp(s['first_seen']):%Y-%m-%d %H:%M}  "
        + ("declared" if s["declared"] else "NOT DECLARED")
        + (", BLOCKED" if s["blocked"] else "") for s in listed) or "no sender yet"
    emit(listed, as_json, text)


@modality.command("block")
@click.argument("aet")
@click.option("--unblock", is_flag=True, help="Accept images from AET again.")
@json_option
@pass_context
def modality_block(ctx: Context, aet: str, unblock: bool, as_json: bool) -> None:
    """Refuse C-STORE from the calling AE title AET from now on (takes effect at once), or
    --unblock it. Images it sent before stay."""
    from . import senders

    try:
        names = senders.set_blocked(ctx.settings, aet, block=not unblock)
    except ValueError:
        raise click.BadParameter(f"{aet!r} is not a valid AE title ({AETitle.allowed})",
                                 param_hint="AET") from None
    emit({"blocked": names}, as_json,
         f"{aet} {'may send again' if unblock else 'blocked'}; blocked now: "
         f"{', '.join(names) or 'none'}")


# --- audit trail ----------------------------------------------------------------------------------


@cli.command("audit")
@click.option("--last", type=click.IntRange(1, 100000), default=50, show_default=True,
              help="How many of the newest events to show.")
@json_option
@pass_context
def audit_command(ctx: Context, last: int, as_json: bool) -> None:
    """Who viewed, exported, changed or deleted which study, who signed in, from where; and
    whether the chain of events is intact (exit 1 if not)."""
    from . import audit

    events, _ = audit.read(ctx.settings.audit_file)
    problems = audit.verify(events)
    shown = events[-last:]
    text = "\n".join(
        f"{datetime.fromtimestamp(e.get('time', 0)):%Y-%m-%d %H:%M:%S} "
        f"{e.get('user', '?'):<16} {e.get('action', '?'):<15} "
        f"{e.get('kind', '')} {e.get('resource', '') or e.get('path', '')} "
        f"from {e.get('address', '?')}" for e in shown) or "no events yet"
    text += "\n" + ("chain intact" if not problems else "CHAIN BROKEN: " + "; ".join(problems))
    trail = audit.trail_of(ctx.settings.audit_file)
    earlier = [path.stem for path in audit.trails(ctx.settings.audit_file)[1:]]
    if trail:
        text += f"; trail {trail}"
    if earlier:
        text += (f"; {len(earlier)} earlier trail(s) restored from a backup in "
                 f"{audit.earlier_folder(ctx.settings.audit_file)}")
    emit({"events": shown, "total": len(events), "chain_problems": problems, "trail": trail,
          "earlier_trails": earlier}, as_json, text)
    sys.exit(1 if problems else 0)


# --- external media -------------------------------------------------------------------------------


@cli.command("archive")
@click.option("--external", "target", required=True, metavar="PATH",
              type=click.Path(file_okay=True, path_type=Path),
              help="Folder where the USB disk is mounted (empty, or a disk made by this command).")
@click.option("--study", "studies", multiple=True, metavar="UID",
              help="Study Instance UID to copy (repeatable) [default: every study].")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              metavar="YYYY-MM-DD",
              help="Only studies this archive received images for on or after that day.")
@click.option("--verify", "verify_only", is_flag=True,
              help="Copy nothing: re-read a disk made earlier against its manifest.")
@json_option
@pass_context
def archive_command(ctx: Context, target: Path, studies: tuple[str, ...],
                    since: datetime | None, verify_only: bool, as_json: bool) -> None:
    """Copy studies to a USB disk as a DICOM File-set (DICOMDIR) with a manifest, verified.

    Exit 1 with one message if anything does not verify; a disk is never left with a DICOMDIR
    that points to missing or different files, and nothing is deleted from the archive.
    """
    from . import archive as media

    last = [0.0]

    def progress(phase: str, done: int, total: int, done_bytes: int, total_bytes: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 1.0:
            last[0] = now
            size = (f", {done_bytes / 1e6:.1f} of {total_bytes / 1e6:.1f} MB" if total_bytes
                    else "")
            click.echo(f"  {phase} {done}/{total} instances{size}", err=True)

    try:
        if verify_only:
            report = media.verify_only(target, progress=None if as_json else progress)
        else:
            report = media.export(ctx.settings, target, studies, since.date() if since else None,
                                  progress=None if as_json else progress)
    except (media.ArchiveError, OrthancError) as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "target": str(target), "error": str(exc)},
                                  indent=2))
        click.echo(f"pacs archive: {exc}", err=True)
        sys.exit(1)
    notes = [f"note: {printable(note, 300)}" for note in report.get("notes", [])]
    if verify_only:
        problems = [f"  {printable(problem, 300)}" for problem in report["problems"]]
        text = (f"{report['target']}: all {report['instances']} instances read back and match "
                "the manifest; the DICOMDIR references each one" if report["ok"] else
                f"{report['target']}: {len(problems)} problem(s):\n" + "\n".join(problems))
    elif report["instances_written"]:
        text = (f"copied {report['instances_written']} instances "
                f"({report['bytes_written'] / 1e6:.1f} MB) of {report['studies']} studies to "
                f"{report['target']} as {report['export']}, read back from the disk and "
                f"verified; {report['instances_already_there']} were already there. "
                "Eject the disk before unplugging it.")
    else:
        text = (f"nothing to copy: all {report['instances_already_there']} instances of "
                f"{report['studies']} studies are already on {report['target']}")
    emit(report, as_json, "\n".join(notes + [text]))
    sys.exit(0 if report["ok"] else 1)


cli.add_command(sync_commands.sync)
cli.add_command(hq_commands.hq)
cli.add_command(backup_commands.backup)
cli.add_command(backup_commands.cleanup)
cli.add_command(backup_commands.restore)
cli.add_command(backup_commands.integrity)
cli.add_command(data_disk_commands.data_disk)
cli.add_command(ris_commands.ris)
cli.add_command(web_commands.web)
cli.add_command(web_commands.tls)
cli.add_command(web_commands.user)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"pacs: configuration error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except StartError as exc:
        click.echo(f"pacs: could not start: {exc}", err=True)
        sys.exit(1)
    except OrthancError as exc:
        click.echo(f"pacs: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # a full disk, a read-only folder, a missing path: one line, no trace
        where = f" ({exc.filename})" if exc.filename else ""
        click.echo(f"pacs: {exc.strerror or exc}{where}", err=True)
        sys.exit(1)
