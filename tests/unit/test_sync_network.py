"""The link estimate and what follows from it: tiers, chunk sizes, timeouts, the breaker."""

from __future__ import annotations

from datetime import datetime

import pytest

from gotg_pacs.sync.network import FIRST_CHUNK, MAX_CHUNK, MIN_CHUNK, LinkEstimate
from gotg_pacs.sync.service import CircuitBreaker, in_window


def _measured(mbps: float, cap: float = 0.0) -> LinkEstimate:
    link = LinkEstimate(cap_mbps=cap)
    for _ in range(10):
        link.sent(int(mbps * 1e6 / 8 * 4), 4.0)  # four seconds' worth each time
    return link


@pytest.mark.parametrize(("mbps", "tier"), [(0.256, "poor"), (2, "good"), (50, "excellent")])
def test_tiers_follow_the_measured_throughput(mbps, tier):
    assert _measured(mbps).tier == tier


def test_chunks_are_a_few_seconds_of_the_link_within_bounds():
    assert LinkEstimate().chunk_size() == FIRST_CHUNK  # nothing known yet
    assert _measured(0.05).chunk_size() == MIN_CHUNK  # 2G: the smallest chunk
    assert abs(_measured(1).chunk_size() - 500_000) < MIN_CHUNK  # 1 Mbit/s x 4 s
    assert _measured(1000).chunk_size() == MAX_CHUNK


def test_the_bandwidth_cap_bounds_the_plan():
    link = _measured(100, cap=1)
    assert link.tier == "good" and abs(link.chunk_size() - 500_000) < MIN_CHUNK
    assert LinkEstimate(cap_mbps=1).chunk_size() == link.chunk_size()  # before any sample


def test_timeouts_fit_the_link():
    fast, slow = _measured(100), _measured(0.256)
    assert fast.timeout(fast.chunk_size()) < slow.timeout(slow.chunk_size())
    assert slow.timeout(64 * 1024) >= 3 * 64 * 1024 * 8 / 256e3  # three times the expected time
    assert fast.timeout(0) >= 10


def test_consecutive_failures_mean_offline_and_one_answer_ends_it():
    link = _measured(2)
    for _ in range(3):
        link.failed()
    assert link.tier == "offline"
    assert link.snapshot().failure_rate == pytest.approx(3 / 13, abs=0.01)
    link.answered(0.2)
    assert link.tier == "good" and link.snapshot().latency_ms == 200.0


def test_small_transfers_do_not_count_as_throughput():
    link = LinkEstimate()
    link.sent(1000, 1.0)
    assert link.bps is None


def test_the_breaker_probes_often_in_a_short_outage_and_rarely_in_a_long_one():
    breaker = CircuitBreaker()
    delays = [breaker.failed(now=float(t)) for t in range(20)]
    assert breaker.is_open
    assert max(delays) <= 3.0 and delays[0] <= 1.0
    late = [breaker.failed(now=700.0 + t) for t in range(10)]
    assert max(late) > 3.0 and max(late) <= 300.0
    assert not breaker.ready(now=700.0 + 9) and breaker.outage_seconds(now=709.0) == 709.0
    breaker.succeeded()
    assert not breaker.is_open and breaker.ready(now=0.0)


@pytest.mark.parametrize(("window", "hour", "inside"), [
    (None, 12, True),
    ((22 * 60, 6 * 60), 23, True), ((22 * 60, 6 * 60), 3, True), ((22 * 60, 6 * 60), 12, False),
    ((9 * 60, 17 * 60), 12, True), ((9 * 60, 17 * 60), 17, False),
])
def test_the_off_peak_window_may_cross_midnight(window, hour, inside):
    assert in_window(window, datetime(2026, 11, 25, hour, 0)) is inside


def test_days_offline_never_overflow_the_backoff():
    breaker = CircuitBreaker()
    for t in range(5000):  # far more failures than 60 hours of probing
        delay = breaker.failed(now=float(t * 60))
    assert delay <= 300.0


def test_an_answered_probe_does_not_reset_the_backoff():
    breaker = CircuitBreaker()
    for t in range(10):
        breaker.failed(now=t * 100.0)  # open for over ten minutes now
    breaker.probed()
    assert breaker.ready(now=910.0) and breaker.is_open, "half-open: one send may try"
    assert breaker.failed(now=911.0) > 3.0, "a send failing after the probe keeps the long pause"


def test_a_chunk_that_timed_out_makes_the_next_smaller_and_more_patient():
    link = LinkEstimate()
    first = link.chunk_size()
    link.failed(timed_out_size=first)  # GPRS: 256 KB did not get through in time
    assert link.chunk_size() < first
    assert link.timeout(link.chunk_size()) >= 3 * link.chunk_size() * 8 / 64e3
    assert link.tier == "good", "a guess is not a measurement"
    measured = _measured(2)
    before = measured.chunk_size()
    measured.failed(timed_out_size=before)
    assert measured.chunk_size() <= before // 2 + MIN_CHUNK
    assert measured.tier == "good", "an outage is not a slow link: no previews because of it"
    measured.sent(before, before * 8 / 2e6)  # one chunk through: full chunks again soon
    assert measured.chunk_size() == before
    measured.failed()  # a refused connection says nothing about the rate
    assert measured.bps == pytest.approx(2e6)
