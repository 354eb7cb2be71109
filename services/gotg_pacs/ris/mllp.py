"""The HL7 listener: MLLP on HL7_PORT (the python `hl7` package's framing), one ACK per message.

An order is acknowledged AA only once it is on disk (the orders database commits with
`synchronous=FULL` first); the worklist item follows. A message this bridge will not take gets
AR with the reason (MSA-3, and ERR-8 for HL7 2.5 readers) and nothing of it is kept: the RIS
must not send it again as it is. A message that could not be kept for a reason of the box's own
(a full disk) gets AE: the RIS sends it again later, and nothing is lost. A message sent again
because its ACK was lost is acknowledged again, once applied.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import uuid
from datetime import datetime
from pathlib import Path

import hl7
from hl7.mllp import InvalidBlockError, start_hl7_server

from . import demographics, hl7_patients, hl7_reports, worklist
from .hl7_orders import MAX_MESSAGE, Received, Rejected, field_value, orders_in, read
from .orders import Orders
from .reports import ReportQueue

log = logging.getLogger(__name__)

APPLICATION = "GOTG_PACS"
# HL7 table 0357: why a message was refused.
UNSUPPORTED, REQUIRED, BAD_VALUE, INTERNAL = "200", "101", "102", "207"


def _error_code(exc: Rejected) -> str:
    if exc.where == "MSH-9":
        return UNSUPPORTED
    return REQUIRED if exc.text == "missing" else BAD_VALUE


def _clean(text: str) -> str:
    """A reason as one HL7 text field: no separator or escape character of ours in it."""
    return "".join(" " if c in "|^~\\&\r\n" else c for c in text)[:200]


class Listener:
    def __init__(self, orders: Orders, worklists: Path, site: str) -> None:
        self.orders = orders
        self.reports = ReportQueue(orders)
        self.patients = demographics.DemographicsQueue(orders)
        self.worklists = worklists
        self.site = site

    def handle(self, raw: bytes) -> bytes:
        """The acknowledgement for one message (the bytes inside the MLLP block)."""
        try:
            received = read(raw)
            if received.kind in hl7_reports.ACCEPTED:
                return self._report(received)
            if received.kind in hl7_patients.ACCEPTED:
                return self._patients(received, hl7_patients.changes_in(received))
            orders_in(received, self.site)
        except Rejected as exc:
            log.warning("HL7 message refused: %s", exc)
            return self._nak(raw, "AR", _error_code(exc), str(exc))
        try:
            # A patient edited in the RIS since: the images follow, kept in the order's own
            # transaction (a message refused changes nothing, images included).
            edits = demographics.edits(self.orders, received.changes)
            changed = self.orders.apply(
                received.changes, "hl7", (received.sender, received.control_id),
                within=lambda db: demographics.DemographicsQueue.insert(db, edits, "hl7"))
        except Rejected as exc:
            log.warning("HL7 message %s refused: %s", received.control_id, exc)
            return self._ack(received.message, "AR", BAD_VALUE, str(exc))
        except (sqlite3.Error, OSError) as exc:
            log.error("HL7 message %s not kept: %s", received.control_id, exc)
            return self._ack(received.message, "AE", INTERNAL,
                             f"not kept here ({exc.__class__.__name__}): send it again later")
        worklist.follow(self.worklists, self.orders, changed)
        log.info("HL7 %s from %s: %d order(s) %s", received.control_id, received.sender,
                 len(received.changes), "kept" if changed else "already kept")
        return self._ack(received.message, "AA")

    def _patients(self, received: Received, changes: list) -> bytes:
        """ADT: patient updates kept to be applied, merges kept for a person to confirm."""
        try:
            self.patients.add(changes, "hl7", (received.sender, received.control_id))
        except (sqlite3.Error, OSError) as exc:
            log.error("HL7 patient change %s not kept: %s", received.control_id, exc)
            return self._ack(received.message, "AE", INTERNAL,
                             f"not kept here ({exc.__class__.__name__}): send it again later")
        log.info("HL7 %s from %s: %d patient change(s) (%s)", received.control_id,
                 received.sender, len(changes), "^".join(received.kind))
        return self._ack(received.message, "AA")

    def _report(self, received: Received) -> bytes:
        """An ORU^R01's final reports, kept to be attached to their studies."""
        found, others = hl7_reports.reports_in(received)  # Rejected: answered AR
        try:
            new = self.reports.add(found, "hl7", (received.sender, received.control_id))
        except (sqlite3.Error, OSError) as exc:
            log.error("HL7 report %s not kept: %s", received.control_id, exc)
            return self._ack(received.message, "AE", INTERNAL,
                             f"not kept here ({exc.__class__.__name__}): send it again later")
        log.info("HL7 %s from %s: %d report(s), %d new%s", received.control_id,
                 received.sender, len(found), new,
                 f"; {others} preliminary result(s) left for the final one" if others else "")
        return self._ack(received.message, "AA")

    def _ack(self, message: hl7.Message | None, code: str, error: str = "",
             text: str = "") -> bytes:
        """The acknowledgement, addressed back to the sender named in `message`'s MSH (None:
        a message with no usable MSH). Built here rather than by `hl7.Message.create_ack`,
        which fails on a header cut short; every value taken over is made one plain field."""
        msh = None
        if message is not None:
            try:
                msh = message.segments("MSH")[0]
            except Exception:  # noqa: BLE001 - any MSH the parser could not build
                msh = None

        def theirs(number: int, component: int = 1, default: str = "") -> str:
            return _clean(field_value(msh, number, component)) or default if msh is not None \
                else default

        now = datetime.now().strftime("%Y%m%d%H%M%S")
        trigger = theirs(9, 2)
        segments = [
            "|".join(["MSH", "^~\\&", APPLICATION, _clean(self.site), theirs(3), theirs(4),
                      now, "", f"ACK^{trigger}^ACK" if trigger else "ACK",
                      f"{now}{uuid.uuid4().hex[:6]}", theirs(11, default="P"),
                      theirs(12, default="2.5.1")]),
            "|".join(["MSA", code, theirs(10), _clean(text)]).rstrip("|")]
        if text:
            segments.append(f"ERR|||{error}^^HL70357|E||||{_clean(text)}")
        return ("\r".join(segments) + "\r").encode("utf-8")

    def _nak(self, raw: bytes, code: str, error: str, text: str) -> bytes:
        """AR for a message that may not even parse: answered from its MSH when it has one."""
        try:
            message = hl7.parse(raw.decode("latin-1").replace("\n", "\r").strip("\r"))
        except Exception:  # noqa: BLE001 - no usable MSH: our own header, no control ID
            message = None
        return self._ack(message, code, error, text)


async def serve(listener: Listener, host: str, port: int) -> None:
    """Answer HL7 senders until cancelled; each connection may carry many messages."""

    async def connected(reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    block = await reader.readblock()
                except asyncio.IncompleteReadError:
                    return  # the sender closed the connection
                except (InvalidBlockError, ValueError) as exc:
                    log.warning("HL7 from %s: not an MLLP block (%s)", peer, exc)
                    block = b""
                writer.writeblock(listener.handle(block))
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()

    server = await start_hl7_server(connected, host, port, limit=MAX_MESSAGE + 16)
    log.info("HL7 (MLLP) listening on %s:%d", host, port)
    async with server:
        await server.serve_forever()
