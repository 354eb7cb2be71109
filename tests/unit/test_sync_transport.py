"""The clinic's side of the wire, without a network: the bandwidth cap."""

from __future__ import annotations

import time

from gotg_pacs.sync.transport import RateCap


def test_the_bandwidth_cap_holds_on_average():
    cap = RateCap(mbps=4)  # 500 kB/s
    started = time.monotonic()
    for _ in range(10):
        cap.wait_for(50_000)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed <= 1.5, elapsed
    unlimited = RateCap(mbps=0)
    started = time.monotonic()
    unlimited.wait_for(10**9)
    assert time.monotonic() - started < 0.05
