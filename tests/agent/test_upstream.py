"""HttpUpstream (the byte pump) and AsgiUpstream serving the CONNECT streams of
in-memory tunnels: the gateway side here is the stream pool, driven by hand
with raw HTTP/1.1 bytes."""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from typing import Any

import pytest
import trio

from revconn import ConfigError, StreamError
from revconn._agent.upstream import AsgiUpstream, HttpUpstream
from revconn._codes import H2_CONNECT_ERROR, H2_NO_ERROR
from revconn._proto.connect import UpstreamInfo
from revconn._runtime.streampool import StreamRefused
from revconn._runtime.streams import TunnelStream
from revconn._runtime.tunnel import Tunnel

from .._memory import read_all, tunnels
from .._procs import free_port
from .._raw_upstream import read_body, read_head, respond, serving

CHUNK = 64 * 1024
GET = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


async def exchange(gw: Tunnel, request: bytes) -> bytes:
    """Send ``request`` on a new stream and read until the agent ends it."""
    stream, fresh = await gw.acquire()
    assert fresh
    with trio.fail_after(5):
        await stream.send_body(request)
        return await read_all(stream)


async def upload_answered_early(gw: Tunnel, size: int) -> tuple[bytes, list[int | None]]:
    """POST ``size`` bytes; returns what came back, and the error code of the
    reset that stopped the upload (empty if it went through)."""
    stream, _ = await gw.acquire()
    head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % size
    stopped: list[int | None] = []

    async def upload() -> None:
        try:
            await stream.send_body(head)
            for _ in range(size // CHUNK):
                await stream.send_body(b"x" * CHUNK)
        except StreamError as exc:
            stopped.append(exc.error_code)

    answer = b""
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            try:
                while (chunk := await stream.read()) is not None:
                    answer += chunk
            except StreamError as exc:
                # The upstream reset its connection after answering (it closed
                # with the body unread): CONNECT_ERROR, after every byte it sent.
                assert exc.error_code == H2_CONNECT_ERROR
    return answer, stopped


# -- the byte pump ------------------------------------------------------------------------
async def test_the_pump_relays_bytes_unchanged_both_ways_and_says_how_to_address_the_upstream() -> (
    None
):
    """The agent parses nothing: what the gateway writes reaches the upstream
    byte for byte (even if it is not HTTP), and the other way round."""
    seen: list[bytes] = []

    async def echo(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(CHUNK)
        seen.append(data)
        await stream.send_all(b"upstream says: " + data)
        await stream.aclose()

    async with serving(echo) as port:
        upstream = HttpUpstream(f"http://127.0.0.1:{port}/base/", agent="web", timeout=7)
        async with tunnels(upstream.handle) as gw:
            stream, _ = await gw.acquire()
            assert stream.upstream == UpstreamInfo(f"127.0.0.1:{port}".encode(), b"/base", 7.0)
            with trio.fail_after(5):
                await stream.send_body(b"\x00not http\r\n")
                answer = await read_all(stream)
    assert seen == [b"\x00not http\r\n"]
    assert answer == b"upstream says: \x00not http\r\n"


async def test_a_stream_is_one_kept_alive_upstream_connection() -> None:
    connections = 0

    async def keep_alive(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        for _ in range(3):
            conn, _ = await read_head(stream)
            await read_body(conn, stream)
            await respond(conn, stream, 200, b"hi")
            conn.start_next_cycle()
        await trio.sleep_forever()

    async with serving(keep_alive) as port:
        upstream = HttpUpstream(f"http://127.0.0.1:{port}", agent="web", timeout=5)
        async with tunnels(upstream.handle) as gw:
            stream, _ = await gw.acquire()
            with trio.fail_after(5):
                for _ in range(3):
                    await stream.send_body(GET)
                    answer = b""
                    while not answer.endswith(b"hi"):
                        answer += await stream.read() or b""
                    assert answer.startswith(b"HTTP/1.1 200 ")
            gw.release(stream, reusable=True)
            again, fresh = await gw.acquire()
            assert again is stream and not fresh
    assert connections == 1


async def test_the_gateway_retiring_a_stream_closes_the_upstream_connection() -> None:
    closed = trio.Event()

    async def wait_close(stream: trio.SocketStream) -> None:
        assert await stream.receive_some(CHUNK) == b""
        closed.set()

    async with serving(wait_close) as port:
        upstream = HttpUpstream(f"http://127.0.0.1:{port}", agent="web", timeout=5)
        async with tunnels(upstream.handle) as gw:
            stream, _ = await gw.acquire()
            gw.release(stream, reusable=True)
            gw.drain(1001, "test")  # retires the idle streams (END_STREAM)
            await gw.flush()
            with trio.fail_after(5):
                await closed.wait()


async def test_a_stream_that_is_not_a_revconn_connect_is_refused() -> None:
    upstream = HttpUpstream(f"http://127.0.0.1:{free_port()}", agent="web", timeout=5)

    async def handle(stream: TunnelStream) -> None:
        await upstream.handle(stream)

    async with tunnels(handle) as gw:
        stream = gw.open_request(
            [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")],
            end_stream=True,
        )
        await gw.flush()
        with trio.fail_after(5):
            response = await stream.receive_response()
            body = json.loads(await read_all(stream))
    assert response.status == 400
    assert body["error"] == "bad_stream"


# -- an answer before the upload is over ----------------------------------------------------
async def test_early_answer_reaches_the_gateway_and_stops_its_upload() -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await respond(conn, stream, 413, b'{"error": "too_large"}')
        await stream.aclose()  # with the body unread: a reset

    async with serving(refuse) as port:
        upstream = HttpUpstream(f"http://127.0.0.1:{port}", agent="web", timeout=5)
        async with tunnels(upstream.handle) as gw:
            answer, stopped = await upload_answered_early(gw, 32 << 20)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert answer.endswith(b'{"error": "too_large"}')
    # RFC 9113 8.1 "stop sending" (the upstream closed), or 8.5 CONNECT_ERROR
    # (it reset): either way the upload stopped and the answer arrived whole.
    assert stopped in ([H2_NO_ERROR], [H2_CONNECT_ERROR])


async def test_asgi_app_answering_without_reading_stops_the_upload() -> None:
    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"9")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b"who are u"})

    upstream = AsgiUpstream(app, agent="web")
    async with tunnels(upstream.handle) as gw:
        answer, stopped = await upload_answered_early(gw, 32 << 20)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert answer.endswith(b"who are u")
    assert stopped == [H2_NO_ERROR]


# -- an unreachable upstream ----------------------------------------------------------------
async def test_unreachable_upstream_is_logged_once_per_change_and_not_revealed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="revconn.upstream")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    upstream = HttpUpstream(url, agent="web", timeout=5)
    unreachable = {
        "error": "upstream_unreachable",
        "agent": "web",
        "detail": "the agent could not reach its upstream service",
    }

    async def hello(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await read_body(conn, stream)
        await respond(conn, stream, 200, b"hello")
        await stream.aclose()

    async def refused(gw: Tunnel) -> None:
        with pytest.raises(StreamRefused) as info:
            await gw.acquire()
        assert (info.value.status, json.loads(info.value.body)) == (502, unreachable)
        assert str(port).encode() not in info.value.body

    async with tunnels(upstream.handle) as gw:
        for _ in range(3):
            await refused(gw)
        async with serving(hello, port):
            for _ in range(3):
                assert (await exchange(gw, GET)).endswith(b"hello")
        for _ in range(3):
            await refused(gw)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "revconn.upstream"]
    assert lines == [
        ("WARNING", f"upstream {url} unreachable: connection refused"),
        ("INFO", f"upstream {url} reachable again"),
        ("WARNING", f"upstream {url} unreachable: connection refused"),
    ]


@pytest.mark.parametrize(
    "url",
    ["http://user:hunter2@127.0.0.1:3000/", "https://tok3n@svc.internal/", "http://:hunter2@h/"],
)
def test_an_upstream_url_with_credentials_is_refused_without_echoing_them(url: str) -> None:
    """They would reach the gateway (the Host it sends) and /status; clients
    send their own Authorization."""
    with pytest.raises(ConfigError, match="must not carry credentials") as info:
        HttpUpstream(url, agent="web")
    assert "hunter2" not in str(info.value) and "tok3n" not in str(info.value)
