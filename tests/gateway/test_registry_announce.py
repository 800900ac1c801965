"""Announced URLs in the registry: one name, one owner, whatever the
transport; TTL expiry at the exact instant (virtual time); replacement told
to the replaced announcer; withdrawal."""

from __future__ import annotations

import datetime

import pytest
import trio
import trio.testing

from revconn import InMemoryRegistry, RegistryEvent, RegistryEventKind
from revconn._gateway.registry import NameTaken, Subscription

from .test_registry import FIXED, FakeSession

URL = "https://svc.example.net/"


class Maker:
    """The ``connect`` factory: records the sessions it made."""

    def __init__(self) -> None:
        self.made: list[FakeSession] = []

    def __call__(self) -> FakeSession:
        session = FakeSession()
        self.made.append(session)
        return session


def make_registry() -> InMemoryRegistry:
    return InMemoryRegistry(wall_clock=lambda: FIXED)


def drain(sub: Subscription) -> list[RegistryEvent]:
    got = []
    while True:
        try:
            got.append(sub._receive.receive_nowait())
        except trio.WouldBlock:
            return got


async def test_announce_lists_and_forwards_through_the_made_session() -> None:
    reg = make_registry()
    maker = Maker()
    ws = FakeSession()
    await reg.register("alpha", ws, remote="127.0.0.1:5")
    announced = await reg.announce(
        "bravo", URL, ttl=30, remote="10.1.2.3", renewing=None, connect=maker
    )
    assert reg.lookup("bravo") is maker.made[0]
    assert announced.to_json() == {
        "name": "bravo",
        "transport": "url",
        "url": URL,
        "epoch": announced.registration.epoch,
        "ttl": 30,
        "expires_at": "2026-01-02T03:04:35Z",
    }
    rows = [row.to_json() for row in await reg.snapshot()]
    assert [(r["name"], r["transport"]) for r in rows] == [
        ("alpha", "websocket"),
        ("bravo", "url"),
    ]
    assert rows[1] == {
        "name": "bravo",
        "status": "online",
        "transport": "url",
        "version": None,
        "url": URL,
        "connected_at": "2026-01-02T03:04:05Z",
        "expires_at": "2026-01-02T03:04:35Z",
        "remote": "10.1.2.3",
        "epoch": announced.registration.epoch,
        "rtt_ms": None,
        "flapping": False,
        "recent_replacements": 0,
    }


async def test_renewal_keeps_epoch_and_session_and_moves_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = make_registry()
    maker = Maker()
    first = await reg.announce("svc", URL, ttl=3, remote="a", renewing=None, connect=maker)
    await trio.sleep(2)
    again = await reg.announce(
        "svc", URL, ttl=3, remote="a", renewing=first.registration.epoch, connect=maker
    )
    assert again.registration == first.registration
    assert len(maker.made) == 1  # the session (and its kept-alive connections) stays
    (row,) = await reg.snapshot()
    assert row.expires_at == FIXED + datetime.timedelta(seconds=3)  # wall clock is fixed here
    await trio.sleep(2)  # past the first expiry (t=3), before the renewed one (t=5)
    assert reg.lookup("svc") is maker.made[0]
    await trio.sleep(1)
    assert reg.lookup("svc") is None


async def test_renewals_keep_one_expiry_item_per_announcement(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Memory: a renewing announcer does not grow the expiry heap."""
    reg = make_registry()
    first = await reg.announce("svc", URL, ttl=3600, remote="a", renewing=None, connect=Maker())
    for _ in range(1000):
        await reg.announce(
            "svc", URL, ttl=3600, remote="a", renewing=first.registration.epoch, connect=Maker()
        )
    assert len(reg._expiries) == 1


async def test_epochs_do_not_restart_at_one() -> None:
    """A renewal from before a gateway restart must not match a new epoch."""
    starts = set()
    for _ in range(5):
        reg = make_registry()
        starts.add((await reg.register("svc", FakeSession(), remote="a")).epoch)
    assert len(starts) == 5


async def test_expiry_at_the_exact_instant(autojump_clock: trio.testing.MockClock) -> None:
    reg = make_registry()
    maker = Maker()
    async with reg.subscribe() as sub, trio.open_nursery() as nursery:
        nursery.start_soon(reg.expire_announcements)
        start = trio.current_time()
        first = await reg.announce("svc", URL, ttl=3, remote="a", renewing=None, connect=maker)
        await trio.sleep(2)
        await reg.announce(
            "svc", URL, ttl=3, remote="a", renewing=first.registration.epoch, connect=maker
        )
        # The first expiry (t=3) has passed by t=4 without effect: renewed to t=5.
        await trio.sleep(2)
        assert reg.lookup("svc") is maker.made[0]
        epoch = first.registration.epoch
        assert drain(sub) == [RegistryEvent(RegistryEventKind.ONLINE, "svc", epoch)]
        event = await sub.__anext__()
        assert event == RegistryEvent(
            RegistryEventKind.OFFLINE, "svc", epoch, reason="announcement expired"
        )
        assert (event.transport, event.url) == ("url", URL)
        assert trio.current_time() - start == pytest.approx(5.0)
        assert reg.lookup("svc") is None
        assert maker.made[0].close_requests == [(1001, "announcement expired")]
        assert await reg.snapshot() == []
        nursery.cancel_scope.cancel()


async def test_a_shorter_ttl_announced_later_wakes_the_sweeper_earlier(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = make_registry()
    gone: list[tuple[str, float]] = []
    async with reg.subscribe() as sub, trio.open_nursery() as nursery:
        nursery.start_soon(reg.expire_announcements)
        start = trio.current_time()
        await reg.announce("long", URL, ttl=100, remote="a", renewing=None, connect=Maker())
        await trio.sleep(1)
        await reg.announce("short", URL, ttl=2, remote="a", renewing=None, connect=Maker())
        async for event in sub:
            if event.kind is RegistryEventKind.OFFLINE:
                gone.append((event.name, trio.current_time() - start))
                if len(gone) == 2:
                    break
        nursery.cancel_scope.cancel()
    assert gone == [("short", pytest.approx(3.0)), ("long", pytest.approx(100.0))]


async def test_lookup_never_answers_for_a_lapsed_announcement(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Even before the sweeper runs (no sweeper here at all)."""
    reg = make_registry()
    maker = Maker()
    await reg.announce("svc", URL, ttl=1, remote="a", renewing=None, connect=maker)
    await trio.sleep(0.999)
    assert reg.lookup("svc") is maker.made[0]
    await trio.sleep(0.001)
    assert reg.lookup("svc") is None
    assert maker.made[0].close_requests == [(1001, "announcement expired")]


async def test_websocket_holder_refuses_announcements() -> None:
    reg = make_registry()
    ws = FakeSession()
    await reg.register("svc", ws, remote="a")
    with pytest.raises(NameTaken) as caught:
        await reg.announce("svc", URL, ttl=30, remote="b", renewing=None, connect=Maker())
    assert (caught.value.holder, caught.value.replaced) == ("websocket", False)
    assert reg.lookup("svc") is ws
    assert ws.close_requests == []
    with pytest.raises(NameTaken):
        await reg.withdraw("svc", None)
    assert reg.lookup("svc") is ws


async def test_websocket_replaces_announcement_and_the_announcer_is_told_once() -> None:
    reg = make_registry()
    maker = Maker()
    async with reg.subscribe() as sub:
        first = await reg.announce("svc", URL, ttl=30, remote="a", renewing=None, connect=maker)
        ws = FakeSession()
        r_ws = await reg.register("svc", ws, remote="b")
        epoch = first.registration.epoch
        assert drain(sub) == [
            RegistryEvent(RegistryEventKind.ONLINE, "svc", epoch),
            RegistryEvent(RegistryEventKind.OFFLINE, "svc", epoch, reason="replaced"),
            RegistryEvent(RegistryEventKind.REPLACED, "svc", epoch, new_epoch=r_ws.epoch),
            RegistryEvent(RegistryEventKind.ONLINE, "svc", r_ws.epoch),
        ]
    assert maker.made[0].close_requests == [(4409, "replaced")]
    assert reg.lookup("svc") is ws
    with pytest.raises(NameTaken) as caught:
        await reg.announce("svc", URL, ttl=30, remote="a", renewing=epoch, connect=maker)
    assert (caught.value.holder, caught.value.replaced) == ("websocket", True)
    assert "replaced" in str(caught.value)
    # Told once; the WebSocket still holds the name.
    with pytest.raises(NameTaken) as caught:
        await reg.announce("svc", URL, ttl=30, remote="a", renewing=epoch, connect=maker)
    assert caught.value.replaced is False
    # Once the WebSocket left, a new announcement (no epoch) may take the name.
    await reg.unregister(r_ws)
    again = await reg.announce("svc", URL, ttl=30, remote="a", renewing=None, connect=maker)
    assert again.registration.epoch > r_ws.epoch


async def test_replaced_announcer_is_told_even_after_the_websocket_left() -> None:
    reg = make_registry()
    first = await reg.announce("svc", URL, ttl=30, remote="a", renewing=None, connect=Maker())
    r_ws = await reg.register("svc", FakeSession(), remote="b")
    await reg.unregister(r_ws)
    with pytest.raises(NameTaken) as caught:
        await reg.announce(
            "svc", URL, ttl=30, remote="a", renewing=first.registration.epoch, connect=Maker()
        )
    assert (caught.value.holder, caught.value.replaced) == ("websocket", True)
    assert reg.lookup("svc") is None


async def test_newer_announcement_replaces_older_one() -> None:
    """Two announcers with one name (or a restarted one): the newer wins, the
    older learns it on its next renewal."""
    reg = make_registry()
    old_maker, new_maker = Maker(), Maker()
    old = await reg.announce("svc", URL, ttl=30, remote="a", renewing=None, connect=old_maker)
    new = await reg.announce(
        "svc", "https://other.example.net/", ttl=30, remote="b", renewing=None, connect=new_maker
    )
    assert new.registration.epoch > old.registration.epoch
    assert reg.lookup("svc") is new_maker.made[0]
    assert old_maker.made[0].close_requests == [(4409, "replaced")]
    with pytest.raises(NameTaken) as caught:
        await reg.announce(
            "svc", URL, ttl=30, remote="a", renewing=old.registration.epoch, connect=old_maker
        )
    assert (caught.value.holder, caught.value.replaced) == ("url", True)
    assert reg.lookup("svc") is new_maker.made[0]


async def test_renewal_with_a_new_url_swaps_the_session() -> None:
    reg = make_registry()
    maker = Maker()
    first = await reg.announce("svc", URL, ttl=30, remote="a", renewing=None, connect=maker)
    second = await reg.announce(
        "svc",
        "https://moved.example.net/",
        ttl=30,
        remote="a",
        renewing=first.registration.epoch,
        connect=maker,
    )
    assert second.registration == first.registration
    assert len(maker.made) == 2
    assert maker.made[0].close_requests == [(1001, "url changed")]
    assert reg.lookup("svc") is maker.made[1]
    (row,) = await reg.snapshot()
    assert row.url == "https://moved.example.net/"


async def test_renewal_of_a_lapsed_announcement_is_a_new_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = make_registry()
    first = await reg.announce("svc", URL, ttl=1, remote="a", renewing=None, connect=Maker())
    await trio.sleep(5)
    again = await reg.announce(
        "svc", URL, ttl=1, remote="a", renewing=first.registration.epoch, connect=Maker()
    )
    assert again.registration.epoch > first.registration.epoch


async def test_withdraw() -> None:
    reg = make_registry()
    maker = Maker()
    first = await reg.announce("svc", URL, ttl=30, remote="a", renewing=None, connect=maker)
    epoch = first.registration.epoch
    assert await reg.withdraw("svc", epoch + 1) is False  # not ours
    assert reg.lookup("svc") is maker.made[0]
    async with reg.subscribe() as sub:
        assert await reg.withdraw("svc", epoch) is True
        assert drain(sub) == [
            RegistryEvent(RegistryEventKind.OFFLINE, "svc", epoch, reason="withdrawn")
        ]
    assert reg.lookup("svc") is None
    assert maker.made[0].close_requests == [(1001, "withdrawn")]
    assert await reg.withdraw("svc", epoch) is False
    # Without an epoch: whatever announcement holds the name.
    await reg.announce("svc", URL, ttl=30, remote="a", renewing=None, connect=maker)
    assert await reg.withdraw("svc", None) is True
    assert await reg.withdraw("nobody", None) is False


async def test_replacement_records_are_forgotten_when_they_would_have_lapsed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Memory stays bounded: one record per name, dropped at the old expiry."""
    reg = make_registry()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reg.expire_announcements)
        for i in range(50):
            await reg.announce(f"n{i}", URL, ttl=2, remote="a", renewing=None, connect=Maker())
            await reg.register(f"n{i}", FakeSession(), remote="b")
        assert len(reg._replaced) == 50
        await trio.sleep(2)
        await trio.testing.wait_all_tasks_blocked()  # the sweeper woke at the same instant
        assert reg._replaced == {}
        assert reg._expiries == []
        nursery.cancel_scope.cancel()
