"""Forwarding to an announced URL (``revconn-agent serve --tunnel-url``):
an ``AgentSession`` whose "streams" are kept-alive TCP (or TLS) connections
to the announced host, so the exchange that serves tunnel streams serves
these too, byte for byte: the same head rewriting, framing, timeouts, retry
on a stale kept-alive connection, and JSON errors. Flow control is TCP's.

Every new connection resolves the host again and checks each address against
the ``AddressPolicy`` (SSRF: DNS may have changed since the announcement),
then connects to exactly the addresses it checked.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import ssl
from typing import Any

import trio

from .. import _codes
from .._errors import AgentBusy, StreamError
from .._proto.announce import AnnouncedUrl
from .._proto.connect import UPSTREAM_UNREACHABLE, UpstreamInfo
from .._runtime.fastpath import send_all
from .._runtime.streampool import IDLE_TIMEOUT, StreamRefused
from .addresses import AddressPolicy, AddressRefused

__all__ = ["DirectSession", "DirectStream"]

log = logging.getLogger("revconn.direct")

READ_SIZE = 64 * 1024
MAX_IDLE = 32
"""Kept-alive connections held per announced URL."""

_Conn = trio.SocketStream | trio.SSLStream[trio.SocketStream]


def _refused(status: int, error: str, agent: str, detail: str) -> StreamRefused:
    body = json.dumps({"error": error, "agent": agent, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return StreamRefused(status, headers, body)


def _socket_of(conn: _Conn) -> trio.socket.SocketType:
    if isinstance(conn, trio.SSLStream):
        return conn.transport_stream.socket
    return conn.socket


class DirectStream:
    """One connection to the announced service, lent to one request at a time
    (the exchange's ``RequestStream``)."""

    __slots__ = ("_conn", "_upstream", "closed", "idle_since", "lent", "remote_ended")

    def __init__(self, conn: _Conn, upstream: UpstreamInfo) -> None:
        self._conn = conn
        self._upstream = upstream
        self.remote_ended = False
        self.closed = False
        self.idle_since = 0.0
        self.lent = True
        """Lent to a request (release() counts it back exactly once)."""

    @property
    def upstream(self) -> UpstreamInfo:
        return self._upstream

    async def send_body(
        self,
        data: bytes,
        *,
        end_stream: bool = False,
        queued: Any = None,
    ) -> None:
        try:
            await send_all(self._conn, data)  # (TLS: the stream's own send)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise StreamError(
                f"the announced service's connection broke: {exc}",
                error_code=_codes.H2_CONNECT_ERROR,
            ) from None
        if queued is not None:
            queued()

    async def read(self) -> bytes | None:
        try:
            data = await self._conn.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.remote_ended = True
            raise StreamError(
                f"the announced service's connection broke: {exc}",
                error_code=_codes.H2_CONNECT_ERROR,
            ) from None
        if not data:
            self.remote_ended = True
            return None
        return data if isinstance(data, bytes) else bytes(data)  # (TLS gives bytearray)

    def reset(self, error_code: int = _codes.H2_CANCEL) -> None:
        """Close the connection now (tasks using it get ClosedResourceError)."""
        if not self.closed:
            self.closed = True
            _socket_of(self._conn).close()

    def looks_alive(self) -> bool:
        """An idle kept-alive connection the service has not closed (nor sent
        anything on: that would be a protocol error)."""
        if self.closed or self.remote_ended:
            return False
        fd = _socket_of(self._conn).fileno()
        if fd < 0:
            return False
        poll = select.poll()
        poll.register(fd, select.POLLIN | select.POLLPRI)
        # Readable while idle: the service closed it (EOF) or sent stray bytes.
        return not poll.poll(0)


class DirectSession:
    """An announced URL as the exchange sees an agent: it lends connections
    (idle kept-alive ones first) and takes them back."""

    def __init__(
        self,
        name: str,
        url: AnnouncedUrl,
        policy: AddressPolicy,
        *,
        timeout: float | None,
        connect_timeout: float,
        max_connections: int = 100,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self._policy = policy
        self._upstream = UpstreamInfo(url.authority, url.prefix, timeout)
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._idle: list[DirectStream] = []
        self._lent = 0
        self._closed = False
        self._failing: str | None = None
        """Why the last connection attempt failed (logged once per change)."""

    rtt = None

    @property
    def accepting(self) -> bool:
        return not self._closed

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def lent_connections(self) -> int:
        return self._lent

    def request_close(self, close_code: int, reason: str) -> None:
        """The announcement is gone: close idle connections; lent ones close
        when their request is done."""
        self._closed = True
        while self._idle:
            self._idle.pop().reset()

    async def acquire(self, *, fresh: bool = False) -> tuple[DirectStream, bool]:
        if self._closed:
            raise StreamError("the announcement was withdrawn")
        if self._lent >= self._max_connections:
            raise AgentBusy("too many concurrent requests")  # (a tunnel agent's words)
        if not fresh:
            self._prune(trio.current_time())
            while self._idle:
                stream = self._idle.pop()
                if stream.looks_alive():
                    self._lent += 1
                    stream.lent = True
                    return stream, False
                stream.reset()
        self._lent += 1
        try:
            return await self._connect(), True
        except BaseException:
            self._lent -= 1
            raise

    def release(self, stream: Any, *, reusable: bool) -> None:
        assert isinstance(stream, DirectStream)
        if not stream.lent:
            return  # released already (a failed retry gives its stream back first)
        stream.lent = False
        self._lent -= 1
        now = trio.current_time()
        if reusable and not self._closed and len(self._idle) < MAX_IDLE and stream.looks_alive():
            stream.idle_since = now
            self._idle.append(stream)
        else:
            stream.reset()
        self._prune(now)

    def prune(self, now: float) -> None:
        """Close idle connections older than IDLE_TIMEOUT, or that the service
        closed (called on acquire and release, and periodically)."""
        self._prune(now)
        for stream in [s for s in self._idle if not s.looks_alive()]:
            self._idle.remove(stream)
            stream.reset()

    def _prune(self, now: float) -> None:
        while self._idle and now - self._idle[0].idle_since >= IDLE_TIMEOUT:
            self._idle.pop(0).reset()

    async def _connect(self) -> DirectStream:
        url = self.url
        try:
            with trio.fail_after(self._connect_timeout):
                addresses = await self._policy.resolve(url.host, url.port)
                conn = await self._open(addresses)
        except AddressRefused as exc:
            self._failed(f"not connecting: {exc}")
            raise _refused(502, "upstream_unreachable", self.name, UPSTREAM_UNREACHABLE) from None
        except trio.TooSlowError:
            self._failed(f"no connection within {self._connect_timeout:g} s")
            detail = f"the upstream did not accept a connection within {self._connect_timeout:g} s"
            raise _refused(504, "upstream_timeout", self.name, detail) from None
        except (OSError, trio.BrokenResourceError) as exc:
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            self._failed(f"cannot connect: {cause or exc}")
            raise _refused(502, "upstream_unreachable", self.name, UPSTREAM_UNREACHABLE) from None
        if self._failing is not None:
            log.info("agent %r: %s is reachable again", self.name, url.text)
            self._failing = None
        return DirectStream(conn, self._upstream)

    def _failed(self, why: str) -> None:
        """Log a failure to reach the URL once per change, not once per request."""
        if why != self._failing:
            log.warning("agent %r: %s: %s", self.name, self.url.text, why)
            self._failing = why

    async def _open(self, addresses: list[tuple[int, tuple[Any, ...]]]) -> _Conn:
        """Connect to the checked addresses in turn (never a fresh lookup),
        each with its share of the connect timeout (a black-holed first
        address must not use it all up)."""
        error: OSError | None = None
        share = max(self._connect_timeout / len(addresses), 1.0)
        for family, sockaddr in addresses:
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            try:
                with trio.move_on_after(share):
                    await sock.connect(sockaddr)
                    self._check_not_self(sock)
                    break
                error = OSError(f"no connection to {sockaddr[0]} within {share:g} s")
            except OSError as exc:
                error = exc
            except BaseException:
                sock.close()
                raise
            sock.close()
        else:
            raise error or OSError("no address to connect to")
        stream = trio.SocketStream(sock)
        if not self.url.secure:
            return stream
        tls = trio.SSLStream(
            stream,
            self._ssl_context or _default_context(),
            server_hostname=self.url.host,
            https_compatible=True,
        )
        try:
            await tls.do_handshake()
        except BaseException:
            sock.close()
            raise
        return tls

    def _check_not_self(self, sock: trio.socket.SocketType) -> None:
        """A public address of the gateway's own host passes the policy, but
        reaches everything listening there (its admin port, databases on
        0.0.0.0): refused unless --announce-allow names it."""
        local, peer = sock.getsockname()[0], sock.getpeername()[0]
        if local == peer and not self._policy.explicitly_allowed(peer):
            raise AddressRefused(f"{peer} is this gateway's own host", "the host is the gateway")


_DEFAULT_CONTEXT: ssl.SSLContext | None = None


def _default_context() -> ssl.SSLContext:
    """The system's CAs, loaded once (loading them costs ~20 ms of CPU)."""
    global _DEFAULT_CONTEXT
    if _DEFAULT_CONTEXT is None:
        _DEFAULT_CONTEXT = ssl.create_default_context()
    return _DEFAULT_CONTEXT
