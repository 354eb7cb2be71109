"""`pacs sync run`: the pacs-sync service's main loop.

It keeps the outbox level with Orthanc's changes. SIGTERM and SIGINT end it between two batches;
a kill -9 at any instant costs at most re-reading the batch that was not yet committed.
"""

from __future__ import annotations

import logging
import signal
import threading

from ..config import Settings
from ..orthanc import Orthanc
from .feed import Feed
from .outbox import Outbox

log = logging.getLogger(__name__)


def run(settings: Settings, idle: float = 1.0) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    outbox = Outbox(settings.sync_outbox_file)
    try:
        log.info("following Orthanc's changes from change %d", outbox.cursor)
        Feed(Orthanc.from_settings(settings), outbox).follow(stop, idle)
    finally:
        outbox.close()
    log.info("stopped at change %d", Outbox(settings.sync_outbox_file).cursor)
    return 0
