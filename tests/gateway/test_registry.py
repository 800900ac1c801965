"""The in-memory registry: epochs, replacement, stale cleanup, flapping, events."""

from __future__ import annotations

import datetime
import logging

import pytest
import trio
import trio.testing

from revconn import InMemoryRegistry, Registration, RegistryEvent, RegistryEventKind
from revconn._gateway.registry import FLAP_THRESHOLD, FLAP_WINDOW, AgentSession


class FakeSession:
    """A session the registry holds; it forwards nothing (the registry never asks)."""

    accepting = True

    def __init__(self, rtt: float | None = None) -> None:
        self.rtt = rtt
        self.close_requests: list[tuple[int, str]] = []

    async def acquire(self, *, fresh: bool = False) -> object:
        raise AssertionError("the registry never borrows streams")

    def release(self, stream: object, *, reusable: bool) -> None:
        raise AssertionError("the registry never borrows streams")

    def request_close(self, close_code: int, reason: str) -> None:
        self.close_requests.append((close_code, reason))


FIXED = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def make_registry() -> InMemoryRegistry:
    return InMemoryRegistry(wall_clock=lambda: FIXED)


def test_fake_session_satisfies_protocol() -> None:
    assert isinstance(FakeSession(), AgentSession)


async def test_register_lookup_snapshot() -> None:
    reg = make_registry()
    s_b, s_a = FakeSession(rtt=0.0123), FakeSession()
    r1 = await reg.register("bravo", s_b, remote="127.0.0.1:1")
    r2 = await reg.register("alpha", s_a, remote="127.0.0.1:2")
    assert r2.epoch > r1.epoch
    assert reg.lookup("bravo") is s_b
    assert reg.lookup("nope") is None
    rows = await reg.snapshot()
    assert [r.name for r in rows] == ["alpha", "bravo"]
    assert rows[1].rtt_ms == pytest.approx(12.3)
    assert rows[1].to_json() == {
        "name": "bravo",
        "status": "online",
        "transport": "websocket",
        "version": None,
        "url": None,
        "connected_at": "2026-01-02T03:04:05Z",
        "expires_at": None,
        "remote": "127.0.0.1:1",
        "epoch": r1.epoch,
        "rtt_ms": 12.3,
        "flapping": False,
        "recent_replacements": 0,
    }


async def test_replacement_closes_old_with_4409() -> None:
    reg = make_registry()
    old, new = FakeSession(), FakeSession()
    r_old = await reg.register("svc", old, remote="a")
    r_new = await reg.register("svc", new, remote="b")
    assert old.close_requests == [(4409, "replaced")]
    assert new.close_requests == []
    assert reg.lookup("svc") is new
    assert r_new.epoch > r_old.epoch


async def test_stale_cleanup_never_removes_newer() -> None:
    reg = make_registry()
    r_old = await reg.register("svc", FakeSession(), remote="a")
    new = FakeSession()
    r_new = await reg.register("svc", new, remote="b")
    # The old session's cleanup runs after the newer registration: no effect.
    assert await reg.unregister(r_old) is False
    assert reg.lookup("svc") is new
    assert await reg.unregister(r_new) is True
    assert reg.lookup("svc") is None
    assert await reg.unregister(r_new) is False
    assert await reg.unregister(Registration("ghost", 99)) is False


async def test_flapping_flag_and_warning(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    reg = make_registry()
    caplog.set_level(logging.WARNING, logger="revconn.registry")
    await reg.register("svc", FakeSession(), remote="a")
    for _ in range(FLAP_THRESHOLD - 1):
        await trio.sleep(10)
        await reg.register("svc", FakeSession(), remote="a")
    (row,) = await reg.snapshot()
    assert row.replacements == FLAP_THRESHOLD - 1
    assert not row.flapping
    assert not caplog.records
    await trio.sleep(10)
    await reg.register("svc", FakeSession(), remote="a")
    (row,) = await reg.snapshot()
    assert row.flapping
    assert row.replacements == FLAP_THRESHOLD
    assert any("flapping" in r.getMessage() for r in caplog.records)
    # Once the window passes, the flag clears.
    await trio.sleep(FLAP_WINDOW + 1)
    (row,) = await reg.snapshot()
    assert not row.flapping
    assert row.replacements == 0


async def test_slow_replacements_are_not_flapping(autojump_clock: trio.testing.MockClock) -> None:
    reg = make_registry()
    await reg.register("svc", FakeSession(), remote="a")
    for _ in range(6):
        await trio.sleep(FLAP_WINDOW / 2 + 1)
        await reg.register("svc", FakeSession(), remote="a")
    (row,) = await reg.snapshot()
    assert not row.flapping


async def test_events_in_order() -> None:
    reg = make_registry()
    async with reg.subscribe() as sub:
        r1 = await reg.register("svc", FakeSession(), remote="a")
        r2 = await reg.register("svc", FakeSession(), remote="b")
        await reg.unregister(r1)  # stale: no event
        await reg.unregister(r2)
        got = []
        with trio.move_on_after(0.1):
            async for event in sub:
                got.append(event)
    assert got == [
        RegistryEvent(RegistryEventKind.ONLINE, "svc", r1.epoch),
        RegistryEvent(RegistryEventKind.OFFLINE, "svc", r1.epoch, reason="replaced"),
        RegistryEvent(RegistryEventKind.REPLACED, "svc", r1.epoch, new_epoch=r2.epoch),
        RegistryEvent(RegistryEventKind.ONLINE, "svc", r2.epoch),
        RegistryEvent(RegistryEventKind.OFFLINE, "svc", r2.epoch, reason="closed"),
    ]
    assert [e.seq for e in got] == [1, 2, 3, 4, 5]
    assert [e.remote for e in got] == ["a", "a", "a", "b", "b"]


async def test_slow_subscriber_is_cut_off_not_waited_for() -> None:
    reg = make_registry()
    async with reg.subscribe(capacity=2) as sub:
        for i in range(5):
            await reg.register(f"a{i}", FakeSession(), remote="x")
        received = [event async for event in sub]
        assert sub.overflowed
        assert len(received) == 2
    assert len(reg) == 5
