"""Request streams over two Tunnels on in-memory transports (no sockets)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from revconn import AgentBusy, StreamError
from revconn._proto.session import STREAM_WINDOW
from revconn._runtime.streams import TunnelStream

from .._memory import read_all, tunnels

REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]


async def echo_handler(stream: TunnelStream) -> None:
    assert stream.request is not None
    body = b""
    while (chunk := await stream.read()) is not None:
        body += chunk
    path = dict(stream.request.headers)[b":path"]
    await stream.respond(
        200, [(b"x-path", path), (b"x-len", str(len(body)).encode())], end_stream=False
    )
    await stream.send_body(body, end_stream=True)


async def test_request_response_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    async with tunnels(echo_handler) as gw:
        stream = gw.open_request([*REQ[:3], (b":path", b"/p?q=%20")], end_stream=False)
        data = bytes(range(256)) * 4000  # ~1 MiB: several windows
        await stream.send_body(data, end_stream=True)
        response = await stream.receive_response()
        assert response.status == 200
        assert (b"x-path", b"/p?q=%20") in response.headers
        assert await read_all(stream) == data
        stream.close()


async def test_stalled_stream_does_not_block_others(autojump_clock: trio.testing.MockClock) -> None:
    big = b"z" * (STREAM_WINDOW * 8)

    async def handler(stream: TunnelStream) -> None:
        path = dict(stream.request.headers)[b":path"]  # type: ignore[union-attr]
        await stream.respond(200, [], end_stream=False)
        await stream.send_body(big if path == b"/big" else b"small", end_stream=True)

    async with tunnels(handler) as gw:
        stalled = gw.open_request([*REQ[:3], (b":path", b"/big")], end_stream=True)
        await gw.flush()
        await stalled.receive_response()
        first = await stalled.read()  # read one chunk, then stop reading
        assert first
        for _ in range(20):
            s = gw.open_request(REQ, end_stream=True)
            await gw.flush()
            with trio.fail_after(1):
                await s.receive_response()
                assert await read_all(s) == b"small"
            s.close()
        # The stalled stream holds at most its window.
        buffered = sum(len(c.data) for c in stalled._chunks)
        assert buffered <= STREAM_WINDOW
        stalled.reset()


async def test_reset_by_gateway_cancels_agent_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cancelled = trio.Event()

    async def handler(stream: TunnelStream) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with tunnels(handler) as gw:
        s = gw.open_request(REQ, end_stream=True)
        await gw.flush()
        await trio.sleep(1)
        s.reset()
        with trio.fail_after(1):
            await cancelled.wait()


async def test_handler_reset_reaches_gateway(autojump_clock: trio.testing.MockClock) -> None:
    async def handler(stream: TunnelStream) -> None:
        await stream.respond(200, [], end_stream=False)
        await stream.send_body(b"partial")
        stream.reset(0x2)

    async with tunnels(handler) as gw:
        s = gw.open_request(REQ, end_stream=True)
        await gw.flush()
        await s.receive_response()
        with pytest.raises(StreamError) as info:
            await read_all(s)
        assert info.value.error_code == 0x2


async def test_handler_bug_resets_stream_not_tunnel(autojump_clock: trio.testing.MockClock) -> None:
    async def handler(stream: TunnelStream) -> None:
        if dict(stream.request.headers)[b":path"] == b"/boom":  # type: ignore[union-attr]
            raise ZeroDivisionError
        await stream.respond(204, [], end_stream=True)

    async with tunnels(handler) as gw:
        s = gw.open_request([*REQ[:3], (b":path", b"/boom")], end_stream=True)
        await gw.flush()
        with pytest.raises(StreamError):
            await s.receive_response()
        ok = gw.open_request(REQ, end_stream=True)
        await gw.flush()
        assert (await ok.receive_response()).status == 204
        assert gw.end is None


async def test_agent_busy(autojump_clock: trio.testing.MockClock) -> None:
    async def handler(stream: TunnelStream) -> None:
        await trio.sleep_forever()

    async with tunnels(handler, max_streams=2) as gw:
        gw.open_request(REQ, end_stream=True)
        gw.open_request(REQ, end_stream=True)
        with pytest.raises(AgentBusy):
            gw.open_request(REQ, end_stream=True)


async def test_the_gateways_own_stream_limit_beneath_the_agents(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """--max-streams-per-agent: the agent would take 100, the gateway opens 2;
    a stream that ends frees its place."""

    async def handler(stream: TunnelStream) -> None:
        await stream.respond(200, [], end_stream=True)
        await trio.sleep_forever()

    async with tunnels(handler, max_streams=100) as gw:
        gw.max_streams = 2
        first = gw.open_request(REQ, end_stream=True)
        gw.open_request(REQ, end_stream=True)
        with pytest.raises(AgentBusy, match="the gateway's limit, 2"):
            gw.open_request(REQ, end_stream=True)
        await gw.flush()
        assert (await first.receive_response()).status == 200
        assert await first.read() is None
        first.close()
        await trio.sleep(1)
        gw.open_request(REQ, end_stream=True)  # its place was freed
        with pytest.raises(AgentBusy):
            gw.open_request(REQ, end_stream=True)


async def test_tunnel_loss_fails_pending_streams(autojump_clock: trio.testing.MockClock) -> None:
    async def handler(stream: TunnelStream) -> None:
        await trio.sleep_forever()

    async with tunnels(handler) as gw:
        s = gw.open_request(REQ, end_stream=True)
        await gw.flush()
        await trio.sleep(1)
        gw.request_close(1001, "shutdown")
        with pytest.raises(StreamError) as info:
            await s.receive_response()
        assert info.value.error_code is None
        with pytest.raises(StreamError):
            gw.open_request(REQ, end_stream=True)


async def test_a_cancelled_flush_still_sends_what_it_took_from_h2() -> None:
    """Frames taken from h2's queue belong to every stream (and the HPACK state
    the peer decodes in order): a flush whose caller is cancelled mid-send (a
    public client that left) must still send them, or the other requests on
    the tunnel are lost."""
    paths: list[bytes] = []

    async def handler(stream: TunnelStream) -> None:
        assert stream.request is not None
        paths.append(dict(stream.request.headers)[b":path"])
        await stream.respond(200, [], end_stream=True)

    async with tunnels(handler) as gw:
        transport = gw.transport
        original = transport.send_message
        gate = trio.Event()

        async def gated(data: bytes) -> None:
            await gate.wait()
            await original(data)

        transport.send_message = gated  # type: ignore[method-assign]
        first = gw.open_request([*REQ[:3], (b":path", b"/one")], end_stream=True)
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def flush_then_cancelled() -> None:
                with scope:
                    await gw.flush()

            nursery.start_soon(flush_then_cancelled)
            await trio.testing.wait_all_tasks_blocked()  # blocked inside the send
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            transport.send_message = original  # type: ignore[method-assign]
            gate.set()
        second = gw.open_request([*REQ[:3], (b":path", b"/two")], end_stream=True)
        await gw.flush()
        with trio.fail_after(5):
            assert (await first.receive_response()).status == 200
            assert (await second.receive_response()).status == 200
        assert paths == [b"/one", b"/two"]
        assert gw.end is None
