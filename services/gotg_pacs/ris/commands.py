"""`pacs ris ...`: the RIS bridge's service and what site IT asks of it."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from ..clikit import Context, as_state_owner, emit, json_option, pass_context, printable


@click.group()
@pass_context
def ris(ctx: Context) -> None:
    """Orders from the RIS, and the worklist the modalities read."""
    as_state_owner(ctx.settings)


@ris.command("run")
@json_option
@pass_context
def ris_run(ctx: Context, as_json: bool) -> None:
    """The pacs-ris service (foreground): HL7 orders in, worklist items out, MPPS, studies
    matched to their orders, reports attached to their studies."""
    from ..orthanc import Orthanc
    from . import demographics, loop, reports, rest, worklist
    from .mllp import Listener, serve
    from .mpps import Mpps
    from .orders import Orders
    from .studies import Studies, follow

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format='{"ris": "%(message)s"}' if as_json
                        else "%(asctime)s [ris] %(message)s")
    settings = ctx.settings
    with Orders(settings.ris_orders_file) as orders:
        listed = orders.scheduled()
        written, removed = worklist.match(settings.worklists_dir, listed)
        logging.getLogger(__name__).info("worklist: %d on the list, %d item(s) written, "
                                         "%d stale removed", len(listed), written, removed)
        listener = Listener(orders, settings.worklists_dir, settings.site_code)
        mpps = Mpps(orders, settings.worklists_dir, settings.pacs_aet, settings.dicom_access,
                    Orthanc.from_settings(settings, timeout=10).modalities)
        studies = Studies(Orthanc.from_settings(settings, timeout=30), orders,
                          settings.worklists_dir)
        attacher = reports.Attacher(Orthanc.from_settings(settings, timeout=60),
                                    reports.ReportQueue(orders))
        applier = demographics.Applier(
            Orthanc.from_settings(settings, timeout=120), demographics.DemographicsQueue(orders),
            settings.worklists_dir, settings.state_path / "ris" / "rewriting",
            settings.audit_file)
        tasks = [serve(listener, "0.0.0.0", settings.hl7_port), follow(studies),
                 loop.every(attacher.attach_waiting, 15, "reports attached to their studies"),
                 loop.every(applier.apply_waiting, 15, "patient changes applied")]
        if settings.ris_url:
            tasks.append(rest.follow(rest.Ris(
                rest.RisClient(settings.ris_url, settings.ris_api_key), orders,
                settings.worklists_dir, settings.site_code, settings.worklist_sync),
                settings.ris_poll_interval))
        elif settings.ris_hl7_address:
            from .hl7_statuses import Hl7Statuses
            tasks.append(rest.follow(rest.Ris(
                Hl7Statuses(settings.ris_hl7_address, orders, settings.site_code), orders,
                settings.worklists_dir, settings.site_code, feeds=False),
                settings.ris_poll_interval))
        mpps.start(settings.mpps_port)

        async def everything() -> None:
            await asyncio.gather(*tasks)
        try:
            asyncio.run(everything())
        except KeyboardInterrupt:
            pass
        finally:
            mpps.stop()


@ris.command("orders")
@click.option("--limit", default=50, show_default=True, help="How many, newest first.")
@json_option
@pass_context
def ris_orders(ctx: Context, limit: int, as_json: bool) -> None:
    """The orders kept here, newest first, and how many are in each state."""
    from .orders import STATES, Orders

    with Orders(ctx.settings.ris_orders_file, readonly=True) as orders:
        listed, counts = orders.listing(limit), orders.counts()
    lines = [", ".join(f"{counts.get(state, 0)} {state.replace('_', ' ')}" for state in STATES)]
    lines += [f"  {printable(o['accession'])}  {o['state']:<9} {o['scheduled_date']} "
              f"{o['scheduled_time'][:4]}  {printable(o['modality']) or '-':<3} "
              f"{printable(o['patient_id'])}  {printable(o['patient_name'])}  "
              f"{printable(o['description'])}" for o in listed]
    emit({"counts": counts, "orders": listed}, as_json, "\n".join(lines))


@ris.command("unmatched")
@click.option("--all", "include_resolved", is_flag=True, help="Resolved entries too.")
@json_option
@pass_context
def ris_unmatched(ctx: Context, include_resolved: bool, as_json: bool) -> None:
    """The reconciliation list: studies that arrived with no order matching them (a modality
    that lost its worklist, an emergency typed at the modality), with the orders that might
    be theirs."""
    from .orders import Orders

    with Orders(ctx.settings.ris_orders_file, readonly=True) as orders:
        entries = orders.unmatched(include_resolved)
    lines = [f"{len(entries)} stud{'y' if len(entries) == 1 else 'ies'} without an order"]
    for entry in entries:
        decided = entry["resolution"]
        lines.append(f"  {entry['study_uid']}  accession {printable(entry['accession']) or '-'}"
                     f"  {printable(entry['PatientID'])}  {printable(entry['PatientName'])}"
                     f"  {entry['PatientBirthDate'] or '-'}  candidates: "
                     f"{', '.join(map(printable, entry['candidates'])) or 'none'}"
                     + (f"  resolved: {printable(decided['order'] or 'no order')}"
                        if decided else ""))
    emit({"entries": entries}, as_json, "\n".join(lines))


@ris.command("resolve")
@click.argument("study_uid")
@click.option("--order", "accession", help="The Accession Number of the order it is.")
@click.option("--no-order", is_flag=True, help="It has no order (performed without one).")
@click.option("--note", default="", help="Why, in a few words (kept with the decision).")
@json_option
@pass_context
def ris_resolve(ctx: Context, study_uid: str, accession: str | None, no_order: bool,
                note: str, as_json: bool) -> None:
    """Decide a study on the reconciliation list: the order it is, or none. The decision is
    kept with who made it. Given an order, pacs-ris then rewrites the study's images with the
    order's Accession Number and patient identity (UIDs and pixels kept, audited)."""
    import getpass
    import os

    from . import worklist
    from .orders import Orders

    if (accession is None) == (not no_order):
        raise click.UsageError("give either --order ACCESSION or --no-order")
    who = os.environ.get("SUDO_USER") or getpass.getuser()
    with Orders(ctx.settings.ris_orders_file) as orders:
        try:
            moved = orders.resolve(study_uid, accession, who, note)
        except (KeyError, ValueError) as exc:
            raise click.ClickException(str(exc).strip("'\"")) from None
        worklist.follow(ctx.settings.worklists_dir, orders, moved)
    emit({"study_uid": study_uid, "order": accession, "by": who}, as_json,
         f"study {study_uid}: " + (f"order {accession}" if accession else "no order")
         + f" (decided by {who})")


@ris.command("statuses")
@click.option("--limit", default=50, show_default=True, help="How many, newest first.")
@click.option("--retry-refused", is_flag=True,
              help="Queue the ones the RIS refused again (after RIS_URL was put right).")
@json_option
@pass_context
def ris_statuses(ctx: Context, limit: int, retry_refused: bool, as_json: bool) -> None:
    """What the RIS is told (MPPS, images available), newest first: waiting, sent, or refused
    by the RIS with its reason. Waiting ones go in order whenever RIS_URL answers."""
    from .orders import Orders

    with Orders(ctx.settings.ris_orders_file, readonly=not retry_refused) as orders:
        if retry_refused:
            click.echo(f"{orders.retry_refused()} refused status(es) queued again", err=True)
        listed, waiting = orders.statuses(limit), orders.counts("statuses").get("waiting", 0)
    lines = [f"{waiting} waiting for the RIS" + (
        "" if ctx.settings.ris_url or ctx.settings.ris_hl7_address
        else " (neither RIS_URL nor RIS_HL7_ADDRESS is set)")]
    lines += [f"  {event['seq']:>6} {printable(event['accession'])}  {event['status']:<16} "
              f"{event['state']}" + (f" ({printable(event['last_error'])})"
                                     if event["last_error"] else "") for event in listed]
    emit({"waiting": waiting, "statuses": listed}, as_json, "\n".join(lines))


@ris.command("reports")
@click.option("--limit", default=50, show_default=True, help="How many, newest first.")
@json_option
@pass_context
def ris_reports(ctx: Context, limit: int, as_json: bool) -> None:
    """Reports from the RIS, newest first: attached to their study, or waiting for it (and
    why: the study is not here yet, or it is another patient's)."""
    from .orders import Orders
    from .reports import ReportQueue

    with Orders(ctx.settings.ris_orders_file, readonly=True) as orders:
        queue = ReportQueue(orders)
        listed, counts = queue.listing(limit), queue.counts()
    lines = [f"{counts.get('attached', 0)} attached, {counts.get('waiting', 0)} waiting "
             "for their study"]
    lines += [f"  {printable(one['accession'])}  {one['status']:<9} {one['state']:<8} "
              f"signed {one['signed']}  {printable(one['author']) or '-'}"
              + (" +PDF" if one["pdf_bytes"] else "")
              + (f"  ({printable(one['last_error'])})" if one["last_error"] else "")
              for one in listed]
    emit({"counts": counts, "reports": listed}, as_json, "\n".join(lines))


@ris.command("demographics")
@click.option("--limit", default=50, show_default=True, help="How many, newest first.")
@json_option
@pass_context
def ris_demographics(ctx: Context, limit: int, as_json: bool) -> None:
    """Patient updates and merges from the RIS, newest first: applied to the worklist and the
    images (how many rewritten), waiting, or a merge held for a person to confirm."""
    from .demographics import DemographicsQueue
    from .orders import Orders

    with Orders(ctx.settings.ris_orders_file, readonly=True) as orders:
        listed = DemographicsQueue(orders).listing(limit)
    held = [one for one in listed if one["state"] == "held"]
    lines = [f"{len(held)} merge(s) waiting for a person (pacs ris merge SEQ --confirm or "
             "--decline)"]
    for one in listed:
        patient = one["patient"]
        who = (f"{printable(one['prior_id'])} into " if one["kind"] == "merge" else "") \
            + f"{printable(one['patient_id'])} {printable(patient['patient_name'])} " \
            f"{patient['birth_date'] or '-'} {patient['sex'] or '-'}"
        lines.append(f"  {one['seq']:>5} {one['kind']:<6} {one['state']:<8} {who}"
                     + (f"  {one['instances']} instance(s)" if one["state"] == "applied"
                        else "")
                     + (f"  ({printable(one['last_error'])})" if one["last_error"] else ""))
    emit({"changes": listed}, as_json, "\n".join(lines))


@ris.command("merge")
@click.argument("seq", type=int)
@click.option("--confirm", "confirm", flag_value=True, default=None,
              help="Apply it: the prior patient's images go under the surviving patient.")
@click.option("--decline", "confirm", flag_value=False, help="Do not apply it.")
@click.option("--note", default="", help="Why, in a few words (kept with the decision).")
@json_option
@pass_context
def ris_merge(ctx: Context, seq: int, confirm: bool | None, note: str, as_json: bool) -> None:
    """A person's decision on a merge the RIS sent (ADT^A40). Confirmed, pacs-ris applies it
    within seconds; either way the decision is kept with who made it."""
    import getpass
    import os

    from .demographics import DemographicsQueue
    from .orders import Orders

    if confirm is None:
        raise click.UsageError("give --confirm or --decline")
    who = os.environ.get("SUDO_USER") or getpass.getuser()
    with Orders(ctx.settings.ris_orders_file) as orders:
        try:
            DemographicsQueue(orders).decide(seq, confirm, who, note)
        except KeyError as exc:
            raise click.ClickException(str(exc).strip("'\"")) from None
    emit({"seq": seq, "confirmed": confirm, "by": who}, as_json,
         f"merge {seq}: {'confirmed' if confirm else 'declined'} by {who}")
