"""`pacs sync run`: the pacs-sync service's main loop.

Each turn: bring the outbox level with Orthanc's changes, then, when a HQ is configured and the
mode allows, send what is ready. HQ out of reach costs nothing but time: the next try waits with
exponential backoff and jitter (2 s up to 5 min), so a dead link is not hammered and a link that
comes back is used within minutes. SIGTERM and SIGINT end it between two steps; a kill -9 at any
instant costs at most the chunk in flight.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time

from ..config import Settings
from ..orthanc import Orthanc, OrthancError
from .feed import Feed
from .outbox import Outbox
from .sender import Sender
from .transport import HQClient, HQUnreachable

log = logging.getLogger(__name__)

BEAT_EVERY = 30.0  # heartbeat into the outbox: SD cards wear with every fsync
STABILITY_EVERY = 60.0  # catch studies whose StableStudy change an Orthanc restart swallowed


class Backoff:
    def __init__(self, first: float = 2.0, cap: float = 300.0) -> None:
        self.first, self.cap, self.failures = first, cap, 0
        self.not_before = 0.0

    def failed(self) -> float:
        self.failures += 1
        delay = min(self.cap, self.first * 2 ** (self.failures - 1))
        delay *= random.uniform(0.5, 1.0)  # jitter: many sites must not retry in step
        self.not_before = time.monotonic() + delay
        return delay

    def succeeded(self) -> None:
        self.failures, self.not_before = 0, 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self.not_before


def hq_client(settings: Settings) -> HQClient:
    return HQClient(settings.hq_url, settings.hq_token, max_mbps=settings.max_bandwidth_mbps)


def run(settings: Settings, idle: float = 1.0) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    outbox = Outbox(settings.sync_outbox_file)
    clinic = Orthanc.from_settings(settings)
    feed = Feed(clinic, outbox)
    sender = (Sender(settings, outbox, clinic, hq_client(settings)) if settings.hq_url else None)
    backoff = Backoff()
    last_beat = last_stability = 0.0
    log.info("following Orthanc's changes from change %d; %s", outbox.cursor,
             f"sending to {settings.hq_url}" if sender else "no HQ configured")
    try:
        while not stop.is_set():
            if time.monotonic() - last_beat >= BEAT_EVERY:
                outbox.beat()
                last_beat = time.monotonic()
            busy = False
            try:
                busy = not feed.step()
                if not busy and time.monotonic() - last_stability >= STABILITY_EVERY:
                    feed.check_stability()
                    last_stability = time.monotonic()
            except OrthancError as exc:
                log.warning("changes feed paused: %s", exc)
            if sender and outbox.mode(settings.offline_mode) == "auto" and backoff.ready():
                try:
                    sent = sender.send()
                    backoff.succeeded()
                    busy = busy or bool(sent.confirmed or sent.already_held)
                except HQUnreachable as exc:
                    log.warning("HQ out of reach (%s); next try in %.0fs", exc, backoff.failed())
                except Exception as exc:  # noqa: BLE001 - never die: back off and try again
                    log.error("sending paused (%s: %s); next try in %.0fs",
                              exc.__class__.__name__, exc, backoff.failed())
            if not busy:
                stop.wait(idle)
    finally:
        log.info("stopped at change %d", outbox.cursor)
        outbox.close()
    return 0
