"""Gateway + agent (``--upstream``) + hand-written upstream, in-process: what
the old agent-side h11 pool guaranteed must now hold end to end, at the
gateway (early answers, broken pipes, TLS, timeouts, framing, keep-alive).

Each upstream handler behaves exactly as its test needs; clients are raw
sockets parsed with h11.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import h11
import pytest
import trio

from revconn import Agent, AgentConfig, Backoff
from revconn._agent.upstream import HttpUpstream
from revconn._runtime.tunnel import Tunnel

from ._gateway_helpers import SECRET, RunningGateway, running_gateway, wait_for
from ._raw_upstream import CHUNK, read_body, read_head, respond, serving
from .gateway.test_exchange import Client, connect, get

UPLOAD = 32 * 1024 * 1024
"""A body far larger than what sockets and the tunnel's windows can buffer."""
PIECE = b"x" * CHUNK
Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def stack(
    handler: Handler,
    *,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[RunningGateway, int, int]]:
    """The upstream ``handler``, a gateway, and agent "web" online in front of
    the upstream (over https with ``tls``, the agent's client context); yields
    the gateway, its data-plane port and the upstream's port."""
    async with serving(tolerant(handler)) as up_port, running_gateway() as gw:
        config = AgentConfig(
            gateway=gw.url,
            name="web",
            secret=SECRET,
            upstream=f"http://127.0.0.1:{up_port}",
            upstream_timeout=timeout,
            backoff=Backoff(0.1, 1),
        )
        agent = Agent(config)
        if tls is not None:
            url = f"https://127.0.0.1:{up_port}"
            agent.upstream = HttpUpstream(url, agent="web", timeout=timeout, ssl_context=tls)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await wait_for(lambda: gw.gateway.registry.lookup("web") is not None)
            yield gw, int(gw.url.rsplit(":", 1)[1]), up_port
            # A goodbye rather than a cancellation: a cancelled agent waits out
            # its 2 s WebSocket close timeout (its reader is cancelled too).
            agent.stop()
            nursery.cancel_scope.deadline = trio.current_time() + 2


def tolerant(handler: Handler) -> Handler:
    """``handler``, where the agent dropping the connection just ends it."""

    async def run(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass

    return run


def tunnel(gw: RunningGateway) -> Tunnel:
    session = gw.gateway.registry.lookup("web")
    assert isinstance(session, Tunnel)
    return session


async def next_request(stream: trio.abc.Stream) -> tuple[h11.Connection, h11.Request] | None:
    """The next request head on an upstream connection; None once it closed
    between requests (requests are never pipelined on a tunnel stream)."""
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(CHUNK)))
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        return conn, event


def upload_head(target: str, length: int, method: str = "POST") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nHost: example.test\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def upload(
    client: Client, head: bytes, length: int, *, piece: bytes = PIECE, interval: float = 0.0
) -> None:
    """Send ``head`` and ``length`` bytes of body in ``piece``s; stops quietly
    when the gateway closes or resets the connection."""
    try:
        await client.send_raw(head)
        sent = 0
        while sent < length:
            if interval:
                await trio.sleep(interval)
            data = piece[: length - sent]
            await client.send_raw(data)
            sent += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def answer_during_upload(
    client: Client, head: bytes, length: int, *, piece: bytes = PIECE, interval: float = 0.0
) -> tuple[h11.Response, bytes]:
    """Upload while reading the response; the upload stops when the response is in."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(upload, client, head, length, piece=piece, interval=interval))
        response, body = await client.response()
        nursery.cancel_scope.cancel()
    return response, body


async def read_to_close(client: Client) -> bytes:
    data = b""
    while chunk := await client.stream.receive_some(65536):
        data += chunk
    return data


# -- answers before the body is read ----------------------------------------------------
async def test_413_from_the_head_with_the_body_unread_reaches_the_client() -> None:
    """An upstream that answers 413 from the head and closes with the body unread
    (its kernel resets): the client gets the whole answer, then a close."""

    async def refuse(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await respond(conn, stream, 413, b'{"error": "too_large"}')
        await stream.aclose()

    async with stack(refuse) as (gw, port, _), connect(port) as client:
        with trio.fail_after(5):
            # The whole upload first, the answer only then: what was sent after
            # the answer must not have cost it (a close with unread data resets).
            await upload(client, upload_head("/a/web/upload", UPLOAD), UPLOAD)
            response, body = await client.response()
            assert response.status_code == 413
            assert body == b'{"error": "too_large"}'
            assert await client.stream.receive_some(65536) == b""  # FIN, no reset
        assert tunnel(gw).pooled_streams == 0


async def test_broken_pipe_while_sending_keeps_the_answer() -> None:
    """The upstream reads a little, answers 401 and closes while the client still
    uploads: the broken pipe at the agent does not hide the answer."""

    async def answer_then_close(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await stream.receive_some(CHUNK)
        await respond(conn, stream, 401, b"who are you?")
        await stream.aclose()

    async with stack(answer_then_close) as (gw, port, _), connect(port) as client:
        with trio.fail_after(5):
            head = upload_head("/a/web/put", UPLOAD, method="PUT")
            response, body = await answer_during_upload(client, head, UPLOAD)
            assert response.status_code == 401
            assert body == b"who are you?"
            assert await client.stream.receive_some(65536) == b""  # FIN, no reset
        assert tunnel(gw).pooled_streams == 0


async def refuse_from_the_head(stream: trio.SocketStream) -> None:
    conn, _ = await read_head(stream)
    await respond(conn, stream, 413, b"too large")
    await stream.aclose()


async def test_an_early_upstream_answer_says_connection_close() -> None:
    """An upstream's answer before the body was read ends the client connection,
    and says so (Connection: close), like the gateway's own early answers."""
    async with stack(refuse_from_the_head) as (_, port, _), connect(port) as client:
        with trio.fail_after(5):
            await client.send_raw(upload_head("/a/web/upload", UPLOAD) + b"x" * 1000)
            response, body = await client.response()
    assert (response.status_code, body) == (413, b"too large")
    assert (b"connection", b"close") in response.headers


async def test_an_early_upstream_answer_closes_even_if_the_client_stops_sending() -> None:
    """A client that stops sending once answered early gets a FIN at once, not a
    connection held open until the gateway's idle timeout."""
    async with stack(refuse_from_the_head) as (_, port, _), connect(port) as client:
        with trio.fail_after(5):
            await client.send_raw(upload_head("/a/web/upload", UPLOAD) + b"x" * 1000)
            response, body = await client.response()
        closed = False
        with trio.move_on_after(1):
            closed = await client.stream.receive_some(65536) == b""
    assert (response.status_code, body) == (413, b"too large")
    assert closed


async def refuse_slowly_while_reading(stream: trio.abc.Stream, received: list[int]) -> None:
    """Read a request head, wait 0.2 s without reading (the upload fills the
    buffers and blocks), then answer 401 in pieces over 0.3 s while reading the
    body on, until the agent closes the connection; counts what it read."""
    conn, _ = await read_head(stream)
    await trio.sleep(0.2)
    head = h11.Response(status_code=401, headers=[(b"content-length", b"12")])
    await stream.send_all(conn.send(head) or b"")

    async def answer() -> None:
        for piece in (b"who ", b"are ", b"you?"):
            await trio.sleep(0.1)
            await stream.send_all(conn.send(h11.Data(data=piece)) or b"")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        try:
            while data := await stream.receive_some(CHUNK):
                received.append(len(data))
        except trio.BrokenResourceError:
            pass
    received.append(0)  # the end: the agent closed the connection


async def test_error_answer_stops_the_upload_even_if_the_upstream_reads_on() -> None:
    """An upstream that starts a 401 mid-upload and reads on while it ends it: the
    upload stops at the head (the upstream gets far less), the answer arrives."""
    received: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        await refuse_slowly_while_reading(stream, received)

    async with stack(handler) as (gw, port, _), connect(port) as client:
        with trio.fail_after(5):
            response, body = await answer_during_upload(
                client, upload_head("/a/web/upload", UPLOAD), UPLOAD
            )
            assert (response.status_code, body) == (401, b"who are you?")
            assert await client.stream.receive_some(65536) == b""  # FIN, no reset
            await wait_for(lambda: received[-1:] == [0])
        assert sum(received) < UPLOAD // 4
        assert tunnel(gw).pooled_streams == 0


async def test_error_answer_over_tls_arrives_whole_and_stops_the_upload(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The same from an https upstream: the agent's TLS write is blocked when the
    answer begins; the whole answer still arrives, and the upload stops."""
    server_context, client_context = tls
    received: list[int] = []

    async def handler(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, server_context, server_side=True)
        await refuse_slowly_while_reading(stream, received)

    async with (
        stack(handler, tls=client_context) as (gw, port, _),
        connect(port) as client,
    ):
        with trio.fail_after(5):
            response, body = await answer_during_upload(
                client, upload_head("/a/web/upload", UPLOAD), UPLOAD
            )
            assert (response.status_code, body) == (401, b"who are you?")
            assert await client.stream.receive_some(65536) == b""  # FIN, no reset
            await wait_for(lambda: received[-1:] == [0])
        assert sum(received) < UPLOAD // 4
        assert tunnel(gw).pooled_streams == 0


# -- uploads that go through --------------------------------------------------------------
async def test_early_2xx_head_lets_the_upload_finish() -> None:
    """A full-duplex upstream starts a 200 at once and ends it once it has read the
    whole body: the body goes through in full, twice, on one upstream connection."""
    connections = 0

    async def duplex(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        while (request := await next_request(stream)) is not None:
            conn, _ = request
            head = h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])
            await stream.send_all(conn.send(head) or b"")
            length = await read_body(conn, stream)
            data = conn.send(h11.Data(data=str(length).encode())) or b""
            await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))

    size = 4 * 1024 * 1024
    async with stack(duplex) as (gw, port, _), connect(port) as client:
        for _ in range(2):
            with trio.fail_after(5):
                response, body = await answer_during_upload(
                    client, upload_head("/a/web/duplex", size), size
                )
            assert (response.status_code, body) == (200, str(size).encode())
        assert tunnel(gw).pooled_streams == 1
    assert connections == 1


async def test_slow_upload_is_not_a_response_timeout() -> None:
    """The upstream timeout (0.5 s) counts from the end of the upload: a body
    trickling in over 1.5 s is answered 200."""

    async def echo_length(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        length = await read_body(conn, stream)
        await respond(conn, stream, 200, str(length).encode())

    piece = b"y" * 1000
    length = 15 * len(piece)
    async with stack(echo_length, timeout=0.5) as (_, port, _), connect(port) as client:
        with trio.fail_after(5):
            t0 = trio.current_time()
            response, body = await answer_during_upload(
                client, upload_head("/a/web/slow", length), length, piece=piece, interval=0.1
            )
            assert trio.current_time() - t0 >= 1.5
        assert (response.status_code, body) == (200, str(length).encode())


async def test_normal_uploads_reuse_one_upstream_connection() -> None:
    """Five sequential POSTs on one client connection reach the upstream over one
    upstream connection, and the tunnel stream goes back to the pool."""
    connections = 0

    async def echo_length(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        while (request := await next_request(stream)) is not None:
            conn, _ = request
            length = await read_body(conn, stream)
            await respond(conn, stream, 200, str(length).encode())

    async with stack(echo_length) as (gw, port, _), connect(port) as client:
        for i in range(5):
            size = 100_000 + i
            with trio.fail_after(5):
                response, body = await answer_during_upload(
                    client, upload_head(f"/a/web/n{i}", size), size
                )
            assert (response.status_code, body) == (200, str(size).encode())
        assert tunnel(gw).pooled_streams == 1
    assert connections == 1


# -- upstream faults ------------------------------------------------------------------------
async def test_no_answer_after_the_upload_is_a_504() -> None:
    """An upstream silent after the upload gets the agent's timeout (0.2 s) at the
    gateway: 504 upstream_timeout; the next request, on a new connection, works."""

    async def silent_then_ok(stream: trio.SocketStream) -> None:
        while (request := await next_request(stream)) is not None:
            conn, head = request
            await read_body(conn, stream)
            if head.target == b"/silent":
                await trio.sleep_forever()
            await respond(conn, stream, 200, b"ok")

    async with stack(silent_then_ok, timeout=0.2) as (_, port, _):
        async with connect(port) as client:
            with trio.fail_after(5):
                t0 = trio.current_time()
                await client.send_raw(upload_head("/a/web/silent", 5) + b"hello")
                response, body = await client.response()
                assert trio.current_time() - t0 >= 0.2
        assert response.status_code == 504
        assert json.loads(body) == {
            "error": "upstream_timeout",
            "agent": "web",
            "detail": "no response within 0.2 s",
        }
        async with connect(port) as client:
            with trio.fail_after(5):
                await client.send_raw(get("/a/web/ok"))
                response, body = await client.response()
            assert (response.status_code, body) == (200, b"ok")


async def test_a_broken_upstream_answer_is_a_502_naming_no_address() -> None:
    """An upstream answering non-HTTP then closing: 502 upstream_unreachable,
    whose body names no address or port of the upstream."""

    async def garbage(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"this is not HTTP\r\n\r\n")
        await stream.aclose()

    async with stack(garbage) as (_, port, up_port), connect(port) as client:
        with trio.fail_after(5):
            await client.send_raw(get("/a/web/x"))
            response, body = await client.response()
    assert response.status_code == 502
    payload = json.loads(body)
    assert payload.keys() == {"error", "agent", "detail"}
    assert (payload["error"], payload["agent"]) == ("upstream_unreachable", "web")
    assert isinstance(payload["detail"], str)
    assert payload["detail"]
    assert b"127.0.0.1" not in body
    assert str(up_port).encode() not in body


async def test_a_response_cut_short_aborts_the_client_connection() -> None:
    """Content-Length 1000, 10 bytes, close: the client never sees a complete
    message; the next request, on a new connection, works."""

    async def cut_short_then_ok(stream: trio.SocketStream) -> None:
        while (request := await next_request(stream)) is not None:
            conn, head = request
            if head.target == b"/cut":
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"z" * 10
                )
                await stream.aclose()
                return
            await respond(conn, stream, 200, b"ok")

    async with stack(cut_short_then_ok) as (_, port, _):
        async with connect(port) as client:
            events: list[h11.Event] = []
            with trio.fail_after(5):
                await client.send_raw(get("/a/web/cut"))
                with pytest.raises((h11.RemoteProtocolError, trio.BrokenResourceError)):
                    while True:
                        events.append(await client.next_event())
        assert isinstance(events[0], h11.Response)
        assert events[0].status_code == 200
        assert not any(isinstance(e, h11.EndOfMessage) for e in events)
        assert sum(len(e.data) for e in events if isinstance(e, h11.Data)) <= 10
        async with connect(port) as client:
            with trio.fail_after(5):
                await client.send_raw(get("/a/web/ok"))
                response, body = await client.response()
            assert (response.status_code, body) == (200, b"ok")


# -- framing and keep-alive ---------------------------------------------------------------
CHUNKED_ANSWER = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
)
EOF_ANSWER = b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the close"


async def chunked_or_eof(stream: trio.SocketStream) -> None:
    """``/chunked``: a chunked answer (connection kept); ``/eof``: an HTTP/1.0
    answer with no length, ended by closing the connection."""
    while (request := await next_request(stream)) is not None:
        _, head = request
        if head.target == b"/eof":
            await stream.send_all(EOF_ANSWER)
            await stream.aclose()
            return
        assert head.target == b"/chunked", head.target
        await stream.send_all(CHUNKED_ANSWER)


async def test_chunked_and_close_delimited_answers_reach_an_http11_client_chunked() -> None:
    """A chunked and a close-delimited upstream answer both reach an HTTP/1.1
    client complete, chunked, on one kept-alive client connection."""
    expected = {"/chunked": b"hello world", "/eof": b"until the close"}
    async with stack(chunked_or_eof) as (_, port, _), connect(port) as client:
        for path in ("/chunked", "/eof", "/chunked"):
            with trio.fail_after(5):
                await client.send_raw(get(f"/a/web{path}"))
                response, body = await client.response()
            assert (response.status_code, body) == (200, expected[path])
            assert (b"transfer-encoding", b"chunked") in response.headers
            assert all(name != b"content-length" for name, _ in response.headers)


@pytest.mark.parametrize(
    ("path", "expected"), [("/chunked", b"hello world"), ("/eof", b"until the close")]
)
async def test_http10_client_gets_upstream_answers_close_delimited(
    path: str, expected: bytes
) -> None:
    """An HTTP/1.0 client gets a chunked or close-delimited upstream answer with
    no chunked framing, ended by the close."""
    async with stack(chunked_or_eof) as (_, port, _), connect(port) as client:
        with trio.fail_after(5):
            await client.send_raw(f"GET /a/web{path} HTTP/1.0\r\n\r\n".encode())
            data = await read_to_close(client)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body == expected


async def test_head_204_and_304_keep_both_connections_usable() -> None:
    """A HEAD, a 204 and a 304 (no bodies, one with a Content-Length) on one
    kept-alive upstream connection: a following GET still gets its body."""
    connections = 0
    answers = {
        b"/head": b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n",
        b"/204": b"HTTP/1.1 204 No Content\r\n\r\n",
        b"/304": b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\n\r\n',
        b"/body": b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world",
    }

    async def bodiless(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        while (request := await next_request(stream)) is not None:
            _, head = request
            await stream.send_all(answers[head.target])

    async with stack(bodiless) as (gw, port, _), connect(port) as client:
        with trio.fail_after(5):
            await client.send_raw(b"HEAD /a/web/head HTTP/1.1\r\nHost: x\r\n\r\n")
            response, body = await client.response("HEAD")
            assert (response.status_code, body) == (200, b"")
            assert (b"content-length", b"5000") in response.headers
            for status in (204, 304):
                await client.send_raw(get(f"/a/web/{status}"))
                response, body = await client.response()
                assert (response.status_code, body) == (status, b"")
            await client.send_raw(get("/a/web/body"))
            response, body = await client.response()
            assert (response.status_code, body) == (200, b"hello world")
        assert tunnel(gw).pooled_streams == 1
    assert connections == 1
