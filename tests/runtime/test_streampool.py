"""The gateway's pool of open tunnel streams (StreamPool, through Tunnel).

In-memory tunnels in virtual time: reuse (LIFO), growth up to the agent's
stream limit, what is never lent again, idle retirement (directly and at
the heartbeat's ping times), drains from either side, a refused CONNECT.
Then end to end, with hand-written upstreams that close kept-alive
connections or talk out of turn: a stale stream costs a GET nothing, a POST
a clear 502, and stray bytes are never an answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import h11
import pytest
import trio
import trio.testing

from revconn import Agent, AgentBusy, AgentConfig, Backoff, StreamError
from revconn._agent.upstream import error_body, refuse
from revconn._codes import H2_CANCEL
from revconn._proto.connect import CONNECT_HEADERS
from revconn._runtime.streampool import IDLE_TIMEOUT, MAX_REFUSAL_BODY, StreamPool, StreamRefused
from revconn._runtime.streams import TunnelStream
from revconn._runtime.tunnel import RequestHandler, Tunnel

from .._gateway_helpers import SECRET, RunningGateway, running_gateway, wait_for
from .._memory import tunnels
from .._raw_upstream import read_body, serving
from ..gateway.test_exchange import Client, connect, get


# -- an agent side that records what happens to each stream -------------------------------
@attrs.define
class Recorder:
    """What the agent's handler saw, per stream id; answers ``ping`` with ``pong``.

    ``bye`` makes it end its side; ``stray`` makes it send bytes nobody asked for.
    """

    ended: dict[int, float] = attrs.Factory(dict)
    """Stream id -> virtual time its read returned None (the gateway's END_STREAM)."""
    reset: dict[int, float] = attrs.Factory(dict)
    """Stream id -> virtual time the gateway's RST_STREAM stopped its handler."""
    tunnel: Tunnel | None = None
    changed: trio.Event = attrs.Factory(trio.Event)

    async def handler(self, stream: TunnelStream) -> None:
        self.tunnel = stream.tunnel
        assert stream.request is not None
        assert stream.request.headers[: len(CONNECT_HEADERS)] == CONNECT_HEADERS
        try:
            await stream.respond(200, [], end_stream=False)
            while (data := await stream.read()) is not None:
                for word in data.split():
                    if word == b"ping":
                        await stream.send_body(b"pong")
                    elif word == b"bye":
                        await stream.send_body(b"", end_stream=True)
                    elif word == b"stray":
                        await stream.send_body(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            self.ended[stream.id] = trio.current_time()
            await stream.end()
        except (StreamError, trio.Cancelled):
            self.reset[stream.id] = trio.current_time()
            raise
        finally:
            self.changed.set()
            self.changed = trio.Event()


LIMIT = 60.0
"""Virtual seconds any in-memory test may take (a hang fails at once in real time)."""


@asynccontextmanager
async def bounded_tunnels(
    handler: RequestHandler, *, max_streams: int = 100
) -> AsyncIterator[Tunnel]:
    """``tunnels()`` under ``trio.fail_after(LIMIT)``."""
    with trio.fail_after(LIMIT):
        async with tunnels(handler, max_streams=max_streams) as gw:
            yield gw


async def exchange(stream: TunnelStream) -> None:
    """One request/response on a lent stream."""
    await stream.send_body(b"ping")
    assert await stream.read() == b"pong"


async def settle() -> None:
    """Let every frame in flight be delivered and handled (virtual time: the
    memory transport is instant, so this is a fixed point, not a wait)."""
    await trio.testing.wait_all_tasks_blocked()


# -- lending ------------------------------------------------------------------------------
async def test_sequential_requests_reuse_one_stream(autojump_clock: trio.testing.MockClock) -> None:
    agent = Recorder()
    async with bounded_tunnels(agent.handler) as gw:
        first, fresh = await gw.acquire()
        assert fresh
        await exchange(first)
        gw.release(first, reusable=True)
        assert gw.pooled_streams == 1
        for _ in range(5):
            stream, fresh = await gw.acquire()
            assert (stream, fresh) == (first, False)
            assert gw.pooled_streams == 0
            await exchange(stream)
            gw.release(stream, reusable=True)
        assert gw.pooled_streams == 1
        assert len(agent.tunnel._streams) == 1  # type: ignore[union-attr]


async def test_most_recently_released_stream_is_lent_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = Recorder()
    async with bounded_tunnels(agent.handler) as gw:
        a, _ = await gw.acquire()
        b, _ = await gw.acquire()
        c, _ = await gw.acquire()
        for stream in (b, a, c):
            await exchange(stream)
            gw.release(stream, reusable=True)
        assert gw.pooled_streams == 3
        lent = [(await gw.acquire())[0] for _ in range(3)]
        assert lent == [c, a, b]
        _, fresh = await gw.acquire()
        assert fresh


async def test_concurrent_acquires_open_distinct_streams_up_to_the_agent_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = Recorder()
    async with bounded_tunnels(agent.handler, max_streams=3) as gw:
        lent: list[tuple[TunnelStream, bool]] = []
        busy: list[AgentBusy] = []

        async def borrow() -> None:
            try:
                lent.append(await gw.acquire())
            except AgentBusy as exc:
                busy.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(borrow)
        assert len({s.id for s, _ in lent}) == 3
        assert all(fresh for _, fresh in lent)
        assert len(busy) == 1
        # Pooled streams still count against the limit, and are lent first.
        for stream, _ in lent:
            gw.release(stream, reusable=True)
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(borrow)
        assert len(busy) == 2
        assert not any(fresh for _, fresh in lent[3:])
        assert {s.id for s, _ in lent[3:]} == {s.id for s, _ in lent[:3]}


# -- what is never lent again -------------------------------------------------------------
async def test_release_not_reusable_resets_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = Recorder()
    async with bounded_tunnels(agent.handler) as gw:
        stream, _ = await gw.acquire()
        await exchange(stream)
        gw.release(stream, reusable=False)
        assert stream.reset_code == H2_CANCEL
        assert gw.pooled_streams == 0
        await settle()
        assert agent.reset == {stream.id: 0.0}  # the agent drops its upstream connection
        assert not agent.tunnel._streams  # type: ignore[union-attr]
        again, fresh = await gw.acquire()
        assert fresh and again.id != stream.id


async def test_stream_ended_by_the_agent_is_not_lent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An upstream that closed its kept-alive connection ends its stream."""
    agent = Recorder()
    async with bounded_tunnels(agent.handler) as gw:
        stream, _ = await gw.acquire()
        await exchange(stream)
        gw.release(stream, reusable=True)
        await stream.send_body(b"bye")  # (as if the upstream closed while idle)
        await settle()
        assert stream.remote_ended and gw.pooled_streams == 1
        other, fresh = await gw.acquire()
        assert fresh and other.id != stream.id
        assert stream.reset_code == H2_CANCEL and not gw.pooled_streams
        await exchange(other)


async def test_stream_ended_before_release_is_not_pooled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = Recorder()
    async with bounded_tunnels(agent.handler) as gw:
        stream, _ = await gw.acquire()
        await stream.send_body(b"ping bye")
        assert await stream.read() == b"pong"
        assert await stream.read() is None
        gw.release(stream, reusable=True)
        assert gw.pooled_streams == 0


async def test_stream_holding_unread_bytes_is_not_lent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 408 an upstream wrote on an idle connection must not answer the next request."""
    agent = Recorder()
    async with bounded_tunnels(agent.handler) as gw:
        stream, _ = await gw.acquire()
        await exchange(stream)
        gw.release(stream, reusable=True)
        await stream.send_body(b"stray")  # (as if the upstream spoke while idle)
        await settle()
        # Reset on arrival: nothing is kept that could pass for an answer.
        assert stream.reset_code == H2_CANCEL and not stream._chunks
        assert stream.id not in gw._streams
        other, fresh = await gw.acquire()
        assert fresh and other.id != stream.id
        await exchange(other)  # pong, not the stray bytes
        await settle()
        assert stream.id in agent.reset


# -- idle retirement ------------------------------------------------------------------------
async def test_prune_retires_streams_idle_for_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = Recorder()
    async with bounded_tunnels(agent.handler) as gw:
        pool = StreamPool(gw)  # (a pool of its own: no heartbeat prunes it)
        old, _ = await pool.acquire()
        new, _ = await pool.acquire()
        await trio.sleep_until(1.0)
        pool.release(old, reusable=True)
        await trio.sleep_until(11.0)
        pool.release(new, reusable=True)
        assert pool.idle == 2

        pool.prune(1.0 + IDLE_TIMEOUT - 0.001)
        assert pool.idle == 2
        await trio.sleep_until(1.0 + IDLE_TIMEOUT)
        pool.prune(trio.current_time())
        assert pool.idle == 1
        await gw.flush()
        await settle()
        assert agent.ended == {old.id: 31.0}  # END_STREAM: its read returned None
        assert not agent.reset
        assert old.id not in gw._streams

        await trio.sleep_until(11.0 + IDLE_TIMEOUT)
        pool.prune(trio.current_time())
        assert pool.idle == 0
        await gw.flush()
        await settle()
        assert agent.ended == {old.id: 31.0, new.id: 41.0}
        assert not agent.tunnel._streams  # type: ignore[union-attr]
        assert gw.end is None  # the tunnel lives on


async def test_prune_everything_retires_every_idle_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = Recorder()
    async with bounded_tunnels(agent.handler) as gw:
        pool = StreamPool(gw)
        streams = [(await pool.acquire())[0] for _ in range(3)]
        for stream in streams:
            pool.release(stream, reusable=True)
        busy, _ = await pool.acquire()
        pool.prune(trio.current_time(), everything=True)
        assert pool.idle == 0
        await gw.flush()
        await settle()
        assert set(agent.ended) == {s.id for s in streams} - {busy.id}
        await exchange(busy)  # a lent stream is not the pool's to retire


async def test_heartbeat_prunes_at_its_ping_times(autojump_clock: trio.testing.MockClock) -> None:
    """tunnels() serves the gateway with a scheduler of Heartbeat(15, 10): PINGs
    at 15, 30, 45 s. A stream released at 1 s is 44 s idle at 45 s: retired
    then, not at 31 s."""
    agent = Recorder()
    async with bounded_tunnels(agent.handler) as gw:
        assert trio.current_time() == 0.0
        stream, _ = await gw.acquire()
        await exchange(stream)
        await trio.sleep_until(1.0)
        gw.release(stream, reusable=True)
        await trio.sleep_until(45.0 - 0.001)
        assert gw.pooled_streams == 1
        assert not agent.ended
        assert gw.rtt == 0.0  # the pings at 15 and 30 s were answered
        with trio.fail_after(1):
            while not agent.ended:
                await agent.changed.wait()
        assert agent.ended == {stream.id: 45.0}
        assert gw.pooled_streams == 0


# -- drains -------------------------------------------------------------------------------
async def test_gateway_drain_retires_idle_streams_then_closes_when_the_rest_return(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = Recorder()
    async with bounded_tunnels(agent.handler) as gw:
        a, _ = await gw.acquire()
        b, _ = await gw.acquire()
        busy, _ = await gw.acquire()
        gw.release(a, reusable=True)
        gw.release(b, reusable=True)
        await trio.sleep_until(5.0)
        gw.drain(1001, "shutdown")
        assert gw.pooled_streams == 0
        await settle()
        assert agent.ended == {a.id: 5.0, b.id: 5.0}
        assert gw.end is None  # a request is still in flight
        await exchange(busy)
        await trio.sleep(1)
        assert gw.end is None
        gw.release(busy, reusable=True)  # (not pooled: the tunnel drains)
        assert gw.end is not None
        assert gw.end.reason == "shutdown" and gw.end.close_code == 1001
        await settle()
        assert agent.tunnel is not None and agent.tunnel.end is not None
        assert agent.tunnel.end.reason == "shutdown"
        assert trio.current_time() == 6.0


async def test_draining_agent_gets_its_idle_streams_retired(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """SETTINGS_MAX_CONCURRENT_STREAMS 0 from the agent: the gateway ends its
    idle streams at once, so the agent's drain completes without waiting for
    IDLE_TIMEOUT."""
    agent = Recorder()
    async with bounded_tunnels(agent.handler) as gw:
        streams = [(await gw.acquire())[0] for _ in range(3)]
        for stream in streams:
            await exchange(stream)
        gw.release(streams[0], reusable=True)
        gw.release(streams[1], reusable=True)
        await trio.sleep_until(2.0)
        assert agent.tunnel is not None
        agent.tunnel.drain(1001, "shutdown")
        await settle()
        assert gw.pooled_streams == 0
        assert agent.ended == {streams[0].id: 2.0, streams[1].id: 2.0}
        assert agent.tunnel.end is None  # streams[2] is in flight
        await exchange(streams[2])
        with pytest.raises(StreamError, match="closing"):
            await gw.acquire()  # no new streams for a draining agent
        gw.release(streams[2], reusable=True)
        await settle()
        assert agent.tunnel.end is not None and agent.tunnel.end.reason == "shutdown"
        assert gw.end is not None and gw.end.by_peer
        assert trio.current_time() == 2.0


# -- a refused CONNECT ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("detail", "kept"),
    [("the agent could not reach its upstream service", None), ("x" * 40_000, MAX_REFUSAL_BODY)],
)
async def test_refused_connect_raises_stream_refused_with_the_agents_answer(
    autojump_clock: trio.testing.MockClock, detail: str, kept: int | None
) -> None:
    async def unreachable(stream: TunnelStream) -> None:
        await refuse(stream, 502, "upstream_unreachable", "web", detail)

    body = error_body("upstream_unreachable", "web", detail)
    async with bounded_tunnels(unreachable) as gw:
        with pytest.raises(StreamRefused) as info:
            await gw.acquire()
        assert info.value.status == 502
        assert (b"content-type", b"application/json") in info.value.headers
        if kept is None:
            assert info.value.body == body
            assert json.loads(info.value.body)["error"] == "upstream_unreachable"
        else:
            assert info.value.body == body[:kept]
        assert not gw._streams and gw.pooled_streams == 0
        assert gw.end is None


# -- end to end: upstreams that close kept-alive connections or talk out of turn -----------
@attrs.define
class Upstream:
    """Requests seen per upstream connection (``METHOD target``), in order."""

    connections: list[list[str]] = attrs.Factory(list)
    closed: list[int] = attrs.Factory(list)
    """Connections the upstream closed, by index."""
    speak: trio.Event = attrs.Factory(trio.Event)


Serve = Callable[[Upstream, int, trio.SocketStream], Awaitable[None]]


def served(behaviour: Serve) -> tuple[Upstream, Callable[[trio.SocketStream], Awaitable[None]]]:
    upstream = Upstream()

    async def handler(stream: trio.SocketStream) -> None:
        index = len(upstream.connections)
        upstream.connections.append([])
        async with stream:
            try:
                await behaviour(upstream, index, stream)
            except trio.BrokenResourceError:
                pass
        upstream.closed.append(index)

    return upstream, handler


async def next_request(
    upstream: Upstream, index: int, stream: trio.SocketStream, conn: h11.Connection | None
) -> tuple[h11.Connection, bytes]:
    """Read a whole request (on a kept-alive h11 ``conn``, or a new one); returns
    the connection and the target. BrokenResourceError if the agent hung up."""
    if conn is None:
        conn = h11.Connection(h11.SERVER)
    else:
        conn.start_next_cycle()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("the agent closed the connection")
        else:
            assert isinstance(event, h11.Request), event
            break
    upstream.connections[index].append(f"{event.method.decode()} {event.target.decode()}")
    await read_body(conn, stream)
    return conn, event.target


async def answer(conn: h11.Connection, stream: trio.SocketStream, body: bytes) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    data = conn.send(h11.Response(status_code=200, headers=headers)) or b""
    data += conn.send(h11.Data(data=body)) or b""
    await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))


async def one_answer_per_connection(
    upstream: Upstream, index: int, stream: trio.SocketStream
) -> None:
    """Keep-alive in words only: answers one request, reads the next, closes
    unanswered (an idle timeout firing as the request arrives)."""
    conn, target = await next_request(upstream, index, stream, None)
    await answer(conn, stream, b"answer to " + target)
    await next_request(upstream, index, stream, conn)


async def close_when_idle(upstream: Upstream, index: int, stream: trio.SocketStream) -> None:
    """A real keep-alive timeout: closes a connection idle for 0.2 s."""
    conn: h11.Connection | None = None
    while True:
        with trio.move_on_after(0.2 if conn is not None else 5):
            conn, target = await next_request(upstream, index, stream, conn)
            await answer(conn, stream, b"answer to " + target)
            continue
        return


async def close_after_first_answer(
    upstream: Upstream, index: int, stream: trio.SocketStream
) -> None:
    """Closes right after its first response, which said nothing of closing."""
    conn, target = await next_request(upstream, index, stream, None)
    await answer(conn, stream, b"answer to " + target)


async def stray_408_when_idle(upstream: Upstream, index: int, stream: trio.SocketStream) -> None:
    """Answers, then (when told) writes a 408 on the idle connection and keeps it open."""
    conn, target = await next_request(upstream, index, stream, None)
    await answer(conn, stream, b"answer to " + target)
    if index == 0:
        await upstream.speak.wait()
        await stream.send_all(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
    await trio.sleep_forever()


@asynccontextmanager
async def stack(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[tuple[RunningGateway, Tunnel, int]]:
    """A gateway with agent "pool" relaying to ``handler``; yields the gateway,
    the agent's tunnel as the gateway holds it, and the data plane's port."""
    async with serving(handler) as upstream_port, running_gateway() as gw:
        config = AgentConfig(
            gateway=gw.url,
            name="pool",
            secret=SECRET,
            upstream=f"http://127.0.0.1:{upstream_port}",
            backoff=Backoff(0.1, 1),
        )
        agent = Agent(config)
        stopped = trio.Event()

        async def run() -> None:
            await agent.run()
            stopped.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            try:
                await wait_for(lambda: gw.gateway.registry.lookup("pool") is not None)
                session = gw.gateway.registry.lookup("pool")
                assert isinstance(session, Tunnel)
                yield gw, session, int(gw.url.rsplit(":", 1)[1])
            finally:
                # A drain, not a cancellation: the gateway retires the idle
                # streams (a cancelled Agent.run waits 2 s for its WebSocket close).
                agent.stop()
                with trio.move_on_after(2):
                    await stopped.wait()


def post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: example.test\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def first_get(client: Client, tunnel: Tunnel) -> None:
    await client.send_raw(get("/a/pool/1"))
    response, body = await client.response()
    assert (response.status_code, body) == (200, b"answer to /1")
    await wait_for(lambda: tunnel.pooled_streams == 1)


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_get_on_a_stream_whose_upstream_closed_unanswered_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream, handler = served(one_answer_per_connection)
    with trio.fail_after(5):
        async with stack(handler) as (_, tunnel, port), connect(port) as client:
            await first_get(client, tunnel)
            await client.send_raw(get("/a/pool/2"))
            response, body = await client.response()
            assert (response.status_code, body) == (200, b"answer to /2")
    # The pooled stream carried GET /2 to a connection that closed unanswered;
    # the retry went on a fresh stream (a new upstream connection).
    assert upstream.connections[:2] == [["GET /1", "GET /2"], ["GET /2"]]
    no_errors_logged(caplog)


@pytest.mark.parametrize("behaviour", [close_when_idle, close_after_first_answer])
async def test_get_after_the_upstream_closed_an_idle_connection_succeeds(
    caplog: pytest.LogCaptureFixture, behaviour: Serve
) -> None:
    upstream, handler = served(behaviour)
    with trio.fail_after(5):
        async with stack(handler) as (_, tunnel, port), connect(port) as client:
            await first_get(client, tunnel)
            await wait_for(lambda: upstream.closed == [0])
            await client.send_raw(get("/a/pool/2"))
            response, body = await client.response()
            assert (response.status_code, body) == (200, b"answer to /2")
    assert upstream.connections[:2] == [["GET /1"], ["GET /2"]]
    no_errors_logged(caplog)


async def test_post_on_a_stream_whose_upstream_closed_unanswered_gets_a_clear_502(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request with a body is not replayed (it may have been acted on): 502."""
    upstream, handler = served(one_answer_per_connection)
    with trio.fail_after(5):
        async with stack(handler) as (_, tunnel, port), connect(port) as client:
            await first_get(client, tunnel)
            await client.send_raw(post("/a/pool/form", b"a=1&b=2"))
            response, body = await client.response("POST")
            assert response.status_code == 502
            assert json.loads(body)["error"] == "upstream_unreachable"
            assert json.loads(body)["agent"] == "pool"
            # The connection and the agent are fine: the next GET goes through.
            await client.send_raw(get("/a/pool/3"))
            response, body = await client.response()
            assert (response.status_code, body) == (200, b"answer to /3")
    assert upstream.connections[:2] == [["GET /1", "POST /form"], ["GET /3"]]
    no_errors_logged(caplog)


async def test_stray_bytes_on_an_idle_connection_never_answer_the_next_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream, handler = served(stray_408_when_idle)
    with trio.fail_after(5):
        async with stack(handler) as (_, tunnel, port), connect(port) as client:
            await first_get(client, tunnel)
            upstream.speak.set()
            pool = tunnel._pool
            assert pool is not None
            # The 408 arrives on the idle stream, which is reset at once.
            await wait_for(lambda: any(s.reset_code is not None for s in pool._idle))
            assert not any(s._chunks for s in pool._idle)
            await client.send_raw(get("/a/pool/2"))
            response, body = await client.response()
            assert (response.status_code, body) == (200, b"answer to /2")
    assert upstream.connections[:2] == [["GET /1"], ["GET /2"]]
    no_errors_logged(caplog)


async def test_retry_goes_on_a_fresh_stream_not_another_pooled_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two pooled streams whose upstream connections both close on their next
    request (an upstream's keep-alive timeout closes all its idle connections):
    the GET is retried once, and that once must be on a new stream."""
    both = trio.Event()

    async def two_at_once(upstream: Upstream, index: int, stream: trio.SocketStream) -> None:
        conn, target = await next_request(upstream, index, stream, None)
        if len(upstream.connections) == 2:
            both.set()
        await both.wait()  # (so that two streams are open at once)
        await answer(conn, stream, b"answer to " + target)
        await next_request(upstream, index, stream, conn)

    upstream, handler = served(two_at_once)
    with trio.fail_after(5):
        async with stack(handler) as (_, tunnel, port):
            async with connect(port) as one, connect(port) as two:
                await one.send_raw(get("/a/pool/1"))
                await two.send_raw(get("/a/pool/1"))
                assert (await one.response())[0].status_code == 200
                assert (await two.response())[0].status_code == 200
            await wait_for(lambda: tunnel.pooled_streams == 2)
            async with connect(port) as client:
                await client.send_raw(get("/a/pool/2"))
                response, body = await client.response()
            assert (response.status_code, body) == (200, b"answer to /2"), body
    # The LIFO stream's connection saw GET /2 and closed; the other pooled one never did.
    assert sorted(upstream.connections[:2]) == [["GET /1"], ["GET /1", "GET /2"]]
    assert upstream.connections[2] == ["GET /2"]
    no_errors_logged(caplog)
