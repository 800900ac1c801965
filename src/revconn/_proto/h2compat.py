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
    """h2's connection without the ``repr(frame)`` it builds for every received
    frame for a trace log that is disabled: for a 16 KiB DATA frame that repr
    hex-encodes the whole payload (hyperframe's ``_raw_data_repr``), measured at
    16 % of the gateway's CPU on a 10 MiB download. The body below is h2 4.x's
    ``_receive_frame`` (same error handling) minus that log line."""

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
