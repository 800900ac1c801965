"""The limits (defaults at least as strict as nginx's, docs/security.md): head
size, header count, target length, body size, agents, a stalled body, an
unanswered WebSocket handshake, the agent tunnel's message size; each refusal
is a clear status or close code, and nothing else is harmed."""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio_websocket import ConnectionRejected
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request

from revconn import Agent, AgentConfig, Backoff
from revconn._proto.connect import WS_SUBPROTOCOL
from revconn._proto.rules import MAX_MESSAGE_SIZE
from revconn._proto.session import Role, TunnelSession

from .._gateway_helpers import SECRET, RunningGateway, raw_agent, running_gateway, wait_for
from .._raw_upstream import Handler, read_head, respond, serving
from .test_public_side import Upstream, exchange

pytestmark = pytest.mark.e2e


async def answer_of(port: int, raw: bytes) -> tuple[int, dict[str, object]]:
    data = await exchange(port, raw)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (b"GET /a/web/" + b"x" * 9000 + b" HTTP/1.1\r\nHost: g\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET /a/web/ HTTP/1.1\r\nHost: g\r\nX-Big: " + b"y" * 17000 + b"\r\n\r\n",
            431,
            "request_header_too_large",
        ),
        (
            b"GET /a/web/ HTTP/1.1\r\nHost: g\r\n" + b"X-N: 1\r\n" * 100 + b"\r\n",
            431,
            "request_header_too_large",
        ),
        (
            b"POST /a/web/up HTTP/1.1\r\nHost: g\r\nContent-Length: 1025\r\n\r\n",
            413,
            "payload_too_large",
        ),
        (
            b"POST /a/web/up HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"400\r\n" + b"z" * 1024 + b"\r\n10\r\n" + b"z" * 16 + b"\r\n0\r\n\r\n",
            413,
            "payload_too_large",
        ),
    ],
    ids=["target", "head", "fields", "content-length", "chunked"],
)
async def test_limits(raw: bytes, status: int, error: str) -> None:
    upstream = Upstream()
    with trio.fail_after(20):
        async with serving(upstream) as up_port, running_gateway(max_body_size=1024) as gw:
            agent = Agent(
                AgentConfig(
                    gateway=gw.url,
                    name="web",
                    secret=SECRET,
                    upstream=f"http://127.0.0.1:{up_port}",
                    backoff=Backoff(0.1, 1),
                )
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent.run)
                await wait_for(lambda: gw.gateway.registry.lookup("web") is not None)
                port = int(gw.url.rsplit(":", 1)[1])
                got, body = await answer_of(port, raw)
                assert (got, body["error"]) == (status, error), body
                assert upstream.completed == []
                if status != 413 or b"chunked" not in raw:
                    assert upstream.targets == []  # refused before anything was sent on
                # Within the limits: fine.
                ok = await exchange(
                    port,
                    b"POST /a/web/fine HTTP/1.1\r\nHost: g\r\nContent-Length: 1024\r\n"
                    b"Connection: close\r\n\r\n" + b"q" * 1024,
                )
                assert ok.startswith(b"HTTP/1.1 200 "), ok[:100]
                agent.stop()
                nursery.cancel_scope.deadline = trio.current_time() + 2


async def test_max_agents() -> None:
    async with running_gateway(max_agents=1) as gw, raw_agent(gw, "first"):
        await wait_for(lambda: gw.gateway.registry.lookup("first") is not None)
        rejected: ConnectionRejected | None = None
        try:
            async with raw_agent(gw, "second"):
                pass
        except BaseException as exc:  # (raised through trio-websocket's nursery)
            rejected = _rejection(exc)
        assert rejected is not None
        assert rejected.status_code == 503
        assert b"too_many_agents" in (rejected.body or b"")
        assert gw.gateway.registry.lookup("first") is not None
        # The same name reconnecting (replacing itself) is not refused.
        async with raw_agent(gw, "first"):
            await wait_for(lambda: len(gw.gateway._tunnels) >= 1)


def _rejection(exc: BaseException) -> ConnectionRejected | None:
    if isinstance(exc, ConnectionRejected):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _rejection(inner)
        if found is not None:
            return found
    return None


# -- timeouts: a stalled body, an unanswered WebSocket handshake ----------------


@asynccontextmanager
async def agent_in_front_of(
    handler: Handler, *, upstream_timeout: float = 60.0, **config: object
) -> AsyncIterator[tuple[RunningGateway, int]]:
    """The upstream ``handler``, a gateway with ``config``, agent "web" online
    in front of the upstream (``--upstream``); yields the gateway and its port."""
    async with serving(handler) as up_port, running_gateway(**config) as gw:
        agent = Agent(
            AgentConfig(
                gateway=gw.url,
                name="web",
                secret=SECRET,
                upstream=f"http://127.0.0.1:{up_port}",
                upstream_timeout=upstream_timeout,
                backoff=Backoff(0.1, 1),
            )
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await wait_for(lambda: gw.gateway.registry.lookup("web") is not None)
            yield gw, int(gw.url.rsplit(":", 1)[1])
            agent.stop()
            nursery.cancel_scope.deadline = trio.current_time() + 2


class Recorder:
    """An upstream that answers /fine, and for anything else reads the head and
    then the body until the agent closes the connection (it records whether
    that happened, and how much body came)."""

    def __init__(self, answer_websocket: bool = False) -> None:
        self.heads: list[bytes] = []
        self.body = 0
        self.closed = trio.Event()

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            conn, request = await read_head(stream)
            if request.target == b"/fine":
                await respond(conn, stream, 200, b"fine")
                return
            self.heads.append(request.target)
            # Body bytes that came with the head are in h11's buffer already.
            self.body += len(conn.trailing_data[0])
            while data := await stream.receive_some(65536):
                self.body += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if self.heads:
                self.closed.set()


async def fine(port: int) -> None:
    ok = await exchange(port, b"GET /a/web/fine HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b"fine"), ok[:200]


async def test_a_client_that_stalls_its_body_gets_408_and_only_its_stream_is_reset() -> None:
    """The client sends 10 of 1000 announced body bytes and goes silent: 408
    request_timeout after the body timeout (not the upstream's 504: the
    upstream was reading), the upstream's connection is closed (the stream
    was reset), and the agent goes on serving."""
    upstream = Recorder()
    with trio.fail_after(15):
        async with agent_in_front_of(upstream, body_timeout=0.5) as (_, port):
            raw = b"POST /a/web/up HTTP/1.1\r\nHost: g\r\nContent-Length: 1000\r\n\r\n" + b"b" * 10
            t0 = trio.current_time()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(raw)
                answer = b""
                while data := await stream.receive_some(65536):
                    answer += data
            elapsed = trio.current_time() - t0
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), answer
            assert b"connection: close" in head.lower()
            assert json.loads(body)["error"] == "request_timeout"
            assert 0.5 <= elapsed < 3, elapsed
            with trio.fail_after(2):
                await upstream.closed.wait()  # the upstream connection went with it
            assert upstream.heads == [b"/up"] and upstream.body == 10
            await fine(port)


async def test_an_upstream_that_stops_reading_keeps_its_504_under_a_short_body_timeout() -> None:
    """The client sends its body as fast as it can and the upstream reads
    none of it: 504 upstream_timeout (the upstream's fault), even when the
    body timeout is shorter than the upstream timeout."""

    async def stall(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await trio.sleep_forever()

    size = 64 * 1024 * 1024
    with trio.fail_after(15):
        async with agent_in_front_of(stall, upstream_timeout=1.0, body_timeout=0.3) as (_, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            answer = b""
            async with stream, trio.open_nursery() as nursery:

                async def send_body() -> None:
                    head = f"POST /a/web/up HTTP/1.1\r\nHost: g\r\nContent-Length: {size}\r\n\r\n"
                    try:
                        await stream.send_all(head.encode())
                        piece = b"p" * 65536
                        for _ in range(size // len(piece)):
                            await stream.send_all(piece)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

                nursery.start_soon(send_body)
                try:
                    while b"\r\n\r\n{" not in answer or not answer.endswith(b"}"):
                        data = await stream.receive_some(65536)
                        if not data:
                            break
                        answer += data
                except trio.BrokenResourceError:
                    pass
                nursery.cancel_scope.cancel()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 504 "), answer[:300]
            assert json.loads(body)["error"] == "upstream_timeout"


class SilentWebSocket:
    """An upstream that reads a WebSocket handshake and never answers it."""

    def __init__(self) -> None:
        self.handshakes = 0
        self.closed = trio.Event()

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            conn, request = await read_head(stream)
            if request.target == b"/fine":
                await respond(conn, stream, 200, b"fine")
                return
            self.handshakes += 1
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if self.handshakes:
                self.closed.set()


WS_HANDSHAKE = (
    b"GET /a/web/chat HTTP/1.1\r\nHost: g\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


async def test_an_unanswered_public_websocket_handshake_is_a_504() -> None:
    """The upstream never answers a public client's WebSocket handshake (and
    the agent has no upstream timeout that would): after the handshake
    timeout the client gets 504 upstream_timeout as JSON, the stream is reset
    (the upstream connection closed), the agent goes on serving."""
    upstream = SilentWebSocket()
    with trio.fail_after(15):
        async with agent_in_front_of(upstream, handshake_timeout=0.5) as (gw, port):
            t0 = trio.current_time()
            answer = await exchange(port, WS_HANDSHAKE)
            elapsed = trio.current_time() - t0
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 504 "), answer
            assert b"connection: close" in head.lower()
            payload = json.loads(body)
            assert (payload["error"], payload["agent"]) == ("upstream_timeout", "web")
            assert "WebSocket handshake" in payload["detail"]
            assert 0.5 <= elapsed < 3, elapsed
            with trio.fail_after(2):
                await upstream.closed.wait()
            assert upstream.handshakes == 1
            await fine(port)
            assert gw.gateway.registry.lookup("web") is not None


async def test_an_agents_upgrade_request_is_bounded_by_the_head_timeout() -> None:
    """/ws/connect's upgrade request trickled and never finished: 408 after
    the idle timeout, like any request head (after the 101 the tunnel
    handshake has --handshake-timeout: close 4408, tests/gateway/test_gateway.py)."""
    with trio.fail_after(10):
        async with running_gateway(idle_timeout=0.3) as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            partial_head = (
                b"GET /ws/connect?name=slow HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\n"
            )
            head, _, body = (await exchange(port, partial_head)).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), head
            assert json.loads(body)["error"] == "request_timeout"
            assert gw.gateway.registry.lookup("slow") is None


# -- the agent tunnel's WebSocket message size (close 1009) ---------------------


@asynccontextmanager
async def wsproto_agent(
    gw: RunningGateway, name: str
) -> AsyncIterator[tuple[trio.SocketStream, WSConnection]]:
    """An agent whose WebSocket frames are ours to write: wsproto over a raw
    socket, tunnel handshake done."""
    port = int(gw.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(
            ws.send(
                Request(
                    host="g",
                    target=f"/ws/connect?name={name}",
                    subprotocols=[WS_SUBPROTOCOL],
                    extra_headers=[(b"authorization", f"Bearer {SECRET}".encode())],
                )
            )
        )
        session = TunnelSession(Role.AGENT)
        session.initiate()
        accepted = False
        while not session.handshake_complete:
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                    await stream.send_all(ws.send(BytesMessage(session.data_to_send())))
                elif isinstance(event, BytesMessage):
                    session.receive_data(bytes(event.data))
                    out = session.data_to_send()
                    if out:
                        await stream.send_all(ws.send(BytesMessage(out)))
                else:
                    raise AssertionError(event)
            if not session.handshake_complete:
                ws.receive_data(await stream.receive_some(65536))
        assert accepted
        yield stream, ws


async def close_code(stream: trio.SocketStream, ws: WSConnection) -> int | None:
    """Read until the gateway's close frame; its code (None: closed without one)."""
    while True:
        for event in ws.events():
            if isinstance(event, CloseConnection):
                return event.code
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return None
        if not data:
            return None
        ws.receive_data(data)


def frame_header(length: int, opcode: int = 0x2, *, fin: bool = True) -> bytes:
    """A masked (client) frame header announcing ``length`` payload bytes, mask 0."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        size = bytes([0x80 | length])
    elif length < 1 << 16:
        size = bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        size = bytes([0x80 | 127]) + struct.pack("!Q", length)
    return bytes([first]) + size + b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    "frames",
    [
        # one frame announcing 2**62 bytes (4 EiB), nothing of it sent
        [frame_header(2**62)],
        # the same header split at every offset
        [bytes([b]) for b in frame_header(2**62)],
        # a first fragment within the limit, sent whole, then a continuation
        # whose announced length takes the message over it
        [
            frame_header(MAX_MESSAGE_SIZE - 1000, fin=False) + b"\x00" * (MAX_MESSAGE_SIZE - 1000),
            frame_header(2000, opcode=0x0),
        ],
    ],
    ids=["2**62", "2**62-split", "continuation"],
)
async def test_an_announced_oversized_message_is_closed_1009_at_once(frames: list[bytes]) -> None:
    """The gateway closes with 1009 as soon as a frame header announces more
    than --max-message-size allows, before (and without) its payload, and
    allocates nothing for the announced size; an agent beside it goes on."""
    upstream = Recorder()
    with trio.fail_after(15):
        async with (
            agent_in_front_of(upstream) as (gw, port),
            wsproto_agent(gw, "huge") as (stream, ws),
        ):
            await wait_for(lambda: gw.gateway.registry.lookup("huge") is not None)
            tracemalloc.start()
            try:
                for frame in frames:
                    await stream.send_all(frame)
                with trio.fail_after(2):  # at once: no payload is coming
                    code = await close_code(stream, ws)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert code == 1009
            assert peak < 4 * MAX_MESSAGE_SIZE, peak  # (what arrived, never 2**62)
            await wait_for(lambda: gw.gateway.registry.lookup("huge") is None)
            await fine(port)
