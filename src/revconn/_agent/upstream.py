"""What an agent does with a request stream: call its upstream, stream the answer back.

Two kinds of upstream:

* ``HttpUpstream``: an HTTP/1.1 server reached through a lean keep-alive pool
  on h11 (``pool.py``; httpx/httpcore's pool bookkeeping dominated the agent's
  CPU in profiles);
* ``AsgiUpstream``: an ASGI application called in-process, with no local port.

Errors become JSON responses with a stable ``error`` field (502
``upstream_unreachable``, 504 ``upstream_timeout``); an upstream that fails
after its response started gets the stream reset, so the gateway aborts the
client instead of ending a truncated body cleanly. An upstream that answers
before it has read the whole request body (a 413, a 401) has its answer
relayed, then the stream reset with NO_ERROR: the gateway stops the upload
and keeps the answer (RFC 9113 8.1).
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import trio

from .. import _codes
from .._errors import ConfigError, StreamError
from .._proto.headers import Headers, clean_headers
from .._runtime.streams import TunnelStream
from .pool import Pool, PoolResponse, UpstreamClosed, UpstreamConnectError

__all__ = ["AsgiUpstream", "HttpUpstream", "Upstream", "error_body"]

log = logging.getLogger("revconn.upstream")

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]

NO_BODY_STATUS = frozenset({204, 304})
LIFESPAN_TIMEOUT = 10.0
# The public details of 502s name no address: the agent's network is its own
# (its log says which upstream failed, and why).
UNREACHABLE = "the agent could not reach its upstream service"
BROKEN = "the agent's upstream service did not send a valid response"


class Upstream(Protocol):
    async def handle(self, stream: TunnelStream) -> None:
        """Serve one request stream (its ``request`` is set)."""
        ...

    def running(self) -> AbstractAsyncContextManager[None]:
        """Context for the agent's lifetime (an ASGI app's lifespan)."""
        ...

    async def aclose(self) -> None: ...


def error_body(error: str, agent: str, detail: str) -> bytes:
    return json.dumps({"error": error, "agent": agent, "detail": detail}).encode()


async def respond_error(
    stream: TunnelStream, status: int, error: str, agent: str, detail: str
) -> None:
    """Answer the stream with a JSON error (one HEADERS + one DATA with END_STREAM)."""
    body = error_body(error, agent, detail)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await stream.respond(status, headers, end_stream=False)
    await stream.send_body(body, end_stream=True)


class _Request:
    """The pseudo-headers and end-to-end headers of a request stream."""

    __slots__ = ("authority", "headers", "method", "target")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.method = b"GET"
        self.target = b"/"
        self.authority = b""
        rest: Headers = []
        for name, value in raw:
            if name == b":method":
                self.method = value
            elif name == b":path":
                self.target = value
            elif name == b":authority":
                self.authority = value
            elif not name.startswith(b":"):
                rest.append((name, value))
        self.headers = rest


def response_headers(status: int, headers: Headers) -> Headers:
    """Upstream response headers made safe for h2: clean, and no Content-Length
    where HTTP/2 would check it against an empty body (204, 304)."""
    out = clean_headers(headers)
    if status in NO_BODY_STATUS:
        out = [(n, v) for n, v in out if n != b"content-length"]
    else:
        lengths = {v for n, v in out if n == b"content-length"}
        if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
            out = [(n, v) for n, v in out if n != b"content-length"]
    return out


class HttpUpstream:
    """Forward request streams to an HTTP/1.1 (or HTTPS) server through a lean pool."""

    def __init__(
        self,
        url: str,
        *,
        agent: str,
        timeout: float = 60.0,
        max_connections: int = 100,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"upstream URL {url!r} must be http://HOST[:PORT] or https://...")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError("upstream timeout must be > 0 seconds")
        self.url = url
        self.agent = agent
        self.timeout = timeout
        secure = parts.scheme == "https"
        try:
            port = parts.port or (443 if secure else 80)
        except ValueError:
            raise ConfigError(f"upstream URL {url!r} has an invalid port") from None
        self._prefix = parts.path.rstrip("/").encode()
        self._host_header = parts.netloc.encode("idna")
        self._pool = Pool(
            parts.hostname,
            port,
            ssl_context=ssl.create_default_context() if secure else None,
            max_connections=max_connections,
            io_timeout=timeout,
        )
        self._down = False
        """The last connect failed (logged once until a response comes again)."""

    async def aclose(self) -> None:
        await self._pool.aclose()

    def running(self) -> AbstractAsyncContextManager[None]:
        return nullcontext()

    async def handle(self, stream: TunnelStream) -> None:
        assert stream.request is not None
        req = _Request(stream.request.headers)
        headers = req.headers
        has_body = not stream.request.end_stream
        if has_body and not any(n == b"content-length" for n, _ in headers):
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        headers = [(b"host", self._host_header), *headers]
        t = self.timeout
        try:
            async with self._pool.request(
                req.method, self._prefix + req.target, headers, stream.read if has_body else None
            ) as response:
                self._reachable()
                await self._relay(stream, req.method, response)
        except trio.TooSlowError:
            if stream.reset_code is None and not stream.responded:
                detail = f"no response within {t:g} s"
                await respond_error(stream, 504, "upstream_timeout", self.agent, detail)
            elif not stream.local_ended:
                stream.reset(_codes.H2_INTERNAL_ERROR)
        except UpstreamConnectError as exc:
            self._unreachable(exc)
            await respond_error(stream, 502, "upstream_unreachable", self.agent, UNREACHABLE)
        except UpstreamClosed as exc:
            if not stream.responded:
                log.info("upstream %s failed on stream %d: %s", self.url, stream.id, exc)
                await respond_error(stream, 502, "upstream_unreachable", self.agent, BROKEN)
            elif not stream.local_ended:
                log.info("upstream failed mid-response on stream %d: %s", stream.id, exc)
                stream.reset(_codes.H2_INTERNAL_ERROR)
        if stream.local_ended and not stream.remote_ended:
            # Answered before the whole request body came (a 413, a 401): tell
            # the gateway to stop sending it, which keeps the answer (RFC 9113 8.1).
            stream.reset(_codes.H2_NO_ERROR)

    def _unreachable(self, exc: UpstreamConnectError) -> None:
        """Log a failed connect once, when the upstream goes from reachable to not."""
        if not self._down:
            self._down = True
            log.warning("upstream %s unreachable: %s", self.url, exc.reason)

    def _reachable(self) -> None:
        if self._down:
            self._down = False
            log.info("upstream %s reachable again", self.url)

    async def _relay(self, stream: TunnelStream, method: bytes, response: PoolResponse) -> None:
        status = response.status
        headers = response_headers(status, response.headers)
        if method == b"HEAD" or status in NO_BODY_STATUS:
            await stream.respond(status, headers, end_stream=True)
            async for _ in response.aiter_chunks():
                pass  # h11 knows there is no body; this completes the exchange
            return
        stream.respond_nowait(status, headers)  # goes out with the first DATA
        async for chunk, last in response.aiter_chunks():
            await stream.send_body(chunk, end_stream=last)
        await stream.end()  # a no-op when the last chunk carried END_STREAM


class AsgiUpstream:
    """Serve request streams with an in-process ASGI application."""

    def __init__(self, app: ASGIApp, *, agent: str) -> None:
        self.app = app
        self.agent = agent

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
        assert stream.request is not None
        req = _Request(stream.request.headers)
        target = req.target
        path, _, query = target.partition(b"?")
        host = req.authority or b"localhost"
        client_ip = "127.0.0.1"
        for name, value in req.headers:
            if name == b"x-forwarded-for":
                client_ip = value.decode("latin-1").split(",")[-1].strip() or client_ip
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": req.method.decode("ascii"),
            "scheme": "http",
            "path": unquote(path.decode("latin-1")),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": [(b"host", host), *req.headers],
            "client": (client_ip, 0),
            "server": (host.decode("latin-1").split(":")[0], 80),
            "state": {},
        }
        body_done = False
        start: tuple[int, Headers] | None = None
        headers_sent = False
        ended = False

        async def receive() -> MutableMapping[str, Any]:
            nonlocal body_done
            if not body_done:
                chunk = await stream.read()
                if chunk is None:
                    body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                return {"type": "http.request", "body": chunk, "more_body": True}
            # Nothing more to receive: wait until the response is done or the client left.
            while stream.reset_code is None and stream.tunnel.end is None and not ended:
                await stream._wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal start, headers_sent, ended
            if ended:
                return
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(bytes(n), bytes(v)) for n, v in message.get("headers", [])]
                start = (status, response_headers(status, headers))
                return
            if message["type"] != "http.response.body":
                return
            if start is None:
                raise RuntimeError("http.response.body before http.response.start")
            body = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            if not headers_sent:
                headers_sent = True
                status, headers = start
                if req.method == b"HEAD" or status in NO_BODY_STATUS:
                    ended = True
                    await stream.respond(status, headers, end_stream=True)
                    return
                await stream.respond(status, headers, end_stream=False)
            ended = not more
            await stream.send_body(body, end_stream=not more)
            if ended:
                stream._wake()  # release a receive() waiting for the disconnect

        try:
            await self.app(scope, receive, send)
        except StreamError:
            raise
        except Exception:
            log.exception("ASGI app failed on stream %d", stream.id)
            if not headers_sent:
                detail = "the application raised an exception"
                await respond_error(stream, 500, "app_error", self.agent, detail)
            else:
                stream.reset(_codes.H2_INTERNAL_ERROR)
            return
        if not ended:
            if not headers_sent:
                detail = "the application returned no response"
                await respond_error(stream, 500, "app_error", self.agent, detail)
            else:
                stream.reset(_codes.H2_INTERNAL_ERROR)
        elif not stream.remote_ended:
            stream.reset(_codes.H2_NO_ERROR)  # answered without the whole body (RFC 9113 8.1)
