"""`pacs sync run`: the pacs-sync service's main loop.

Each turn: bring the outbox level with Orthanc's changes, then, when a HQ is configured and the
mode allows, send what is ready. HQ out of reach opens a circuit breaker: no sending, only a tiny
probe (the empty holdings question) after a pause with jitter that grows from 1 s to 3 s during
the first ten minutes of an outage (a link that comes back is used within seconds) and up to
5 minutes after that (a site offline for days is not hammered). SIGTERM and SIGINT end it between
two steps; a kill -9 at any instant costs at most the chunk in flight.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import threading
import time
from datetime import datetime

from .. import audit
from ..config import Settings
from ..orthanc import Orthanc, OrthancError
from .feed import Feed
from .inbound import Inbound
from .outbox import Outbox
from .sender import Sender
from .transport import HQClient, HQRefused, HQUnreachable

log = logging.getLogger(__name__)

BEAT_EVERY = 30.0  # heartbeat into the outbox: SD cards wear with every fsync
STABILITY_EVERY = 60.0  # catch studies whose StableStudy change an Orthanc restart swallowed


class CircuitBreaker:
    """Closed: send. Open: wait, then probe; the first answered probe closes it."""

    SHORT_OUTAGE = 600.0

    def __init__(self, first: float = 1.0, short_cap: float = 3.0, cap: float = 300.0) -> None:
        self.first, self.short_cap, self.cap = first, short_cap, cap
        self.failures = 0
        self.opened_at: float | None = None
        self.not_before = 0.0

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def failed(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self.opened_at is None:
            self.opened_at = now
        self.failures += 1
        cap = self.short_cap if now - self.opened_at < self.SHORT_OUTAGE else self.cap
        delay = min(cap, self.first * 2 ** min(self.failures - 1, 20))  # days offline: no overflow
        delay *= random.uniform(0.5, 1.0)  # jitter: many sites must not retry in step
        self.not_before = now + delay
        return delay

    def probed(self) -> None:
        """A probe was answered: half-open. Only a real send closes the breaker, so a failure
        that shows only when sending keeps backing off instead of spinning every second."""
        self.not_before = 0.0

    def succeeded(self) -> None:
        self.failures, self.opened_at, self.not_before = 0, None, 0.0

    def ready(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.not_before

    def outage_seconds(self, now: float | None = None) -> float:
        if self.opened_at is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.opened_at


def in_window(window: tuple[int, int] | None, when: datetime | None = None) -> bool:
    """Is local time `when` inside the daily window (start, end minutes; may cross midnight)?"""
    if window is None:
        return True
    when = when or datetime.now()
    minute = when.hour * 60 + when.minute
    start, end = window
    return start <= minute < end if start < end else minute >= start or minute < end


def run(settings: Settings, idle: float = 1.0) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    outbox = Outbox(settings.sync_outbox_file)
    clinic = Orthanc.from_settings(settings)
    feed = Feed(clinic, outbox)
    hq = HQClient.from_settings(settings) if settings.hq_url else None
    sender = Sender(settings, outbox, clinic, hq) if hq else None
    inbound = Inbound(settings, clinic, hq) if hq else None  # reports, priors from HQ
    breaker = CircuitBreaker()
    last_beat = last_stability = 0.0
    log.info("following Orthanc's changes from change %d; %s", outbox.cursor,
             f"sending to {settings.hq_url}" if sender else "no HQ configured")
    try:
        while not stop.is_set():
            if time.monotonic() - last_beat >= BEAT_EVERY:
                outbox.beat(link=json.dumps({
                    **(hq.link.snapshot().as_dict() if hq else {}),
                    "circuit": "open" if breaker.is_open else "closed",
                    "outage_s": round(breaker.outage_seconds(), 1)}))
                last_beat = time.monotonic()
            busy = False
            try:
                busy = not feed.step()
                if not busy and time.monotonic() - last_stability >= STABILITY_EVERY:
                    feed.check_stability()
                    last_stability = time.monotonic()
            except OrthancError as exc:
                log.warning("changes feed paused: %s", exc)
            except Exception as exc:  # noqa: BLE001 - a full disk, a locked outbox: wait, retry
                log.error("changes feed paused (%s: %s)", exc.__class__.__name__, exc)
                stop.wait(5)
            if sender and outbox.mode(settings.offline_mode) == "auto" and breaker.ready():
                try:
                    outage = breaker.outage_seconds()
                    if breaker.is_open:
                        hq.holdings([])  # a probe: a few hundred bytes
                        breaker.probed()
                    sent = sender.send(low_allowed=in_window(settings.offpeak_window))
                    busy = inbound.step() or busy
                    try:
                        busy = bool(audit.ship(settings.audit_file, hq)) or busy
                    except HQRefused as exc:  # an older HQ: studies must still go
                        log.warning("HQ did not take the audit trail (%s); kept here", exc)
                    if breaker.is_open:
                        log.info("sending to HQ again after %.0fs", outage)
                    breaker.succeeded()
                    busy = busy or bool(sent.confirmed or sent.already_held)
                except HQUnreachable as exc:
                    delay = breaker.failed()
                    if breaker.failures == 1:
                        log.warning("HQ out of reach (%s); probing again in %.0fs", exc, delay)
                except Exception as exc:  # noqa: BLE001 - never die: back off and try again
                    log.error("sending paused (%s: %s); next try in %.0fs",
                              exc.__class__.__name__, exc, breaker.failed())
            if not busy:
                stop.wait(idle)
    finally:
        log.info("stopped at change %d", outbox.cursor)
        if sender:
            sender.close()
        outbox.close()
    return 0
