"""The trio adapter that runs a :class:`TunnelSession` over a message transport.

Thin by design: a reader loop feeds received WebSocket messages to the
session and wakes the streams they concern; whoever has queued frames flushes
them under one lock; PINGs come from a :class:`HeartbeatScheduler`. No
protocol decisions are made here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from .. import _codes
from .._errors import (
    AgentBusy,
    AuthError,
    ConnectionLost,
    HandshakeTimeout,
    HeartbeatTimeout,
    ProtocolError,
    RemoteProtocolError,
    ReplacedError,
    RevconnError,
    RevokedError,
    StreamError,
)
from .._proto.session import (
    DataReceived,
    PingAcknowledged,
    RequestReceived,
    ResponseReceived,
    Role,
    SessionEnded,
    StreamLimitReached,
    StreamReset,
    TunnelSession,
    WindowOpened,
)
from .heartbeat import Heartbeat, HeartbeatScheduler
from .streampool import StreamPool
from .streams import TunnelStream
from .transport import MessageTransport

__all__ = ["RequestHandler", "Tunnel", "TunnelEnd"]

log = logging.getLogger("revconn.tunnel")

CLOSE_TIMEOUT = 2.0
MAX_MESSAGE = 256 * 1024
"""Largest WebSocket message a tunnel sends: larger outbound data is split.
Receivers accept up to 1 MiB (docs/protocol.md)."""


@attrs.frozen
class TunnelEnd:
    """How a tunnel ended: ``error`` is None for a clean goodbye."""

    close_code: int
    reason: str
    error: RevconnError | None
    by_peer: bool


RequestHandler = Callable[[TunnelStream], Awaitable[None]]


class Tunnel:
    """Runs one tunnel session until it ends.

    ``on_end`` is called synchronously, exactly once, the moment the end is
    decided: before any closing I/O, so a registry can drop the agent even if
    the socket cannot be written any more.

    One lock guards sending: whoever sends takes the lock, drains
    ``session.data_to_send()`` and writes it, so bytes leave in h2's order.
    """

    __slots__ = (
        "__weakref__",
        "_cancel_scope",
        "_drain_close",
        "_handlers",
        "_on_end",
        "_on_request",
        "_pool",
        "_scheduler",
        "_send_lock",
        "_streams",
        "_window_changed",
        "accepting",
        "end",
        "handshake_timeout",
        "heartbeat",
        "max_streams",
        "rtt",
        "session",
        "transport",
    )

    def __init__(
        self,
        session: TunnelSession,
        transport: MessageTransport,
        *,
        heartbeat: Heartbeat,
        handshake_timeout: float = 10.0,
        on_end: Callable[[TunnelEnd], None] | None = None,
        max_streams: int | None = None,
    ) -> None:
        self.session = session
        self.max_streams = max_streams
        """(gateway) Streams open at once at most, pooled ones included (the
        agent's own SETTINGS limit applies too); None: the agent's only."""
        self.transport = transport
        self.heartbeat = heartbeat
        self.handshake_timeout = handshake_timeout
        self._on_end = on_end
        self.rtt: float | None = None
        self.end: TunnelEnd | None = None
        self._send_lock = trio.Lock()
        self._cancel_scope: trio.CancelScope | None = None
        self._scheduler: HeartbeatScheduler | None = None
        self._streams: dict[int, TunnelStream] = {}
        self._window_changed: trio.Event | None = None
        self._handlers: trio.Nursery | None = None
        self._on_request: RequestHandler | None = None
        self.accepting = True
        """(gateway) False once the session must not take new requests."""
        self._drain_close: tuple[int, str] | None = None
        self._pool: StreamPool | None = None
        """(gateway) Open streams lent to requests; created with the first request."""

    def drain(self, close_code: int, reason: str) -> None:
        """Take no new requests; end the session (GOAWAY ``reason``, close
        ``close_code``) as soon as no stream is in flight. h2 cannot finish
        streams after GOAWAY (python-hyper/h2#1181), hence the wait before it."""
        self.accepting = False
        self._drain_close = (close_code, reason)
        if self.session.role is Role.AGENT and self.end is None:
            # Tell the gateway to open no more streams here (SETTINGS
            # MAX_CONCURRENT_STREAMS = 0); the ones in flight finish first.
            self.session.stop_accepting_streams()
            self.flush_soon()
        elif self._pool is not None:
            self._pool.prune(0.0, everything=True)
            self.flush_soon()
        self._maybe_finish_drain()

    def _maybe_finish_drain(self) -> None:
        if self._drain_close is not None and not self._streams and self.end is None:
            self.request_close(*self._drain_close)

    # -- streams ----------------------------------------------------------------
    def open_request(self, headers: list[tuple[bytes, bytes]], *, end_stream: bool) -> TunnelStream:
        """(gateway) Open a request stream (call ``flush()`` after). Raises AgentBusy or
        StreamError (tunnel ending)."""
        if self.end is not None or not self.accepting or self.session.peer_draining:
            raise StreamError("tunnel is closing")
        if self.session.stream_ids_exhausted:
            # Redial for fresh stream ids once the current requests are done.
            self.drain(_codes.WS_GOING_AWAY, "stream ids exhausted")
            raise StreamError("stream ids exhausted; the agent will reconnect")
        if self.max_streams is not None and len(self._streams) >= self.max_streams:
            raise AgentBusy(
                "too many concurrent requests for this agent "
                f"(the gateway's limit, {self.max_streams})"
            )
        try:
            stream_id = self.session.open_stream(headers, end_stream=end_stream)
        except StreamLimitReached:
            raise AgentBusy("too many concurrent requests for this agent") from None
        stream = TunnelStream(self, stream_id)
        stream.local_ended = end_stream
        self._streams[stream_id] = stream
        return stream

    async def acquire(self, *, fresh: bool = False) -> tuple[TunnelStream, bool]:
        """(gateway) A stream for one request from the pool (see StreamPool.acquire)."""
        pool = self._pool
        if pool is None:
            pool = self._pool = StreamPool(self)
        return await pool.acquire(fresh=fresh)

    def release(self, stream: object, *, reusable: bool) -> None:
        """(gateway) Give a stream back once its response has ended."""
        assert isinstance(stream, TunnelStream)
        if self._pool is None:
            stream.reset(_codes.H2_CANCEL)
        else:
            self._pool.release(stream, reusable=reusable)

    @property
    def pooled_streams(self) -> int:
        """(gateway) Idle streams in the pool."""
        return 0 if self._pool is None else self._pool.idle

    def flush_soon(self) -> None:
        """Flush in the background (for callers that cannot await, e.g. cleanup)."""
        if self._scheduler is not None and self.end is None:
            self._scheduler.spawn(self.flush)

    async def wait_window(self) -> None:
        """Wait until flow-control credit arrives (or a stream or the tunnel ends)."""
        if self._window_changed is None:
            self._window_changed = trio.Event()
        await self._window_changed.wait()

    def _window_opened(self) -> None:
        if self._window_changed is not None:
            self._window_changed.set()
            self._window_changed = None

    # -- control from outside (sync, never blocks) ---------------------------
    def request_close(self, close_code: int, reason: str) -> None:
        """End the session: GOAWAY with ``reason``, then WebSocket close ``close_code``."""
        self._finish(TunnelEnd(close_code, reason, None, by_peer=False))

    def heartbeat_expired(self) -> None:
        """Called by the heartbeat scheduler when a PING went unanswered."""
        err = HeartbeatTimeout(f"no PING acknowledgement within {self.heartbeat.timeout:g} s")
        self._finish(TunnelEnd(_codes.WS_TIMEOUT, _codes.REASON_HEARTBEAT, err, by_peer=False))

    def queue_ping(self, payload: bytes) -> bool:
        """Queue a PING (the caller flushes); False if the session is over."""
        if self.end is not None or self.session.closed:
            return False
        if self._pool is not None:
            self._pool.prune(trio.current_time())
        self.session.send_ping(payload)
        return True

    async def flush(self) -> None:
        """Send everything the session has queued, in order.

        With several streams in flight, taking the lock is a schedule point:
        the other streams' tasks queue their frames meanwhile and they all
        leave in one message. With one stream there is nobody to wait for, so
        an empty queue returns at once and a full one is sent without a
        detour through the scheduler (each such pass costs an ``epoll_wait``
        and the resumption of a deep await stack).
        """
        lock = self._send_lock
        if len(self._streams) > 1 or lock.locked():
            await lock.acquire()
        elif not self.session.has_data_to_send:
            return
        else:
            lock.acquire_nowait()
        try:
            data = self.session.data_to_send()
            # Shielded: these bytes are gone from h2's queue (frames of every
            # stream, HPACK state the peer's decoder must see in order), so a
            # caller cancelled here (a client that left) must not drop them.
            # The wait is bounded by the tunnel: a transport that never drains
            # is closed when the heartbeat lapses, which ends this send.
            with trio.CancelScope(shield=True):
                try:
                    for start in range(0, len(data), MAX_MESSAGE):
                        await self.transport.send_message(data[start : start + MAX_MESSAGE])
                except ConnectionLost as exc:
                    self._finish(TunnelEnd(_codes.WS_NORMAL, str(exc), exc, by_peer=True))
        finally:
            lock.release()

    # -- running --------------------------------------------------------------
    async def handshake(self) -> None:
        """Exchange SETTINGS within ``handshake_timeout``.

        On failure the transport is closed (4408 on timeout, 1002 on a protocol
        error) and HandshakeTimeout, ProtocolError or ConnectionLost is raised.
        """
        self.session.initiate()
        try:
            with trio.move_on_after(self.handshake_timeout) as scope:
                await self.flush()
                while not self.session.handshake_complete:
                    data = await self.transport.receive_message()
                    try:
                        events = self.session.receive_data(data)
                    finally:
                        await self.flush()
                    for event in events:
                        if isinstance(event, SessionEnded):
                            raise _ended_error(event) or ConnectionLost(
                                "peer ended the session during the handshake"
                            )
        except ProtocolError as exc:
            self.end = TunnelEnd(exc.close_code, _codes.REASON_PROTOCOL, exc, by_peer=False)
            await self._close_transport(self.end)
            raise
        if scope.cancelled_caught:
            timeout = HandshakeTimeout(
                f"tunnel handshake did not complete within {self.handshake_timeout:g} s"
            )
            self.end = TunnelEnd(_codes.WS_TIMEOUT, "handshake timeout", timeout, by_peer=False)
            await self._close_transport(self.end)
            raise timeout

    async def serve(
        self,
        scheduler: HeartbeatScheduler | None = None,
        *,
        on_request: RequestHandler | None = None,
        on_rtt: Callable[[float], None] | None = None,
    ) -> TunnelEnd:
        """Run the session after the handshake until it ends; then close the socket.

        ``scheduler`` sends this tunnel's heartbeats (a gateway shares one among
        all its tunnels); without one, the tunnel runs its own. ``on_request``
        (agent) is run in a task of this tunnel for each request stream; those
        tasks are cancelled when the tunnel ends; ``on_rtt`` gets each PING's
        round trip (seconds) from the tunnel's own scheduler. Returns how the
        session ended.
        """
        if scheduler is not None and on_request is None:
            return await self._serve(scheduler)
        async with trio.open_nursery() as nursery:
            self._handlers = nursery
            self._on_request = on_request
            if scheduler is None:
                scheduler = HeartbeatScheduler(self.heartbeat, on_rtt=on_rtt)
                await nursery.start(scheduler.run)
            end = await self._serve(scheduler)
            nursery.cancel_scope.cancel()
        return end

    async def _serve(self, scheduler: HeartbeatScheduler) -> TunnelEnd:
        if self.end is None:
            with trio.CancelScope() as self._cancel_scope:
                self._scheduler = scheduler
                scheduler.add(self)
                try:
                    await self._read_loop()
                finally:
                    scheduler.remove(self)
        assert self.end is not None
        await self._close_transport(self.end)
        return self.end

    async def _run_handler(self, stream: TunnelStream) -> None:
        assert self._on_request is not None
        try:
            with trio.CancelScope() as stream.cancel_scope:
                await self._on_request(stream)
        except StreamError:
            pass
        except Exception:  # a bug in a request handler must not take the tunnel down
            log.exception("request handler failed on stream %d", stream.id)
            stream.reset(_codes.H2_INTERNAL_ERROR)
        finally:
            if not (stream.local_ended and stream.remote_ended) and stream.reset_code is None:
                stream.reset(_codes.H2_CANCEL if stream.local_ended else _codes.H2_INTERNAL_ERROR)
            stream.close()

    async def _close_transport(self, end: TunnelEnd) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            if not end.by_peer and not isinstance(end.error, ConnectionLost):
                h2_error = (
                    end.error.h2_error
                    if isinstance(end.error, ProtocolError)
                    else _codes.H2_NO_ERROR
                )
                self.session.close(h2_error, end.reason)
                await self.flush()
            await self.transport.close(end.close_code, end.reason)

    def _finish(self, end: TunnelEnd) -> None:
        if self.end is not None:
            return
        self.end = end
        self.accepting = False
        if self._on_end is not None:
            self._on_end(end)
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        for stream in self._streams.values():
            stream._wake()
        self._window_opened()

    def _start_handler(self, event: RequestReceived) -> None:
        if self._handlers is None or self._on_request is None:
            # Nobody serves requests here (a gateway): refuse, keep the session.
            self.session.reset_stream(event.stream_id, _codes.H2_REFUSED_STREAM)
            return
        stream = TunnelStream(self, event.stream_id)
        stream.request = event
        stream.remote_ended = event.end_stream
        self._streams[event.stream_id] = stream
        self._handlers.start_soon(self._run_handler, stream)

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self.transport.receive_message()
            except ConnectionLost as exc:
                self._finish(TunnelEnd(_codes.WS_NORMAL, str(exc), exc, by_peer=True))
                return
            try:
                events = self.session.receive_data(data)
            except RemoteProtocolError as exc:
                self._finish(TunnelEnd(exc.close_code, _codes.REASON_PROTOCOL, exc, by_peer=False))
                return
            for event in events:
                if isinstance(event, DataReceived):
                    stream = self._streams.get(event.stream_id)
                    if stream is None:
                        self.session.ack_data(event.stream_id, event.flow_length)
                    elif stream.pooled and event.data:
                        # Bytes on an idle pooled stream: an upstream that
                        # miscounted a body, or spoke unasked. They must never
                        # pass for the next request's answer: the stream goes.
                        self.session.ack_data(event.stream_id, event.flow_length)
                        stream.reset(_codes.H2_CANCEL)
                    else:
                        stream._chunks.append(event)
                        stream.remote_ended = event.end_stream
                        stream._wake()
                elif isinstance(event, ResponseReceived):
                    stream = self._streams.get(event.stream_id)
                    if stream is not None:
                        stream.response = event
                        stream.remote_ended = event.end_stream
                        stream._wake()
                elif isinstance(event, WindowOpened):
                    self._window_opened()
                elif isinstance(event, RequestReceived):
                    self._start_handler(event)
                elif isinstance(event, StreamReset):
                    stream = self._streams.get(event.stream_id)
                    if stream is not None:
                        stream._reset_by_peer(event.error_code)
                    self._window_opened()
                elif isinstance(event, PingAcknowledged):
                    if self._scheduler is not None:
                        self._scheduler.acknowledged(self, event.payload)
                elif isinstance(event, SessionEnded):
                    err = _ended_error(event)
                    code = _peer_close_code(err)
                    self._finish(TunnelEnd(code, event.reason, err, by_peer=True))
                    return
            pool = self._pool
            if pool is not None and pool.idle and self.session.peer_draining:
                pool.prune(0.0, everything=True)  # the agent drains: free its upstream connections
            await self.flush()


REVOKED_MESSAGE = (
    "the gateway revoked this agent's credential: ask its operator for a new token "
    "(`revconn-gateway token issue`)"
)
EXPIRED_MESSAGE = "this agent's token expired: ask the gateway's operator for a new one"


def _peer_close_code(err: RevconnError | None) -> int:
    """The WebSocket close code that goes with a GOAWAY's meaning."""
    if isinstance(err, ReplacedError):
        return _codes.WS_REPLACED
    if isinstance(err, RevokedError):
        return _codes.WS_REVOKED
    if isinstance(err, AuthError):
        return _codes.WS_CREDENTIAL_EXPIRED
    return _codes.WS_NORMAL


def _ended_error(event: SessionEnded) -> RevconnError | None:
    """Map a GOAWAY from the peer to the error it implies (None for a clean end)."""
    if event.reason == _codes.REASON_REPLACED:
        return ReplacedError("replaced: another agent connected with the same name")
    if event.reason == _codes.REASON_REVOKED:
        return RevokedError(REVOKED_MESSAGE, status=401)
    if event.reason == _codes.REASON_EXPIRED:
        return AuthError(EXPIRED_MESSAGE, status=401)
    if event.error_code != _codes.H2_NO_ERROR:
        return ConnectionLost(
            f"peer ended the session with HTTP/2 error {event.error_code:#x}: {event.reason!r}"
        )
    if event.reason == _codes.REASON_SHUTDOWN:
        return ConnectionLost("peer is shutting down", close_code=_codes.WS_GOING_AWAY)
    return None
