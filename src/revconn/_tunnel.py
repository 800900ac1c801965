"""The trio adapter that runs a :class:`TunnelSession` over a message transport.

Thin by design: a reader loop feeds received WebSocket messages to the
session, a single writer task sends whatever the session has queued, and a
heartbeat task sends PINGs and waits for their acknowledgements. No protocol
decisions are made here.
"""

from __future__ import annotations

import logging
import math
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
from ._session import HandshakeComplete, PingAcknowledged, SessionEnded, TunnelSession

__all__ = ["Heartbeat", "MessageTransport", "Tunnel", "TunnelEnd"]

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


class Tunnel:
    """Runs one tunnel session until it ends.

    ``on_end`` is called synchronously, exactly once, the moment the end is
    decided: before any closing I/O, so a registry can drop the agent even if
    the socket cannot be written any more.
    """

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
        self._wakeup_writer = trio.Event()
        self._ping_payload: bytes | None = None
        self._ping_acked = trio.Event()
        self._ping_seq = 0
        self._cancel_scope: trio.CancelScope | None = None
        self._pending_close: TunnelEnd | None = None

    # -- control from outside (sync, never blocks) ---------------------------
    def request_close(self, close_code: int, reason: str) -> None:
        """End the session: GOAWAY with ``reason``, then WebSocket close ``close_code``."""
        self._finish(TunnelEnd(close_code, reason, None, by_peer=False))

    # -- running --------------------------------------------------------------
    async def handshake(self) -> None:
        """Exchange SETTINGS within ``handshake_timeout``.

        On failure the transport is closed (4408 on timeout, 1002 on a protocol
        error) and HandshakeTimeout, ProtocolError or ConnectionLost is raised.
        """
        self.session.initiate()
        try:
            with trio.move_on_after(self.handshake_timeout) as scope:
                await self.transport.send_message(self.session.data_to_send())
                while not self.session.handshake_complete:
                    data = await self.transport.receive_message()
                    try:
                        events = self.session.receive_data(data)
                    finally:
                        await self._flush_direct()
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

    async def serve(self) -> TunnelEnd:
        """Run the session after the handshake until it ends; then close the socket.

        Returns how it ended (a clean end, or an error the caller may raise).
        """
        if self.end is None:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader)
                nursery.start_soon(self._heartbeat)
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
                await self._flush_direct()
            await self.transport.close(end.close_code, end.reason)

    def _finish(self, end: TunnelEnd) -> None:
        if self.end is not None:
            return
        self.end = end
        if self._on_end is not None:
            self._on_end(end)
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def _flush_direct(self) -> None:
        data = self.session.data_to_send()
        try:
            for start in range(0, len(data), MAX_MESSAGE):
                await self.transport.send_message(data[start : start + MAX_MESSAGE])
        except ConnectionLost:
            pass

    def _kick_writer(self) -> None:
        self._wakeup_writer.set()

    async def _writer(self) -> None:
        while True:
            await self._wakeup_writer.wait()
            self._wakeup_writer = trio.Event()
            data = self.session.data_to_send()
            try:
                for start in range(0, len(data), MAX_MESSAGE):
                    await self.transport.send_message(data[start : start + MAX_MESSAGE])
            except ConnectionLost as exc:
                self._finish(TunnelEnd(_codes.WS_NORMAL, str(exc), exc, by_peer=True))
                return

    async def _reader(self) -> None:
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
                    if event.payload == self._ping_payload:
                        self._ping_acked.set()
                elif isinstance(event, SessionEnded):
                    err = _ended_error(event)
                    replaced = isinstance(err, ReplacedError)
                    code = _codes.WS_REPLACED if replaced else _codes.WS_NORMAL
                    self._finish(TunnelEnd(code, event.reason, err, by_peer=True))
                    return
                elif isinstance(event, HandshakeComplete):  # pragma: no cover - after handshake
                    pass
            self._kick_writer()

    async def _heartbeat(self) -> None:
        hb = self.heartbeat
        while True:
            await trio.sleep(hb.interval)
            self._ping_seq += 1
            payload = self._ping_seq.to_bytes(8, "big")
            self._ping_payload = payload
            self._ping_acked = trio.Event()
            sent_at = trio.current_time()
            self.session.send_ping(payload)
            self._kick_writer()
            with trio.move_on_after(hb.timeout):
                await self._ping_acked.wait()
                self.rtt = trio.current_time() - sent_at
                continue
            err = HeartbeatTimeout(f"no PING acknowledgement within {hb.timeout:g} s")
            self._finish(TunnelEnd(_codes.WS_TIMEOUT, _codes.REASON_HEARTBEAT, err, by_peer=False))
            return


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
