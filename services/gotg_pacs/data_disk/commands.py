"""`pacs data-disk ...`: site IT moving the archive onto a disk of its own, and opening it again
after a boot without its key stick."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..clikit import Context, emit, json_option, pass_context, size_text
from . import DataDiskError, move

_DEVICE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group("data-disk")
def data_disk() -> None:
    """Orthanc's images and index on a disk of their own, encrypted (LUKS2) if asked."""


@data_disk.command("prepare")
@click.argument("device", type=_DEVICE)
@click.option("--encrypt/--no-encrypt", default=None,
              help="LUKS2 encryption [default: ENCRYPTION].")
@click.option("--unlock", type=click.Choice(move.UNLOCKS),
              help="How the box opens it at boot: the key stick (usb-key; the default with "
                   "--key-stick), or a passphrase typed at the console.")
@click.option("--key-stick", type=_DEVICE, metavar="STICK",
              help="A USB stick to erase and hold the key.")
@click.option("--yes", is_flag=True, help="Erase DEVICE (and the key stick) without asking.")
@json_option
@pass_context
def prepare(ctx: Context, device: Path, encrypt: bool | None, unlock: str | None,
            key_stick: Path | None, yes: bool, as_json: bool) -> None:
    """ERASE DEVICE, make it the data disk and move the archive there (Orthanc stops meanwhile;
    the copy is compared byte for byte before the system disk's is removed)."""
    settings = ctx.settings
    encrypt = settings.encryption if encrypt is None else encrypt
    unlock = unlock or ("usb-key" if key_stick else "")
    if encrypt and not unlock:
        # A passphrase at every boot keeps the archive closed after each night's power cut
        # until someone types it: never chosen for a box by default.
        raise click.ClickException("say how the box opens it at boot: --key-stick STICK, or "
                                   "--unlock console (a passphrase typed at every boot)")
    erased = " and ".join(str(d) for d in (device, key_stick) if d)
    if not yes and not (sys.stdin.isatty() and click.confirm(
            f"Everything on {erased} will be erased. Go on?")):
        raise click.ClickException(f"nothing done: say --yes to erase {erased}")
    say = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    try:
        done = move.prepare(settings, device, encrypt, unlock, key_stick, say=say)
    except DataDiskError as exc:
        raise click.ClickException(str(exc)) from None
    lines = [f"the archive ({done.files} files, {size_text(done.bytes)}) is on {done.device}"
             + (f", encrypted, opened at boot by the {done.unlock}" if done.encrypted else "")]
    if done.encrypted:
        lines += ["",
                  f"RECOVERY PASSPHRASE  {done.recovery_passphrase}",
                  "Write it down now and keep it away from the box: it opens the data disk "
                  "without the key stick (`pacs data-disk unlock --passphrase`). It is not "
                  "shown again.", ""]
        if settings.hq_url:
            from ..sync.transport import HQClient

            done.escrowed = move.hand_over_recovery(HQClient.from_settings(settings, timeout=60))
        lines.append("HQ keeps it too (`pacs hq site disk-passphrase`)" if done.escrowed else
                     "not at HQ yet: it goes with the next backup that reaches HQ")
    if done.problem:
        lines.append(f"WARNING: {done.problem}")
    emit(done.public(), as_json, "\n".join(lines))
    if done.problem:
        sys.exit(1)


@data_disk.command("unlock")
@click.option("--passphrase", is_flag=True,
              help="Ask the recovery passphrase (else the key stick plugged in is read).")
@json_option
@pass_context
def unlock(ctx: Context, passphrase: bool, as_json: bool) -> None:
    """Open the data disk, mount it and start Orthanc: after a boot without the key stick, or
    a passphrase not typed in time."""
    typed = None
    if passphrase:
        typed = (click.prompt("Recovery passphrase", hide_input=True) if sys.stdin.isatty()
                 else sys.stdin.readline()).strip().upper()
    try:
        how = move.unlock(ctx.settings, typed)
    except DataDiskError as exc:
        raise click.ClickException(str(exc)) from None
    emit({"opened_by": how}, as_json, f"data disk open ({how}); Orthanc started")


@data_disk.command("status")
@json_option
@pass_context
def status(ctx: Context, as_json: bool) -> None:
    """Whether the archive is on a data disk, encrypted, unlocked and mounted."""
    shown = move.status(ctx.settings)
    if not shown["data_disk"]:
        text = f"no data disk: the archive is in {shown['storage_path']} on the system disk"
    else:
        text = "\n".join([
            f"data disk   {'encrypted (LUKS2)' if shown['encrypted'] else 'not encrypted'}",
            f"unlocked    {'yes' if shown['unlocked'] else 'NO: pacs data-disk unlock'}",
            f"mounted     {'yes' if shown['mounted'] else 'NO'} at {shown['storage_path']}",
            f"key stick   {'plugged in' if shown['key_stick_present'] else 'not plugged in'}"])
    emit(shown, as_json, text)
