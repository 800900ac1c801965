"""The trio tunnel adapter over in-memory transports, in virtual time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from revconn import (
    ConnectionLost,
    HandshakeTimeout,
    Heartbeat,
    HeartbeatTimeout,
    RemoteProtocolError,
    ReplacedError,
)
from revconn._proto.session import Role, TunnelSession
from revconn._runtime.tunnel import Tunnel, TunnelEnd

from .._memory import MemoryTransport, transport_pair


def make_pair(
    hb_gw: Heartbeat = Heartbeat(15, 10), hb_ag: Heartbeat = Heartbeat(15, 10)
) -> tuple[Tunnel, Tunnel, MemoryTransport, MemoryTransport, list[TunnelEnd]]:
    t_gw, t_ag = transport_pair()
    ends: list[TunnelEnd] = []
    gw = Tunnel(TunnelSession(Role.GATEWAY), t_gw, heartbeat=hb_gw, on_end=ends.append)
    ag = Tunnel(TunnelSession(Role.AGENT), t_ag, heartbeat=hb_ag)
    return gw, ag, t_gw, t_ag, ends


async def handshake_both(gw: Tunnel, ag: Tunnel) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.handshake)
        nursery.start_soon(ag.handshake)


async def test_heartbeat_measures_rtt(autojump_clock: trio.testing.MockClock) -> None:
    gw, ag, *_ = make_pair()
    await handshake_both(gw, ag)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.serve)
        nursery.start_soon(ag.serve)
        await trio.sleep(14.9)
        assert gw.rtt is None
        await trio.sleep(0.2)
        assert gw.rtt == 0.0  # virtual time: the memory transport is instant
        assert ag.rtt == 0.0
        # Many intervals pass without a timeout.
        await trio.sleep(15 * 20)
        assert gw.end is None and ag.end is None
        gw.request_close(1001, "shutdown")
    assert gw.end == TunnelEnd(1001, "shutdown", None, by_peer=False)
    assert ag.end is not None
    assert ag.end.by_peer
    assert isinstance(ag.end.error, ConnectionLost)
    assert ag.end.error.close_code == 1001


async def test_peer_stops_reading_is_dropped_at_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw, ag, t_gw, t_ag, ends = make_pair(hb_gw=Heartbeat(15, 10))
    await handshake_both(gw, ag)
    t_ag.reading = False  # the agent process froze
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ag.serve)
        with trio.fail_after(100):
            end = await gw.serve()
        nursery.cancel_scope.cancel()
    assert trio.current_time() == pytest.approx(25.0)  # interval + timeout
    assert isinstance(end.error, HeartbeatTimeout)
    assert end.close_code == 4408
    assert ends == [end]  # on_end fired exactly once
    assert t_gw.closed_with is not None and t_gw.closed_with.code == 4408


async def test_agent_leaves_silent_gateway(autojump_clock: trio.testing.MockClock) -> None:
    gw, ag, t_gw, _t_ag, _ = make_pair(hb_ag=Heartbeat(5, 3))
    await handshake_both(gw, ag)
    t_gw.reading = False  # the gateway went silent (half-open connection)
    end = await ag.serve()
    assert trio.current_time() == pytest.approx(8.0)
    assert isinstance(end.error, HeartbeatTimeout)


async def test_replacement_goaway_reaches_agent(autojump_clock: trio.testing.MockClock) -> None:
    gw, ag, *_ = make_pair()
    await handshake_both(gw, ag)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.serve)
        nursery.start_soon(ag.serve)
        await trio.sleep(1)
        gw.request_close(4409, "replaced")
    assert ag.end is not None
    assert isinstance(ag.end.error, ReplacedError)
    assert ag.end.reason == "replaced"


async def test_handshake_timeout_closes_with_4408(autojump_clock: trio.testing.MockClock) -> None:
    t_gw, _t_silent = transport_pair()
    gw = Tunnel(TunnelSession(Role.GATEWAY), t_gw, heartbeat=Heartbeat(), handshake_timeout=10.0)
    with pytest.raises(HandshakeTimeout):
        await gw.handshake()
    assert trio.current_time() == 10.0
    assert t_gw.closed_with is not None and t_gw.closed_with.code == 4408


async def test_garbage_during_handshake(autojump_clock: trio.testing.MockClock) -> None:
    t_gw, t_peer = transport_pair()
    gw = Tunnel(TunnelSession(Role.GATEWAY), t_gw, heartbeat=Heartbeat())
    await t_peer.send_message(b"\x00\x00\x04\x01\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(RemoteProtocolError):
        await gw.handshake()
    assert t_gw.closed_with is not None and t_gw.closed_with.code == 1002


async def test_garbage_after_handshake_ends_with_protocol_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw, ag, _t_gw, t_ag, ends = make_pair()
    await handshake_both(gw, ag)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.serve)
        await t_ag.send_message(b"\xff" * 9 + b"x" * 20)
    assert gw.end is not None
    assert isinstance(gw.end.error, RemoteProtocolError)
    assert gw.end.close_code == 1002
    assert ends == [gw.end]


async def test_transport_loss_ends_tunnel(autojump_clock: trio.testing.MockClock) -> None:
    gw, ag, _t_gw, t_ag, _ends = make_pair()
    await handshake_both(gw, ag)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.serve)
        await trio.sleep(1)
        await t_ag.close(1006, "")
    assert gw.end is not None
    assert gw.end.by_peer
    assert isinstance(gw.end.error, ConnectionLost)
    assert trio.current_time() == 1.0


async def test_request_close_before_serve(autojump_clock: trio.testing.MockClock) -> None:
    gw, ag, t_gw, *_ = make_pair()
    await handshake_both(gw, ag)
    gw.request_close(1001, "shutdown")
    end = await gw.serve()
    assert end.reason == "shutdown"
    assert t_gw.closed_with is not None and t_gw.closed_with.code == 1001
