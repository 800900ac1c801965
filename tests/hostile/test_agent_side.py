"""Hostile input from an agent: a scripted agent ("bad") that speaks the real
protocol (revconn.v2 WebSocket + HTTP/2, docs/protocol.md 2-7) and then
misbehaves. Each test checks that the affected public request gets a 502 (or
the session is closed with a clear close code and reason), that nothing the
bad agent sends reaches the public client as an extra header or a second
response, and that a well-behaved agent ("good") on the same gateway keeps
serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, PingFrame, SettingsFrame, WindowUpdateFrame
from trio_websocket import ConnectionClosed, WebSocketConnection

from revconn import Agent, AgentConfig, Backoff
from revconn._codes import H2_CANCEL, H2_INTERNAL_ERROR, H2_REFUSED_STREAM
from revconn._proto.session import (
    DataReceived,
    RequestReceived,
    SessionEnded,
    TunnelSession,
)

from .._gateway_helpers import SECRET, RunningGateway, raw_agent, running_gateway, wait_for
from ..upstream_app import app
from .test_public_side import exchange

pytestmark = pytest.mark.e2e


def get(name: str, path: str = "/x", *, close: bool = True) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return f"GET /a/{name}{path} HTTP/1.1\r\nHost: g\r\n".encode() + extra + b"\r\n"


@asynccontextmanager
async def stack() -> AsyncIterator[tuple[RunningGateway, int]]:
    """A gateway with the well-behaved agent "good" online; yields the data port."""
    async with running_gateway() as gw:
        agent = Agent(
            AgentConfig(gateway=gw.url, name="good", secret=SECRET, backoff=Backoff(0.1, 1)),
            app=app,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await wait_for(lambda: gw.gateway.registry.lookup("good") is not None)
            yield gw, int(gw.url.rsplit(":", 1)[1])
            agent.stop()
            nursery.cancel_scope.deadline = trio.current_time() + 2


async def assert_good_serves(port: int) -> None:
    answer = await exchange(port, get("good", "/echo/fine"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert json.loads(body)["raw_path"] == "/echo/fine"


def split(answer: bytes) -> tuple[list[bytes], bytes]:
    """(lower-cased head lines, body) of a single response."""
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.lower().split(b"\r\n"), body


def assert_json_error(answer: bytes, status: int, *errors: str) -> None:
    lines, body = split(answer)
    assert lines[0].startswith(f"http/1.1 {status} ".encode()), answer[:400]
    assert json.loads(body)["error"] in errors, body


def assert_no_injection(answer: bytes) -> None:
    """Exactly one response, no injected header lines, no stray control bytes."""
    assert answer.count(b"HTTP/1.") == 1, answer[:600]
    lines, _ = split(answer)
    names = [line.split(b":", 1)[0] for line in lines[1:]]
    assert not any(n.startswith(b"x-injected") for n in names), lines
    for line in lines:
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line, line


Reply = Callable[[int], bytes]


async def serve_streams(
    ws: WebSocketConnection,
    session: TunnelSession,
    reply: bytes | Reply,
    *,
    seen: list[int] | None = None,
) -> None:
    """Pump the bad agent: accept every stream with 200; once a request head has
    arrived on it, write ``reply`` (bytes, or a function of the stream id) as
    the stream's response bytes and end the stream."""
    buffers: dict[int, bytes] = {}
    while True:
        try:
            message = await ws.get_message()
        except ConnectionClosed:
            return
        for event in session.receive_data(message):
            if isinstance(event, RequestReceived):
                if seen is not None:
                    seen.append(event.stream_id)
                session.send_response(event.stream_id, 200, [], end_stream=False)
                buffers[event.stream_id] = b""
            elif isinstance(event, DataReceived):
                session.ack_data(event.stream_id, event.flow_length)
                sid = event.stream_id
                if sid in buffers:
                    buffers[sid] += event.data
                    if b"\r\n\r\n" in buffers[sid]:
                        del buffers[sid]
                        data = reply if isinstance(reply, bytes) else reply(sid)
                        session.send_data(sid, data, end_stream=True)
        out = session.data_to_send()
        if out:
            await ws.send_message(out)


@asynccontextmanager
async def bad_agent(gw: RunningGateway, reply: bytes | Reply) -> AsyncIterator[list[int]]:
    """Agent "bad" online and answering every request with ``reply``; yields the
    stream ids the gateway opened on it."""
    seen: list[int] = []
    async with raw_agent(gw, "bad") as (ws, session), trio.open_nursery() as nursery:
        await wait_for(lambda: gw.gateway.registry.lookup("bad") is not None)
        nursery.start_soon(partial(serve_streams, ws, session, reply, seen=seen))
        yield seen
        nursery.cancel_scope.cancel()


async def closed_by_gateway(ws: WebSocketConnection, session: TunnelSession) -> tuple[int, str]:
    """Read until the gateway closes the WebSocket; the close code and the
    reason (the WebSocket close reason, else the GOAWAY's)."""
    goaway = ""
    with trio.fail_after(5):
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code, exc.reason.reason or goaway
            try:
                for event in session.receive_data(message):
                    if isinstance(event, SessionEnded):
                        goaway = event.reason
            except Exception:  # (our own session may object to what follows)
                pass


# -- 1. garbage instead of HTTP/2 frames -------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        # (a frame header announcing 8 MiB: more than the 128 KiB the gateway
        # allows, refused as soon as the header arrives, 4.2)
        b"\x7fgarbage that is no HTTP/2 frame at all" * 4,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # another protocol
        # a well-formed frame header, but DATA on stream 0 (a connection error)
        b"\x00\x00\x05\x00\x00\x00\x00\x00\x00hello",
    ],
    ids=["garbage", "http1", "data-on-stream-0"],
)
async def test_garbage_closes_the_session_1002_and_nobody_else_notices(garbage: bytes) -> None:
    with trio.fail_after(15):
        async with stack() as (gw, port), raw_agent(gw, "bad") as (ws, session):
            await wait_for(lambda: gw.gateway.registry.lookup("bad") is not None)
            await ws.send_message(garbage)
            code, reason = await closed_by_gateway(ws, session)
            assert code == 1002, (code, reason)
            assert reason, "the close carries no reason"
            await wait_for(lambda: gw.gateway.registry.lookup("bad") is None)
            assert_json_error(await exchange(port, get("bad")), 503, "agent_offline")
            await assert_good_serves(port)


# -- 2. two response heads on one stream --------------------------------------

TWO_HEADS = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Injected: yes\r\n\r\nevil!"
)


async def test_two_response_heads_give_one_response_and_the_stream_is_not_reused() -> None:
    with trio.fail_after(15):
        async with stack() as (gw, port), bad_agent(gw, TWO_HEADS) as seen:
            # Two pipelined requests on one client connection: each gets the
            # bad agent's first response only, never the stray second one.
            answer = await exchange(port, get("bad", "/1", close=False) + get("bad", "/2"))
            assert answer.count(b"HTTP/1.1 ") == 2, answer
            assert b"evil" not in answer and b"x-injected" not in answer.lower(), answer
            first, _, rest = answer.partition(b"\r\n\r\nok")
            assert first.startswith(b"HTTP/1.1 200 ")
            assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"\r\n\r\nok"), rest
            # The first stream was not lent again for the second request.
            assert len(seen) == 2 and seen[0] != seen[1], seen
            await assert_good_serves(port)


# -- 3. header injection, hop-by-hop headers, contradictory framing ----------

INJECTIONS = {
    "bare-cr": b"HTTP/1.1 200 OK\r\nX-A: a\rX-Injected: 1\r\nContent-Length: 2\r\n\r\nok",
    "nul": b"HTTP/1.1 200 OK\r\nX-A: a\x00X-Injected: 1\r\nContent-Length: 2\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n X-Injected: 1\r\nContent-Length: 2\r\n\r\nok",
    "bad-name": b"HTTP/1.1 200 OK\r\nX Injected: 1\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("reply", list(INJECTIONS.values()), ids=list(INJECTIONS))
async def test_header_injection_never_reaches_the_client(reply: bytes) -> None:
    with trio.fail_after(15):
        async with stack() as (gw, port), bad_agent(gw, reply):
            answer = await exchange(port, get("bad"))
            assert_no_injection(answer)
            lines, body = split(answer)
            if lines[0].startswith(b"http/1.1 502 "):
                assert json.loads(body)["error"] == "upstream_unreachable"
            else:
                assert lines[0].startswith(b"http/1.1 200 "), answer
                assert body == b"ok"
            await assert_good_serves(port)


HOP_BY_HOP = (
    b"HTTP/1.1 200 OK\r\n"
    b"Connection: keep-alive, X-Secret\r\n"
    b"X-Secret: s\r\n"
    b"Keep-Alive: timeout=999\r\n"
    b"Proxy-Authenticate: Basic\r\n"
    b"Trailer: X-T\r\n"
    b"Upgrade: h2c\r\n"
    b"X-Kept: yes\r\n"
    b"Content-Length: 2\r\n\r\nok"
)


async def test_hop_by_hop_response_headers_are_dropped() -> None:
    with trio.fail_after(15):
        async with stack() as (gw, port), bad_agent(gw, HOP_BY_HOP):
            answer = await exchange(port, get("bad"))
            assert_no_injection(answer)
            lines, body = split(answer)
            assert lines[0].startswith(b"http/1.1 200 "), answer
            names = [line.split(b":", 1)[0] for line in lines[1:]]
            for name in (b"x-secret", b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
                assert name not in names, lines
            assert b"x-kept" in names
            assert body == b"ok"
            await assert_good_serves(port)


async def test_transfer_encoding_with_content_length_is_a_502() -> None:
    # RFC 9112 6.3: a proxy must not forward such a message as is; the gateway
    # answers 502 before any byte (or relays one correctly framed response).
    reply = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    )
    with trio.fail_after(15):
        async with stack() as (gw, port), bad_agent(gw, reply):
            answer = await exchange(port, get("bad"))
            assert_no_injection(answer)
            assert_json_error(answer, 502, "upstream_unreachable")
            await assert_good_serves(port)


async def test_body_shorter_than_its_content_length_aborts_the_connection() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    with trio.fail_after(15):
        async with stack() as (gw, port), bad_agent(gw, reply):
            answer = await exchange(port, get("bad"))
            assert_no_injection(answer)
            lines, body = split(answer)
            if lines[0].startswith(b"http/1.1 502 "):
                pass  # (refused before any byte: also fine)
            else:
                assert lines[0].startswith(b"http/1.1 200 "), answer
                assert b"content-length: 10" in lines
                assert body == b"abc"  # cut short: the connection was closed
            await assert_good_serves(port)


# -- 4. invalid status codes --------------------------------------------------

BAD_STATUS = {
    "999": b"HTTP/1.1 999 X\r\nContent-Length: 2\r\n\r\nok",
    "abc": b"HTTP/1.1 abc\r\nContent-Length: 2\r\n\r\nok",
    "two-digit": b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n",
}


@pytest.mark.parametrize(
    "reply",
    list(BAD_STATUS.values()),
    ids=list(BAD_STATUS),
)
async def test_invalid_status_is_a_502(reply: bytes) -> None:
    with trio.fail_after(15):
        async with stack() as (gw, port), bad_agent(gw, reply):
            answer = await exchange(port, get("bad"))
            assert_no_injection(answer)
            assert_json_error(answer, 502, "upstream_unreachable")
            await assert_good_serves(port)


# -- 5. rapid reset ------------------------------------------------------------


async def reset_everything(
    ws: WebSocketConnection, session: TunnelSession, count: list[int]
) -> None:
    codes = [H2_INTERNAL_ERROR, H2_REFUSED_STREAM, H2_CANCEL]
    while True:
        try:
            message = await ws.get_message()
        except ConnectionClosed:
            return
        for event in session.receive_data(message):
            if isinstance(event, RequestReceived):
                session.reset_stream(event.stream_id, codes[count[0] % len(codes)])
                count[0] += 1
            elif isinstance(event, DataReceived):
                session.ack_data(event.stream_id, event.flow_length)
        out = session.data_to_send()
        if out:
            await ws.send_message(out)


async def test_rapid_reset_each_request_gets_a_json_error_and_nobody_else_notices() -> None:
    answers: list[bytes] = []
    count = [0]

    async def one(port: int) -> None:
        answers.append(await exchange(port, get("bad")))

    with trio.fail_after(15):
        async with stack() as (gw, port), raw_agent(gw, "bad") as (ws, session):
            await wait_for(lambda: gw.gateway.registry.lookup("bad") is not None)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reset_everything, ws, session, count)
                for _ in range(4):  # waves of concurrent requests
                    async with trio.open_nursery() as wave:
                        for _ in range(25):
                            wave.start_soon(one, port)
                    await assert_good_serves(port)
                nursery.cancel_scope.cancel()
            assert len(answers) == 100
            for answer in answers:
                assert_no_injection(answer)
                lines, body = split(answer)
                assert lines[0][:12] in (b"http/1.1 502", b"http/1.1 503"), answer
                assert json.loads(body)["error"] in ("agent_reset", "agent_busy"), body
            assert count[0] >= 100


# -- 6. PING and SETTINGS floods --------------------------------------------


def ping_flood(n: int) -> list[bytes]:
    frame = PingFrame(0, opaque_data=b"12345678").serialize()
    per = 50_000
    return [frame * min(per, n - i) for i in range(0, n, per)]


def settings_flood(n: int) -> list[bytes]:
    frame = SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 100}).serialize()
    per = 50_000
    return [frame * min(per, n - i) for i in range(0, n, per)]


@pytest.mark.parametrize("flood", [ping_flood, settings_flood], ids=["ping", "settings"])
async def test_control_frame_flood_harms_nobody_else(flood: Callable[[int], list[bytes]]) -> None:
    with trio.fail_after(15):
        async with stack() as (gw, port), raw_agent(gw, "bad") as (ws, session):
            await wait_for(lambda: gw.gateway.registry.lookup("bad") is not None)
            # The bad agent floods and reads nothing back meanwhile.
            for message in flood(10_000):
                await ws.send_message(message)
            await assert_good_serves(port)
            # Then the gateway has either answered or closed the session.
            with trio.move_on_after(3):
                try:
                    while True:
                        session.receive_data(await ws.get_message())
                except ConnectionClosed as exc:
                    assert exc.reason.code in (1002, 1008, 1011), exc.reason
                    assert exc.reason.reason
                except Exception:
                    pass  # (our session's own view of a GOAWAY-ended stream)
            await assert_good_serves(port)


# -- 7. frames on streams that were never opened ------------------------------

NEVER_OPENED = {
    "data-99": DataFrame(99, data=b"HTTP/1.1 200 OK\r\nX-Injected: 1\r\n\r\n").serialize(),
    "data-even-2": DataFrame(2, data=b"hello").serialize(),
    "headers-97": HeadersFrame(97, data=b"\x88", flags=["END_HEADERS"]).serialize(),  # :status 200
}


@pytest.mark.parametrize("frame", list(NEVER_OPENED.values()), ids=list(NEVER_OPENED))
async def test_frame_on_a_never_opened_stream(frame: bytes) -> None:
    with trio.fail_after(15):
        async with stack() as (gw, port), raw_agent(gw, "bad") as (ws, session):
            await wait_for(lambda: gw.gateway.registry.lookup("bad") is not None)
            await ws.send_message(frame)
            # A protocol error (RFC 9113 5.1: a frame on an idle stream): closed
            # with 1002 and a reason.
            code, reason = await closed_by_gateway(ws, session)
            assert code == 1002, (code, reason)
            assert reason
            await wait_for(lambda: gw.gateway.registry.lookup("bad") is None)
            await assert_good_serves(port)


# -- 8. flow-control overflow and a HPACK bomb -------------------------------------


async def test_a_window_update_overflow_closes_the_session_1002() -> None:
    """RFC 9113 6.9.1: a window above 2^31-1 is a FLOW_CONTROL_ERROR."""
    with trio.fail_after(15):
        async with stack() as (gw, port), raw_agent(gw, "bad") as (ws, session):
            await wait_for(lambda: gw.gateway.registry.lookup("bad") is not None)
            await ws.send_message(WindowUpdateFrame(0, window_increment=2**31 - 1).serialize())
            code, reason = await closed_by_gateway(ws, session)
            assert (code, reason) == (1002, "protocol error")
            await wait_for(lambda: gw.gateway.registry.lookup("bad") is None)
            await assert_good_serves(port)


def hpack_bomb(stream_id: int, copies: int) -> bytes:
    """A response HEADERS block of a few hundred bytes that decodes to
    ``copies`` x 4 KiB: one 4000-byte field added to the dynamic table, then
    referenced ``copies`` times by its one-byte index (62, the first dynamic)."""
    encoder = Encoder()
    block = encoder.encode([(b":status", b"200"), (b"x-bomb", b"v" * 4000)], huffman=False)
    block += bytes([0x80 | 62]) * copies
    return HeadersFrame(stream_id, data=block, flags=["END_HEADERS"]).serialize()


async def test_a_hpack_bomb_closes_the_session_and_its_request_gets_a_502() -> None:
    with trio.fail_after(15):
        async with stack() as (gw, port), raw_agent(gw, "bad") as (ws, session):
            await wait_for(lambda: gw.gateway.registry.lookup("bad") is not None)
            async with trio.open_nursery() as nursery:
                answers: list[bytes] = []

                async def request() -> None:
                    answers.append(await exchange(port, get("bad")))

                nursery.start_soon(request)
                stream_id = None
                while stream_id is None:
                    for event in session.receive_data(await ws.get_message()):
                        if isinstance(event, RequestReceived):
                            stream_id = event.stream_id
                # 100 x 4 KiB decoded: beyond the 64 KiB SETTINGS_MAX_HEADER_LIST_SIZE.
                await ws.send_message(hpack_bomb(stream_id, 100))
                code, reason = await closed_by_gateway(ws, session)
            assert (code, reason) == (1002, "protocol error")
            (answer,) = answers
            # The session died before the stream was accepted: the agent is
            # gone, and the request says so (nothing of the bomb reaches it).
            assert_json_error(answer, 503, "agent_offline")
            assert_no_injection(answer)
            await assert_good_serves(port)
