"""WebSocket passthrough: a public client's handshake to ``/a/NAME/...`` (or
``NAME.DOMAIN``) reaches the agent's upstream, and after its 101 the stream is
a byte pipe both ways. In-process gateway and agent (``--upstream`` in front
of a wsproto server that echoes frames exactly as they came, or ``--app``);
public clients are wsproto over raw sockets, so every frame is visible."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from revconn import Agent, AgentConfig, Backoff
from revconn._runtime.tunnel import Tunnel

from .._gateway_helpers import SECRET, RunningGateway, running_gateway, wait_for
from .._raw_upstream import serving

pytestmark = pytest.mark.e2e

READ = 256 * 1024
BIG = 16 * 1024 * 1024


class WS:
    """One side of a WebSocket over a trio stream, with wsproto: frames in, events out."""

    def __init__(self, stream: trio.abc.Stream, kind: ConnectionType) -> None:
        self.stream = stream
        self.ws = WSConnection(kind)
        self.events: list[Event] = []
        self.eof = False

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next(self) -> Event:
        """The next event; raises EOFError when the connection ended first."""
        while not self.events:
            if self.eof:
                raise EOFError
            try:
                data = await self.stream.receive_some(READ)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                self.eof = True  # (wsproto would make up a 1006 close: not an event here)
                raise EOFError
            self.ws.receive_data(data)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def message(self) -> str | bytes:
        """One whole message (its fragments joined)."""
        parts: list[Any] = []
        while True:
            event = await self.next()
            assert isinstance(event, Message), event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)


Upstream = Callable[[WS], Awaitable[None]]


async def echo(ws: WS) -> None:
    """Echo every frame as it came (fragments stay fragments); pings are
    answered by wsproto's Pong below; a text "close CODE REASON" makes this
    side close; a close from the client is echoed with its code and reason."""
    while True:
        try:
            event = await ws.next()
        except EOFError:
            return
        if isinstance(event, TextMessage) and event.data.startswith("close "):
            _, code, reason = event.data.split(" ", 2)
            await ws.send(CloseConnection(int(code), reason))
        elif isinstance(event, Message):
            await ws.send(type(event)(data=event.data, message_finished=event.message_finished))
        elif isinstance(event, Ping):
            await ws.send(event.response())
        elif isinstance(event, CloseConnection):
            await ws.send(event.response())
            await ws.stream.aclose()
            return


class Service:
    """The upstream: a wsproto server; it accepts the first subprotocol it
    likes and permessage-deflate when offered, or refuses with ``refuse``."""

    def __init__(self, behaviour: Upstream = echo, *, refuse: int | None = None) -> None:
        self.behaviour = behaviour
        self.refuse = refuse
        self.requests: list[Request] = []
        self.ended = trio.Event()

    async def __call__(self, stream: trio.SocketStream) -> None:
        ws = WS(stream, ConnectionType.SERVER)
        try:
            request = await ws.next()
            assert isinstance(request, Request), request
            self.requests.append(request)
            if self.refuse is not None:
                headers = [(b"content-type", b"text/plain"), (b"x-why", b"nope")]
                body = b"not here\n"
                headers.append((b"content-length", str(len(body)).encode()))
                await ws.send(
                    RejectConnection(status_code=self.refuse, headers=headers, has_body=True)
                )
                await ws.send(RejectData(data=body))
                return
            chosen = next((p for p in request.subprotocols if p.startswith("super")), None)
            extensions = [PerMessageDeflate()] if request.extensions else []
            await ws.send(AcceptConnection(subprotocol=chosen, extensions=extensions))
            await self.behaviour(ws)
        finally:
            self.ended.set()


@asynccontextmanager
async def stack(
    service: Service | None = None, **gateway: Any
) -> AsyncIterator[tuple[RunningGateway, int, Service]]:
    """The upstream, a gateway and agent "web" online in front of it (``--upstream``)."""
    service = service or Service()
    async with serving(service) as up_port, running_gateway(**gateway) as gw:
        config = AgentConfig(
            gateway=gw.url,
            name="web",
            secret=SECRET,
            upstream=f"http://127.0.0.1:{up_port}",
            backoff=Backoff(0.1, 1),
        )
        agent = Agent(config)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await wait_for(lambda: gw.gateway.registry.lookup("web") is not None)
            yield gw, int(gw.url.rsplit(":", 1)[1]), service
            # A goodbye rather than a cancellation (a cancelled agent waits out
            # its WebSocket close timeout).
            agent.stop()
            nursery.cancel_scope.deadline = trio.current_time() + 2


@asynccontextmanager
async def client(
    port: int,
    target: str = "/a/web/chat",
    *,
    host: str = "gw.test",
    subprotocols: list[str] | None = None,
    deflate: bool = False,
) -> AsyncIterator[tuple[WS, Event]]:
    """A public WebSocket client; yields it and the handshake's answer event."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        ws = WS(stream, ConnectionType.CLIENT)
        extensions = [PerMessageDeflate()] if deflate else []
        await ws.send(
            Request(
                host=host,
                target=target,
                subprotocols=subprotocols or [],
                extensions=extensions,
            )
        )
        answer = await ws.next()
        yield ws, answer


async def test_messages_both_ways_text_binary_fragmented_and_big() -> None:
    with trio.fail_after(20):
        async with stack() as (_, port, service), client(port) as (ws, answer):
            assert isinstance(answer, AcceptConnection), answer
            assert service.requests[0].target == "/chat"  # the prefix is stripped
            await ws.send(TextMessage("hello"))
            assert await ws.message() == "hello"
            await ws.send(BytesMessage(b"\x00\x01\xff"))
            assert await ws.message() == b"\x00\x01\xff"
            # Fragments pass as fragments: the echo returns each as it came.
            await ws.send(TextMessage("frag", message_finished=False))
            await ws.send(TextMessage("ment", message_finished=False))
            await ws.send(TextMessage("ed", message_finished=True))
            parts = [await ws.next() for _ in range(3)]
            assert [(p.data, p.message_finished) for p in parts] == [  # type: ignore[attr-defined]
                ("frag", False),
                ("ment", False),
                ("ed", True),
            ]
            big = bytes(range(256)) * (BIG // 256)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ws.send, BytesMessage(big))
                got = await ws.message()
            assert len(got) == BIG
            assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()


async def test_ping_pong_and_close_codes_both_ways() -> None:
    with trio.fail_after(10):
        async with stack() as (_, port, service):
            async with client(port) as (ws, answer):
                assert isinstance(answer, AcceptConnection)
                await ws.send(Ping(b"are you there"))
                pong = await ws.next()
                assert isinstance(pong, Pong) and pong.payload == b"are you there"
                # The client closes: the upstream sees its code and reason, and its
                # answering close comes back.
                await ws.send(CloseConnection(4001, "client says bye"))
                closed = await ws.next()
                assert isinstance(closed, CloseConnection)
                assert (closed.code, closed.reason) == (4001, "client says bye")
                with pytest.raises(EOFError):
                    await ws.next()  # and the TCP connection ends
            await service.ended.wait()
            async with client(port) as (ws, answer):
                # The upstream closes: its code and reason reach the client.
                await ws.send(TextMessage("close 4002 server says bye"))
                closed = await ws.next()
                assert isinstance(closed, CloseConnection)
                assert (closed.code, closed.reason) == (4002, "server says bye")


async def test_subprotocol_and_extensions_are_negotiated_end_to_end() -> None:
    with trio.fail_after(10):
        async with (
            stack() as (_, port, service),
            client(port, subprotocols=["chat", "superchat"], deflate=True) as (ws, answer),
        ):
            assert isinstance(answer, AcceptConnection)
            assert answer.subprotocol == "superchat"
            assert [type(e) for e in answer.extensions] == [PerMessageDeflate]
            request = service.requests[0]
            assert request.subprotocols == ["chat", "superchat"]
            assert request.extensions  # permessage-deflate reached the upstream
            text = "compressible " * 10_000
            await ws.send(TextMessage(text))
            assert await ws.message() == text


async def test_an_upstream_that_refuses_the_upgrade_is_passed_through() -> None:
    with trio.fail_after(10):
        async with stack(Service(refuse=403)) as (_, port, _service), client(port) as (ws, answer):
            assert isinstance(answer, RejectConnection), answer
            assert answer.status_code == 403
            assert (b"x-why", b"nope") in answer.headers
            body = await ws.next()
            assert isinstance(body, RejectData) and body.data == b"not here\n"


async def test_host_routed_websocket() -> None:
    with trio.fail_after(10):
        async with (
            stack(domains=("t.test",)) as (_, port, service),
            client(port, "/live", host="web.t.test") as (ws, answer),
        ):
            assert isinstance(answer, AcceptConnection)
            assert service.requests[0].target == "/live"
            await ws.send(TextMessage("by host"))
            assert await ws.message() == "by host"


async def test_client_gone_closes_the_upstream_and_resets_the_stream() -> None:
    with trio.fail_after(10):
        async with stack() as (gw, port, service):
            async with client(port) as (ws, answer):
                assert isinstance(answer, AcceptConnection)
                await ws.send(TextMessage("x"))
                assert await ws.message() == "x"
            # The client's TCP connection is gone (no close frame): the
            # upstream's connection ends at once.
            await service.ended.wait()
            session = gw.gateway.registry.lookup("web")
            assert isinstance(session, Tunnel)
            await wait_for(lambda: session.pooled_streams == 0)


async def test_agent_lost_closes_the_public_connection_at_once() -> None:
    with trio.fail_after(10):
        async with stack() as (gw, port, _), client(port) as (ws, answer):
            assert isinstance(answer, AcceptConnection)
            session = gw.gateway.registry.lookup("web")
            assert session is not None
            session.request_close(1011, "test: agent lost")
            with pytest.raises(EOFError):
                await ws.next()


async def blaster(ws: WS) -> None:
    """Sends 1 MiB messages as fast as it can, counting what it got out."""
    piece = b"b" * (1 << 20)
    try:
        while True:
            await ws.send(BytesMessage(piece))
            SENT.append(len(piece))
    except trio.BrokenResourceError:
        return  # the client (and so the stream) is gone


SENT: list[int] = []


async def test_a_client_that_stops_reading_stalls_only_its_own_stream() -> None:
    SENT.clear()
    with trio.fail_after(20):
        async with stack(Service(blaster)) as (_gw, port, _), client(port) as (_ws, answer):
            assert isinstance(answer, AcceptConnection)
            # This client reads nothing more: the upstream is soon stalled.
            before = -1
            while sum(SENT) != before:
                before = sum(SENT)
                await trio.sleep(0.3)
            stalled = sum(SENT)
            # Bounded: the stream's window (1 MiB) plus socket buffers, not the
            # upstream's appetite.
            assert stalled < 24 * (1 << 20), stalled
            # The same agent keeps serving other WebSockets meanwhile.
            async with client(port) as (other, other_answer):
                assert isinstance(other_answer, AcceptConnection)
                # (this upstream blasts too: one message arrives)
                got = await other.message()
                assert len(got) == 1 << 20


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (
            b"GET /a/web/x HTTP/1.1\r\nHost: g\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n",
            400,
            "bad_websocket_handshake",
        ),  # no key
        (
            b"GET /a/web/x HTTP/1.1\r\nHost: g\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            426,
            "bad_websocket_handshake",
        ),
        (
            b"POST /a/web/x HTTP/1.1\r\nHost: g\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            400,
            "bad_websocket_handshake",
        ),
        (
            b"GET /a/web/x HTTP/1.0\r\nHost: g\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            400,
            "bad_websocket_handshake",
        ),
    ],
)
async def test_bad_handshakes_never_reach_the_agent(raw: bytes, status: int, error: str) -> None:
    import json

    with trio.fail_after(10):
        async with stack() as (_, port, service):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(raw)
                data = b""
                while chunk := await stream.receive_some(READ):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d " % status), head
            assert json.loads(body)["error"] == error
            assert service.requests == []


async def asgi_echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An in-process app's ``websocket`` scope: echoes, picks a subprotocol,
    closes with 4003 when told."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    assert scope["type"] == "websocket", scope
    assert (await receive())["type"] == "websocket.connect"
    chosen = next((p for p in scope["subprotocols"] if p.startswith("super")), None)
    await send({"type": "websocket.accept", "subprotocol": chosen})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "bye":
            await send({"type": "websocket.close", "code": 4003, "reason": "app says bye"})
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"] + "!"})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})


async def test_an_in_process_apps_websocket_scope() -> None:
    with trio.fail_after(20):
        async with running_gateway() as gw:
            agent = Agent(
                AgentConfig(gateway=gw.url, name="app", secret=SECRET, backoff=Backoff(0.1, 1)),
                app=asgi_echo,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent.run)
                await wait_for(lambda: gw.gateway.registry.lookup("app") is not None)
                port = int(gw.url.rsplit(":", 1)[1])
                async with client(port, "/a/app/ws", subprotocols=["x", "superx"]) as (
                    ws,
                    answer,
                ):
                    assert isinstance(answer, AcceptConnection), answer
                    assert answer.subprotocol == "superx"
                    await ws.send(TextMessage("hi"))
                    assert await ws.message() == "hi!"
                    await ws.send(BytesMessage(b"abc"))
                    assert await ws.message() == b"cba"
                    big = b"q" * (4 << 20)
                    async with trio.open_nursery() as inner:
                        inner.start_soon(ws.send, BytesMessage(big))
                        assert await ws.message() == big[::-1]
                    await ws.send(TextMessage("bye"))
                    closed = await ws.next()
                    assert isinstance(closed, CloseConnection)
                    assert (closed.code, closed.reason) == (4003, "app says bye")
                agent.stop()
                nursery.cancel_scope.deadline = trio.current_time() + 2


async def test_gateway_shutdown_lets_websockets_run_through_the_grace_then_closes_them() -> None:
    with trio.fail_after(10):
        async with stack() as (gw, port, _), client(port) as (ws, answer):
            assert isinstance(answer, AcceptConnection)
            gw.gateway.begin_shutdown()  # draining: no new requests, this one goes on
            await ws.send(TextMessage("still here"))
            assert await ws.message() == "still here"
            gw.gateway.close_all_agents()  # the grace period is over
            with pytest.raises(EOFError):
                await ws.next()


async def silent_service(ws: WS) -> None:
    await trio.sleep_forever()


class Silent(Service):
    """Reads the handshake and never answers."""

    async def __call__(self, stream: trio.SocketStream) -> None:
        ws = WS(stream, ConnectionType.SERVER)
        try:
            self.requests.append(await ws.next())  # type: ignore[arg-type]
            await stream.receive_some(READ)  # until the gateway closes it
        except (EOFError, trio.BrokenResourceError):
            pass
        finally:
            self.ended.set()


async def test_a_client_leaving_during_the_handshake_frees_the_stream_at_once() -> None:
    """The upstream never answers the handshake (no upstream timeout for a
    WebSocket here: the agent's default); the client gives up: the upstream
    connection is closed at once, not held until it answers."""
    service = Silent()
    with trio.fail_after(10):
        async with stack(service) as (gw, port, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            ws = WS(stream, ConnectionType.CLIENT)
            await ws.send(Request(host="gw.test", target="/a/web/chat"))
            await wait_for(lambda: len(service.requests) == 1)
            await stream.aclose()
            with trio.fail_after(2):
                await service.ended.wait()
            session = gw.gateway.registry.lookup("web")
            assert isinstance(session, Tunnel)


def raw_handshake(target: str = "/a/web/chat") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()


async def test_bytes_sent_right_after_the_handshake_follow_the_101() -> None:
    """A client that does not wait for the 101 (RFC 6455 says it should):
    its first frame is held, then delivered after the switch."""
    frame = b"\x81\x82\x00\x00\x00\x00hi"  # a masked text frame "hi" (mask 0)
    with trio.fail_after(10):
        async with stack() as (_, port, _service):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(raw_handshake() + frame)
                data = b""
                while b"hi" not in data.partition(b"\r\n\r\n")[2]:
                    data += await stream.receive_some(READ)
                head, _, rest = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 ")
                assert rest == b"\x81\x02hi"  # the echo, unmasked from the server


class NotWebSocket(Service):
    """Answers the handshake with a 101 that is not a WebSocket's."""

    def __init__(self, answer: bytes) -> None:
        super().__init__()
        self.answer = answer

    async def __call__(self, stream: trio.SocketStream) -> None:
        await stream.receive_some(READ)
        await stream.send_all(self.answer)
        with trio.move_on_after(5):
            await stream.receive_some(READ)
        self.ended.set()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: wrong\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ],
)
async def test_an_upstream_101_that_is_not_a_websocket_is_a_502(answer: bytes) -> None:
    import json

    with trio.fail_after(10):
        async with stack(NotWebSocket(answer)) as (_, port, _service):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(raw_handshake())
                data = b""
                while chunk := await stream.receive_some(READ):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 502 "), head
            assert json.loads(body)["error"] == "upstream_unreachable"
