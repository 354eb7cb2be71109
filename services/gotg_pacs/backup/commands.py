"""`pacs backup ...`, `pacs cleanup`, `pacs restore` and `pacs integrity check`: what site IT
and the backup timers ask for."""

from __future__ import annotations

import sys
import time

import click

from ..clikit import Context, emit, json_option, matching, pass_context, size_text
from ..config import Settings
from .borgmatic import LOCAL, REMOTE, BackupError, Backups


def _backups(ctx: Context) -> Backups:
    return Backups(ctx.settings, ctx.env_file)


@click.group()
def backup() -> None:
    """Backups to the USB backup disk (borg through borgmatic)."""


@backup.command("now")
@json_option
@pass_context
def backup_now(ctx: Context, as_json: bool) -> None:
    """Back up now (the timer runs this every BACKUP_INTERVAL); then, with AUTO_CLEANUP, remove
    local copies older than RETENTION_DAYS that HQ and this backup both hold."""
    try:
        made = _backups(ctx).create()
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    lines = [f"backup {archive['archive']} to {archive['repository']}: {archive['files']} files, "
             f"{size_text(archive['original_bytes'])}, {size_text(archive['added_bytes'])} new, "
             f"{archive['seconds']} s" for archive in made["archives"]]
    if ctx.settings.hq_url:
        from ..sync.transport import HQClient

        hq = HQClient.from_settings(ctx.settings, timeout=60)
        if _backups(ctx).hand_over_passphrase(hq):
            lines.append("backup passphrase handed to HQ (kept there for a new box)")
        if ctx.settings.backup_path is not None and _backups(ctx).hand_over_key(hq):
            lines.append("the backup disk's repository key handed to HQ (kept there in case "
                         "the disk's copy is damaged)")
        from ..data_disk.move import hand_over_recovery

        if hand_over_recovery(hq):
            lines.append("the data disk's recovery passphrase handed to HQ")
    for problem in made.get("state_errors", []):
        lines.append(f"NOT in this backup (its previous copy is): {problem}")
    if made["remote_error"]:
        lines.append(f"not sent to HQ this time (the backup disk has it): {made['remote_error']}")
    if ctx.settings.auto_cleanup:
        try:
            verdicts = _cleanup(ctx.settings, _backups(ctx), ctx.settings.retention_days, False)
        except click.ClickException as exc:
            emit(made, as_json, "\n".join(lines))
            raise click.ClickException("the backup is made, but the cleanup (AUTO_CLEANUP) did "
                                       f"not run: {exc.message}") from None
        made["cleanup"] = [verdict.public() for verdict in verdicts]
        lines.append(_cleanup_summary(verdicts, dry_run=False))
    emit(made, as_json, "\n".join(lines))


@backup.command("list")
@json_option
@pass_context
def backup_list(ctx: Context, as_json: bool) -> None:
    """The archives the backup disk holds, oldest first."""
    try:
        archives = _backups(ctx).archives()
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    emit(archives, as_json, "\n".join(f"{a['time']}  {a['name']}  ({a['repository']})"
                                       for a in archives) or "no backup yet")


@backup.command("check")
@click.option("--verify-data", is_flag=True,
              help="Read and verify every chunk of every archive (slow: the whole disk).")
@json_option
@pass_context
def backup_check(ctx: Context, verify_data: bool, as_json: bool) -> None:
    """Check the backup repository and its archives."""
    try:
        _backups(ctx).check(verify_data)
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    emit({"ok": True, "verify_data": verify_data}, as_json,
         "backup repository and archives are consistent"
         + (", every chunk read and verified" if verify_data else ""))


@backup.command("drill")
@json_option
@pass_context
def backup_drill(ctx: Context, as_json: bool) -> None:
    """Rehearse a restore without touching anything: a random sample (256 MB) of the newest
    archive's images extracted to scratch, each checked by MD5 and parsed, and the archive's
    copy of Orthanc's index checked by SQLite. Exits 1 on a failure; the outcome shows in
    `pacs status`."""
    from ..orthanc import Orthanc, OrthancError
    from .restore import Drill

    backups = _backups(ctx)
    try:
        outcome = Drill(ctx.settings, backups, Orthanc.from_settings(ctx.settings)).run()
    except (BackupError, OrthancError) as exc:
        backups.note("drill", {"at": time.time(), "ok": False, "error": str(exc)})
        raise click.ClickException(str(exc)) from None
    ok = not outcome["failures"]
    backups.note("drill", {"at": time.time(), "ok": ok, **outcome})
    lines = [f"restore drill from {outcome['archive']}: {outcome['files']} files "
             f"({size_text(outcome['bytes'])}) extracted and checked in {outcome['seconds']} s, "
             f"{len(outcome['failures'])} failed"]
    if outcome["index_instances"] is not None:
        lines.append(f"  Orthanc's index in the archive checked: {outcome['index_instances']} "
                     "instances")
    lines += [f"  FAILED {f['file']}: {f['reason']}" for f in outcome["failures"]]
    emit(outcome, as_json, "\n".join(lines))
    if not ok:
        sys.exit(1)


@backup.command("key")
@json_option
@pass_context
def backup_key(ctx: Context, as_json: bool) -> None:
    """This box's SSH key for HQ's backup server, and the line HQ adds to its authorized_keys:
    the key may only append to this site's repository."""
    backups = _backups(ctx)
    try:
        line = backups.hq_access_line()
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    if line is None:
        raise click.ClickException("REMOTE_BACKUP_URL is not set: no backups go to HQ")
    emit({"public_key": backups.make_ssh_key(), "authorized_keys": line}, as_json, line)


@backup.command("passphrase")
@click.option("--set", "put_back", is_flag=True,
              help="Put back a kept passphrase, read from standard input (a new box reading "
                   "the old box's backup disk).")
@click.option("--from-hq", "from_hq", is_flag=True,
              help="Put back the passphrase HQ keeps for this site (HQ_URL, HQ_TOKEN).")
@json_option
@pass_context
def backup_passphrase(ctx: Context, put_back: bool, from_hq: bool, as_json: bool) -> None:
    """Show the backup's passphrase, to keep off the box (a sealed envelope; every backup also
    hands it to HQ when HQ_URL is set): without it the backups cannot be read once this box
    is gone."""
    backups = _backups(ctx)
    if put_back or from_hq:
        try:
            if from_hq:
                from ..sync.transport import HQClient, HQRefused, HQUnreachable

                if not ctx.settings.hq_url:
                    raise BackupError("HQ_URL is not set")
                try:  # newest first: the one that opens the repository is kept
                    candidates = HQClient.from_settings(
                        ctx.settings, timeout=60).kept_passphrases()[::-1]
                except (HQRefused, HQUnreachable) as exc:
                    raise BackupError(f"HQ did not give the passphrase back: {exc}") from None
            else:
                candidates = [click.get_text_stream("stdin").read()]
            warning = backups.put_back_passphrase(candidates)
        except BackupError as exc:
            raise click.ClickException(str(exc)) from None
        emit({"file": str(backups.passphrase_file), "warning": warning}, as_json,
             f"passphrase kept in {backups.passphrase_file}"
             + (f"\nWARNING: {warning}" if warning else ""))
        return
    try:
        secret = backups.passphrase_file.read_text().strip()
    except FileNotFoundError:
        raise click.ClickException("no passphrase yet: it is made by the first backup") from None
    except PermissionError:
        raise click.ClickException("only root may read the backup's passphrase") from None
    emit({"passphrase": secret, "file": str(backups.passphrase_file)}, as_json, secret)


@backup.command("repository-key")
@click.option("--from-hq", "from_hq", is_flag=True,
              help="Put back into the backup disk's repository the key HQ keeps for it.")
@json_option
@pass_context
def backup_repository_key(ctx: Context, from_hq: bool, as_json: bool) -> None:
    """The backup disk's repository key, sealed by the passphrase (every backup also hands it
    to HQ): a repository whose copy of the key is damaged cannot be read without it."""
    backups = _backups(ctx)
    try:
        if from_hq:
            from ..sync.transport import HQClient, HQRefused, HQUnreachable

            if not ctx.settings.hq_url:
                raise BackupError("HQ_URL is not set")
            try:
                kept = HQClient.from_settings(ctx.settings, timeout=60).kept_keys()
            except (HQRefused, HQUnreachable) as exc:
                raise BackupError(f"HQ did not give the key back: {exc}") from None
            with backups.locked():
                repository = backups.put_back_key(kept)
            emit({"repository": repository, "put_back": True}, as_json,
                 f"the key HQ keeps is back in the repository {repository}")
            return
        with backups.locked():
            key, repository = backups.export_key(), backups.repository_id()
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    emit({"repository": repository, "key": key}, as_json, key.rstrip("\n"))


def _cleanup(settings: Settings, backups: Backups, days: float, dry_run: bool):
    from ..cleanup import Cleanup, CleanupError
    from ..orthanc import Orthanc, OrthancError
    from ..sync.outbox import Outbox, OutboxError
    from ..sync.transport import HQClient

    hq = HQClient.from_settings(settings, timeout=60) if settings.hq_url else None
    try:
        with Outbox(settings.sync_outbox_file, readonly=True) as outbox:
            return Cleanup(settings, Orthanc.from_settings(settings), outbox, backups,
                           hq).run(days, dry_run)
    except (CleanupError, OutboxError, OrthancError) as exc:
        raise click.ClickException(str(exc)) from None


def _cleanup_summary(verdicts, dry_run: bool) -> str:
    gone = [v for v in verdicts if (v.removable if dry_run else v.removed)]
    freed = sum(v.bytes for v in gone)
    head = (f"cleanup{' (dry run)' if dry_run else ''}: {len(verdicts)} old studies, "
            f"{len(gone)} {'removable' if dry_run else 'removed'} ({size_text(freed)}), "
            f"{len(verdicts) - len(gone)} kept")
    kept = [f"  kept {v.study_uid} ({v.study_date or 'no date'}): {v.reason}"
            for v in verdicts if v not in gone or not v.removable]
    return "\n".join([head, *kept])


@click.command("cleanup")
@click.option("--older-than", "days", type=click.FloatRange(min=0), required=True,
              metavar="DAYS", help="Only studies unchanged for at least this many days.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@json_option
@pass_context
def cleanup(ctx: Context, days: float, dry_run: bool, as_json: bool) -> None:
    """Remove local copies of old studies that HQ confirmed (and still holds, asked again) and
    that the newest backup holds. Everything else stays."""
    verdicts = _cleanup(ctx.settings, _backups(ctx), days, dry_run)
    emit([verdict.public() for verdict in verdicts], as_json,
         _cleanup_summary(verdicts, dry_run))


@click.command("restore")
@click.option("--latest", "latest", is_flag=True, help="From the newest archive (the default).")
@click.option("--archive", metavar="NAME", help="From this archive (see `pacs backup list`).")
@click.option("--remote", is_flag=True,
              help="From HQ's copy (REMOTE_BACKUP_URL) instead of the backup disk.")
@click.option("--site", metavar="SITE",
              callback=matching(r"[a-z0-9][a-z0-9-]{1,31}", "a SITE_CODE: 2-32 characters "
                                "a-z 0-9 -"),
              help="With --remote: that site's repository (a new box replacing a lost one).")
@json_option
@pass_context
def restore(ctx: Context, latest: bool, archive: str | None, remote: bool, site: str | None,
            as_json: bool) -> None:
    """Put every study of a backup archive back, each one verified by Orthanc's MD5.

    Orthanc stopped with an empty index (a new box): its index and files go back in place as
    the archive holds them (under systemd an empty running Orthanc is stopped for it and started
    again). Orthanc running with studies: every file is stored again through it, modalities
    keep storing meanwhile, and the instances already here stay."""
    from ..orthanc import Orthanc, OrthancError
    from .restore import Restore

    if latest and archive:
        raise click.UsageError("--latest or --archive NAME, not both")
    if site and not remote:
        raise click.UsageError("--site SITE reads HQ's copy: add --remote")
    backups = Backups(ctx.settings, ctx.env_file, reading=REMOTE if remote else LOCAL,
                      site=site)
    try:
        done = Restore(ctx.settings, backups,
                       Orthanc.from_settings(ctx.settings, timeout=300)).run(archive)
    except (BackupError, OrthancError) as exc:
        raise click.ClickException(str(exc)) from None
    if done.mode == "whole":
        lines = [f"restored from {done.archive}: Orthanc's index and {len(done.restored)} "
                 f"instances put back and verified, in {done.seconds:.0f} s"]
        if done.waiting:
            lines.append(f"  {done.waiting} file(s) stored while the backup ran: Orthanc stores "
                         "them again when it starts")
        lines += [f"  stopped and started again: {unit}" for unit in done.stopped]
        if not done.stopped:
            lines.append("  start Orthanc now (`pacs run`, or `systemctl start orthanc`)")
    else:
        lines = [f"restored from {done.archive}: {len(done.restored)} instances stored and "
                 f"verified, {len(done.present)} already here, in {done.seconds:.0f} s"]
    lines += [f"  declared modality {name} again" for name in done.modalities]
    names = {"accounts": "web accounts", "site_ca": "site certificate authority",
             "ris_orders": "worklist orders", "audit_trail": "audit trail"}
    lines += [f"  {names[key]}: {said}" for key, said in done.state.items()]
    lines += [f"  MISSING instance {item['sop'] or item['instance']}: in the index, not in the "
              "archive (deleted while the backup ran, or an older archive holds it: "
              "`pacs integrity check --repair` once Orthanc runs)" for item in done.missing]
    lines += [f"  kept as it is here (differs from the backup): {uid}" for uid in done.differs]
    lines += [f"  FAILED {failure['file']}: {failure['reason']}" for failure in done.failed]
    emit(done.public(), as_json, "\n".join(lines))
    if done.failed or done.missing:
        sys.exit(1)


@click.group()
def integrity() -> None:
    """The stored images checked against what Orthanc recorded when it received them."""


@integrity.command("check")
@click.option("--repair", is_flag=True,
              help="Put damaged files back from the newest backup that holds them as stored, "
                   "else from HQ when HQ confirmed them.")
@json_option
@pass_context
def integrity_check(ctx: Context, repair: bool, as_json: bool) -> None:
    """Every stored instance: its file present, its MD5 as Orthanc recorded, a DICOM parse.
    Exits 1 while damage remains."""
    from ..orthanc import Orthanc, OrthancError
    from ..sync.outbox import Outbox, OutboxError
    from ..sync.transport import HQClient
    from .integrity import Integrity

    settings = ctx.settings

    def confirmed(instance_ids):
        try:
            with Outbox(settings.sync_outbox_file, readonly=True) as outbox:
                return outbox.confirmations(instance_ids)
        except OutboxError:
            return {}

    checker = Integrity(settings, Orthanc.from_settings(settings, timeout=120),
                        _backups(ctx) if settings.backup_path or settings.remote_backup_url
                        else None, confirmed,
                        HQClient.from_settings(settings) if settings.hq_url else None)
    try:
        findings = checker.check()
        if repair:
            checker.repair(findings)
    except (BackupError, OrthancError) as exc:
        raise click.ClickException(str(exc)) from None
    left = [f for f in findings if f.damaged and not f.repaired_from]
    if settings.backup_path or settings.remote_backup_url:
        _backups(ctx).note("integrity", {
            "at": time.time(), "ok": not left, "checked": checker.checked,
            "damaged": sum(1 for f in findings if f.damaged),
            "repaired": sum(1 for f in findings if f.repaired_from), "not_repaired": len(left)})
    lines = [f"{checker.checked} instances checked: "
             f"{sum(1 for f in findings if f.damaged)} damaged"
             + (f", {sum(1 for f in findings if f.repaired_from)} repaired" if repair else "")
             + f", {len(left)} not repaired"]
    for f in findings:
        state = (f"repaired from {f.repaired_from}" if f.repaired_from
                 else "HQ confirmed a copy" if f.at_hq else "no copy known")
        lines.append(f"  {f.problem} {f.sop_uid} ({f.detail}): {state}")
    emit({"checked": checker.checked, "findings": [checker.public(f) for f in findings]},
         as_json, "\n".join(lines))
    if left:
        sys.exit(1)
