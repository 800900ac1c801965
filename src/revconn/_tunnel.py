"""The trio adapter that runs a :class:`TunnelSession` over a message transport.

Thin by design: a reader loop feeds received WebSocket messages to the
session, a single writer task sends whatever the session has queued, and a
heartbeat task sends PINGs and waits for their acknowledgements. No protocol
decisions are made here.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from . import _codes
from ._errors import (
    ConfigError,
    ConnectionLost,
    HandshakeTimeout,
    HeartbeatTimeout,
    ProtocolError,
    RemoteProtocolError,
    ReplacedError,
    RevconnError,
)
from ._session import PingAcknowledged, SessionEnded, TunnelSession

__all__ = ["Heartbeat", "HeartbeatScheduler", "MessageTransport", "Tunnel", "TunnelEnd"]

log = logging.getLogger("revconn.tunnel")

CLOSE_TIMEOUT = 2.0
MAX_MESSAGE = 256 * 1024
"""Largest WebSocket message a tunnel sends: larger outbound data is split.
Receivers accept up to 1 MiB (docs/protocol.md)."""


class MessageTransport(Protocol):
    """A WebSocket seen as a stream of binary messages."""

    async def send_message(self, data: bytes) -> None:
        """Send one binary message; raise ConnectionLost if the socket is gone."""
        ...

    async def receive_message(self) -> bytes:
        """Next binary message; raise ConnectionLost (with the close code) at the end."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with ``code``/``reason``; never raises for a dead socket."""
        ...


@attrs.frozen
class Heartbeat:
    """PING every ``interval`` seconds; the peer must answer within ``timeout``."""

    interval: float = 15.0
    timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        for label, value in (("interval", self.interval), ("timeout", self.timeout)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"heartbeat {label} must be > 0 seconds, got {value!r}")


@attrs.frozen
class TunnelEnd:
    """How a tunnel ended: ``error`` is None for a clean goodbye."""

    close_code: int
    reason: str
    error: RevconnError | None
    by_peer: bool


class HeartbeatScheduler:
    """PINGs many tunnels on one schedule from a single task.

    All tunnels share ``heartbeat.interval`` and ``heartbeat.timeout``, so both
    the ping times and the ACK deadlines come due in insertion order: two
    ordered dicts are the whole timer queue (O(1) per event, no task and no
    cancel scope per tunnel). Sending a PING spawns a short flush task in the
    scheduler's nursery, so a socket that cannot be written never delays the
    timeout check of any tunnel; a tunnel whose ACK is late is ended at its
    deadline by ``Tunnel.heartbeat_expired`` (no I/O needed for that).
    """

    def __init__(self, heartbeat: Heartbeat) -> None:
        self.heartbeat = heartbeat
        self._due: OrderedDict[Tunnel, float] = OrderedDict()
        # tunnel -> (ACK deadline, PING payload, sent at)
        self._waiting: OrderedDict[Tunnel, tuple[float, bytes, float]] = OrderedDict()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._seq = 0

    def __len__(self) -> int:
        return len(self._due) + len(self._waiting)

    def add(self, tunnel: Tunnel) -> None:
        self._due[tunnel] = trio.current_time() + self.heartbeat.interval
        self._changed.set()

    def remove(self, tunnel: Tunnel) -> None:
        self._due.pop(tunnel, None)
        self._waiting.pop(tunnel, None)

    def acknowledged(self, tunnel: Tunnel, payload: bytes) -> None:
        entry = self._waiting.get(tunnel)
        if entry is None or entry[1] != payload:
            return  # not ours, or already expired
        del self._waiting[tunnel]
        sent_at = entry[2]
        tunnel.rtt = trio.current_time() - sent_at
        self._due[tunnel] = sent_at + self.heartbeat.interval
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                now = trio.current_time()
                while self._waiting:
                    tunnel, (deadline, _, _) = next(iter(self._waiting.items()))
                    if deadline > now:
                        break
                    del self._waiting[tunnel]
                    tunnel.heartbeat_expired()
                while self._due:
                    tunnel, when = next(iter(self._due.items()))
                    if when > now:
                        break
                    del self._due[tunnel]
                    self._seq += 1
                    payload = self._seq.to_bytes(8, "big")
                    if tunnel.queue_ping(payload):
                        self._waiting[tunnel] = (now + self.heartbeat.timeout, payload, now)
                        nursery.start_soon(tunnel.flush)
                wake = next(iter(self._due.values())) if self._due else math.inf
                if self._waiting:
                    wake = min(wake, next(iter(self._waiting.values()))[0])
                self._changed = trio.Event()
                with trio.move_on_at(wake):
                    await self._changed.wait()


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
        "_on_end",
        "_scheduler",
        "_send_lock",
        "end",
        "handshake_timeout",
        "heartbeat",
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
    ) -> None:
        self.session = session
        self.transport = transport
        self.heartbeat = heartbeat
        self.handshake_timeout = handshake_timeout
        self._on_end = on_end
        self.rtt: float | None = None
        self.end: TunnelEnd | None = None
        self._send_lock = trio.Lock()
        self._cancel_scope: trio.CancelScope | None = None
        self._scheduler: HeartbeatScheduler | None = None

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
        self.session.send_ping(payload)
        return True

    async def flush(self) -> None:
        """Send everything the session has queued, in order."""
        async with self._send_lock:
            data = self.session.data_to_send()
            try:
                for start in range(0, len(data), MAX_MESSAGE):
                    await self.transport.send_message(data[start : start + MAX_MESSAGE])
            except ConnectionLost as exc:
                self._finish(TunnelEnd(_codes.WS_NORMAL, str(exc), exc, by_peer=True))

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

    async def serve(self, scheduler: HeartbeatScheduler | None = None) -> TunnelEnd:
        """Run the session after the handshake until it ends; then close the socket.

        ``scheduler`` sends this tunnel's heartbeats (a gateway shares one among
        all its tunnels); without one, the tunnel runs its own. Returns how the
        session ended (a clean end, or an error the caller may raise).
        """
        if scheduler is None:
            async with trio.open_nursery() as nursery:
                own = HeartbeatScheduler(self.heartbeat)
                await nursery.start(own.run)
                end = await self.serve(own)
                nursery.cancel_scope.cancel()
            return end
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
        if self._on_end is not None:
            self._on_end(end)
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

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
                if isinstance(event, PingAcknowledged):
                    if self._scheduler is not None:
                        self._scheduler.acknowledged(self, event.payload)
                elif isinstance(event, SessionEnded):
                    err = _ended_error(event)
                    replaced = isinstance(err, ReplacedError)
                    code = _codes.WS_REPLACED if replaced else _codes.WS_NORMAL
                    self._finish(TunnelEnd(code, event.reason, err, by_peer=True))
                    return
            await self.flush()


def _ended_error(event: SessionEnded) -> RevconnError | None:
    """Map a GOAWAY from the peer to the error it implies (None for a clean end)."""
    if event.reason == _codes.REASON_REPLACED:
        return ReplacedError("replaced: another agent connected with the same name")
    if event.error_code != _codes.H2_NO_ERROR:
        return ConnectionLost(
            f"peer ended the session with HTTP/2 error {event.error_code:#x}: {event.reason!r}"
        )
    if event.reason == _codes.REASON_SHUTDOWN:
        return ConnectionLost("peer is shutting down", close_code=_codes.WS_GOING_AWAY)
    return None
