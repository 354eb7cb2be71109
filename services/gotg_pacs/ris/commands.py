"""`pacs ris ...`: the RIS bridge's service and what site IT asks of it."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from ..clikit import Context, as_state_owner, emit, json_option, pass_context


@click.group()
@pass_context
def ris(ctx: Context) -> None:
    """Orders from the RIS, and the worklist the modalities read."""
    as_state_owner(ctx.settings)


@ris.command("run")
@json_option
@pass_context
def ris_run(ctx: Context, as_json: bool) -> None:
    """The pacs-ris service (foreground): HL7 orders in, worklist items out, MPPS."""
    from ..orthanc import Orthanc
    from . import worklist
    from .mllp import Listener, serve
    from .mpps import Mpps
    from .orders import Orders

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format='{"ris": "%(message)s"}' if as_json
                        else "%(asctime)s [ris] %(message)s")
    settings = ctx.settings
    with Orders(settings.ris_orders_file) as orders:
        written, removed = worklist.match(settings.worklists_dir, orders.scheduled())
        logging.getLogger(__name__).info("worklist: %d items, %d stale removed", written,
                                         removed)
        listener = Listener(orders, settings.worklists_dir, settings.site_code)
        mpps = Mpps(orders, settings.worklists_dir, settings.pacs_aet, settings.dicom_access,
                    Orthanc.from_settings(settings, timeout=10).modalities)
        mpps.start(settings.mpps_port)
        try:
            asyncio.run(serve(listener, "0.0.0.0", settings.hl7_port))
        except KeyboardInterrupt:
            pass
        finally:
            mpps.stop()


@ris.command("orders")
@click.option("--limit", default=50, show_default=True, help="How many, newest first.")
@json_option
@pass_context
def ris_orders(ctx: Context, limit: int, as_json: bool) -> None:
    """The orders kept here, newest first, and how many are on the worklist."""
    from ..hq.conflicts import printable
    from .orders import Orders

    with Orders(ctx.settings.ris_orders_file, readonly=True) as orders:
        listed, counts = orders.listing(limit), orders.counts()
    lines = [f"{counts.get('scheduled', 0)} scheduled, {counts.get('cancelled', 0)} cancelled"]
    lines += [f"  {printable(o['accession'])}  {o['state']:<9} {o['scheduled_date']} "
              f"{o['scheduled_time'][:4]}  {printable(o['modality']) or '-':<3} "
              f"{printable(o['patient_id'])}  {printable(o['patient_name'])}  "
              f"{printable(o['description'])}" for o in listed]
    emit({"counts": counts, "orders": listed}, as_json, "\n".join(lines))
