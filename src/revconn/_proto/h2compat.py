"""Everything revconn does to h2 and hpack beyond their public API, in one place.

Each piece leans on h2 4.x internals (pinned ``h2<5`` in pyproject.toml);
``tests/proto/test_h2compat.py`` fails loudly when the behaviour relied on
changes, so an h2 upgrade cannot silently break the tunnel.
"""

from __future__ import annotations

from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.stream
import hpack
import hyperframe.frame

__all__ = ["H2Connection", "PlainEncoder", "SlimDeque", "compact_h2"]


class SlimDeque(list):  # type: ignore[type-arg]
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


def compact_h2(conn: h2.connection.H2Connection) -> None:
    """Swap h2's per-connection deques for SlimDeque (same contents, same order)."""
    for settings in (conn.local_settings, conn.remote_settings):
        table: dict[Any, Any] = settings._settings
        for key, values in table.items():
            if type(values) is not SlimDeque:
                table[key] = SlimDeque(values)
    for hpack_table in (conn.encoder.header_table, conn.decoder.header_table):
        entries: Any = hpack_table.dynamic_entries
        if type(entries) is not SlimDeque:
            hpack_table.dynamic_entries = SlimDeque(entries)  # type: ignore[assignment]


class PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding of literals (RFC 7541 5.2, H bit 0).

    hpack Huffman-codes in pure Python, byte by byte, on both ends: a request
    head whose values are not yet in the dynamic table took 58 us to decode
    with it and 26 us without (19 vs 14 us to encode once indexed), for ~25 %
    more bytes on a link where bytes are cheap. Decoders accept both forms,
    so a peer that does use Huffman is still understood."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)


class H2Connection(h2.connection.H2Connection):
    """h2's connection with two changes.

    * Without the ``repr(frame)`` it builds for every received frame for a
      trace log that is disabled: for a 16 KiB DATA frame that repr
      hex-encodes the whole payload (hyperframe's ``_raw_data_repr``),
      measured at 16 % of the gateway's CPU on a 10 MiB download. The body of
      ``_receive_frame`` below is h2 4.x's (same error handling) minus that
      log line.
    * A new stream beyond our SETTINGS_MAX_CONCURRENT_STREAMS is refused with
      RST_STREAM REFUSED_STREAM, a stream error (RFC 9113 5.1.2), where h2
      raises TooManyStreamsError, a connection error. An honest peer does
      that when its HEADERS crossed our lowered limit (the agent's drain
      signal, SETTINGS_MAX_CONCURRENT_STREAMS = 0): the session and the
      streams in flight must survive it.
    """

    def _receive_headers_frame(self, frame: Any) -> Any:
        stream_id = frame.stream_id
        if (
            stream_id not in self.streams
            and stream_id > self.highest_inbound_stream_id
            and not self._stream_id_is_outbound(stream_id)
            and self.open_inbound_streams + 1 > self.local_settings.max_concurrent_streams
        ):
            self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_HEADERS)
            # The header block is decoded all the same: HPACK state is per connection.
            h2.connection._decode_headers(self.decoder, frame.data)
            self.highest_inbound_stream_id = stream_id
            self._closed_streams[stream_id] = h2.stream.StreamClosedBy.SEND_RST_STREAM
            refusal = hyperframe.frame.RstStreamFrame(stream_id)
            refusal.error_code = h2.errors.ErrorCodes.REFUSED_STREAM
            return [refusal], []
        return super()._receive_headers_frame(frame)

    def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
        events: list[h2.events.Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            # Closed by RST_STREAM: a stream error, answered with RST_STREAM.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = hyperframe.frame.RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = hyperframe.frame.RstStreamFrame(e.stream_id)
                f.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events
