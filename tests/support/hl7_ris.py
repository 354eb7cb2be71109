"""An HL7-only RIS for the tests: an MLLP listener (the python `hl7` package's asyncio server)
that keeps every message it is sent and answers AA, or AR for the accessions it is told to
refuse. It can be taken down and brought back on the same port, like a RIS whose link is cut.
"""

from __future__ import annotations

import asyncio
import threading

import hl7
from hl7.mllp import start_hl7_server

from tests.support.site import free_port


def msa(ack: bytes) -> list[str]:
    """What an acknowledgement says: MSA's fields after the segment name."""
    segment = next(s for s in ack.decode().split("\r") if s.startswith("MSA|"))
    return segment.split("|")[1:]


class Hl7Ris:
    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.messages: list[hl7.Message] = []
        self.refuse: set[str] = set()  # accessions (ORC-3) answered AR
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    async def _serve(self, ready: threading.Event) -> None:
        async def connected(reader, writer) -> None:
            try:
                while not writer.is_closing():
                    message = await reader.readmessage()
                    accession = str(message.segment("ORC")[3])
                    code = "AR" if accession in self.refuse else "AA"
                    if code == "AA":
                        self.messages.append(message)
                    writer.writemessage(message.create_ack(code))
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass
            finally:
                writer.close()

        self._stop = asyncio.Event()
        server = await start_hl7_server(connected, "127.0.0.1", self.port)
        ready.set()
        async with server:
            await self._stop.wait()

    def up(self) -> Hl7Ris:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._serve(ready),), daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def down(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
            self._loop = None

    def statuses(self) -> list[tuple[str, str, str]]:
        """(accession, ORC-5, OBR-25) of each message kept, in order."""
        return [(str(m.segment("ORC")[3]), str(m.segment("ORC")[5]),
                 str(m.segment("OBR")[25]) if len(m.segment("OBR")) > 25 else "")
                for m in self.messages]
