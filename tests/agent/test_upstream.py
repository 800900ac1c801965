"""HttpUpstream and AsgiUpstream serving request streams of in-memory tunnels."""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from typing import Any

import pytest
import trio

from revconn import StreamError
from revconn._agent.upstream import AsgiUpstream, HttpUpstream
from revconn._codes import H2_NO_ERROR
from revconn._runtime.tunnel import Tunnel

from .._memory import read_all, tunnels
from .._procs import free_port
from .test_pool import read_body, read_head, respond, serving

CHUNK = 64 * 1024


def request(
    method: bytes, path: bytes = b"/", *extra: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method),
        (b":scheme", b"http"),
        (b":authority", b"x"),
        (b":path", path),
        *extra,
    ]


async def get(gw: Tunnel) -> tuple[int, bytes]:
    stream = gw.open_request(request(b"GET"), end_stream=True)
    await gw.flush()
    with trio.fail_after(5):
        response = await stream.receive_response()
        body = await read_all(stream)
    stream.close()
    return response.status, body


async def upload_answered_early(gw: Tunnel, size: int) -> tuple[int, bytes, list[int | None]]:
    """POST ``size`` bytes; returns the status, the body, and the error code of
    the reset that stopped the upload (empty if it went through)."""
    headers = request(b"POST", b"/", (b"content-length", str(size).encode()))
    stream = gw.open_request(headers, end_stream=False)
    stopped: list[int | None] = []

    async def upload() -> None:
        try:
            for _ in range(size // CHUNK):
                await stream.send_body(b"x" * CHUNK)
            await stream.end()
        except StreamError as exc:
            stopped.append(exc.error_code)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            response = await stream.receive_response()
            body = await read_all(stream)
    stream.close()
    return response.status, body, stopped


# -- an answer before the upload is over ----------------------------------------------------
async def test_early_answer_reaches_the_gateway_and_stops_its_upload() -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await respond(conn, stream, 413, b'{"error": "too_large"}')
        await stream.aclose()  # with the body unread: a reset

    async with serving(refuse) as port:
        upstream = HttpUpstream(f"http://127.0.0.1:{port}", agent="web", timeout=5)
        async with tunnels(upstream.handle) as gw:
            status, body, stopped = await upload_answered_early(gw, 32 << 20)
        await upstream.aclose()
    assert (status, body) == (413, b'{"error": "too_large"}')
    assert stopped == [H2_NO_ERROR]  # RFC 9113 8.1: "stop sending", not an error


async def test_asgi_app_answering_without_reading_stops_the_upload() -> None:
    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"9")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b"who are u"})

    upstream = AsgiUpstream(app, agent="web")
    async with tunnels(upstream.handle) as gw:
        status, body, stopped = await upload_answered_early(gw, 32 << 20)
    assert (status, body) == (401, b"who are u")
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

    async with tunnels(upstream.handle) as gw:
        for _ in range(3):
            status, body = await get(gw)
            assert (status, json.loads(body)) == (502, unreachable)
            assert str(port).encode() not in body
        async with serving(hello, port):
            for _ in range(3):
                assert await get(gw) == (200, b"hello")
        for _ in range(3):
            status, body = await get(gw)
            assert (status, json.loads(body)) == (502, unreachable)
    await upstream.aclose()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "revconn.upstream"]
    assert lines == [
        ("WARNING", f"upstream {url} unreachable: connection refused"),
        ("INFO", f"upstream {url} reachable again"),
        ("WARNING", f"upstream {url} unreachable: connection refused"),
    ]


async def test_upstream_timeout_names_no_address() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await trio.sleep_forever()

    async with serving(silent) as port:
        upstream = HttpUpstream(f"http://127.0.0.1:{port}", agent="web", timeout=0.2)
        async with tunnels(upstream.handle) as gw:
            status, body = await get(gw)
        await upstream.aclose()
    assert status == 504
    assert json.loads(body) == {
        "error": "upstream_timeout",
        "agent": "web",
        "detail": "no response within 0.2 s",
    }


async def test_broken_upstream_answer_names_no_address() -> None:
    async def junk(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"this is not HTTP\r\n\r\n")
        await stream.aclose()

    async with serving(junk) as port:
        upstream = HttpUpstream(f"http://127.0.0.1:{port}", agent="web", timeout=5)
        async with tunnels(upstream.handle) as gw:
            status, body = await get(gw)
        await upstream.aclose()
    assert status == 502
    assert json.loads(body) == {
        "error": "upstream_unreachable",
        "agent": "web",
        "detail": "the agent's upstream service did not send a valid response",
    }
