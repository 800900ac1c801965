"""The data plane's exchange (trio + h11) at the HTTP/1.1 byte level:
keep-alive, pipelining, 100-continue, malformed input, timeouts, dispatch.

An in-process gateway and an in-process agent serving the test upstream app;
clients are raw sockets, parsed with h11.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import pytest
import trio
from trio_websocket import ConnectionClosed

from revconn import Agent, AgentConfig, Backoff
from revconn._proto.session import RequestReceived

from .._gateway_helpers import SECRET, RunningGateway, raw_agent, running_gateway, wait_for
from ..upstream_app import app, pattern

pytestmark = pytest.mark.e2e


@asynccontextmanager
async def public_stack(**config: object) -> AsyncIterator[tuple[RunningGateway, int]]:
    """A gateway with agent "web" online; yields the data plane's port."""
    async with running_gateway(**config) as gw:
        agent = Agent(
            AgentConfig(gateway=gw.url, name="web", secret=SECRET, backoff=Backoff(0.1, 1)),
            app=app,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await wait_for(lambda: gw.gateway.registry.lookup("web") is not None)
            port = int(gw.url.rsplit(":", 1)[1])
            yield gw, port
            nursery.cancel_scope.cancel()


class Client:
    """A raw HTTP/1.1 client connection: requests go out as bytes (so they can be
    pipelined or malformed); each response is parsed by a fresh h11 connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.h11 = self._parser("GET")

    def _parser(self, method: str) -> h11.Connection:
        """A client-side h11 connection that has 'sent' a ``method`` request, fed
        with whatever arrived after the previous response."""
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        if self.buffer:  # (h11 reads b"" as end of file)
            conn.receive_data(self.buffer)
        self.buffer = b""
        return conn

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
                continue
            assert event is not h11.PAUSED
            return event  # type: ignore[return-value]

    async def response(self, method: str = "GET") -> tuple[h11.Response, bytes]:
        """The next complete response (informational ones skipped) to a
        ``method`` request."""
        if method != "GET":
            self.buffer = self.h11.trailing_data[0]
            self.h11 = self._parser(method)
        head = await self.next_event()
        while isinstance(head, h11.InformationalResponse):
            head = await self.next_event()
        assert isinstance(head, h11.Response), head
        body = b""
        while not isinstance(event := await self.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            body += event.data
        self.buffer = self.h11.trailing_data[0]
        self.h11 = self._parser("GET")
        return head, body

    async def closed_by_peer(self) -> bool:
        with trio.fail_after(5):
            try:
                return await self.stream.receive_some(65536) == b""
            except trio.BrokenResourceError:
                return True


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        yield Client(stream)


def get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: example.test", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def test_keep_alive_and_pipelined_requests_answered_in_order() -> None:
    async with public_stack() as (_, port), connect(port) as client:
        # Two requests in one write (pipelining), then a third on the same connection.
        await client.send_raw(get("/a/web/echo/one") + get("/a/web/echo/two?x=1"))
        first, body1 = await client.response()
        second, body2 = await client.response()
        assert first.status_code == second.status_code == 200
        assert json.loads(body1)["raw_path"] == "/echo/one"
        assert json.loads(body2)["query"] == "x=1"
        await client.send_raw(get("/a/web/bytes?n=100000&seed=3"))
        third, body3 = await client.response()
        assert third.status_code == 200
        assert body3 == pattern(100000, 3)


async def test_expect_100_continue_upload() -> None:
    data = pattern(300_000, 9)
    async with public_stack() as (_, port), connect(port) as client:
        head = (
            "POST /a/web/upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        await client.send_raw(head)
        # The body is sent only after the interim 100 arrives.
        interim = await client.next_event()
        assert isinstance(interim, h11.InformationalResponse)
        assert interim.status_code == 100
        await client.send_raw(data)
        response, body = await client.response()
        assert response.status_code == 200
        assert json.loads(body) == {
            "length": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET /a/web/ HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400, "bad_request"),
        (b"GET /a/web/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, None),
        (get("/endpoints"), 404, "not_found"),
        (get("/a/Not_A_Name/x"), 404, "not_found"),
        (get("/a/nobody/x"), 503, "agent_offline"),
    ],
)
async def test_bad_input_gets_a_clear_status_and_the_listener_keeps_serving(
    raw: bytes, status: int, error: str | None
) -> None:
    async with public_stack() as (_, port):
        async with connect(port) as client:
            await client.send_raw(raw)
            response, body = await client.response()
            assert response.status_code == status
            if error is not None:
                assert json.loads(body)["error"] == error
        async with connect(port) as client:
            await client.send_raw(get("/a/web/status/200"))
            ok, _ = await client.response()
            assert ok.status_code == 200


@pytest.mark.parametrize(
    "target",
    [b"/%61/web/status/200", b"/%61/1/status/200", b"/A/web/status/200", b"/a%2Fweb/status/200"],
)
async def test_a_percent_encoded_prefix_never_reaches_an_agent(target: bytes) -> None:
    """Dispatch reads the raw target: ``/%61/web/x`` is not ``/a/web/x``. (A front
    end that matched the decoded path once sent it to an agent named "1".)"""
    async with public_stack() as (gw, port), raw_agent(gw, "1") as (ws, session):
        await wait_for(lambda: gw.gateway.registry.lookup("1") is not None)
        async with connect(port) as client:
            await client.send_raw(get(target.decode()))
            response, body = await client.response()
        assert response.status_code == 404
        assert json.loads(body)["error"] == "not_found"
        # Agent "1" saw no request: its next message is at most SETTINGS/PING traffic.
        with trio.move_on_after(0.2):
            while True:
                for event in session.receive_data(await ws.get_message()):
                    assert not isinstance(event, RequestReceived), event


async def test_early_answer_with_a_body_pending_closes_the_connection() -> None:
    async with public_stack() as (_, port), connect(port) as client:
        head = b"POST /a/nobody/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        await client.send_raw(head + b"x" * 1000)
        response, body = await client.response()
        assert response.status_code == 503
        assert json.loads(body)["error"] == "agent_offline"
        assert (b"connection", b"close") in response.headers
        assert await client.closed_by_peer()


async def test_slow_request_head_gets_408_and_idle_connection_is_closed() -> None:
    async with public_stack(idle_timeout=0.3) as (_, port):
        async with connect(port) as client:
            await client.send_raw(b"GET /a/web/ HTTP/1.1\r\nHost: x\r\n")  # never finished
            response, body = await client.response()
            assert response.status_code == 408
            assert json.loads(body)["error"] == "request_timeout"
        async with connect(port) as client:
            await client.send_raw(get("/a/web/status/204"))
            ok, _ = await client.response()
            assert ok.status_code == 204
            assert await client.closed_by_peer()  # idle after the response: closed


async def test_response_reason_phrase_and_chunked_streaming() -> None:
    async with public_stack() as (_, port), connect(port) as client:
        await client.send_raw(get("/a/web/stream?n=3&interval=0.01"))
        response, body = await client.response()
        assert response.status_code == 200
        assert response.reason == b"OK"
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ("Sec-WebSocket-Version: 13", 400),  # no key
        ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8", 426),
    ],
)
async def test_bad_websocket_handshake_is_refused_in_plain_http(extra: str, status: int) -> None:
    async with public_stack() as (_, port), connect(port) as client:
        await client.send_raw(
            (
                "GET /ws/connect?name=x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nAuthorization: Bearer {SECRET}\r\n{extra}\r\n\r\n"
            ).encode()
        )
        response, body = await client.response()
        assert response.status_code == status
        assert json.loads(body)["error"] == "bad_websocket_handshake"


async def test_agent_websocket_answers_pings_and_rejects_text() -> None:
    async with public_stack() as (gw, _), raw_agent(gw, "pinger") as (ws, _):
        with trio.fail_after(5):
            await ws.ping(b"are you there")  # returns when the pong arrives
        await ws.send_message("text is not allowed")
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
        assert closed.value.reason.code == 1003


async def test_http10_client_gets_a_close_delimited_streaming_response() -> None:
    async with public_stack() as (_, port), connect(port) as client:
        await client.send_raw(b"GET /a/web/stream?n=2&interval=0.01 HTTP/1.0\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await client.stream.receive_some(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"transfer-encoding" not in head.lower()
        assert body == b"data: 0\n\ndata: 1\n\n"


async def test_head_and_bodiless_statuses_keep_the_connection_usable() -> None:
    async with public_stack() as (_, port), connect(port) as client:
        await client.send_raw(b"HEAD /a/web/bytes?n=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = await client.response("HEAD")
        assert head.status_code == 200
        assert (b"content-length", b"5000") in head.headers
        assert body == b""
        for status in (204, 304):
            await client.send_raw(get(f"/a/web/status/{status}"))
            response, body = await client.response()
            assert (response.status_code, body) == (status, b"")
        await client.send_raw(get("/a/web/bytes?n=10&seed=1"))
        last, body = await client.response()
        assert (last.status_code, body) == (200, pattern(10, 1))
