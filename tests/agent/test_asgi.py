"""serve_http1: an ASGI app served by hypercorn's HTTP/1.1 protocol layer on an
in-memory byte channel, driven with raw bytes from the gateway's end."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events as ws

from revconn._agent.asgi import ASGIApp, asgi_config, forwarded_scope, serve_http1

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]

AGENT = "box"
HOST = [("host", "agent.test")]


class MemoryByteChannel:
    """The agent's end of a tunnelled byte stream: bounded memory channels."""

    def __init__(
        self,
        incoming: trio.MemoryReceiveChannel[bytes],
        outgoing: trio.MemorySendChannel[bytes],
    ) -> None:
        self.incoming = incoming
        self.outgoing = outgoing
        self.eof_sent = False

    async def receive(self) -> bytes | None:
        try:
            return await self.incoming.receive()
        except trio.EndOfChannel:
            return None

    async def send(self, data: bytes) -> None:
        await self.outgoing.send(data)

    async def send_eof(self) -> None:
        self.eof_sent = True
        await self.outgoing.aclose()


class Gateway:
    """The gateway's end: writes raw bytes, parses the responses with h11."""

    def __init__(
        self,
        to_agent: trio.MemorySendChannel[bytes],
        from_agent: trio.MemoryReceiveChannel[bytes],
    ) -> None:
        self.to_agent = to_agent
        self.from_agent = from_agent
        self.h11 = h11.Connection(h11.CLIENT)
        self.eof = False

    async def send(self, data: bytes) -> None:
        await self.to_agent.send(data)

    async def send_eof(self) -> None:
        await self.to_agent.aclose()

    async def read(self) -> bytes:
        """The agent's next bytes, b"" at its EOF."""
        try:
            return await self.from_agent.receive()
        except trio.EndOfChannel:
            self.eof = True
            return b""

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
    ) -> None:
        """Send one request (on a connection ready for it) with h11."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        hdrs = [*HOST, *(headers or [])]
        if body is not None and not any(n.lower() == "transfer-encoding" for n, _ in hdrs):
            hdrs.append(("content-length", str(len(body))))
        data = self.h11.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.send(data)

    async def next_event(self, conn: h11.Connection | None = None) -> Any:
        conn = conn or self.h11
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await self.read())

    async def response(self, conn: h11.Connection | None = None) -> Response:
        event = await self.next_event(conn)
        while isinstance(event, h11.InformationalResponse):
            event = await self.next_event(conn)
        assert isinstance(event, h11.Response), event
        body = b""
        while True:
            part = await self.next_event(conn)
            if isinstance(part, h11.EndOfMessage):
                return Response(event, body)
            assert isinstance(part, h11.Data), part
            body += part.data

    async def read_until_eof(self) -> bytes:
        data = b""
        while chunk := await self.read():
            data += chunk
        return data


class Response:
    def __init__(self, head: h11.Response, body: bytes) -> None:
        self.status = head.status_code
        self.headers = {n.decode(): v.decode() for n, v in head.headers}
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Served:
    def __init__(self, gateway: Gateway, channel: MemoryByteChannel) -> None:
        self.gateway = gateway
        self.channel = channel
        self.done = trio.Event()
        self.cancel_scope = trio.CancelScope()


@asynccontextmanager
async def serving(
    app: ASGIApp, *, capacity: int = 1, keep_alive_timeout: float = 60.0, **kwargs: Any
) -> AsyncIterator[Served]:
    """serve_http1(app) on a fresh channel pair, bounded (``capacity`` chunks
    each way, so backpressure is real); the test must let it end."""
    to_agent, agent_in = trio.open_memory_channel[bytes](capacity)
    agent_out, from_agent = trio.open_memory_channel[bytes](capacity)
    channel = MemoryByteChannel(agent_in, agent_out)
    served = Served(Gateway(to_agent, from_agent), channel)

    async def run() -> None:
        with served.cancel_scope:
            await serve_http1(
                app,
                channel,
                config=asgi_config(keep_alive_timeout=keep_alive_timeout),
                agent=AGENT,
                **kwargs,
            )
        served.done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield served


async def read_body(receive: Receive) -> bytes:
    body: bytes = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def respond(send: Send, status: int, body: bytes, headers: list[Any] | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode()), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def echo_app(scope: Any, receive: Receive, send: Send) -> None:
    """Answers with the method, path and body it got."""
    assert scope["type"] == "http"
    body = await read_body(receive)
    await respond(send, 200, f"{scope['method']} {scope['path']} ".encode() + body)


# -- HTTP/1.1 -----------------------------------------------------------------


async def test_two_requests_on_one_keep_alive_connection() -> None:
    with trio.fail_after(2):
        async with serving(echo_app) as s:
            await s.gateway.request("GET", "/one")
            first = await s.gateway.response()
            assert (first.status, first.body) == (200, b"GET /one ")
            assert "connection" not in first.headers  # kept alive
            assert "server" not in first.headers  # asgi_config hides it
            await s.gateway.request("POST", "/two?x=1", body=b"payload")
            second = await s.gateway.response()
            assert (second.status, second.body) == (200, b"POST /two payload")
            await s.gateway.send_eof()
            await s.done.wait()


async def test_pipelined_requests_are_answered_in_order() -> None:
    log: list[str] = []

    async def app(scope: Any, receive: Receive, send: Send) -> None:
        log.append(f"start {scope['path']}")
        await read_body(receive)
        for _ in range(20):  # give a later request every chance to overtake
            await trio.lowlevel.checkpoint()
        await respond(send, 200, scope["path"].encode())
        log.append(f"end {scope['path']}")

    raw = b"".join(b"GET /%d HTTP/1.1\r\nhost: agent.test\r\n\r\n" % i for i in range(1, 4))
    with trio.fail_after(2):
        async with serving(app) as s:
            await s.gateway.send(raw)  # all three in one chunk
            parser = h11.Connection(h11.CLIENT)
            bodies = []
            for i in range(1, 4):
                parser.send(h11.Request(method="GET", target=f"/{i}", headers=HOST))
                parser.send(h11.EndOfMessage())
                bodies.append((await s.gateway.response(parser)).body)
                parser.start_next_cycle()
            assert bodies == [b"/1", b"/2", b"/3"]
            await s.gateway.send_eof()
    # Each app ran only once the one before had answered.
    assert log == ["start /1", "end /1", "start /2", "end /2", "start /3", "end /3"]


async def test_a_chunked_upload_is_echoed() -> None:
    chunks = [b"alpha-", b"beta-", b"gamma" * 1000]
    with trio.fail_after(2):
        async with serving(echo_app) as s:
            conn = s.gateway.h11
            await s.gateway.send(
                conn.send(
                    h11.Request(
                        method="PUT",
                        target="/up",
                        headers=[*HOST, ("transfer-encoding", "chunked")],
                    )
                )
            )
            for chunk in chunks:
                await s.gateway.send(conn.send(h11.Data(data=chunk)))
            await s.gateway.send(conn.send(h11.EndOfMessage()))
            response = await s.gateway.response()
            assert response.body == b"PUT /up " + b"".join(chunks)
            await s.gateway.send_eof()


async def test_expect_100_continue_gets_a_100_before_the_body_is_sent() -> None:
    with trio.fail_after(2):
        async with serving(echo_app) as s:
            conn = s.gateway.h11
            head = h11.Request(
                method="POST",
                target="/form",
                headers=[*HOST, ("content-length", "4"), ("expect", "100-continue")],
            )
            await s.gateway.send(conn.send(head))
            interim = await s.gateway.next_event()
            assert isinstance(interim, h11.InformationalResponse)
            assert interim.status_code == 100
            await s.gateway.send(conn.send(h11.Data(data=b"data")) + conn.send(h11.EndOfMessage()))
            response = await s.gateway.response()
            assert (response.status, response.body) == (200, b"POST /form data")
            await s.gateway.send_eof()


async def test_head_gets_the_headers_without_the_body_and_the_connection_stays_usable() -> None:
    async def app(scope: Any, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await respond(send, 200, b"hello")

    with trio.fail_after(2):
        async with serving(app) as s:
            await s.gateway.request("HEAD", "/")
            head = await s.gateway.response()
            assert (head.status, head.headers["content-length"], head.body) == (200, "5", b"")
            await s.gateway.request("GET", "/")
            assert (await s.gateway.response()).body == b"hello"
            await s.gateway.send_eof()


# -- app errors -----------------------------------------------------------------


async def test_an_app_raising_before_its_response_gets_a_json_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Receive, send: Send) -> None:
        raise ValueError("boom")

    with trio.fail_after(2):
        async with serving(app) as s:
            await s.gateway.request("GET", "/fails")
            response = await s.gateway.response()
            assert response.status == 500
            assert response.headers["content-type"] == "application/json"
            assert response.json() == {
                "error": "app_error",
                "agent": AGENT,
                "detail": "the application raised an exception",
            }
            # The framing is intact: the connection serves the next request.
            await s.gateway.request("GET", "/again")
            assert (await s.gateway.response()).status == 500
            await s.gateway.send_eof()
    [record, _] = [r for r in caplog.records if r.name == "revconn.upstream"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert "GET /fails" in record.getMessage()


async def test_an_app_raising_an_exception_group_gets_a_json_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise KeyError("in a nursery")

    with trio.fail_after(2):
        async with serving(app) as s:
            await s.gateway.request("GET", "/")
            response = await s.gateway.response()
            assert (response.status, response.json()["error"]) == (500, "app_error")
            await s.gateway.send_eof()
    assert any(r.name == "revconn.upstream" for r in caplog.records)


async def test_an_app_returning_no_response_gets_a_json_500() -> None:
    async def app(scope: Any, receive: Receive, send: Send) -> None:
        return None

    with trio.fail_after(2):
        async with serving(app) as s:
            await s.gateway.request("GET", "/")
            response = await s.gateway.response()
            assert response.status == 500
            assert response.json() == {
                "error": "app_error",
                "agent": AGENT,
                "detail": "the application returned no response",
            }
            await s.gateway.send_eof()


async def test_an_app_failing_mid_response_truncates_it_and_ends_the_connection() -> None:
    async def app(scope: Any, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("mid-stream")

    with trio.fail_after(2):
        async with serving(app) as s:
            await s.gateway.request("GET", "/")
            data = await s.gateway.read_until_eof()
            assert data.startswith(b"HTTP/1.1 200 ")
            assert data.endswith(b"7\r\npartial\r\n")  # no last chunk: truncated
            assert s.channel.eof_sent
            await s.done.wait()


# -- the scope -----------------------------------------------------------------


async def test_the_scope_gets_client_scheme_and_host_from_the_gateway_headers() -> None:
    scopes: list[Any] = []

    async def app(scope: Any, receive: Receive, send: Send) -> None:
        scopes.append(scope)
        await respond(send, 204, b"")

    forwarded = [
        ("x-forwarded-for", "198.51.100.7, 203.0.113.9"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "public.example"),
        ("x-forwarded-prefix", "/a/box"),
    ]
    with trio.fail_after(2):
        async with serving(app, client=("10.0.0.1", 5555), server=("agent", 80)) as s:
            await s.gateway.request("GET", "/p?q=1", forwarded)
            await s.gateway.response()
            await s.gateway.request("GET", "/plain")
            await s.gateway.response()
            await s.gateway.send_eof()
    proxied, plain = scopes
    assert proxied["client"] == ("203.0.113.9", 0)  # the last hop: the gateway's view
    assert proxied["scheme"] == "https"
    assert proxied["root_path"] == ""
    assert (proxied["path"], proxied["query_string"]) == ("/p", b"q=1")
    assert proxied["server"] == ("agent", 80)
    assert [v for n, v in proxied["headers"] if n == b"host"] == [b"public.example"]
    assert (b"x-forwarded-prefix", b"/a/box") in proxied["headers"]
    assert (plain["client"], plain["scheme"]) == (("10.0.0.1", 5555), "http")
    assert [v for n, v in plain["headers"] if n == b"host"] == [b"agent.test"]


def test_forwarded_scope_gives_websockets_ws_schemes_and_ignores_odd_values() -> None:
    def scope(kind: str, proto: bytes) -> dict[str, Any]:
        headers = [(b"x-forwarded-proto", proto), (b"x-forwarded-for", b" ")]
        return {"type": kind, "scheme": "x", "client": None, "headers": headers}

    assert forwarded_scope(scope("websocket", b"https"))["scheme"] == "wss"
    assert forwarded_scope(scope("websocket", b"http"))["scheme"] == "ws"
    assert forwarded_scope(scope("http", b"HTTPS"))["scheme"] == "https"
    odd = forwarded_scope(scope("http", b"gopher"))
    assert (odd["scheme"], odd["client"]) == ("x", None)


# -- WebSocket -----------------------------------------------------------------


async def test_a_websocket_upgrade_echoes_text_and_binary_then_closes() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Receive, send: Send) -> None:
        assert scope["type"] == "websocket"
        seen.append(scope)
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                seen.append(message)
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"].upper()})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})

    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)

    async def events() -> list[Any]:
        while True:
            got = list(client.events())
            if got:
                return got
            data = await s.gateway.read()
            client.receive_data(data or None)

    with trio.fail_after(2):
        async with serving(app) as s:
            await s.gateway.send(
                client.send(
                    ws.Request(
                        host="agent.test",
                        target="/ws",
                        extra_headers=[(b"x-forwarded-proto", b"https")],
                    )
                )
            )
            [accepted] = await events()
            assert isinstance(accepted, ws.AcceptConnection)
            await s.gateway.send(client.send(ws.TextMessage(data="hello")))
            [text] = await events()
            assert isinstance(text, ws.TextMessage) and text.data == "HELLO"
            await s.gateway.send(client.send(ws.BytesMessage(data=b"\x00\x01\x02")))
            [binary] = await events()
            assert isinstance(binary, ws.BytesMessage) and binary.data == b"\x02\x01\x00"
            await s.gateway.send(client.send(ws.CloseConnection(code=1000)))
            [closing] = await events()
            assert isinstance(closing, ws.CloseConnection) and closing.code == 1000
            await s.done.wait()  # hypercorn ends the connection after the close
            assert s.channel.eof_sent
    assert seen[0]["scheme"] == "wss" and seen[0]["path"] == "/ws"
    # hypercorn quirk: a close begun by the client is reported as 1006, not with
    # the client's code (hypercorn/protocol/ws_stream.py lines 247-251).
    assert seen[1] == {"type": "websocket.disconnect", "code": 1006}


async def test_a_websocket_app_raising_before_accept_gets_a_json_500() -> None:
    async def app(scope: Any, receive: Receive, send: Send) -> None:
        raise RuntimeError("no")

    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    with trio.fail_after(2):
        async with serving(app) as s:
            await s.gateway.send(client.send(ws.Request(host="agent.test", target="/ws")))
            parser = h11.Connection(h11.CLIENT)
            parser.send(h11.Request(method="GET", target="/ws", headers=HOST))
            parser.send(h11.EndOfMessage())
            response = await s.gateway.response(parser)
            assert (response.status, response.json()["error"]) == (500, "app_error")
            await s.gateway.send_eof()


# -- ending ----------------------------------------------------------------------


async def test_gateway_eof_ends_serve_http1_and_the_app_hears_a_disconnect() -> None:
    heard: list[Message] = []

    async def app(scope: Any, receive: Receive, send: Send) -> None:
        heard.append(await receive())  # the headers came, the body never will
        heard.append(await receive())
        heard.append(await receive())  # a disconnect, again

    with trio.fail_after(2):
        async with serving(app) as s:
            await s.gateway.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 9\r\n\r\nabc")
            await trio.testing.wait_all_tasks_blocked()
            await s.gateway.send_eof()
            await s.done.wait()
            assert s.channel.eof_sent
    assert heard == [
        {"type": "http.request", "body": b"abc", "more_body": True},
        {"type": "http.disconnect"},
        {"type": "http.disconnect"},
    ]


async def test_the_keep_alive_timeout_ends_an_idle_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(100):
        async with serving(echo_app, keep_alive_timeout=7.0) as s:
            await s.gateway.request("GET", "/")
            await s.gateway.response()
            answered = trio.current_time()
            assert await s.gateway.read() == b""  # the agent's EOF
            assert trio.current_time() - answered == pytest.approx(7.0)
            await s.done.wait()


async def test_cancelling_serve_http1_stops_it_at_once_even_while_sending_is_blocked() -> None:
    state = {"app_cancelled": False}

    async def app(scope: Any, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:  # far more than the channel holds: the send blocks
                await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
        except trio.Cancelled:
            state["app_cancelled"] = True
            raise

    with trio.fail_after(2):
        async with serving(app) as s:
            await s.gateway.request("GET", "/stream")
            assert (await s.gateway.read()).startswith(b"HTTP/1.1 200")  # then stop reading
            await trio.testing.wait_all_tasks_blocked()
            s.cancel_scope.cancel()
            await s.done.wait()
            assert state["app_cancelled"]  # its task was done before serve_http1 returned


async def test_an_app_that_never_reads_a_large_body_makes_the_reading_stop() -> None:
    """Nothing is buffered beyond hypercorn's bounded queue; and when the app
    then answers without reading, the connection still ends (with hypercorn's
    own queue it deadlocks here: the app's last send waits for room to put
    http.disconnect)."""
    release = trio.Event()
    sent = 0
    sender_done = trio.Event()

    async def app(scope: Any, receive: Receive, send: Send) -> None:
        await release.wait()
        await respond(send, 413, b"too large")  # answers without reading the body

    chunk = b"x" * 65536
    total = 16 * 1024 * 1024
    with trio.fail_after(3):
        async with serving(app) as s:

            async def upload() -> None:
                nonlocal sent
                await s.gateway.send(
                    b"PUT / HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % total
                )
                try:
                    while sent < total:
                        await s.gateway.send(chunk)
                        sent += len(chunk)
                except trio.BrokenResourceError:
                    pass  # the agent closed its end
                sender_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                await trio.testing.wait_all_tasks_blocked()
                # hypercorn's queue (10 chunks) plus what is in flight, no more.
                assert sent <= 16 * len(chunk)
                assert not sender_done.is_set()
                release.set()
                response = await s.gateway.response()
                assert (response.status, response.body) == (413, b"too large")
                assert await s.gateway.read() == b""  # hypercorn closes: the body was unread
                await s.done.wait()
                nursery.cancel_scope.cancel()


async def test_apps_still_running_when_the_connection_ends_get_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = {"background_done": False, "cancelled": False}

    async def app(scope: Any, receive: Receive, send: Send) -> None:
        await respond(send, 200, b"bye")
        await trio.sleep(1.0)  # a response's background work: finishes
        state["background_done"] = True
        try:
            await trio.sleep_forever()  # overstays: cancelled
        except trio.Cancelled:
            state["cancelled"] = True
            raise

    with trio.fail_after(100):
        async with serving(app) as s:
            await s.gateway.request("GET", "/", [("connection", "close")])
            assert (await s.gateway.response()).body == b"bye"
            answered = trio.current_time()
            assert await s.gateway.read() == b""  # the connection is over at once
            assert trio.current_time() == answered
            await s.done.wait()
            assert trio.current_time() - answered == pytest.approx(3.0)  # graceful_timeout
    assert state == {"background_done": True, "cancelled": True}


async def test_the_gateway_going_away_mid_response_ends_serve_http1() -> None:
    async def app(scope: Any, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            await send({"type": "http.response.body", "body": b"tick", "more_body": True})

    with trio.fail_after(2):
        async with serving(app) as s:
            await s.gateway.send(
                b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            await s.gateway.send(b"1\r\nx\r\n")
            assert (await s.gateway.read()).startswith(b"HTTP/1.1 200")
            await s.gateway.from_agent.aclose()  # gone: the agent's next send fails
            await s.gateway.send(b"1\r\nx\r\n")
            await s.done.wait()


def test_asgi_config_suits_the_tunnel() -> None:
    config = asgi_config(keep_alive_timeout=12.5)
    assert config.keep_alive_timeout == 12.5
    assert config.accesslog is None
    assert config.h11_max_incomplete_size == 96 * 1024  # a 64 KiB public head plus X-Forwarded-*
    assert config.websocket_max_message_size == 16 * 1024 * 1024
    assert config.include_server_header is False
    assert config.root_path == ""
    assert config.log.access_logger is None
    assert asgi_config().keep_alive_timeout == 60.0
