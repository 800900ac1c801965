"""The failed-authentication limiter, on a fake clock: exact windows and
Retry-After, bounded memory, and IPv6 /64 grouping."""

from __future__ import annotations

import pytest

from revconn._errors import ConfigError
from revconn._gateway.ratelimit import FailureLimiter, source_of
from revconn._gateway.replies import too_many_failures


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **kw: int | float) -> FailureLimiter:
    return FailureLimiter(clock=clock, **kw)  # type: ignore[arg-type]


def test_nth_failure_locks_out_until_the_window_ends() -> None:
    clock = Clock()
    lim = limiter(clock, max_failures=3, window=60.0)
    assert lim.retry_after("10.0.0.1") is None
    assert lim.failed("10.0.0.1") is False
    clock.now += 10
    assert lim.failed("10.0.0.1") is False
    assert lim.retry_after("10.0.0.1") is None  # two of three: still allowed
    clock.now += 15
    assert lim.failed("10.0.0.1") is True  # the lock-out: logged once
    assert lim.retry_after("10.0.0.1") == 35.0  # counted from the first failure
    clock.now += 34.5
    assert lim.retry_after("10.0.0.1") == 0.5
    clock.now += 0.5
    assert lim.retry_after("10.0.0.1") is None
    # A new window: three fresh tries.
    assert lim.failed("10.0.0.1") is False
    assert lim.retry_after("10.0.0.1") is None


def test_failures_spread_over_more_than_a_window_never_lock_out() -> None:
    clock = Clock()
    lim = limiter(clock, max_failures=3, window=60.0)
    for _ in range(10):
        lim.failed("10.0.0.1")
        lim.failed("10.0.0.1")
        assert lim.retry_after("10.0.0.1") is None
        clock.now += 60


def test_other_sources_are_unaffected() -> None:
    lim = limiter(Clock(), max_failures=2)
    lim.failed("10.0.0.1")
    lim.failed("10.0.0.1")
    assert lim.retry_after("10.0.0.1") == 60.0
    assert lim.retry_after("10.0.0.2") is None
    assert lim.retry_after("2001:db8::1") is None


def test_lockout_is_reported_once_per_window() -> None:
    clock = Clock()
    lim = limiter(clock, max_failures=2, window=5.0)
    reports = [lim.failed("10.0.0.1") for _ in range(5)]
    assert reports == [False, True, False, False, False]
    clock.now += 5
    assert [lim.failed("10.0.0.1") for _ in range(2)] == [False, True]


def test_success_forgets_partial_counts_but_not_a_lockout() -> None:
    lim = limiter(Clock(), max_failures=2)
    lim.failed("10.0.0.1")
    lim.succeeded("10.0.0.1")
    lim.failed("10.0.0.1")
    assert lim.retry_after("10.0.0.1") is None
    lim.failed("10.0.0.1")
    lim.succeeded("10.0.0.1")
    assert lim.retry_after("10.0.0.1") == 60.0


def test_ipv6_is_grouped_by_64() -> None:
    lim = limiter(Clock(), max_failures=3)
    for host in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:2:abcd:1:2:3"):
        lim.failed(host)
    assert lim.retry_after("2001:db8:1:2::42") == 60.0
    assert lim.retry_after("2001:db8:1:3::1") is None  # the next /64
    assert len(lim) == 1


def test_source_keys() -> None:
    assert source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("2001:db8::1%eth0") == "2001:db8::/64"
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"  # a dual-stack IPv4 peer
    assert source_of("unknown") == "unknown"
    # IPv4 is never grouped: neighbours keep their own counters.
    assert source_of("192.0.2.8") != source_of("192.0.2.7")


def test_memory_is_bounded_under_a_flood_of_distinct_addresses() -> None:
    clock = Clock()
    lim = limiter(clock, max_failures=3, max_tracked=1000)
    for _ in range(3):
        lim.failed("10.9.9.9")  # the attacker we want to keep locked out
    for i in range(100_000):
        lim.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        clock.now += 1e-6
        assert len(lim) <= 1000
    assert len(lim) == 1000
    # Single failures from new addresses evict other counting sources, never
    # a locked-out one.
    assert lim.retry_after("10.9.9.9") is not None


def test_locked_out_sources_are_evicted_when_nothing_else_is_left() -> None:
    lim = limiter(Clock(), max_failures=1, max_tracked=2)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        lim.failed(host)
    assert len(lim) == 2
    assert lim.retry_after("10.0.0.1") is None  # the oldest lock-out went
    assert lim.retry_after("10.0.0.3") == 60.0


@pytest.mark.parametrize(
    "kw",
    [{"max_failures": 0}, {"window": 0}, {"window": float("nan")}, {"max_tracked": 0}],
)
def test_invalid_settings(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        FailureLimiter(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("wait", "header"), [(35.0, b"35"), (0.2, b"1"), (59.01, b"60")])
def test_reply_rounds_retry_after_up(wait: float, header: bytes) -> None:
    reply = too_many_failures(wait)
    assert reply.status == 429
    assert (b"retry-after", header) in reply.headers
    assert b'"error":"too_many_auth_failures"' in reply.body
