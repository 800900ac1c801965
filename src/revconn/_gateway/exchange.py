"""The data plane's HTTP/1.1 exchange, written once: dispatch on the raw
request target, the agent lookup (through the Registry interface), borrowing
a tunnel stream, the upload with backpressure, the response relay, the abort
when a response is cut short, the reset when the client goes.

Requests are parsed once (httptools, ``_proto/http1.py``); the forwarded
head is rewritten (no ``/a/NAME`` prefix, no hop-by-hop headers, with
X-Forwarded-* and Via) and written as HTTP/1.1 into a pooled tunnel stream,
whose other direction carries the upstream's response bytes, parsed again
only for their boundaries and hop-by-hop headers. Semantics:

* a client that disconnects resets its stream (the agent drops its upstream
  connection);
* a response cut short (the agent or its upstream lost, a malformed body)
  aborts the client connection, so a truncated body never looks complete (no
  final chunk, no clean close);
* an answer given before the request body was read (ours or the upstream's)
  is followed by a lingering close, so the client sees it rather than a reset;
* a stream is given back to the agent's pool only after a complete exchange
  on a connection its upstream keeps open.
"""

from __future__ import annotations

import http
import logging
import math
from collections.abc import Iterable
from typing import NoReturn, Protocol

import attrs
import trio
from wsproto.utilities import generate_accept_token

from .. import _codes
from .._errors import AgentBusy, StreamError
from .._proto.announce import MAX_BODY as MAX_ANNOUNCE
from .._proto.connect import PUBLIC_URL_HEADER, WS_SUBPROTOCOL
from .._proto.headers import clean_headers
from .._proto.http1 import (
    END,
    LAST_CHUNK,
    Body,
    EndOfMessage,
    Informational,
    ParseError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    chunk,
    request_head,
    response_head,
)
from .._runtime.fastpath import WriteLock, send_all
from .._runtime.streampool import StreamRefused
from .auth import Admission
from .registry import Registry, RequestStream
from .replies import Reply, agent_busy, agent_offline, json_reply, stream_failure, upstream_broken
from .routing import Forward, Route, Target, dispatch, forward, public_urls, public_view
from .tls import AcceptedStream
from .traffic import CLIENT_GONE, MAX_PATH, AgentTraffic, Traffic, shown_path
from .websocket import WebSocketTransport, upgrade_response

__all__ = ["MAX_HEAD", "DataPlane", "HeadWait", "HttpConnection", "RequestLimits"]

log = logging.getLogger("revconn.exchange")
access_log = logging.getLogger("revconn.access")
"""``--access-log``: one INFO line per request for an agent."""

MAX_HEAD = 64 * 1024
"""Largest response head accepted from an upstream (502 beyond); requests
are bounded by ``RequestLimits``."""
READ_SIZE = 64 * 1024
LINGER = 5.0
"""After answering before the request body was read: how long at most to keep
reading (and discarding) it, so the client sees the answer rather than a reset
(closing a socket with unread data sends RST, which can destroy the answer)."""
_REASONS = {int(status): status.phrase.encode("ascii") for status in http.HTTPStatus}
JOIN_LIMIT = 64 * 1024
"""Pieces of a write are joined into one send below this size (one syscall);
larger bodies go out as they are (no copy)."""
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
VERSION_MISMATCH = f"protocol version mismatch: this gateway speaks {WS_SUBPROTOCOL}"
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
"""Methods a request may be retried with on a fresh stream when a kept-alive
one turned out closed before any answer (RFC 9110 9.2.2)."""


@attrs.frozen
class RequestLimits:
    """What a public request may be (docs/security.md, the defaults table)."""

    max_head: int = 16 * 1024
    """Request line + header fields, bytes (431 beyond)."""
    max_fields: int = 100
    """Header fields (431 beyond)."""
    max_target: int = 8 * 1024
    """The request target, bytes (414 beyond)."""
    max_body: int | None = None
    """Request body, bytes (413, before it is read when it has a Content-Length); None: any."""
    body_timeout: float = 60.0
    """Seconds a request body may stall: no byte of it from the client (408 beyond)."""
    upgrade_timeout: float = 10.0
    """Seconds an upstream has to answer a public WebSocket handshake (504 beyond)."""

    def parser(self) -> RequestParser:
        return RequestParser(
            max_head=self.max_head, max_fields=self.max_fields, max_target=self.max_target
        )


class DataPlane(Protocol):
    """What an exchange needs from the gateway."""

    @property
    def limits(self) -> RequestLimits: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def traffic(self) -> Traffic | None:
        """Where forwarded requests are counted; None: they are not."""
        ...

    @property
    def access_log(self) -> bool:
        """``--access-log``: log one line per request for an agent."""
        ...

    @property
    def idle_timeout(self) -> float:
        """Keep-alive idle time, and the time allowed for a request head (s)."""
        ...

    @property
    def max_message_size(self) -> int:
        """Largest WebSocket message accepted from an agent."""
        ...

    @property
    def scheme(self) -> str:
        """``http`` or ``https``: what X-Forwarded-Proto says."""
        ...

    @property
    def domains(self) -> tuple[str, ...]:
        """``--domain``: hosts ``NAME.DOMAIN`` route to agent NAME."""
        ...

    def trusts_proxy(self, client: str | None) -> bool:
        """``client`` (an IP address) is a ``--trusted-proxy``."""
        ...

    def check_access(
        self, name: str, remote: str | None, headers: list[tuple[bytes, bytes]]
    ) -> Reply | None:
        """Agent ``name``'s public access rules (IP allow-list, basic auth) for
        a request from peer ``remote``: the refusal, or None."""
        ...

    def guards_credentials(self, name: str) -> bool:
        """Agent ``name`` uses basic auth at the gateway (Authorization is
        the gateway's, not forwarded)."""
        ...

    @property
    def shutting_down(self) -> bool: ...

    def admit_agent(
        self,
        query_string: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        remote: str | None = None,
    ) -> Admission | Reply:
        """The agent's name and grant, or the refusal to answer its upgrade with."""
        ...

    async def announce(
        self,
        method: bytes,
        query_string: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        remote: str,
    ) -> Reply:
        """The answer to ``PUT``/``DELETE /announce`` (never raises for bad input)."""
        ...


class HeadWait(Protocol):
    """The listener's count of connections waiting for a request head
    (``--max-pending-connections``): one slot per connection."""

    def enter(self) -> bool:
        """This connection waits for a request head now (no-op if it already
        does); False if too many do: then it is to be closed."""
        ...

    def leave(self) -> None:
        """Its head arrived (or it ended); idempotent."""
        ...


class _InFlight:
    """One request in flight on a connection."""

    __slots__ = (
        "done",
        "forward",
        "fresh",
        "gone",
        "head",
        "head_bytes",
        "method",
        "name",
        "received",
        "request_done",
        "retried",
        "scope",
        "sent",
        "session",
        "started",
        "status",
        "stop_upload",
        "stream",
        "switch",
        "switched",
        "target",
        "timeout",
        "traffic",
        "upload_wait",
        "waiting_on_client",
    )

    def __init__(self, stream: RequestStream, outbound: Forward, head: RequestHead) -> None:
        self.stream = stream
        self.forward = outbound
        self.session = outbound.session
        self.name = outbound.name
        self.head = head
        self.head_bytes = b""
        self.scope = trio.CancelScope()
        self.fresh = True
        """The stream was new (a failure on it is not a stale keep-alive)."""
        self.waiting_on_client = False
        """The relay is writing to the client (its deadline is the client's)."""
        self.gone = False
        """The client left, or a timeout of ours answers it (the scope was
        cancelled for that, not for the upstream's timeout): the relay, which
        may yet be woken by our own reset, says nothing."""
        self.done = False
        self.retried = False
        self.request_done = False
        """The whole request (head and body) is in the stream."""
        self.stop_upload = False
        self.received = 0
        """Request body bytes received (for a chunked body's limit, and counted)."""
        self.sent = 0
        """Response bytes written to the client."""
        self.status = 0
        """The status answered (the upstream's, or the gateway's error)."""
        self.started = 0.0
        self.method = head.method
        self.target = head.target[:MAX_PATH]
        """What the counters and the access log record (``shown_path`` cuts
        the query): bounded, as the last requests are kept (a slice of a
        short target is the target itself, no copy). A WebSocket's ``head``
        is dropped."""
        self.traffic: AgentTraffic | None = None
        """The agent's counters, when the gateway counts."""
        self.switch: trio.Event | None = None
        """(a WebSocket handshake) Set once the upstream's answer is known."""
        self.switched = False
        """The upstream answered 101: the stream is a byte pipe now."""
        self.upload_wait: trio.CancelScope | None = None
        """(the reader) Waiting for more of the body from the client (set
        exactly while that read is pending, so a timeout that cancels it
        leaves it set); cancelled when the response ended first, so the
        connection closes at once."""
        """The upstream answered >= 300 before the body was sent: send no more."""
        upstream = stream.upstream
        self.timeout = (
            math.inf if upstream is None or upstream.timeout is None else upstream.timeout
        )

    def spend(self) -> None:
        """(a WebSocket after its 101) Drop what only HTTP needed: the request
        as parsed and as sent."""
        self.head = _SPENT_HEAD
        self.forward = _SPENT_FORWARD
        self.head_bytes = b""

    @property
    def send_allowance(self) -> float:
        """How long the upload may wait for the upstream to take more."""
        return 60.0 if self.timeout == math.inf else self.timeout

    def uploaded(self) -> None:
        """The whole request is sent: the upstream's silence counts from now."""
        self.request_done = True
        if self.timeout != math.inf:
            self.scope.deadline = trio.current_time() + self.timeout


class HttpConnection:
    """HTTP/1.1 on one accepted connection: requests are dispatched, forwarded
    to agents (or answered by the gateway), until the connection ends or
    becomes an agent's WebSocket.

    ``run()`` is this connection's reader task: it parses requests, uploads
    their bodies (with backpressure: the stream's flow-control window) and
    notices a client that goes away. Per forwarded request one relay task
    writes the response. Memory is bounded: the parser's buffer (request heads
    up to ``MAX_HEAD``, one read of pipelined data) plus the stream's window.
    """

    __slots__ = (
        "_agent_name",
        "_closing",
        "_cycle_done",
        "_exchange",
        "_http10",
        "_keep_alive",
        "_method",
        "_nursery",
        "_responding",
        "_send_lock",
        "_started",
        "_timeout",
        "_trusted",
        "_tunnel",
        "_waiting",
        "client",
        "parser",
        "plane",
        "stream",
    )

    def __init__(
        self,
        plane: DataPlane,
        stream: AcceptedStream,
        client: str | None,
        waiting: HeadWait | None = None,
    ):
        self.plane = plane
        self.stream = stream
        self.client = client
        self.parser = plane.limits.parser()
        self._send_lock = WriteLock()
        self._exchange: _InFlight | None = None
        self._cycle_done = trio.Event()
        self._cycle_done.set()
        self._nursery: trio.Nursery | None = None
        self._timeout = trio.CancelScope()
        self._method = b""
        self._keep_alive = True
        self._http10 = False
        self._closing = False
        """The connection ends after the current response."""
        self._responding = False
        """A response to the current request has begun (nothing else may be sent)."""
        self._started = 0.0
        """When the current request for an agent was routed (trio time; counted only)."""
        self._agent_name = ""
        """The agent the current request is for (the access log's)."""
        self._tunnel: tuple[Admission, WebSocketTransport] | None = None
        self._trusted = plane.trusts_proxy(client)
        """The peer is a --trusted-proxy: its X-Forwarded-* are believed."""
        self._waiting = waiting
        """Held while this connection waits for a request head (the listener
        took it at accept); a kept-alive connection that cannot get it back
        after a response is closed, as idle keep-alive connections may be."""

    # -- writing ------------------------------------------------------------------
    async def _write(self, parts: list[bytes]) -> None:
        if len(parts) > 1 and sum(map(len, parts)) <= JOIN_LIMIT:
            parts = [b"".join(parts)]
        async with self._send_lock:
            for part in parts:
                await send_all(self.stream, part)

    async def _reply(self, reply: Reply, *, close: bool = False) -> None:
        ex = self._exchange
        if ex is not None and not ex.status:
            ex.status = reply.status  # (the gateway answers for the agent: 502, 504, ...)
        close = close or not self._keep_alive
        headers = [*reply.headers, (b"connection", b"close")] if close else reply.headers
        head = response_head(reply.status, _REASONS.get(reply.status, b""), headers)
        body = b"" if self._method == b"HEAD" else reply.body
        self._responding = True
        await self._write([head, body] if body else [head])
        if close:
            self._closing = True

    # -- the reader (this connection's own task) ----------------------------------
    async def run(self) -> tuple[Admission, WebSocketTransport] | None:
        """Serve HTTP requests until the connection ends; returns the agent's
        name and WebSocket if it turned into an agent tunnel."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            with self._timeout:
                await self._read_loop()
            if self._timeout.cancelled_caught:
                await self._timed_out()
            nursery.cancel_scope.cancel()
        return self._tunnel

    async def _read_loop(self) -> None:
        event: RequestHead | Body | EndOfMessage | _Switched | None = None
        while True:
            try:
                if event is None:
                    if self._waiting is not None and not self._waiting.enter():
                        return  # too many connections wait for a head: this idle one goes
                    self._timeout.deadline = trio.current_time() + self.plane.idle_timeout
                    event = await self._next_event()
                    if event is None:
                        return  # the client closed the connection between requests
                if not self._cycle_done.is_set():
                    # A pipelined request waits until the current response is done.
                    self._timeout.deadline = math.inf
                    await self._cycle_done.wait()
                if self._closing:
                    return
                if not isinstance(event, RequestHead):
                    raise AssertionError(event)  # noqa: TRY004  (bodies are read by _upload)
                if self._waiting is not None:
                    self._waiting.leave()  # (a head is here: not waiting for one)
                event = await self._request(event)
                if event is _SWITCHED:
                    await self._pipe_upload()
                    return
                if self._closing:
                    return
            except ParseError as exc:
                # A malformed request after one in flight: that one is
                # answered first, then this one gets its 400.
                self._timeout.deadline = trio.current_time() + self.plane.idle_timeout
                await self._cycle_done.wait()
                if not self._closing:
                    await self._bad_request(exc)
                return

    async def _timed_out(self) -> None:
        """Idle or slow client: say 408 if a request head had begun, or its
        body stalled, then close; an upstream that stopped taking the request
        body: 504. Either way the stream is reset (the agent drops its
        upstream connection) and nothing else is touched."""
        ex = self._exchange
        if ex is not None and not ex.done and not self._responding:
            if ex.upload_wait is not None:  # the read from the client was pending
                timeout = self.plane.limits.body_timeout
                detail = f"no request body bytes received within {timeout:g} s"
                status, payload = 408, {"error": "request_timeout", "detail": detail}
                log.info("agent %r: the client's request body stalled", ex.name)
            else:
                detail = "the upstream stopped reading the request body"
                status = 504
                payload = {"error": "upstream_timeout", "agent": ex.name, "detail": detail}
            ex.gone = True
            ex.stream.reset(_codes.H2_CANCEL)
            ex.scope.cancel()
            self._method = b""
            with trio.move_on_after(1):
                await self._reply(json_reply(status, payload), close=True)
            return
        if self.parser.head_started and self._cycle_done.is_set():
            detail = f"request head not received within {self.plane.idle_timeout:g} s"
            self._method = b""
            with trio.move_on_after(1):
                await self._reply(
                    json_reply(408, {"error": "request_timeout", "detail": detail}), close=True
                )

    async def _next_event(self) -> RequestHead | Body | EndOfMessage | None:
        """The next request event; None once the client ended the connection."""
        parser = self.parser
        while True:
            event = parser.next_event()
            if event is not None:
                return event
            if parser.eof:
                return None
            data = await self.stream.receive_some(READ_SIZE)
            try:
                if data:
                    parser.feed(data)
                else:
                    parser.feed_eof()
            except ParseError:
                pass  # next_event() raises it after the requests before it

    async def _bad_request(self, exc: ParseError) -> None:
        if not self._responding and self._cycle_done.is_set():
            error = {431: "request_header_too_large", 414: "uri_too_long"}.get(
                exc.status, "bad_request"
            )
            self._method = b""
            await self._reply(
                json_reply(exc.status, {"error": error, "detail": exc.detail}), close=True
            )

    async def _request(
        self, head: RequestHead
    ) -> RequestHead | Body | EndOfMessage | _Switched | None:
        """Forward one request; returns the connection's next event if it was
        read while watching for the client going away."""
        self._method = head.method
        self._keep_alive = head.keep_alive and not head.upgrade
        self._http10 = head.version == b"1.0"
        self._responding = False
        if not head.has_body or head.upgrade:
            end = self.parser.next_event()  # the parser ends these with their head
            assert end is END, end
        hosts = [v for n, v in head.headers if n == b"host"]
        decision = dispatch(head.target, hosts, self.plane.domains)
        websocket = False
        if head.upgrade and decision is not Target.AGENT:
            refused = _refused_upgrade(head, decision)
            if refused is not None:
                await self._answer_early(refused, head, close=True)
                return None
            websocket = isinstance(decision, Route)
            if not websocket:
                # The gateway's own routes ignore an Upgrade (RFC 9110 7.8):
                # answered as a plain request, then the connection closes.
                self._resume_after_upgrade(head)
        if isinstance(decision, Reply):
            # A bad Host (400): this connection's framing cannot be trusted either.
            await self._answer_early(decision, head, close=decision.status == 400)
            return None
        if decision is Target.AGENT:
            await self._agent_tunnel(head)
            self._closing = True  # this connection is an agent's WebSocket now
            return None
        if decision is Target.HEALTH:
            await self._answer_early(self._health(head.method), head)
            return None
        if decision is Target.ANNOUNCE:
            await self._announce(head)
            return None
        assert isinstance(decision, Route)
        self._agent_name = decision.name
        if self.plane.traffic is not None or self.plane.access_log:
            self._started = trio.current_time()
        refused_access = self.plane.check_access(decision.name, self.client, head.headers)
        if refused_access is not None:
            await self._answer_for_agent(refused_access, head, close=websocket)
            return None
        if not hosts and head.version == b"1.1":
            detail = "an HTTP/1.1 request needs exactly one Host header (RFC 9112 3.2)"
            await self._answer_for_agent(
                json_reply(400, {"error": "bad_request", "detail": detail}), head, close=True
            )
            return None
        outbound = forward(
            self.plane.registry,
            decision,
            head.method,
            head.headers,
            client=self.client,
            proto=self.plane.scheme,
            trusted=self._trusted,
            drop_authorization=self.plane.guards_credentials(decision.name),
        )
        if isinstance(outbound, Reply):
            await self._answer_for_agent(outbound, head)
            return None
        too_large = self._body_too_large(head)
        if too_large is not None:
            await self._answer_for_agent(too_large, head, close=True)
            return None
        if websocket:
            # Upgrade and Connection are hop-by-hop: the handshake's own two go on.
            outbound = attrs.evolve(outbound, headers=[*outbound.headers, *_WEBSOCKET_UPGRADE])
        self._timeout.deadline = math.inf
        try:
            with trio.move_on_after(self.plane.idle_timeout) as waiting:
                stream, fresh = await outbound.session.acquire()
        except AgentBusy:
            await self._answer_for_agent(agent_busy(outbound.name), head)
            return None
        except StreamRefused as refused:
            await self._answer_for_agent(_refusal(refused), head)
            return None
        except StreamError as exc:
            failed = agent_offline(outbound.name)
            if exc.error_code is not None:
                failed = stream_failure(exc, outbound.name)
            await self._answer_for_agent(failed, head)
            return None
        if waiting.cancelled_caught:
            detail = f"the agent did not accept a stream within {self.plane.idle_timeout:g} s"
            payload = {"error": "upstream_timeout", "agent": outbound.name, "detail": detail}
            await self._answer_for_agent(json_reply(504, payload), head)
            return None
        exchange = _InFlight(stream, outbound, head)
        exchange.fresh = fresh
        traffic = self.plane.traffic
        exchange.started = self._started
        if traffic is not None:
            exchange.traffic = traffic.begin(outbound.name)
        if websocket:
            exchange.switch = trio.Event()
        self._exchange = exchange
        self._cycle_done = trio.Event()
        assert self._nursery is not None
        if not head.has_body:
            exchange.head_bytes = outbound.head(stream.upstream, framing=[])
            self._nursery.start_soon(self._relay, exchange)
            try:
                await stream.send_body(exchange.head_bytes, queued=exchange.uploaded)
            except StreamError:
                pass  # the relay says what happened
        else:
            self._nursery.start_soon(self._relay, exchange)
            await self._upload(exchange)
        # Now watch for the client going away; the relay re-arms the idle
        # timeout when the response is done.
        self._timeout.deadline = math.inf
        if exchange.done:
            return None
        if exchange.switch is not None:
            return _SWITCHED  # the read loop pipes (this frame's locals are not kept)
        event = await self._next_event()
        if event is None and not exchange.done:
            self._client_gone(exchange)
            raise trio.BrokenResourceError("client closed the connection")
        return event  # the next (pipelined) request, or None: closed after the response

    async def _pipe_upload(self) -> None:
        """A WebSocket handshake is out: if the upstream switches (101), the
        client's bytes go up the stream as they come, unparsed, until either
        side ends; otherwise its answer is relayed and the connection closes.
        The client must wait for the 101 before it sends (RFC 6455 4.1): until
        then nothing is read."""
        exchange = self._exchange
        assert exchange is not None and exchange.switch is not None
        early = await self._await_switch(exchange)
        if not exchange.switched:
            await self._cycle_done.wait()
            return
        stream = exchange.stream
        # Nothing parses this connection again: its HTTP state goes (an idle
        # WebSocket keeps only the pipe).
        trailing = self.parser.upgrade_trailing
        self.parser = _SPENT
        exchange.spend()
        try:
            if trailing or early:
                await stream.send_body(trailing + early if trailing else early)
            while True:
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    break
                exchange.received += len(data)
                await stream.send_body(data)
        except StreamError:
            return  # the agent or its upstream ended it: the relay closes the connection
        # The client closed: the upstream connection is closed at once.
        self._client_gone(exchange)
        raise trio.BrokenResourceError("client closed its WebSocket")

    async def _await_switch(self, exchange: _InFlight) -> bytes:
        """Wait for the upstream's answer to a WebSocket handshake while
        watching the client: one that leaves resets the stream at once (its
        slot and the upstream connection are not held for nothing). Bytes it
        sends meanwhile (at most READ_SIZE, then it is not read) are returned,
        to follow the 101 — or dropped with a refusal. An upstream that has
        not answered within the upgrade timeout gets its stream reset and the
        client a 504 (a WebSocket has no upstream timeout once switched, so
        this is the only bound on a handshake nobody answers)."""
        assert exchange.switch is not None
        early = b""
        gone = False
        waited = trio.CancelScope()
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal early, gone
                while len(early) < READ_SIZE:
                    data = await self.stream.receive_some(READ_SIZE - len(early))
                    if not data:
                        gone = True
                        nursery.cancel_scope.cancel()
                        return
                    early += data
                await trio.sleep_forever()  # enough buffered: backpressure

            nursery.start_soon(watch)
            waited.deadline = trio.current_time() + self.plane.limits.upgrade_timeout
            with waited:
                await exchange.switch.wait()
            nursery.cancel_scope.cancel()
        if gone:
            self._client_gone(exchange)
            raise trio.BrokenResourceError("client closed during the WebSocket handshake")
        if waited.cancelled_caught and not exchange.switch.is_set():
            await self._upgrade_timed_out(exchange)
        return early

    async def _upgrade_timed_out(self, exchange: _InFlight) -> None:
        """No answer to a WebSocket handshake within the upgrade timeout: the
        stream is reset (the agent drops its upstream connection), the relay
        ends, and the client gets 504 before the connection closes."""
        timeout = self.plane.limits.upgrade_timeout
        log.info("agent %r: no answer to a WebSocket handshake within %g s", exchange.name, timeout)
        exchange.gone = True  # (the relay, cancelled, answers nothing itself)
        exchange.status = exchange.status or 504  # (counted as answered, before the relay ends)
        exchange.stream.reset(_codes.H2_CANCEL)
        exchange.scope.cancel()
        await self._cycle_done.wait()
        detail = f"no answer to the WebSocket handshake within {timeout:g} s"
        payload = {"error": "upstream_timeout", "agent": exchange.name, "detail": detail}
        if not self._responding:
            with trio.move_on_after(1):
                await self._reply(json_reply(504, payload), close=True)
        self._closing = True

    def _resume_after_upgrade(self, head: RequestHead) -> None:
        """Go on parsing an upgrade request's body as a plain HTTP body: a
        fresh parser is given a head with the same framing, then the bytes
        that followed the real one."""
        trailing = self.parser.upgrade_trailing or b""
        self.parser = self.plane.limits.parser()
        if not head.has_body:
            return
        framing = [
            (n, v) for n, v in head.headers if n in (b"content-length", b"transfer-encoding")
        ]
        self.parser.feed(request_head(b"POST", b"/", framing) + trailing)
        synthetic = self.parser.next_event()
        assert isinstance(synthetic, RequestHead), synthetic

    async def _announce(self, head: RequestHead) -> None:
        """``/announce``: read its small body (413 beyond MAX_ANNOUNCE), answer."""
        body = b""
        if head.has_body:
            if head.expect_continue:
                await self._write([CONTINUE])
            parts: list[bytes] = []
            size = 0
            while True:
                event = self.parser.next_event()
                if event is None:
                    data = await self.stream.receive_some(READ_SIZE)
                    if not data:
                        raise trio.BrokenResourceError("client closed during the request body")
                    self.parser.feed(data)  # a ParseError is answered by the read loop
                    continue
                if isinstance(event, EndOfMessage):
                    break
                assert isinstance(event, Body), event
                size += len(event.data)
                if size > MAX_ANNOUNCE:
                    detail = f"an announcement is at most {MAX_ANNOUNCE} bytes"
                    reply = json_reply(413, {"error": "payload_too_large", "detail": detail})
                    await self._answer_early(reply, head, close=True)
                    return
                parts.append(event.data)
            body = b"".join(parts)
        query = head.target.partition(b"?")[2]
        # The answer may wait for a DNS lookup (bounded by the plane): not the
        # client's time.
        self._timeout.deadline = math.inf
        reply = await self.plane.announce(
            head.method, query, head.headers, body, self.client or "unknown"
        )
        self._timeout.deadline = trio.current_time() + self.plane.idle_timeout
        self._exchange = None
        await self._reply(reply)

    def _health(self, method: bytes) -> Reply:
        if method not in (b"GET", b"HEAD"):
            return json_reply(
                405,
                {"error": "method_not_allowed", "detail": "use GET"},
                [(b"allow", b"GET, HEAD")],
            )
        if self.plane.shutting_down:
            return json_reply(503, {"status": "shutting_down"})
        return json_reply(200, {"status": "ok"})

    async def _agent_tunnel(self, head: RequestHead) -> None:
        """An agent dialing in: answer the WebSocket handshake (101) and hand the
        connection to its tunnel, or refuse with a plain HTTP response."""
        headers = head.headers
        accept = upgrade_response(head.method, headers)
        if isinstance(accept, Reply):
            await self._answer_early(accept, head, close=True)
            return
        query = head.target.partition(b"?")[2]
        admitted = self.plane.admit_agent(query, headers, remote=self.client)
        if isinstance(admitted, Reply):
            await self._answer_early(admitted, head, close=True)
            return
        if head.has_body:
            reply = json_reply(
                400, {"error": "bad_websocket_handshake", "detail": "unexpected request body"}
            )
            await self._answer_early(reply, head, close=True)
            return
        offered = {
            t.strip()
            for n, v in headers
            if n == b"sec-websocket-protocol"
            for t in v.decode("latin-1").split(",")
        }
        speaks = WS_SUBPROTOCOL in offered
        if speaks:
            scheme, host = public_view(headers, self.plane.scheme, trusted=self._trusted)
            urls = public_urls(admitted.name, host, self.plane.domains, scheme)
            accept = [
                *accept,
                (b"sec-websocket-protocol", WS_SUBPROTOCOL.encode()),
                *((PUBLIC_URL_HEADER, url.encode("ascii")) for url in urls),
            ]
        switch = response_head(101, b"Switching Protocols", accept)
        await self.stream.send_all(switch)
        trailing = self.parser.upgrade_trailing or b""
        transport = WebSocketTransport(self.stream, trailing, self.plane.max_message_size)
        if not speaks:
            # An agent of another protocol version: tell it why, in the close
            # reason its WebSocket library reports (no tunnel starts).
            log.info("agent %r from %s: protocol version mismatch", admitted.name, self.client)
            with trio.move_on_after(2):
                await transport.close(_codes.WS_VERSION_MISMATCH, VERSION_MISMATCH)
            return
        self._tunnel = (admitted, transport)  # run() returns it to the listener

    async def _upload(self, exchange: _InFlight) -> None:
        """Send the request (head, then body as it comes) up the stream; a reset
        or an early answer ends it."""
        parser = self.parser
        limits = self.plane.limits
        stream = exchange.stream
        head = exchange.head
        chunked = not any(n == b"content-length" for n, _ in head.headers)
        if chunked:
            framing = [(b"transfer-encoding", b"chunked")]
        else:
            framing = [(n, v) for n, v in head.headers if n == b"content-length"][:1]
        pending = exchange.head_bytes = exchange.forward.head(stream.upstream, framing=framing)
        continued = False
        try:
            while True:
                try:
                    event = parser.next_event()
                except ParseError as exc:  # (found in bytes read with the head)
                    await self._malformed_body(exchange, exc)
                if event is None:
                    if pending:
                        await stream.send_body(pending)
                        pending = b""
                    if head.expect_continue and not continued and not self._responding:
                        continued = True
                        await self._write([CONTINUE])
                    # The client's silence is bounded by the body timeout
                    # (408 then, in _timed_out: upload_wait is still set).
                    self._timeout.deadline = trio.current_time() + limits.body_timeout
                    with trio.CancelScope() as exchange.upload_wait:
                        data = await self.stream.receive_some(READ_SIZE)
                    exchange.upload_wait = None
                    # Sending it on may wait for the upstream to read: bounded
                    # by its timeout (504 then, in _timed_out).
                    self._timeout.deadline = trio.current_time() + exchange.send_allowance
                    if exchange.done:
                        # The response ended before the body was read: the
                        # rest is not needed.
                        raise StreamError("answered before the body was read")  # noqa: TRY301
                    if not data:
                        self._client_gone(exchange)
                        raise trio.BrokenResourceError("client closed during the upload")
                    try:
                        parser.feed(data)
                    except ParseError as exc:  # a malformed chunked body
                        await self._malformed_body(exchange, exc)
                    continue
                if exchange.stop_upload:
                    # The upstream refused the body: read (and drop) the rest.
                    raise StreamError("the upstream answered before the body was sent")  # noqa: TRY301
                if isinstance(event, Body):
                    exchange.received += len(event.data)
                    limit = self.plane.limits.max_body
                    if chunked and limit is not None and exchange.received > limit:
                        detail = f"the request body is larger than {limit} bytes"
                        await self._malformed_body(exchange, ParseError(413, detail))
                    piece = chunk(event.data) if chunked else event.data
                    if pending:
                        piece = pending + piece
                        pending = b""
                    await stream.send_body(piece)
                elif isinstance(event, EndOfMessage):
                    await stream.send_body(
                        pending + LAST_CHUNK if chunked else pending, queued=exchange.uploaded
                    )
                    return
                else:
                    raise AssertionError(event)  # noqa: TRY004
        except StreamError:
            # The agent reset the stream or the upstream answered early; the
            # answer (or error) is on the way. Drop the rest of the body, then close.
            await self._discard_body()

    def _body_too_large(self, head: RequestHead, received: int = 0) -> Reply | None:
        """413 for a body over the limit: announced by Content-Length (answered
        before any of it is read), or ``received`` so far (chunked)."""
        limit = self.plane.limits.max_body
        if limit is None or not head.has_body:
            return None
        length = next((int(v) for n, v in head.headers if n == b"content-length"), None)
        if max(length or 0, received) <= limit:
            return None
        detail = f"the request body is larger than {limit} bytes"
        return json_reply(413, {"error": "payload_too_large", "detail": detail})

    async def _malformed_body(self, exchange: _InFlight, exc: ParseError) -> NoReturn:
        """A request body that breaks its framing (a malformed chunk): the
        stream is abandoned, so the upstream never sees a complete request
        nor anything after it; the client is told, if nothing was answered
        yet, and the connection closes."""
        answered = self._responding
        if not answered:
            exchange.status = exc.status  # (counted as answered, before the relay ends)
        self._client_gone(exchange)  # (the relay, cancelled, writes nothing more)
        await self._cycle_done.wait()
        if not answered:
            self._method = b""
            error = "payload_too_large" if exc.status == 413 else "bad_request"
            payload = {"error": error, "detail": exc.detail}
            with trio.move_on_after(1):
                await self._reply(json_reply(exc.status, payload), close=True)
        raise trio.BrokenResourceError("malformed request body")

    async def _discard_body(self) -> None:
        """Drop the rest of the body while the answer is written (a client
        that sends all before it reads must not block the answer), then linger."""
        if not self._cycle_done.is_set():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drop_input, nursery.cancel_scope)
                await self._cycle_done.wait()
                nursery.cancel_scope.cancel()
        await self._linger()

    async def _drop_input(self, scope: trio.CancelScope) -> None:
        while await self.stream.receive_some(READ_SIZE):
            pass
        scope.cancel()

    async def _linger(self) -> NoReturn:
        """The answer is out but the client is still sending: end our side
        (FIN after the answer), read and drop what still comes (up to LINGER
        seconds, constant memory), then close."""
        with trio.move_on_after(LINGER):
            async with self._send_lock:
                await self.stream.send_eof()
            while await self.stream.receive_some(READ_SIZE):
                pass
        raise trio.BrokenResourceError("closed after an early answer")

    async def _answer_early(self, reply: Reply, head: RequestHead, *, close: bool = False) -> None:
        """Answer without the agent; keep the connection only if no body is pending."""
        close = close or head.has_body
        self._exchange = None
        await self._reply(reply, close=close)
        if close:
            if head.has_body:
                await self._linger()
            self._closing = True

    async def _answer_for_agent(
        self, reply: Reply, head: RequestHead, *, close: bool = False
    ) -> None:
        """Answer a request for an agent without it (offline, busy, refused,
        too large, ...): counted as the agent's requests are."""
        traffic = self.plane.traffic
        if traffic is not None:
            traffic.early(reply.status, self._started)
        if self.plane.access_log:
            name = self._agent_name
            self._access(name, head.method, head.target, reply.status, self._started, 0, 0)
        await self._answer_early(reply, head, close=close)

    def _access(
        self,
        name: str,
        method: bytes,
        target: bytes,
        status: int,
        started: float,
        got: int,
        sent: int,
    ) -> None:
        """``--access-log``: one line per request for an agent (no query
        string, no header value), with its stable JSON keys."""
        path = shown_path(target)
        took = (trio.current_time() - started) * 1000.0
        access_log.info(
            "%s %s %s %d %d/%d B %.1f ms",
            name,
            method.decode("latin-1"),
            path,
            status,
            got,
            sent,
            took,
            extra={
                "event": "request",
                "agent": name,
                "remote": self.client,
                "method": method.decode("latin-1"),
                "path": path,
                "status": status,
                "bytes_in": got,
                "bytes_out": sent,
                "duration_ms": round(took, 3),
            },
        )

    def _client_gone(self, exchange: _InFlight) -> None:
        exchange.gone = True
        exchange.stream.reset(_codes.H2_CANCEL)
        exchange.scope.cancel()

    def abandon(self) -> None:
        """Connection over: whatever is in flight is reset."""
        ex = self._exchange
        if ex is not None and not ex.done:
            self._client_gone(ex)

    # -- the relay (one task per request) -------------------------------------
    async def _relay(self, exchange: _InFlight) -> None:
        reusable = False
        try:
            with exchange.scope:
                reusable = await self._relay_response(exchange)
                if exchange.switched:
                    await self._pipe_download(exchange)
            if exchange.scope.cancelled_caught and not exchange.gone:
                if exchange.waiting_on_client:
                    log.info("agent %r: client stopped reading the response", exchange.name)
                    self._abort()
                else:
                    await self._upstream_timeout(exchange)
        finally:
            exchange.done = True
            if exchange.traffic is not None:
                traffic = self.plane.traffic
                assert traffic is not None
                traffic.end(
                    exchange.traffic,
                    exchange.method,
                    exchange.target,
                    exchange.status or CLIENT_GONE,
                    exchange.started,
                    exchange.received,
                    exchange.sent,
                )
            if self.plane.access_log:
                self._access(
                    exchange.name,
                    exchange.method,
                    exchange.target,
                    exchange.status or CLIENT_GONE,
                    exchange.started,
                    exchange.received,
                    exchange.sent,
                )
            if exchange.switch is not None:
                exchange.switch.set()
            if exchange.upload_wait is not None:
                exchange.upload_wait.cancel()
            reusable = reusable and exchange.request_done
            exchange.session.release(exchange.stream, reusable=reusable)
            self._cycle_done.set()

    async def _relay_response(self, exchange: _InFlight) -> bool:
        """Write the response; True if the stream can carry another request."""
        name = exchange.name
        method = exchange.head.method
        parser = ResponseParser(max_head=MAX_HEAD)
        parser.expect(method)
        received = False
        out: list[bytes] = []
        chunking = False
        upstream_keeps = False
        while True:
            try:
                event = parser.next_event()
                if event is None:
                    if out:
                        await self._write_response(exchange, out)
                        out = []
                    data = await self._read(exchange)
                    if data is None:
                        parser.feed_eof()
                    else:
                        received = True
                        parser.feed(data)
                    continue
            except StreamError as exc:
                if exchange.gone:
                    # We reset the stream ourselves (the client left, or a
                    # timeout answers for it): nothing is ours to say.
                    return False
                if not self._responding:
                    if not received and await self._retry(exchange):
                        parser = ResponseParser(max_head=MAX_HEAD)
                        parser.expect(method)
                        continue
                    failed = stream_failure(exc, name)
                    if exc.error_code == _codes.H2_CONNECT_ERROR:  # the upstream reset it
                        failed = upstream_broken(name)
                    await self._reply(failed, close=not exchange.request_done)
                    self._finish_cycle(exchange)
                else:
                    log.info("agent %r: response aborted mid-body: %s", name, exc)
                    self._abort()
                return False
            except ParseError as exc:
                if exchange.gone:
                    return False
                if not self._responding:
                    if not received and await self._retry(exchange):
                        parser = ResponseParser(max_head=MAX_HEAD)
                        parser.expect(method)
                        continue
                    log.info("agent %r: invalid response: %s", name, exc.detail)
                    await self._reply(upstream_broken(name), close=not exchange.request_done)
                    self._finish_cycle(exchange)
                else:
                    # A body cut short or contradicting its framing: the client
                    # must not take it as complete.
                    log.info("agent %r: bad response framing: %s", name, exc.detail)
                    self._abort()
                return False
            if isinstance(event, Body):
                out.append(chunk(event.data) if chunking else event.data)
            elif isinstance(event, EndOfMessage):
                if chunking:
                    out.append(LAST_CHUNK)
                if out:
                    await self._write_response(exchange, out)
                self._finish_cycle(exchange)
                return upstream_keeps and not parser.stray
            elif isinstance(event, ResponseHead):
                exchange.status = event.status
                if event.status == 101 and exchange.switch is not None:
                    problem = _bad_switch(exchange.head, event)
                    if problem is not None:
                        log.info("agent %r: the upstream's 101 %s", name, problem)
                        exchange.switch.set()
                        await self._reply(upstream_broken(name), close=True)
                        self._finish_cycle(exchange)
                        return False
                    await self._switch(exchange, event, out, parser.upgrade_trailing)
                    return False  # _relay pipes (this frame and its parser are not kept)
                if event.status == 101:
                    # No Upgrade was forwarded: a switch nobody asked for.
                    log.info("agent %r: unrequested 101 from the upstream", name)
                    await self._reply(upstream_broken(name), close=True)
                    self._finish_cycle(exchange)
                    return False
                if exchange.switch is not None:
                    exchange.switch.set()  # refused: its answer is relayed as it is
                upstream_keeps = event.keep_alive
                if event.status >= 300 and not exchange.request_done:
                    # An answer before the body was read: the rest of the
                    # upload stops, and the connection closes after it.
                    exchange.stop_upload = True
                    self._keep_alive = False
                chunking = self._response_framing(event, out)
            elif isinstance(event, Informational):
                if event.status != 100 and not self._http10:  # (100: we said it already)
                    out.append(
                        response_head(event.status, event.reason, clean_headers(event.headers))
                    )
            else:
                raise AssertionError(event)  # noqa: TRY004

    async def _switch(
        self,
        exchange: _InFlight,
        head: ResponseHead,
        out: list[bytes],
        trailing: bytes | None,
    ) -> None:
        """The upstream switched to WebSocket: its 101 (and any bytes after it)
        go to the client, and the reader may start piping the other way."""
        headers = [*clean_headers(head.headers), *_WEBSOCKET_UPGRADE]
        out.append(response_head(101, head.reason or b"Switching Protocols", headers))
        if trailing:
            out.append(trailing)
        self._responding = True
        exchange.switched = True
        exchange.timeout = math.inf  # a WebSocket may be silent for hours
        assert exchange.switch is not None
        exchange.switch.set()
        await self._write_response(exchange, out)

    async def _pipe_download(self, exchange: _InFlight) -> None:
        """After the 101: the stream's bytes go to the client as they come,
        unparsed (frames, pings, close frames and extensions are end to end),
        until either side ends. Then the connection closes: an agent lost
        mid-message cannot be given a close frame, so the client sees its TCP
        connection end."""
        stream = exchange.stream
        try:
            while True:
                exchange.waiting_on_client = False
                exchange.scope.deadline = math.inf
                data = await stream.read()
                if data is None:
                    break  # the upstream closed its side
                await self._write_response(exchange, [data])
        except StreamError as exc:
            log.info("agent %r: WebSocket ended by the tunnel: %s", exchange.name, exc)
        self._abort()

    def _response_framing(self, head: ResponseHead, out: list[bytes]) -> bool:
        """Queue the client's response head; True if the body is to be chunked."""
        headers = clean_headers(head.headers)
        chunking = False
        bodiless = self._method == b"HEAD" or head.status in (204, 304) or head.status < 200
        if not bodiless and head.content_length is None:
            if self._http10:
                self._keep_alive = False  # close-delimited: the end is the close
            else:
                chunking = True
                headers.append((b"transfer-encoding", b"chunked"))
        if not self._keep_alive:
            headers.append((b"connection", b"close"))
        elif self._http10:
            headers.append((b"connection", b"keep-alive"))
        out.append(
            response_head(head.status, head.reason or _REASONS.get(head.status, b""), headers)
        )
        self._responding = True
        return chunking

    async def _read(self, exchange: _InFlight) -> bytes | None:
        """The next bytes of the response. Once the request is sent, the
        upstream may stay silent for its timeout: the relay's own scope has
        that deadline (one scope per request, not per read)."""
        exchange.waiting_on_client = False
        if exchange.request_done and exchange.timeout != math.inf:
            exchange.scope.deadline = trio.current_time() + exchange.timeout
        elif exchange.scope.deadline != math.inf:
            exchange.scope.deadline = math.inf
        return await exchange.stream.read()

    async def _write_response(self, exchange: _InFlight, out: list[bytes]) -> None:
        """Write to the client; one that takes nothing for the idle timeout is
        cut off (the upstream's silence is not counted meanwhile)."""
        exchange.waiting_on_client = True
        exchange.scope.deadline = trio.current_time() + self.plane.idle_timeout
        exchange.sent += sum(map(len, out))
        await self._write(out)

    async def _upstream_timeout(self, exchange: _InFlight) -> None:
        """The upstream was silent for its timeout: 504 if nothing was
        answered yet, else the client connection is aborted."""
        if self._responding:
            log.info("agent %r: response stalled mid-body", exchange.name)
            self._abort()
            return
        detail = f"no response within {exchange.timeout:g} s"
        payload = {"error": "upstream_timeout", "agent": exchange.name, "detail": detail}
        exchange.stream.reset(_codes.H2_CANCEL)
        await self._reply(json_reply(504, payload), close=not exchange.request_done)
        self._finish_cycle(exchange)

    async def _retry(self, exchange: _InFlight) -> bool:
        """A kept-alive stream ended before any answer (its upstream closed the
        connection as the request went out): send a bodiless idempotent
        request once more, on a fresh stream."""
        head = exchange.head
        if head.has_body or head.method not in _IDEMPOTENT or not exchange.request_done:
            return False
        if exchange.fresh:
            return False  # not a stale keep-alive: the upstream failed on a new connection
        if exchange.retried:
            return False
        exchange.retried = True
        session = exchange.session
        session.release(exchange.stream, reusable=False)  # (again in _relay: a no-op)
        try:
            stream, _ = await session.acquire(fresh=True)
        except (AgentBusy, StreamError, StreamRefused):
            return False
        exchange.stream = stream
        exchange.fresh = True
        try:
            await stream.send_body(exchange.head_bytes)
        except StreamError:
            return False
        return True

    def _finish_cycle(self, exchange: _InFlight) -> None:
        if exchange.head.has_body and not exchange.request_done:
            return  # the reader drops the rest of the body (a lingering close)
        if self._closing or not self._keep_alive:
            self._abort()
        elif self._waiting is not None and not self._waiting.enter():
            # Too many connections wait for a request head: an idle kept-alive
            # one is closed after its response (RFC 9112 9.5 lets a server).
            self._abort()
        else:
            self._responding = False
            self._timeout.deadline = trio.current_time() + self.plane.idle_timeout

    def _abort(self) -> None:
        """Close the connection now (no final chunk: a truncated body stays visible)."""
        self._closing = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


def _refusal(refused: StreamRefused) -> Reply:
    """The agent's own answer to a refused stream (its JSON error), as ours."""
    content_type = next(
        (v for n, v in refused.headers if n == b"content-type"), b"application/json"
    )
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(refused.body)).encode()),
    ]
    return Reply(refused.status if 400 <= refused.status <= 599 else 502, headers, refused.body)


_WEBSOCKET_UPGRADE = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]


def _refused_upgrade(head: RequestHead, decision: object) -> Reply | None:
    """For a request that asks for an Upgrade: the refusal to answer it with,
    or None. A WebSocket handshake to an agent is passed through (checked
    here: RFC 6455 4.1); any other Upgrade to an agent (h2c, raw TCP
    protocols) is refused: never a raw pipe by accident."""
    if head.method == b"CONNECT":
        return json_reply(
            405, {"error": "method_not_allowed", "detail": "CONNECT is not forwarded"}
        )
    if not isinstance(decision, Route):
        return None
    if _upgrades_to(head.headers) != {b"websocket"}:
        detail = (
            "only WebSocket upgrades are forwarded (this gateway speaks HTTP/1.1 to agents; "
            "no h2c): retry without Upgrade"
        )
        return json_reply(400, {"error": "upgrade_not_supported", "detail": detail})
    if head.version != b"1.1":
        return json_reply(
            400, {"error": "bad_websocket_handshake", "detail": "a WebSocket handshake is HTTP/1.1"}
        )
    checked = upgrade_response(head.method, head.headers)
    if isinstance(checked, Reply):
        return checked
    if head.has_body:
        detail = "a WebSocket handshake has no body"
        return json_reply(400, {"error": "bad_websocket_handshake", "detail": detail})
    return None


class _Switched:
    """``_request``'s answer when the connection became a WebSocket pipe."""


_SWITCHED = _Switched()
_SPENT = RequestParser(max_head=1)
"""The parser of a connection nothing parses any more (a WebSocket pipe)."""
_SPENT_HEAD = RequestHead(b"GET", b"/", b"1.1", [], False, False, False, True)
_SPENT_FORWARD = Forward("", None, b"", b"", b"", [])  # type: ignore[arg-type]


def _bad_switch(request: RequestHead, answer: ResponseHead) -> str | None:
    """What is wrong with an upstream's 101 to a WebSocket handshake (it must
    switch to WebSocket and prove it read the key, RFC 6455 4.2.2), or None."""
    if _upgrades_to(answer.headers) != {b"websocket"}:
        return "does not switch to WebSocket"
    key = next((v for n, v in request.headers if n == b"sec-websocket-key"), b"")
    accepts = [v.strip() for n, v in answer.headers if n == b"sec-websocket-accept"]
    if accepts != [generate_accept_token(key)]:
        return "has no valid Sec-WebSocket-Accept"
    return None


def _upgrades_to(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The protocols an ``Upgrade`` header list names, lower case."""
    return {
        token.strip().lower()
        for name, value in headers
        if name == b"upgrade"
        for token in value.split(b",")
    }
