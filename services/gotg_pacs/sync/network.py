"""What the link to HQ is really like, learnt from the transfers themselves, not from one ping.

Every chunk sent is a measurement (bytes and seconds); every small request a latency sample;
every failure counts. From these: a throughput estimate (a moving average weighted towards the
recent), the tier staff see (excellent > 10 Mbit/s, good 1-10, poor < 1, offline), and the
choices that follow from it:

* chunk size: about four seconds of the link (16 KB on GPRS, megabytes on a LAN), so an outage
  costs at most a few seconds of sending and a fast link is not slowed by round trips;
* timeouts: a few times what a chunk should take, so a dead link is noticed in seconds on a LAN
  and a slow one is not mistaken for dead;
* what goes: on a poor link back-fill waits until nothing else is owed (critical and recent
  studies first); on an excellent one the CPU, not the link, is the limit, so JPEG 2000 (5x
  slower than JPEG-LS for a few percent) is skipped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

MBIT = 1e6
TIERS = ("offline", "poor", "good", "excellent")
CHUNK_SECONDS = 4.0
MIN_CHUNK, MAX_CHUNK, FIRST_CHUNK = 16 * 1024, 8 * 2**20, 256 * 1024
SLOWEST_GUESS = 32e3  # bits/s assumed after a chunk timed out with nothing measured (GPRS)
MIN_SAMPLE = 16 * 1024  # smaller transfers measure latency, not throughput
OFFLINE_AFTER = 3       # consecutive failures


@dataclass(frozen=True)
class Snapshot:
    tier: str
    throughput_mbps: float | None
    latency_ms: float | None
    failure_rate: float
    chunk_bytes: int

    def as_dict(self) -> dict:
        return {"tier": self.tier, "throughput_mbps": self.throughput_mbps,
                "latency_ms": self.latency_ms, "failure_rate": self.failure_rate,
                "chunk_bytes": self.chunk_bytes}


class LinkEstimate:
    """Thread-safe: the packer and the uploads may report at the same time."""

    def __init__(self, cap_mbps: float = 0.0, alpha: float = 0.3) -> None:
        self.cap_bps = cap_mbps * MBIT if cap_mbps > 0 else 0.0
        self.alpha = alpha
        self.bps: float | None = None       # bits per second while sending
        self.latency: float | None = None   # seconds for a small request
        self.outcomes: list[bool] = []      # the last 50 requests: True = failed
        self.failing = 0                    # consecutive failures
        self.assumed_bps: float | None = None  # a guess, while nothing is measured
        self.shrink = 1.0                   # chunks made smaller after chunks timed out
        self._lock = threading.Lock()

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def sent(self, size: int, seconds: float) -> None:
        with self._lock:
            self._outcome(False)
            self.shrink = min(1.0, self.shrink * 2)  # back to full chunks step by step
            if size >= MIN_SAMPLE and seconds > 0:
                self.bps = self._average(self.bps, size * 8 / seconds)

    def answered(self, seconds: float) -> None:
        with self._lock:
            self._outcome(False)
            self.latency = self._average(self.latency, seconds)

    def failed(self, timed_out_size: int = 0) -> None:
        """A request failed. A chunk that timed out may mean a link slower than planned (GPRS)
        or a link that went down: the next chunks are halved until one gets through, but the
        measured rate and the tier stay as measured (an outage is not a slow link). With
        nothing measured yet, the guess drops towards GPRS, so timeouts grow to match."""
        with self._lock:
            self._outcome(True)
            if timed_out_size:
                self.shrink = max(MIN_CHUNK / MAX_CHUNK, self.shrink / 2)
                if self.bps is None:
                    self.assumed_bps = max(SLOWEST_GUESS / 4,
                                           (self.assumed_bps or 4 * SLOWEST_GUESS) / 2)

    def _outcome(self, failed: bool) -> None:
        self.outcomes = (self.outcomes + [failed])[-50:]
        self.failing = self.failing + 1 if failed else 0

    @property
    def rate_bps(self) -> float | None:
        """The rate to plan with: what was measured, never above MAX_BANDWIDTH_MBPS."""
        measured = self.bps if self.bps is not None else self.assumed_bps
        if measured is None:
            return self.cap_bps or None
        return min(measured, self.cap_bps) if self.cap_bps else measured

    @property
    def tier(self) -> str:
        if self.failing >= OFFLINE_AFTER:
            return "offline"
        if self.bps is None and not self.cap_bps:
            return "good"  # nothing measured yet: assume the middle, learn from the first chunk
        rate = self.rate_bps
        return "excellent" if rate > 10 * MBIT else "good" if rate >= MBIT else "poor"

    def chunk_size(self) -> int:
        rate = self.rate_bps
        if rate is None:
            return max(MIN_CHUNK, int(FIRST_CHUNK * self.shrink))
        size = int(rate / 8 * CHUNK_SECONDS * self.shrink) // MIN_CHUNK * MIN_CHUNK
        return max(MIN_CHUNK, min(MAX_CHUNK, size))

    def timeout(self, size: int = 0) -> float:
        """Seconds to wait for an answer to a request carrying `size` bytes."""
        rate = self.rate_bps
        expected = size * 8 / rate if rate else size * 8 / (256e3 / 2)  # unknown: slow 2G
        return max(10.0, 3 * expected + 4 * (self.latency or 1.0))

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                tier=self.tier,
                throughput_mbps=None if self.bps is None else round(self.bps / MBIT, 3),
                latency_ms=None if self.latency is None else round(self.latency * 1000, 1),
                failure_rate=round(sum(self.outcomes) / len(self.outcomes), 3)
                if self.outcomes else 0.0,
                chunk_bytes=self.chunk_size())
