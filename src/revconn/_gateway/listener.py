"""The data-plane listener: accepts TCP connections and runs the exchange on each.

A thin adapter, as hypercorn's ``trio/tcp_server.py`` is around its protocol
layer: listening sockets (TCP_NODELAY, TCP_USER_TIMEOUT, a large backlog), trio's
accept loop, one task per connection running :class:`HttpConnection` (after
the TLS handshake, with ``--certfile``), and the hand-over of a connection
that became an agent's WebSocket to the gateway. A bug in one connection is
logged and costs that connection only.

At most ``max_pending`` connections wait for a request head at once (from
accept, TLS handshake included, until their head is complete; a kept-alive
connection again after each response). When one more comes, the one that
has waited longest is closed to make room (an idle kept-alive connection, or
a client that is slow to send its head), as nginx reuses idle keep-alive
connections when it runs out: a flood of half-open or slow connections holds
a bounded number of sockets and parsers, cannot lock newcomers out (a client
that sends its head promptly is served however many others wait), and
requests in flight, agents and WebSockets are never touched.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

import trio

from .._errors import ConfigError
from .._runtime.transport import MessageTransport
from .auth import Admission
from .exchange import DataPlane, HttpConnection
from .replies import format_peer
from .tls import AcceptedStream, TLSConnection

__all__ = [
    "AgentHost",
    "Listener",
    "PendingLimit",
    "listen_all",
    "parse_bind",
    "socket_url",
]

log = logging.getLogger("revconn.listener")

WARN_EVERY = 10.0
"""Seconds between warnings that new connections are being closed (a flood
must not flood the log too)."""


class PendingLimit:
    """The connections waiting for a request head, oldest first, and how many
    were closed to make room (sans-I/O). ``maximum`` None: no limit."""

    __slots__ = ("_order", "evicted", "maximum")

    def __init__(self, maximum: int | None) -> None:
        self.maximum = maximum
        self._order: dict[PendingSlot, None] = {}
        """The held slots in the order they were taken (dicts keep it)."""
        self.evicted = 0
        """Connections closed to make room for a newer one (ever)."""

    @property
    def waiting(self) -> int:
        return len(self._order)

    def slot(self, evict: Callable[[], None] | None = None) -> PendingSlot:
        """One connection's place in the line (not yet taken); ``evict``
        closes that connection when it has waited longest and room is needed."""
        return PendingSlot(self, evict)

    def _make_room(self) -> bool:
        """Evict the longest-waiting connection; False if none can be."""
        for oldest in self._order:
            if oldest._evict is not None:
                oldest.leave()
                self.evicted += 1
                oldest._evict()
                return True
        return False


class PendingSlot:
    """One connection's place among those waiting for a request head (the
    exchange's ``HeadWait``)."""

    __slots__ = ("_evict", "_held", "_limit")

    def __init__(self, limit: PendingLimit, evict: Callable[[], None] | None) -> None:
        self._limit = limit
        self._evict = evict
        self._held = False

    def enter(self) -> bool:
        if self._held:
            return True
        limit = self._limit
        if limit.maximum is not None and limit.waiting >= limit.maximum and not limit._make_room():
            return False
        limit._order[self] = None
        self._held = True
        return True

    def leave(self) -> None:
        if self._held:
            self._held = False
            del self._limit._order[self]


class AgentHost(DataPlane, Protocol):
    """The gateway as the listener sees it: the exchange's needs, plus running
    an admitted agent's tunnel."""

    async def serve_agent(
        self, admission: Admission, transport: MessageTransport, remote: str
    ) -> None:
        """Run the admitted agent's tunnel until it ends."""
        ...


class Listener:
    """Serves the data plane on listening sockets until cancelled. During a
    graceful shutdown it keeps accepting, so that new agents and requests get
    a clear 503 (and ``/healthz`` says ``shutting_down``) rather than a refused
    connection.

    With ``tls`` every connection starts with a TLS handshake (server side),
    which must complete within ``handshake_timeout``; one that fails or is
    too slow (a plain-HTTP client, a scanner) closes that connection only.

    ``max_pending``: connections waiting for a request head at once (the
    module docstring); ``pending`` counts them.
    """

    def __init__(
        self,
        host: AgentHost,
        *,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
        max_pending: int | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.pending = PendingLimit(max_pending)
        self._warned_at = -math.inf

    async def serve(
        self,
        sockets: Sequence[socket.socket],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``sockets`` (listening, non-blocking) until cancelled; reports
        the trio listeners once accepting."""
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        try:
            # trio's accept loop: a task per connection, EMFILE and friends
            # backed off without stopping the other listeners.
            await trio.serve_listeners(self._connection, listeners, task_status=task_status)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        scope = trio.CancelScope()
        slot = self.pending.slot(partial(self._evict, scope))
        slot.enter()  # (room is made: the longest-waiting connection goes)
        try:
            peer = tcp.socket.getpeername()
        except OSError:
            peer = None
        remote = format_peer(peer)
        stream: AcceptedStream = tcp
        try:
            with scope:
                if self.tls is not None:
                    tls = await self._tls_handshake(tcp, self.tls, remote)
                    if tls is None:
                        return
                    stream = tls
                tunnel = await self._http(stream, str(peer[0]) if peer else None, slot)
                if tunnel is not None:
                    # An agent: its WebSocket outlives the HTTP state, which _http
                    # has released (a gateway holds thousands of these).
                    admission, transport = tunnel
                    await self.host.serve_agent(admission, transport, remote)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away; its stream (if any) was reset
        except* Exception:
            # A bug must cost one connection, never the listener (and every other client).
            log.exception("connection from %s failed", remote)
        finally:
            slot.leave()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _evict(self, scope: trio.CancelScope) -> None:
        """Close a connection that waited longest for a request head, to make
        room for a new one; warn, at most every WARN_EVERY s."""
        scope.cancel()
        now = trio.current_time()
        if now - self._warned_at < WARN_EVERY:
            return
        self._warned_at = now
        log.warning(
            "%d connections are waiting for a request head (--max-pending-connections): "
            "the longest-waiting ones are closed to make room (%d so far)",
            self.pending.waiting,
            self.pending.evicted,
        )

    async def _tls_handshake(
        self, tcp: trio.SocketStream, context: ssl.SSLContext, remote: str
    ) -> TLSConnection | None:
        """The connection after its TLS handshake; None (the caller closes the
        socket) if the handshake failed or took longer than the timeout."""
        tls = trio.SSLStream(tcp, context, server_side=True, https_compatible=True)
        with trio.move_on_after(self.handshake_timeout) as scope:
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                log.debug("TLS handshake with %s failed: %s", remote, exc.__cause__ or exc)
                return None
        if scope.cancelled_caught:
            log.debug("TLS handshake with %s: none within %g s", remote, self.handshake_timeout)
            return None
        return TLSConnection(tls)

    async def _http(
        self, stream: AcceptedStream, client: str | None, slot: PendingSlot
    ) -> tuple[Admission, MessageTransport] | None:
        """HTTP/1.1 on the connection until it ends or becomes an agent tunnel."""
        conn = HttpConnection(self.host, stream, client, slot)
        try:
            return await conn.run()
        finally:
            conn.abandon()


def parse_bind(bind: str, flag: str = "--bind") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); ConfigError if malformed."""
    host, sep, port_text = bind.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{flag} {bind!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{flag} {bind!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{flag} {bind!r}: port must be 0-65535")
    return host, port


def listen_all(
    binds: Sequence[str], backlog: int, user_timeout: float | None, flag: str = "--bind"
) -> list[socket.socket]:
    """Listening, non-blocking sockets for ``binds``; ConfigError names a bind that fails."""
    socks: list[socket.socket] = []
    try:
        for bind in binds:
            host, port = parse_bind(bind, flag)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
                # Inherited by accepted sockets (Linux): unacknowledged data may
                # sit this long before the kernel drops a dead peer's socket.
                ms = int(user_timeout * 1000)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ConfigError(f"cannot listen on {flag} {bind}: {exc.strerror}") from exc
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def socket_url(sock: socket.socket, scheme: str = "http") -> str:
    """The URL a listening socket is reached at (its port resolved)."""
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
