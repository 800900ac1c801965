"""Edge cases of the gateway's HTTP/1.1 exchange, end to end: malformed and
oversized requests on kept-alive connections, Host checks, header hygiene,
and upstreams that misbehave (resets, unrequested 101s, miscounted bodies,
stalled uploads, early answers larger than the socket buffers).

In-process gateway + agent (``--upstream``) + hand-written upstream; clients
are raw sockets parsed with h11.
"""

from __future__ import annotations

import json
import socket
import struct

import h11
import pytest
import trio

from .._raw_upstream import read_head, respond
from ..test_upstream_exchange import (
    answer_during_upload,
    next_request,
    stack,
    tunnel,
    upload,
    upload_head,
)
from .test_exchange import Client, connect, get

STEP = 5  # seconds allowed for each step


def error_of(body: bytes) -> str:
    return str(json.loads(body)["error"])


async def ok_handler(stream: trio.SocketStream) -> None:
    """Answers every request on the connection 200 with its target."""
    while (request := await next_request(stream)) is not None:
        conn, head = request
        await respond(conn, stream, 200, head.target)


async def events_until_close(client: Client) -> tuple[list[h11.Event], bytes]:
    """Every h11 event (and the raw bytes) until the connection ends; a
    protocol error at the end (a message cut short) ends the list."""
    events: list[h11.Event] = []
    raw = b""
    while True:
        try:
            data = await client.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        raw += data
        client.h11.receive_data(data)
        try:
            while (event := client.h11.next_event()) is not h11.NEED_DATA:
                events.append(event)  # type: ignore[arg-type]
                if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return events, raw
        except h11.RemoteProtocolError:
            return events, raw
        if not data:
            return events, raw


# -- malformed and oversized requests ----------------------------------------------------
async def test_malformed_request_pipelined_after_a_good_one() -> None:
    """A good request and garbage in one write: the good one is answered, then
    the garbage gets a JSON 400, then the connection closes."""
    async with stack(ok_handler) as (_, port, _), connect(port) as client:
        with trio.fail_after(STEP):
            await client.send_raw(b"GET /a/web/x HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
            response, body = await client.response()
        assert (response.status_code, body) == (200, b"/x")
        with trio.fail_after(STEP):
            response, body = await client.response()
        assert response.status_code == 400
        assert error_of(body) == "bad_request"
        assert (b"connection", b"close") in response.headers
        assert await client.closed_by_peer()


async def test_oversized_second_head_on_a_kept_alive_connection_is_a_431() -> None:
    async with stack(ok_handler) as (_, port, _), connect(port) as client:
        with trio.fail_after(STEP):
            await client.send_raw(get("/a/web/first"))
            response, body = await client.response()
        assert (response.status_code, body) == (200, b"/first")
        with trio.fail_after(STEP):
            await client.send_raw(get("/a/web/second", "X-Big: " + "a" * 70 * 1024))
            response, body = await client.response()
        assert response.status_code == 431
        assert error_of(body) == "request_header_too_large"
        assert await client.closed_by_peer()


async def test_missing_or_duplicate_host_is_a_400_and_the_agent_is_unaffected() -> None:
    connections = 0

    async def counting(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await ok_handler(stream)

    bad = [
        b"GET /a/web/nohost HTTP/1.1\r\n\r\n",
        b"GET /a/web/twohosts HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
    ]
    async with stack(counting) as (gw, port, _):
        for raw in bad:
            async with connect(port) as client:
                with trio.fail_after(STEP):
                    await client.send_raw(raw)
                    response, body = await client.response()
                assert response.status_code == 400, raw
                assert error_of(body) == "bad_request"
                assert await client.closed_by_peer()
        assert connections == 0  # nothing reached the upstream
        async with connect(port) as client:
            with trio.fail_after(STEP):
                await client.send_raw(get("/a/web/fine"))
                response, body = await client.response()
        assert (response.status_code, body) == (200, b"/fine")
        assert connections == 1
        assert tunnel(gw).pooled_streams == 1


async def test_underscore_header_never_reaches_the_upstream() -> None:
    seen: list[h11.Request] = []

    async def recording(stream: trio.SocketStream) -> None:
        conn, head = await read_head(stream)
        seen.append(head)
        await respond(conn, stream, 200, b"ok")

    async with stack(recording) as (_, port, _), connect(port) as client:
        with trio.fail_after(STEP):
            await client.send_raw(
                get("/a/web/h", "x_forwarded_for: 6.6.6.6", "X-Custom: kept", "Accept: */*")
            )
            response, body = await client.response()
    assert (response.status_code, body) == (200, b"ok")
    [head] = seen
    headers = [(bytes(n), bytes(v)) for n, v in head.headers]
    assert all(b"_" not in name for name, _ in headers), headers
    assert all(b"6.6.6.6" not in value for _, value in headers), headers
    assert (b"x-custom", b"kept") in headers
    assert (b"accept", b"*/*") in headers


# -- upstreams that misbehave ------------------------------------------------------------
async def test_close_delimited_answer_ended_by_a_reset_never_looks_complete() -> None:
    """No length, some body, then RST: the client (chunked) gets no final chunk."""

    async def reset_after_partial(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\npartial")
        await trio.sleep(0.1)  # (let the agent read it before the reset)
        linger = struct.pack("ii", 1, 0)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        await stream.aclose()

    async with stack(reset_after_partial) as (_, port, _), connect(port) as client:
        with trio.fail_after(STEP):
            await client.send_raw(get("/a/web/partial"))
            events, raw = await events_until_close(client)
    assert isinstance(events[0], h11.Response)
    assert events[0].status_code == 200
    assert not any(isinstance(e, h11.EndOfMessage) for e in events), events
    assert b"0\r\n\r\n" not in raw.partition(b"\r\n\r\n")[2]


async def test_unrequested_101_from_the_upstream_is_a_502() -> None:
    async def switch(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        )
        await trio.sleep_forever()

    async with stack(switch) as (_, port, _), connect(port) as client:
        with trio.fail_after(STEP):
            await client.send_raw(get("/a/web/switch"))
            response, body = await client.response()
    assert response.status_code == 502
    payload = json.loads(body)
    assert (payload["error"], payload["agent"]) == ("upstream_unreachable", "web")


async def test_upstream_that_stops_reading_the_body_gets_a_504() -> None:
    """The upstream reads the head and goes silent without reading the body:
    the blocked upload is a 504 after about the upstream timeout, not a hang."""

    async def stall(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await trio.sleep_forever()

    size = 32 * 1024 * 1024
    async with stack(stall, timeout=0.5) as (_, port, _), connect(port) as client:
        t0 = trio.current_time()
        with trio.fail_after(STEP):
            response, body = await answer_during_upload(
                client, upload_head("/a/web/stall", size), size
            )
        elapsed = trio.current_time() - t0
    assert response.status_code == 504
    payload = json.loads(body)
    assert (payload["error"], payload["agent"]) == ("upstream_timeout", "web")
    assert "request body" in payload["detail"]
    assert elapsed < 4, elapsed


@pytest.mark.parametrize("late", [0.0, 0.1], ids=["one-write", "extra-bytes-later"])
async def test_body_longer_than_its_content_length_is_cut_and_never_reused(late: float) -> None:
    """``Content-Length: 5`` then ``hello world`` (the extra bytes in the same
    write, or ``late`` s after): the client gets ``hello``; its next request
    goes over a fresh upstream connection and never sees `` world``."""
    connections = 0

    async def overlong(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        while (request := await next_request(stream)) is not None:
            conn, head = request
            if head.target == b"/first":
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello world"
                if late:
                    await stream.send_all(answer[:-6])
                    await trio.sleep(late)
                    answer = answer[-6:]
                await stream.send_all(answer)
            else:
                await respond(conn, stream, 200, b"second answer")

    async with stack(overlong) as (_, port, _), connect(port) as client:
        with trio.fail_after(STEP):
            await client.send_raw(get("/a/web/first"))
            response, body = await client.response()
        assert (response.status_code, body) == (200, b"hello")
        await trio.sleep(3 * late)  # (the extra bytes are in before the next request)
        with trio.fail_after(STEP):
            await client.send_raw(get("/a/web/second"))
            response, body = await client.response()
        assert (response.status_code, body) == (200, b"second answer")
    assert connections == 2


async def test_large_early_answer_reaches_a_client_that_uploads_all_first() -> None:
    """The upstream answers 413 with 2 MiB right after the head; the client
    sends all 8 MiB before it reads: no deadlock, the whole answer arrives."""
    answer = bytes(range(256)) * (2 * 1024 * 1024 // 256)

    async def refuse_big(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await respond(conn, stream, 413, answer)
        # A graceful close: FIN, then drop what the agent still sends (a close
        # with unread data would reset, and could destroy the unsent answer).
        await stream.send_eof()
        with trio.move_on_after(STEP):
            while await stream.receive_some(65536):
                pass
        await stream.aclose()

    size = 8 * 1024 * 1024
    async with stack(refuse_big) as (_, port, _), connect(port) as client:
        with trio.fail_after(STEP):
            await upload(client, upload_head("/a/web/upload", size), size)
        with trio.fail_after(STEP):
            response, body = await client.response()
    assert response.status_code == 413
    assert len(body) == len(answer)
    assert body == answer
