"""The supervisor's schedule, asserted exactly in virtual time."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import trio
import trio.testing

from revconn import (
    AuthError,
    Backoff,
    ConfigError,
    ConnectError,
    ReplacedError,
    Supervisor,
)


def test_backoff_caps_and_range() -> None:
    b = Backoff(1.0, 30.0)
    assert [b.cap(n) for n in range(7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert b.delay(0, 0.0) == 1.0
    assert b.delay(3, 1.0) == 16.0
    assert b.delay(3, 0.5) == 8.5
    assert b.cap(10_000) == 30.0  # no overflow


@pytest.mark.parametrize(
    ("low", "high"), [(0.0, 1.0), (-1.0, 5.0), (2.0, 1.0), (float("nan"), 3.0), (1.0, float("inf"))]
)
def test_backoff_rejects_bad_bounds(low: float, high: float) -> None:
    with pytest.raises(ConfigError):
        Backoff(low, high)


class Script:
    """A connect function that fails, succeeds or stays up as scripted."""

    def __init__(self, steps: list[tuple[str, float]]) -> None:
        self.steps = steps
        self.started_at: list[float] = []

    async def __call__(self, connected: Callable[[], None]) -> None:
        self.started_at.append(trio.current_time())
        kind, duration = self.steps.pop(0) if self.steps else ("hang", 0.0)
        if kind == "fail":
            await trio.sleep(duration)
            raise ConnectError("refused")
        if kind == "oserror":
            raise OSError(111, "Connection refused")
        if kind == "up-then-fail":
            connected()
            await trio.sleep(duration)
            raise ConnectError("lost")
        if kind == "up-then-clean":
            connected()
            await trio.sleep(duration)
            return
        if kind == "auth":
            raise AuthError("rejected")
        if kind == "replaced":
            connected()
            await trio.sleep(duration)
            raise ReplacedError("replaced")
        await trio.sleep_forever()


async def _run_until_hang(sup: Supervisor, script: Script) -> None:
    """Run until the scripted steps are used up and the final (hanging) attempt began."""
    total = len(script.steps) + 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        while len(script.started_at) < total:
            await trio.sleep(0.25)
        nursery.cancel_scope.cancel()


def _gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


async def test_exponential_schedule_with_max_jitter(autojump_clock: trio.testing.MockClock) -> None:
    script = Script([("fail", 0.0)] * 7)
    sup = Supervisor(script, backoff=Backoff(1, 30), uniform01=lambda: 1.0)
    await _run_until_hang(sup, script)
    assert _gaps(script.started_at) == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    stats = sup.statistics()
    assert stats.attempts == 8
    assert stats.failures == 7
    assert stats.last_error == "ConnectError: refused"


async def test_full_jitter_uses_random_source(autojump_clock: trio.testing.MockClock) -> None:
    draws = iter([0.0, 0.5, 0.25, 1.0])
    script = Script([("oserror", 0.0)] * 4)
    sup = Supervisor(script, backoff=Backoff(1, 30), uniform01=lambda: next(draws))
    await _run_until_hang(sup, script)
    # caps 2, 4, 8, 16 -> 1 + u * (cap - 1)
    assert _gaps(script.started_at) == [1.0, 2.5, 2.75, 16.0]


async def test_stable_connection_resets_delay(autojump_clock: trio.testing.MockClock) -> None:
    script = Script(
        [("fail", 0.0)] * 3
        + [("up-then-fail", 10.0)]  # stayed up >= stable_after: reset
        + [("fail", 0.0)]
        + [("up-then-fail", 3.0)]  # too short to reset
        + [("fail", 0.0)]
    )
    sup = Supervisor(script, backoff=Backoff(1, 30), stable_after=10.0, uniform01=lambda: 1.0)
    await _run_until_hang(sup, script)
    gaps = _gaps(script.started_at)
    # fail x3: 2, 4, 8; up 10 s then fail -> reset: 10 + 2; fail: 4;
    # up 3 s then fail (no reset, failures=2): 3 + 8; fail: 16
    assert gaps == [2.0, 4.0, 8.0, 12.0, 4.0, 11.0, 16.0]


async def test_clean_end_retries_after_minimum(autojump_clock: trio.testing.MockClock) -> None:
    script = Script([("up-then-clean", 5.0), ("up-then-clean", 1.0)])
    sup = Supervisor(script, backoff=Backoff(2, 30), uniform01=lambda: 1.0)
    await _run_until_hang(sup, script)
    assert _gaps(script.started_at) == [7.0, 3.0]
    assert sup.statistics().failures == 0


async def test_fatal_error_stops_at_once(autojump_clock: trio.testing.MockClock) -> None:
    script = Script([("fail", 0.0), ("auth", 0.0), ("fail", 0.0)])
    sup = Supervisor(script, backoff=Backoff(1, 30), uniform01=lambda: 0.0)
    with pytest.raises(AuthError):
        await sup.run()
    assert len(script.started_at) == 2
    assert trio.current_time() == 1.0


async def test_replaced_is_fatal(autojump_clock: trio.testing.MockClock) -> None:
    script = Script([("replaced", 4.0)])
    sup = Supervisor(script)
    with pytest.raises(ReplacedError):
        await sup.run()
    assert sup.statistics().attempts == 1


async def test_bug_propagates(autojump_clock: trio.testing.MockClock) -> None:
    async def broken(connected: Callable[[], None]) -> None:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await Supervisor(broken).run()


async def test_statistics_while_connected_and_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script([("up-then-fail", 5.0)])
    sup = Supervisor(script, backoff=Backoff(1, 30), uniform01=lambda: 1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        await trio.sleep(1.0)
        s = sup.statistics()
        assert s.connected_since == 0.0
        assert s.current_delay is None
        await trio.sleep(4.5)  # failed at t=5, now waiting 2 s
        s = sup.statistics()
        assert s.connected_since is None
        assert s.current_delay == 2.0
        assert s.last_error == "ConnectError: lost"
        nursery.cancel_scope.cancel()


async def test_stop_interrupts_backoff_wait(autojump_clock: trio.testing.MockClock) -> None:
    script = Script([("fail", 0.0)])
    sup = Supervisor(script, backoff=Backoff(10, 30), uniform01=lambda: 1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        await trio.sleep(1.0)
        sup.stop()
    assert trio.current_time() == 1.0
    assert len(script.started_at) == 1


async def test_cancellation_is_not_swallowed(autojump_clock: trio.testing.MockClock) -> None:
    script = Script([("up-then-fail", 100.0)])
    sup = Supervisor(script)
    with trio.move_on_after(3.0) as scope:
        await sup.run()
    assert scope.cancelled_caught
    assert sup.statistics().connected_since is None
