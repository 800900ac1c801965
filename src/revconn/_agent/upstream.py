"""What an agent does with a tunnel stream: relay its bytes.

Every stream the gateway opens is an extended CONNECT stream carrying raw
HTTP/1.1 (docs/protocol.md section 5); the agent parses none of it.

* ``HttpUpstream`` (``--upstream URL``): the stream is a byte pipe to one
  upstream connection, opened when the stream is (answered ``200`` with how
  the gateway should address the upstream: its Host, path prefix and
  timeout) or refused with a JSON ``502 upstream_unreachable`` when the
  connect fails. Bytes flow both ways until either side ends; the gateway,
  which parses both directions, decides what a complete response is.
* ``AsgiUpstream`` (``--app``): the stream is served by hypercorn's HTTP/1.1
  protocol layer (``asgi.py``), WebSockets included.

An upstream that answers before it has read the whole request (a 413, a
401) and closes: its answer is relayed, the stream ended, then reset with
NO_ERROR so the gateway stops the upload and keeps the answer (RFC 9113 8.1).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any, Protocol
from urllib.parse import urlsplit

import trio

from .. import _codes
from .._errors import ConfigError, StreamError, UpstreamConnectError
from .._proto.connect import PROTOCOL_TOKEN, UPSTREAM_UNREACHABLE
from .._runtime.fastpath import send_all
from .._runtime.streams import TunnelStream
from .monitor import AgentMonitor, FirstByteTimer

__all__ = ["ASGIApp", "AsgiUpstream", "HttpUpstream", "StreamChannel", "Upstream", "error_body"]

log = logging.getLogger("revconn.upstream")

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]

LIFESPAN_TIMEOUT = 10.0
READ_SIZE = 256 * 1024
# The public details of 502s name no address: the agent's network is its own
# (its log says which upstream failed, and why).
UNREACHABLE = UPSTREAM_UNREACHABLE

_Conn = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class Upstream(Protocol):
    async def handle(self, stream: TunnelStream) -> None:
        """Serve one tunnel stream (its ``request`` is set)."""
        ...

    def running(self) -> AbstractAsyncContextManager[None]:
        """Context for the agent's lifetime (an ASGI app's lifespan)."""
        ...

    async def aclose(self) -> None: ...


def error_body(error: str, agent: str, detail: str) -> bytes:
    return json.dumps({"error": error, "agent": agent, "detail": detail}).encode()


async def refuse(stream: TunnelStream, status: int, error: str, agent: str, detail: str) -> None:
    """Refuse a stream's CONNECT with a JSON error (HEADERS + DATA, END_STREAM)."""
    body = error_body(error, agent, detail)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    stream.respond_nowait(status, headers)
    await stream.send_body(body, end_stream=True)


async def check_connect(stream: TunnelStream, agent: str) -> bool:
    """True if the stream is a revconn CONNECT; else it is refused with 400."""
    assert stream.request is not None
    fields = dict(stream.request.headers)
    if fields.get(b":method") == b"CONNECT" and fields.get(b":protocol") == PROTOCOL_TOKEN:
        return True
    detail = f"streams must be CONNECT with :protocol {PROTOCOL_TOKEN.decode()}"
    await refuse(stream, 400, "bad_stream", agent, detail)
    return False


def finish(stream: TunnelStream) -> None:
    """After our side ended: a gateway still sending is told to stop (NO_ERROR)."""
    if stream.local_ended and not stream.remote_ended and stream.reset_code is None:
        stream.reset(_codes.H2_NO_ERROR)


class StreamChannel:
    """A tunnel stream as the byte channel ``asgi.serve_http1`` reads and writes."""

    __slots__ = ("stream", "timer")

    def __init__(self, stream: TunnelStream, timer: FirstByteTimer) -> None:
        self.stream = stream
        self.timer = timer

    async def receive(self) -> bytes | None:
        data = await self.stream.read()
        if data:
            self.timer.request_bytes()
        return data

    async def send(self, data: bytes) -> None:
        self.timer.answer_bytes(data)
        await self.stream.send_body(data)

    async def send_eof(self) -> None:
        await self.stream.end()


class HttpUpstream:
    """``--upstream URL``: each stream is a byte pipe to one upstream connection."""

    def __init__(
        self,
        url: str,
        *,
        agent: str,
        timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        monitor: AgentMonitor | None = None,
    ) -> None:
        """``ssl_context``: for an https upstream (default: the system's CAs);
        ``monitor`` counts connect times, failures and latency."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"upstream URL {url!r} must be http://HOST[:PORT] or https://...")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"upstream URL {parts.scheme}://...@{parts.hostname}: must not carry "
                "credentials (user:password@): clients send their own Authorization"
            )
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError("upstream timeout must be > 0 seconds")
        self.url = url
        self.agent = agent
        self.timeout = timeout
        secure = parts.scheme == "https"
        try:
            self.port = parts.port or (443 if secure else 80)
        except ValueError:
            raise ConfigError(f"upstream URL {url!r} has an invalid port") from None
        self.host = parts.hostname
        self._ssl = (ssl_context or ssl.create_default_context()) if secure else None
        self._accept_headers = [
            (b"revconn-upstream-host", parts.netloc.encode("idna")),
            (b"revconn-upstream-timeout", f"{timeout:g}".encode()),
        ]
        prefix = parts.path.rstrip("/").encode()
        if prefix:
            self._accept_headers.append((b"revconn-upstream-prefix", prefix))
        self._down = False
        """The last connect failed (logged once until one succeeds again)."""
        self.monitor = monitor if monitor is not None else AgentMonitor()

    async def aclose(self) -> None:
        return None

    def running(self) -> AbstractAsyncContextManager[None]:
        return nullcontext()

    async def _connect(self) -> _Conn:
        conn: _Conn
        started = trio.current_time()
        try:
            with trio.fail_after(self.timeout):
                if self._ssl is not None:
                    conn = await trio.open_ssl_over_tcp_stream(
                        self.host, self.port, ssl_context=self._ssl, https_compatible=True
                    )
                    await conn.do_handshake()
                else:
                    conn = await trio.open_tcp_stream(self.host, self.port)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            reason = connect_failure(exc)
            raise UpstreamConnectError(
                f"cannot connect to {self.host}:{self.port}: {reason}", reason=reason
            ) from exc
        self.monitor.upstream_connect.observe(trio.current_time() - started)
        return conn

    async def handle(self, stream: TunnelStream) -> None:
        if not await check_connect(stream, self.agent):
            return
        try:
            conn = await self._connect()
        except UpstreamConnectError as exc:
            self.monitor.upstream_unreachable += 1
            if not self._down:
                self._down = True
                log.warning("upstream %s unreachable: %s", self.url, exc.reason)
            await refuse(stream, 502, "upstream_unreachable", self.agent, UNREACHABLE)
            return
        if self._down:
            self._down = False
            log.info("upstream %s reachable again", self.url)
        try:
            stream.respond_nowait(200, self._accept_headers)
            await stream.tunnel.flush()
            timer = FirstByteTimer(self.monitor.upstream_latency)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._to_upstream, stream, conn, timer, nursery.cancel_scope)
                await self._to_gateway(stream, conn, timer)
                nursery.cancel_scope.cancel()
            if stream.reset_code is None:
                if not stream.local_ended:
                    await stream.end()  # the gateway retired the stream: end ours too
                finish(stream)
        finally:
            await trio.aclose_forcefully(conn)

    async def _to_upstream(
        self, stream: TunnelStream, conn: _Conn, timer: FirstByteTimer, scope: trio.CancelScope
    ) -> None:
        """Gateway -> upstream. The gateway ending the stream retires it: the
        upstream connection is closed (an idle stream has nothing in flight)."""
        try:
            while (data := await stream.read()) is not None:
                timer.request_bytes()
                await send_all(conn, data)  # (TLS: the stream's own send)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The upstream stopped reading and closed (an early answer): what
            # it sent still reaches the gateway through the other direction.
            return
        except StreamError:
            pass  # the gateway reset the stream: abandon the connection
        scope.cancel()

    async def _to_gateway(self, stream: TunnelStream, conn: _Conn, timer: FirstByteTimer) -> None:
        """Upstream -> gateway; the upstream closing ends the stream, the
        upstream resetting the connection resets it with CONNECT_ERROR (RFC
        9113 8.5): what came before still reaches the gateway, which keeps a
        complete response and aborts an incomplete or close-delimited one."""
        try:
            while data := await conn.receive_some(READ_SIZE):
                timer.answer_bytes(data)
                await stream.send_body(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            stream.reset(_codes.H2_CONNECT_ERROR)
            return
        await stream.end()


class AsgiUpstream:
    """``--app``: each stream is served by the ASGI app through hypercorn's
    HTTP/1.1 protocol layer."""

    def __init__(self, app: ASGIApp, *, agent: str, monitor: AgentMonitor | None = None) -> None:
        """``monitor`` counts the app's latency (time to its first answer byte)."""
        # hypercorn is loaded only by agents that serve an app (--app).
        from . import asgi

        self.app = app
        self.agent = agent
        self.monitor = monitor if monitor is not None else AgentMonitor()
        self._asgi = asgi
        self.config = asgi.asgi_config()

    async def aclose(self) -> None:
        return None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the app's ASGI lifespan (startup before serving, shutdown after).

        An app without lifespan support (it raises, or returns at once) is
        served anyway; a reported startup failure is a ConfigError.
        """
        send_ch, receive_ch = trio.open_memory_channel[MutableMapping[str, Any]](2)
        replies_send, replies = trio.open_memory_channel[MutableMapping[str, Any]](2)

        async def lifespan() -> None:
            scope = {
                "type": "lifespan",
                "asgi": {"version": "3.0", "spec_version": "2.0"},
                "state": {},
            }
            try:
                await self.app(scope, receive_ch.receive, replies_send.send)
            except Exception:  # no lifespan support: serve without it
                log.debug("ASGI app has no lifespan support", exc_info=True)
            finally:
                replies_send.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lifespan)
            await send_ch.send({"type": "lifespan.startup"})
            supported = False
            with trio.move_on_after(LIFESPAN_TIMEOUT):
                async for reply in replies:
                    if reply["type"] == "lifespan.startup.failed":
                        raise ConfigError(
                            f"the ASGI app failed to start: {reply.get('message', '')}"
                        )
                    supported = reply["type"] == "lifespan.startup.complete"
                    break
            try:
                yield
            finally:
                if supported:
                    with trio.move_on_after(LIFESPAN_TIMEOUT) as scope:
                        scope.shield = True
                        await send_ch.send({"type": "lifespan.shutdown"})
                        async for _ in replies:
                            break
                nursery.cancel_scope.cancel()

    async def handle(self, stream: TunnelStream) -> None:
        if not await check_connect(stream, self.agent):
            return
        await stream.respond(200, [], end_stream=False)
        channel = StreamChannel(stream, FirstByteTimer(self.monitor.upstream_latency))
        await self._asgi.serve_http1(self.app, channel, config=self.config, agent=self.agent)
        finish(stream)


def connect_failure(exc: BaseException) -> str:
    """Why a connect failed, briefly ("connection refused"). trio's
    ``open_tcp_stream`` raises one OSError for all the addresses it tried, with
    each attempt's error in its cause."""
    if isinstance(exc, trio.TooSlowError):
        return "connect timed out"
    errors: list[BaseException] = [exc]
    if isinstance(exc.__cause__, BaseExceptionGroup):
        errors = list(exc.__cause__.exceptions)
    elif isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        errors = [exc.__cause__]  # the TLS handshake failed
    reasons: list[str] = []
    for error in errors:
        if isinstance(error, socket.gaierror):
            reason = f"cannot resolve the host ({error.strerror})"
        elif isinstance(error, OSError) and error.errno and not isinstance(error, ssl.SSLError):
            reason = os.strerror(error.errno).lower()
        else:
            reason = str(error) or type(error).__name__
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons)
