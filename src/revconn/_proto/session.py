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
from typing import Final

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .. import _codes
from .._errors import LocalProtocolError, RemoteProtocolError
from .h2compat import H2Connection, PlainEncoder, compact_h2

__all__ = [
    "DataReceived",
    "Event",
    "HandshakeComplete",
    "PingAcknowledged",
    "RequestReceived",
    "ResponseReceived",
    "Role",
    "SessionEnded",
    "StreamLimitReached",
    "StreamReset",
    "TunnelSession",
    "WindowOpened",
]

CLIENT_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_LEN: Final = 9
MAX_FRAME_SIZE: Final = 128 * 1024
"""SETTINGS_MAX_FRAME_SIZE both ends advertise: a 10 MiB body is 80 DATA frames
instead of 640, and h2's cost is mostly per frame. Below the 1 MiB WebSocket
message limit and the 256 KiB stream window."""
MAX_GOAWAY_REASON: Final = 123  # fits a WebSocket close reason too
_GOAWAY_TYPE: Final = 0x7


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


@attrs.frozen(slots=True)
class RequestReceived:
    """(agent) The gateway opened a stream: one forwarded request."""

    stream_id: int
    headers: list[tuple[bytes, bytes]]
    end_stream: bool


@attrs.frozen(slots=True)
class ResponseReceived:
    """(gateway) The agent answered a stream with a final status."""

    stream_id: int
    status: int
    headers: list[tuple[bytes, bytes]]
    end_stream: bool


@attrs.frozen(slots=True)
class DataReceived:
    """Body bytes on a stream. Call ``ack_data(stream_id, flow_length)`` once consumed."""

    stream_id: int
    data: bytes
    flow_length: int
    end_stream: bool


@attrs.frozen(slots=True)
class StreamReset:
    """The peer reset a stream (RST_STREAM) with an HTTP/2 error code."""

    stream_id: int
    error_code: int


@attrs.frozen(slots=True)
class WindowOpened:
    """Flow-control credit arrived; ``stream_id`` 0 means the whole connection."""

    stream_id: int


Event = (
    HandshakeComplete
    | PingAcknowledged
    | SessionEnded
    | RequestReceived
    | ResponseReceived
    | DataReceived
    | StreamReset
    | WindowOpened
)

STREAM_WINDOW = 1024 * 1024
"""Per-stream receive window: the most bytes buffered for one stream. 1 MiB,
not 256 KiB: a stream now carries one upstream connection's bytes, and a
10 MiB download ran 1.19x, a 100 MiB upload 1.21x faster with it in one
interleaved run (docs/benchmarks.md)."""
CONNECTION_WINDOW = 16 * 1024 * 1024
"""Connection receive window: the most body bytes buffered for one agent."""
MAX_STREAM_ID = 2**31 - 1


class StreamLimitReached(LocalProtocolError):
    """(gateway) The agent's SETTINGS_MAX_CONCURRENT_STREAMS is reached."""


class _FrameScanner:
    """Follows frame boundaries in the byte stream and checks each frame's length.

    Only the 9-byte headers are looked at; payload bytes are skipped by count.
    """

    __slots__ = ("_goaway", "_header", "_max_frame_size", "_payload_left", "_preface_left")

    def __init__(self, max_frame_size: int, preface_len: int) -> None:
        self._max_frame_size = max_frame_size
        self._preface_left = preface_len
        self._header = b""
        self._payload_left = 0
        self._goaway = False

    def feed(self, data: bytes) -> int | None:
        """Scan ``data``; returns the offset just past a GOAWAY frame that ends
        in it, else None. Nothing after a GOAWAY is to be parsed: h2 makes any
        frame after a received GOAWAY a connection error, which lost the
        GOAWAY's reason whenever more frames came in the same message."""
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
                if self._goaway and not self._payload_left:
                    return pos
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
            if header[3] == _GOAWAY_TYPE:
                if not length:
                    return pos
                self._goaway = True
        return None


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
        # Outbound headers are built or cleaned by revconn (_headers.py), so h2's
        # per-header validation and normalisation would only repeat that work.
        #
        # Inbound validation is off too: h2 turns a malformed header block into a
        # *connection* error (every stream of the agent lost) and costs ~20 % of
        # h2's receive time. What a peer sends is checked where it is used
        # instead: status parsing here, clean_headers() on responses, h11 on the
        # requests the agent sends upstream.
        config = h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self._conn = H2Connection(config=config)
        self._conn.encoder = PlainEncoder()
        # The gateway never accepts streams from the agent (it refuses them), but
        # advertises 1, not 0: h2 checks this limit *before* it recognises a
        # HEADERS frame on a stream we reset, so with 0 every late response (the
        # client left, the agent had already answered) was a connection error
        # that took all of the agent's requests down.
        self._conn.local_settings = h2.settings.Settings(
            client=client,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: (
                    1 if client else max_concurrent_streams
                ),
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: (
                    self._conn.DEFAULT_MAX_HEADER_LIST_SIZE
                ),
                # (agent) Streams are extended CONNECT streams (RFC 8441).
                **({} if client else {h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1}),
            },
        )
        # (h2 reads this once in its constructor, before our settings exist)
        self._conn.max_inbound_frame_size = MAX_FRAME_SIZE
        compact_h2(self._conn)
        self._scanner = _FrameScanner(MAX_FRAME_SIZE, 0 if client else len(CLIENT_PREFACE))
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
        self._conn.increment_flow_control_window(CONNECTION_WINDOW - 65_535)

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

    # -- streams (outbound) --------------------------------------------------
    def stop_accepting_streams(self) -> None:
        """(agent) Advertise SETTINGS_MAX_CONCURRENT_STREAMS = 0: the gateway opens no
        new streams; those in flight are unaffected. The drain signal, since GOAWAY
        would end them too (python-hyper/h2#1181)."""
        if not self.closed and self.initiated:
            self._conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})

    @property
    def peer_draining(self) -> bool:
        """(gateway) The agent advertised SETTINGS_MAX_CONCURRENT_STREAMS = 0."""
        return bool(self._conn.remote_settings.max_concurrent_streams == 0)

    @property
    def stream_ids_exhausted(self) -> bool:
        return bool(self._conn.highest_outbound_stream_id >= MAX_STREAM_ID - 2)

    def open_stream(self, headers: list[tuple[bytes, bytes]], *, end_stream: bool) -> int:
        """(gateway) Start a request stream; ``headers`` include the pseudo-headers.

        Raises StreamLimitReached at the agent's SETTINGS_MAX_CONCURRENT_STREAMS
        (checked by h2 itself: its count of open streams walks every stream, so
        it is not asked twice) and LocalProtocolError when ids are used up.
        """
        self._require_open()
        if self.stream_ids_exhausted:
            raise LocalProtocolError("stream ids exhausted: the session must be redialled")
        stream_id: int = self._conn.get_next_available_stream_id()
        try:
            self._conn.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.TooManyStreamsError:
            raise StreamLimitReached("the agent's concurrent stream limit is reached") from None
        return stream_id

    def send_response(
        self, stream_id: int, status: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool
    ) -> None:
        """(agent) Answer a stream; ``headers`` must already be clean (_headers.clean_headers)."""
        self._require_open()
        self._conn.send_headers(
            stream_id, [(b":status", str(status).encode()), *headers], end_stream=end_stream
        )

    def send_window(self, stream_id: int) -> int:
        """How many body bytes may be sent on ``stream_id`` now."""
        try:
            return min(
                int(self._conn.local_flow_control_window(stream_id)),
                self._conn.max_outbound_frame_size * 16,
            )
        except h2.exceptions.StreamClosedError:
            return 0

    def send_data(self, stream_id: int, data: bytes | memoryview, *, end_stream: bool) -> int:
        """Queue as much of ``data`` as the flow-control window allows; returns how
        many bytes were queued. ``end_stream`` applies only if all of it fit."""
        self._require_open()
        n = min(len(data), self.send_window(stream_id))
        if n < len(data):
            end_stream = False
        if n == 0 and not end_stream:
            return 0
        frame_size = self._conn.max_outbound_frame_size
        pos = 0
        while True:
            chunk = data[pos : min(pos + frame_size, n)]  # (a memoryview: no copy)
            pos += len(chunk)
            last = pos >= n
            self._conn.send_data(stream_id, chunk, end_stream=end_stream and last)
            if last:
                return n

    def end_stream(self, stream_id: int) -> None:
        """End our side of a stream (an empty DATA frame with END_STREAM);
        LocalProtocolError if the stream or the session is closed."""
        self._require_open()
        try:
            self._conn.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            raise LocalProtocolError(f"stream {stream_id} is closed") from None

    def reset_stream(self, stream_id: int, error_code: int = _codes.H2_CANCEL) -> None:
        """Reset a stream; a no-op if it is already closed."""
        if self.closed:
            return
        try:
            self._conn.reset_stream(stream_id, error_code=error_code)
        except h2.exceptions.StreamClosedError:
            pass

    def ack_data(self, stream_id: int, flow_length: int) -> None:
        """Give back flow-control credit for consumed body bytes (stream and connection)."""
        if self.closed or flow_length <= 0:
            return
        try:
            self._conn.acknowledge_received_data(flow_length, stream_id)
        except h2.exceptions.StreamClosedError:
            # The stream is gone; the connection window still needs the credit.
            self._conn.increment_flow_control_window(flow_length)

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._conn._data_to_send)

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
            goaway_end = self._scanner.feed(data)
            if goaway_end is not None:
                data = data[:goaway_end]  # the peer ended the session: nothing after counts
            h2_events = self._conn.receive_data(data)
        except RemoteProtocolError as exc:
            self.close(exc.h2_error, _codes.REASON_PROTOCOL)
            raise
        except h2.exceptions.ProtocolError as exc:
            self.closed = True
            code = int(getattr(exc, "error_code", _codes.H2_PROTOCOL_ERROR))
            # h2 has queued its GOAWAY, except for a bad client preface: that
            # it rejects before its error handling (tests/proto/test_session_fuzz.py).
            if self._conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                self._conn.close_connection(
                    error_code=code, additional_data=_codes.REASON_PROTOCOL.encode()
                )
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
                # Nothing after GOAWAY counts, as in later calls (a closed
                # session ignores its input): what h2 parsed after it in the
                # same bytes must not depend on how they were cut.
                break
            elif isinstance(ev, h2.events.DataReceived):
                out.append(
                    DataReceived(
                        ev.stream_id,
                        ev.data,
                        ev.flow_controlled_length,
                        ev.stream_ended is not None,
                    )
                )
            elif isinstance(ev, h2.events.ResponseReceived):
                status, headers = _split_status(ev.headers)
                out.append(
                    ResponseReceived(ev.stream_id, status, headers, ev.stream_ended is not None)
                )
            elif isinstance(ev, h2.events.RequestReceived):
                out.append(
                    RequestReceived(ev.stream_id, list(ev.headers), ev.stream_ended is not None)
                )
            elif isinstance(ev, h2.events.TrailersReceived):
                # Not part of the protocol (the only header blocks are a stream's
                # CONNECT and its answer): the fields are dropped, but the
                # END_STREAM h2 requires on them is not, or the stream would
                # never end. An empty DATA with END_STREAM reports it.
                if ev.stream_ended is not None:
                    out.append(DataReceived(ev.stream_id, b"", 0, True))
            elif isinstance(ev, h2.events.StreamEnded):
                # Already reported through the end_stream flag of the event it came with.
                pass
            elif isinstance(ev, h2.events.StreamReset):
                out.append(StreamReset(ev.stream_id, int(ev.error_code or 0)))
            elif isinstance(ev, h2.events.WindowUpdated):
                out.append(WindowOpened(ev.stream_id))

            if not self._handshake_reported and self.handshake_complete:
                self._handshake_reported = True
                compact_h2(self._conn)  # the peer's SETTINGS added new entries
                out.append(HandshakeComplete())
        return out

    def _require_open(self) -> None:
        if self.closed:
            raise LocalProtocolError("session is closed")
        if not self.initiated:
            raise LocalProtocolError("session not initiated")


def _split_status(headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
    """(status, regular headers); status 0 when ``:status`` is missing or not a
    3-digit number (inbound header validation is off: the gateway answers 502)."""
    status = 0
    rest: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b":status":
            status = int(value) if len(value) == 3 and value.isdigit() else 0
        elif not name.startswith(b":"):
            rest.append((name, value))
    return status, rest
