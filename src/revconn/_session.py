"""The tunnel session: a sans-I/O layer over an ``h2`` connection.

Bytes in (``receive_data``), events out, bytes to send (``data_to_send``); no
networking and no trio. The gateway plays the HTTP/2 client, the agent the
server. docs/protocol.md is the specification this implements.

What this layer adds over plain h2:

* a frame-header scanner that rejects over-long frames from their 9-byte
  header, before h2 buffers the whole frame (h2 only checks afterwards);
* a handshake notion: complete once the peer's SETTINGS arrived *and* the
  peer acknowledged ours;
* GOAWAY reasons as ASCII debug data, mapped to events;
* h2 errors mapped to :class:`RemoteProtocolError` with the close code to use.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import attrs
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from . import _codes
from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Event",
    "HandshakeComplete",
    "PingAcknowledged",
    "Role",
    "SessionEnded",
    "TunnelSession",
]

CLIENT_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_LEN: Final = 9
DEFAULT_MAX_FRAME_SIZE: Final = 16_384
MAX_GOAWAY_REASON: Final = 123  # fits a WebSocket close reason too


class Role(enum.Enum):
    """Which end of the tunnel: the gateway is the HTTP/2 client."""

    GATEWAY = "gateway"
    AGENT = "agent"


@attrs.frozen
class HandshakeComplete:
    """Both SETTINGS frames were exchanged and acknowledged."""


@attrs.frozen
class PingAcknowledged:
    """The peer answered one of our PINGs; ``payload`` is the 8 bytes we sent."""

    payload: bytes


@attrs.frozen
class SessionEnded:
    """The peer sent GOAWAY. The session is over; no more frames will be accepted."""

    error_code: int
    reason: str


Event = HandshakeComplete | PingAcknowledged | SessionEnded


class _SlimDeque(list):  # type: ignore[type-arg]
    """The deque operations h2 and hpack use, on a list.

    An idle ``collections.deque`` allocates a 64-slot block (~760 bytes); h2 keeps
    about a dozen of them per connection (one per setting, plus the two HPACK
    tables), which made h2 the largest cost of an idle agent. Their contents stay
    tiny (a setting holds one value plus pending ones; the HPACK table is bounded
    by SETTINGS_HEADER_TABLE_SIZE), so list operations are as fast.
    """

    __slots__ = ()

    def popleft(self) -> object:
        return self.pop(0)

    def appendleft(self, item: object) -> None:
        self.insert(0, item)


def _compact_h2(conn: h2.connection.H2Connection) -> None:
    """Swap h2's per-connection deques for _SlimDeque (same contents, same order)."""
    for settings in (conn.local_settings, conn.remote_settings):
        table: dict[Any, Any] = settings._settings
        for key, values in table.items():
            if type(values) is not _SlimDeque:
                table[key] = _SlimDeque(values)
    for hpack_table in (conn.encoder.header_table, conn.decoder.header_table):
        entries: Any = hpack_table.dynamic_entries
        if type(entries) is not _SlimDeque:
            hpack_table.dynamic_entries = _SlimDeque(entries)  # type: ignore[assignment]


class _FrameScanner:
    """Follows frame boundaries in the byte stream and checks each frame's length.

    Only the 9-byte headers are looked at; payload bytes are skipped by count.
    """

    __slots__ = ("_header", "_max_frame_size", "_payload_left", "_preface_left")

    def __init__(self, max_frame_size: int, preface_len: int) -> None:
        self._max_frame_size = max_frame_size
        self._preface_left = preface_len
        self._header = b""
        self._payload_left = 0

    def feed(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        if self._preface_left:
            step = min(self._preface_left, end)
            self._preface_left -= step
            pos = step
        while pos < end:
            if self._payload_left:
                step = min(self._payload_left, end - pos)
                self._payload_left -= step
                pos += step
                continue
            need = FRAME_HEADER_LEN - len(self._header)
            chunk = data[pos : pos + need]
            pos += len(chunk)
            header = self._header + chunk
            if len(header) < FRAME_HEADER_LEN:
                self._header = header
                break
            self._header = b""
            length = int.from_bytes(header[:3], "big")
            if length > self._max_frame_size:
                raise RemoteProtocolError(
                    f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE "
                    f"{self._max_frame_size}",
                    h2_error=_codes.H2_FRAME_SIZE_ERROR,
                )
            self._payload_left = length


class TunnelSession:
    """One end of a tunnel's HTTP/2 connection.

    Usage: ``initiate()``, then feed every received WebSocket message to
    ``receive_data`` and send whatever ``data_to_send`` returns after each call.
    """

    __slots__ = (
        "_conn",
        "_handshake_reported",
        "_local_settings_acked",
        "_remote_settings_seen",
        "_scanner",
        "closed",
        "initiated",
        "role",
    )

    def __init__(self, role: Role, *, max_concurrent_streams: int = 100) -> None:
        self.role = role
        client = role is Role.GATEWAY
        config = h2.config.H2Configuration(client_side=client, header_encoding=None)
        self._conn = h2.connection.H2Connection(config=config)
        # The gateway never accepts streams from the agent.
        self._conn.local_settings = h2.settings.Settings(
            client=client,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: (
                    0 if client else max_concurrent_streams
                ),
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: (
                    self._conn.DEFAULT_MAX_HEADER_LIST_SIZE
                ),
            },
        )
        _compact_h2(self._conn)
        self._scanner = _FrameScanner(DEFAULT_MAX_FRAME_SIZE, 0 if client else len(CLIENT_PREFACE))
        self._remote_settings_seen = False
        self._local_settings_acked = False
        self._handshake_reported = False
        self.closed = False
        self.initiated = False

    # -- state --------------------------------------------------------------
    @property
    def handshake_complete(self) -> bool:
        return self._remote_settings_seen and self._local_settings_acked

    # -- outbound -----------------------------------------------------------
    def initiate(self) -> None:
        """Queue the connection preface and our SETTINGS."""
        if self.initiated:
            raise LocalProtocolError("session already initiated")
        self.initiated = True
        self._conn.initiate_connection()

    def send_ping(self, payload: bytes) -> None:
        """Queue a PING carrying exactly 8 bytes of ``payload``."""
        if len(payload) != 8:
            raise LocalProtocolError("PING payload must be 8 bytes")
        self._require_open()
        self._conn.ping(payload)

    def close(self, error_code: int = _codes.H2_NO_ERROR, reason: str = "") -> None:
        """Queue GOAWAY with ``reason`` as debug data. Idempotent."""
        if self.closed or not self.initiated:
            self.closed = True
            return
        self.closed = True
        data = reason.encode("ascii", "replace")[:MAX_GOAWAY_REASON]
        self._conn.close_connection(error_code=error_code, additional_data=data)

    def data_to_send(self) -> bytes:
        data: bytes = self._conn.data_to_send()
        return data

    # -- inbound ------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns the events they produced.

        Raises :class:`RemoteProtocolError` when the peer broke the protocol; a
        GOAWAY is then queued in ``data_to_send``.
        """
        if self.closed:
            return []
        try:
            self._scanner.feed(data)
            h2_events = self._conn.receive_data(data)
        except RemoteProtocolError as exc:
            self.close(exc.h2_error, _codes.REASON_PROTOCOL)
            raise
        except h2.exceptions.ProtocolError as exc:
            # h2 has already queued its GOAWAY.
            self.closed = True
            code = int(getattr(exc, "error_code", _codes.H2_PROTOCOL_ERROR))
            raise RemoteProtocolError(f"HTTP/2 protocol error: {exc}", h2_error=code) from exc
        return self._translate(h2_events)

    def _translate(self, h2_events: list[h2.events.Event]) -> list[Event]:
        out: list[Event] = []
        for ev in h2_events:
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                self._remote_settings_seen = True
            elif isinstance(ev, h2.events.SettingsAcknowledged):
                self._local_settings_acked = True
            elif isinstance(ev, h2.events.PingAckReceived):
                out.append(PingAcknowledged(bytes(ev.ping_data)))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
                reason = (ev.additional_data or b"").decode("ascii", "replace")
                out.append(SessionEnded(int(ev.error_code or 0), reason))
            elif isinstance(ev, h2.events.RequestReceived):
                # Phase 1 agents serve no streams yet: refuse politely, keep the session.
                self._conn.reset_stream(ev.stream_id, error_code=_codes.H2_REFUSED_STREAM)
            if not self._handshake_reported and self.handshake_complete:
                self._handshake_reported = True
                _compact_h2(self._conn)  # the peer's SETTINGS added new entries
                out.append(HandshakeComplete())
        return out

    def _require_open(self) -> None:
        if self.closed:
            raise LocalProtocolError("session is closed")
        if not self.initiated:
            raise LocalProtocolError("session not initiated")
