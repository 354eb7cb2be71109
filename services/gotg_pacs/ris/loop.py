"""What pacs-ris does again and again (attach reports, apply patient changes): one step in a
thread every few seconds, until cancelled. Orthanc down or a full disk only delays it: the
work waits on disk and the next round takes it up."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable

from ..orthanc import OrthancError

log = logging.getLogger(__name__)


async def every(step: Callable[[], object], seconds: float, what: str) -> None:
    while True:
        try:
            await asyncio.to_thread(step)
        except (OrthancError, OSError, sqlite3.Error) as exc:
            log.warning("%s: not now (%s), again in %.0f s", what, exc, seconds)
        await asyncio.sleep(seconds)
