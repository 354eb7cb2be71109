"""Statuses back to a RIS that speaks only HL7 (RIS_HL7_ADDRESS): the outbox's events as
ORM^O01 order status changes over MLLP (the python `hl7` package's asyncio connection).

Each event is one message, ORC-1 `SC` (status changed):
  in_progress        ORC-5 IP        completed     ORC-5 CM        discontinued   ORC-5 DC
  images_available   ORC-5 CM with OBR-25 R (results stored, not yet verified: ready to read)
with the order's placer number (ORC-2), the Accession Number as filler number (ORC-3, OBR-18),
the patient (PID-3, PID-5), and the Study Instance UID in ZDS-1 (IHE's segment for it). MSH-10
is the event's ID, so a RIS that keeps control IDs takes a resend once. AA or CA: sent. AR or
CR: refused for good (recorded; the queue goes on). AE, CE, no answer, no connection: the RIS
cannot take it now, and the queue waits, in order, exactly as for the REST API.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import hl7
from hl7.mllp import open_hl7_connection

from .orders import Orders
from .rest import RisRefused, RisUnreachable

APPLICATION = "GOTG_PACS"
ORDER_STATUS = {"in_progress": "IP", "completed": "CM", "discontinued": "DC",
                "images_available": "CM"}


# HL7's own delimiters, escaped (the escape character first); any other character, accents and
# other scripts included, goes as it is in UTF-8 (MSH-18). The library's escape() writes those
# as \X..\ hex, which a RIS reading UTF-8 would show as such.
ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"),
           ("~", "\\R\\"))


def escape(value: str) -> str:
    for character, escaped in ESCAPES:
        value = value.replace(character, escaped)
    return value


class Hl7Statuses:
    """The RIS's MLLP listener as the outbox's client (what `rest.RisClient` is for REST)."""

    def __init__(self, address: str, orders: Orders, site: str, timeout: float = 30.0) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.orders = orders
        self.site = site
        self.timeout = timeout

    def message(self, event: dict) -> str:
        """The ORM^O01 telling the RIS of `event`, every value escaped for HL7."""
        found = self.orders.get(event["accession"])
        order = found[1] if found else None
        def text(value: str) -> str:
            return escape(value or "")

        def name(value: str) -> str:  # DICOM PN to HL7 XPN (their 4th and 5th are swapped)
            parts = (value.split("^") + [""] * 5)[:5]
            family, given, middle, prefix, suffix = (text(part) for part in parts)
            return "^".join((family, given, middle, suffix, prefix)).rstrip("^")
        now = datetime.now().strftime("%Y%m%d%H%M%S")
        at = datetime.fromtimestamp(event["at"]).strftime("%Y%m%d%H%M%S")
        accession = text(event["accession"])
        placer = text(order.placer) if order else ""
        code = "^".join(text(part) for part in (order.code[0], order.code[2], order.code[1])) \
            if order and order.code[0] else ""
        segments = [
            f"MSH|^~\\&|{APPLICATION}|{text(self.site)}|RIS||{now}||ORM^O01|"
            f"{text(event['event_id'])}|P|2.5.1||||||UNICODE UTF-8",
            f"PID|1||{text(order.patient_id)}^^^{text(order.issuer)}||"
            f"{name(order.patient_name)}" if order else "PID|1",
            f"ORC|SC|{placer}|{accession}||{ORDER_STATUS[event['status']]}||||{at}",
            f"OBR|1|{placer}|{accession}|{code}" + "|" * 14 + f"{accession}"
            + "|" * 7 + ("R" if event["status"] == "images_available" else "")]
        if event.get("study_uid"):
            segments.append(f"ZDS|{text(event['study_uid'])}^^Application^DICOM")
        return "\r".join(segments)

    def post_status(self, event: dict) -> None:
        message = self.message(event)
        try:
            ack = asyncio.run(self._exchange(message))
        except Exception as exc:  # noqa: BLE001 - no answer, a broken block, bytes not UTF-8
            raise RisUnreachable(f"RIS HL7 at {self.host}:{self.port}: "
                                 f"{exc.__class__.__name__}") from None
        try:
            msa = ack.segment("MSA")
            code, text = str(msa[1]).upper(), str(msa[3]) if len(msa) > 3 else ""
        except (KeyError, IndexError):
            raise RisUnreachable("the RIS answered something that is no HL7 ACK") from None
        if code in ("AR", "CR"):
            raise RisRefused(400, f"{code} {text}".strip())
        if code not in ("AA", "CA"):
            raise RisUnreachable(f"the RIS answered {code} {text}".strip())

    async def _exchange(self, message: str) -> hl7.Message:
        reader, writer = await asyncio.wait_for(
            open_hl7_connection(self.host, self.port, encoding="utf-8"), self.timeout)
        try:
            writer.writemessage(hl7.parse(message))
            await writer.drain()
            return await asyncio.wait_for(reader.readmessage(), self.timeout)
        finally:
            writer.close()
