"""The background fills' token bucket and its governor, on a fake clock (exact arithmetic).

The clock is the one thing faked: the bucket reads no other state of the
world. Values are powers of two so that the floating-point arithmetic is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from clocks import ManualClock
from imagecache.errors import ConfigurationError
from imagecache.fill import fill_config
from imagecache.fill.bandwidth import BURST_SECONDS, BackgroundBandwidth, TokenBucket
from imagecache.settings import Settings

MiB = 1024 * 1024


def test_the_bucket_starts_full_and_overdrafts_are_waited_off() -> None:
    clock = ManualClock()
    bucket = TokenBucket(2 * MiB, clock)
    assert BURST_SECONDS == 0.5
    assert bucket.tokens == 1 * MiB  # half a second of the rate
    assert bucket.delay() == 0
    bucket.spend(1 * MiB)
    assert bucket.delay() == 0  # exactly empty: the next chunk may go
    bucket.spend(1 * MiB)  # a whole chunk overdraws it
    assert bucket.tokens == -1 * MiB
    assert bucket.delay() == 0.5
    clock.now += 0.25
    assert bucket.delay() == 0.25
    clock.now += 0.25
    assert bucket.delay() == 0
    clock.now += 10  # idle time earns no more than the burst
    assert bucket.tokens == 1 * MiB


def test_the_rate_holds_over_many_chunks() -> None:
    # 8 MiB in 1 MiB chunks at 2 MiB/s, each chunk read as soon as delay() allows:
    # the last one starts 3 s in ((8 - 1 chunk - 1 burst) / 2), never earlier.
    clock = ManualClock()
    bucket = TokenBucket(2 * MiB, clock)
    start = clock.now
    for _ in range(8):
        clock.now += bucket.delay()
        bucket.spend(1 * MiB)
    assert clock.now - start == 3.0


def test_a_pause_holds_every_chunk_and_a_resume_keeps_what_was_earned() -> None:
    clock = ManualClock()
    bucket = TokenBucket(4 * MiB, clock)
    bucket.spend(3 * MiB)  # 2 MiB burst, 1 MiB in debt
    bucket.set_rate(0)
    assert bucket.delay() == math.inf
    clock.now += 100
    assert bucket.delay() == math.inf
    bucket.set_rate(4 * MiB)  # nothing was earned while paused
    assert bucket.tokens == -1 * MiB
    assert bucket.delay() == 0.25


def test_a_lower_rate_cuts_the_balance_to_its_burst() -> None:
    clock = ManualClock()
    bucket = TokenBucket(8 * MiB, clock)
    assert bucket.tokens == 4 * MiB
    bucket.set_rate(1 * MiB)
    assert bucket.tokens == 0.5 * MiB


def test_no_limit_never_waits_and_a_limit_after_it_starts_full() -> None:
    clock = ManualClock()
    bucket = TokenBucket(math.inf, clock)
    bucket.spend(10**12)
    assert bucket.delay() == 0
    bucket.set_rate(2 * MiB)
    assert bucket.tokens == 1 * MiB


def test_the_governor_switches_rates_and_reports_each_change() -> None:
    clock = ManualClock()
    rates: list[float] = []
    governor = BackgroundBandwidth(4 * MiB, 1 * MiB, clock, on_rate=rates.append)
    assert governor.rate == 4 * MiB
    governor.set_busy(True)
    governor.set_busy(True)  # no change, no report
    assert governor.rate == 1 * MiB
    governor.set_busy(False)
    assert rates == [4 * MiB, 1 * MiB, 4 * MiB]


def test_a_busy_rate_never_exceeds_the_idle_one() -> None:
    governor = BackgroundBandwidth(1 * MiB, 8 * MiB, ManualClock())
    governor.set_busy(True)
    assert governor.rate == 1 * MiB


@pytest.mark.parametrize(
    ("values", "idle", "busy"),
    [
        ({}, math.inf, 1 * MiB),  # the defaults: no cap; 1 MiB/s while busy
        ({"background_bandwidth": "8MiB/s", "workers": 2}, 4 * MiB, 0.5 * MiB),
        ({"background_bandwidth": "8MiB", "background_bandwidth_while_busy": 0}, 8 * MiB, 0),
        ({"background_bandwidth_while_busy": "2 MB/s"}, math.inf, 2_000_000),
    ],
)
def test_the_settings_give_each_worker_its_share(
    make_settings: Callable[..., Settings], values: dict[str, object], idle: float, busy: float
) -> None:
    governor = BackgroundBandwidth.of(fill_config(make_settings(**values)))
    assert governor.idle == idle
    assert governor.busy_rate == busy


def test_a_rate_that_is_not_a_size_is_refused(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigurationError, match="background_bandwidth"):
        make_settings(background_bandwidth="fast")
