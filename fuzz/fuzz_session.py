"""atheris harness: the tunnel session's frame and session decoding.

Run: ``python fuzz/fuzz_session.py fuzz/corpus/session -max_total_time=60``
(fuzz/README.md). Without atheris the module still imports, and
``TestOneInput`` can be called directly (tests/test_fuzz_harness.py does).

Input format, so that mutations keep their meaning:

* byte 0, bits: 0 = the session under test is the agent (else the gateway);
  1 = start handshaken (else fresh, right after ``initiate()``);
  2 = *frame mode* (below; else the rest is fed as raw bytes);
* byte 1: the piece size the input is fed in (0 = all at once; otherwise
  it is fed whole too, and must end the same way);
* the rest: raw bytes, or in frame mode a sequence of records
  ``type flags stream len payload[len]``, each turned into a frame with a
  correct 9-byte header (stream byte: low 7 bits the id, bit 7 sets the top
  id bits), so that mutations reach the frame semantics, not just the framing.
  A fresh agent gets the client preface first.

Property (each violation raises, which libFuzzer reports as a crash):
``receive_data`` raises nothing but RemoteProtocolError (close code 1002),
after which a GOAWAY with the same error code is queued and input is
ignored; events are of the documented types, in a sane order per stream
(one head, body, end; nothing after a reset or after GOAWAY); buffers stay
bounded and what is sent back stays proportional to what came in; at the
end the session either still works (a PING can be queued) or ended with a
reason (a protocol error, or the peer's GOAWAY).
"""

from __future__ import annotations

import contextlib
import sys

try:
    import atheris
except ImportError:  # the harness stays importable and testable without it
    atheris = None

_instrument = (
    atheris.instrument_imports()
    if atheris is not None and __name__ == "__main__"
    else contextlib.nullcontext()
)
with _instrument:
    import h2.events
    import h2.frame_buffer
    from hyperframe.frame import Frame, GoAwayFrame, PingFrame

    from revconn import LocalProtocolError, RemoteProtocolError
    from revconn._proto import session as S

EVENT_TYPES = (
    S.HandshakeComplete,
    S.PingAcknowledged,
    S.SessionEnded,
    S.RequestReceived,
    S.ResponseReceived,
    S.DataReceived,
    S.StreamReset,
    S.WindowOpened,
)
CONNECT = [
    (b":method", b"CONNECT"),
    (b":protocol", b"revconn-http1"),
    (b":scheme", b"http"),
    (b":path", b"/"),
    (b":authority", b"upstream"),
]


class Violation(AssertionError):
    """The session broke its contract on this input."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise Violation(message)


def frames_of(data: bytes) -> list[Frame]:
    frames = []
    pos = 0
    while pos < len(data):
        check(len(data) - pos >= S.FRAME_HEADER_LEN, "a partial frame was queued")
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        frames.append(frame)
        pos += 9 + length
    return frames


def handshaken_pair() -> tuple[S.TunnelSession, S.TunnelSession]:
    gw, ag = S.TunnelSession(S.Role.GATEWAY), S.TunnelSession(S.Role.AGENT)
    gw.initiate()
    ag.initiate()
    for _ in range(3):
        ag.receive_data(gw.data_to_send())
        gw.receive_data(ag.data_to_send())
    return gw, ag


def frames_from_records(data: bytes) -> bytes:
    """Frame mode: ``type flags stream len payload`` records -> frames."""
    out = bytearray()
    pos = 0
    while pos + 4 <= len(data):
        type_, flags, sid_byte, length = data[pos : pos + 4]
        payload = data[pos + 4 : pos + 4 + length]
        pos += 4 + length
        sid = (sid_byte & 0x7F) | ((0x7F << 24) if sid_byte & 0x80 else 0)
        out += len(payload).to_bytes(3, "big") + bytes([type_, flags]) + sid.to_bytes(4, "big")
        out += payload
    return bytes(out)


class Checked:
    """One session under test, and what it reported so far."""

    def __init__(self, session: S.TunnelSession, opened: set[int]) -> None:
        self.session = session
        self.opened = opened
        self.heads: set[int] = set()
        self.ended: set[int] = set()
        self.reset: set[int] = set()
        self.error: RemoteProtocolError | None = None
        self.goaway: tuple[int, str] | None = None
        self.handshakes = 1 if session.handshake_complete else 0
        self.h2_events: list[object] = []
        conn = session._conn
        inner = conn.receive_data

        def receive_data(data: bytes) -> list[object]:
            events: list[object] = inner(data)
            self.h2_events = events
            return events

        conn.receive_data = receive_data  # (an instance attribute shadows the method)

    def feed(self, chunk: bytes) -> None:
        session = self.session
        was_closed = session.closed
        self.h2_events = []
        try:
            events = session.receive_data(chunk)
        except RemoteProtocolError as exc:
            check(not was_closed, "a closed session raised")
            self.on_error(exc)
            return
        # (any other exception propagates: that is the crash being looked for)
        check(type(events) is list, "receive_data did not return a list")
        check(not (was_closed and events), "a closed session reported events")
        for event in events:
            self.on_event(event, event is events[-1])
        self.check_translation(events)
        self.check_bounds()
        out = session.data_to_send()
        check(len(out) <= 3 * len(chunk) + 64, f"{len(out)} bytes sent for {len(chunk)}")

    def on_error(self, exc: RemoteProtocolError) -> None:
        session = self.session
        self.error = exc
        check(exc.close_code == 1002, f"close code {exc.close_code}")
        check(0 <= exc.h2_error <= 0xD, f"h2 error {exc.h2_error}")
        check(session.closed, "not closed after a protocol error")
        frames = frames_of(session.data_to_send())
        check(frames and isinstance(frames[-1], GoAwayFrame), "no GOAWAY after a protocol error")
        check(frames[-1].error_code == exc.h2_error, "GOAWAY with another error code")
        check(session.receive_data(b"\0" * 9) == [], "input accepted after the error")
        check(session.data_to_send() == b"", "bytes sent after the error")
        try:
            session.send_ping(b"12345678")
        except LocalProtocolError:
            pass
        else:
            raise Violation("PING accepted on a closed session")

    def on_event(self, e: object, last: bool) -> None:
        check(isinstance(e, EVENT_TYPES), f"unknown event {e!r}")
        role = self.session.role
        if isinstance(e, S.HandshakeComplete):
            self.handshakes += 1
            check(self.handshakes == 1, "HandshakeComplete twice")
            check(self.session.handshake_complete, "HandshakeComplete before the handshake")
        elif isinstance(e, S.SessionEnded):
            self.goaway = (e.error_code, e.reason)
            check(self.session.closed and last, "events after GOAWAY")
        elif isinstance(e, S.RequestReceived | S.ResponseReceived):
            sid = e.stream_id
            if isinstance(e, S.RequestReceived):
                # on the gateway: a stream the agent opened (its runtime refuses it)
                check(sid % 2 == (role is S.Role.AGENT), f"request on stream {sid}")
            else:
                check(role is S.Role.GATEWAY and sid in self.opened, f"response on {sid}")
            check(sid not in self.heads and sid not in self.reset, f"second head on {sid}")
            self.heads.add(sid)
            if e.end_stream:
                self.ended.add(sid)
        elif isinstance(e, S.DataReceived):
            sid = e.stream_id
            check(sid in self.heads, f"DATA before HEADERS on {sid}")
            check(sid not in self.ended and sid not in self.reset, f"DATA after the end on {sid}")
            check(len(e.data) <= e.flow_length <= S.MAX_FRAME_SIZE, "odd flow length")
            if e.end_stream:
                self.ended.add(sid)
        elif isinstance(e, S.StreamReset):
            check(e.stream_id not in self.reset, f"stream {e.stream_id} reset twice")
            self.reset.add(e.stream_id)

    def check_translation(self, events: list[object]) -> None:
        """No stream end, reset or GOAWAY that h2 reported is lost."""
        for ev in self.h2_events:
            if isinstance(ev, h2.events.StreamEnded):
                check(
                    any(
                        getattr(e, "stream_id", None) == ev.stream_id
                        and getattr(e, "end_stream", False)
                        for e in events
                    ),
                    f"the end of stream {ev.stream_id} was not reported",
                )
            elif isinstance(ev, h2.events.StreamReset):
                check(
                    any(
                        isinstance(e, S.StreamReset) and e.stream_id == ev.stream_id for e in events
                    ),
                    f"the reset of stream {ev.stream_id} was not reported",
                )
            elif isinstance(ev, h2.events.ConnectionTerminated):
                check(any(isinstance(e, S.SessionEnded) for e in events), "GOAWAY not reported")

    def check_bounds(self) -> None:
        session = self.session
        scanner = session._scanner
        check(len(scanner._header) < S.FRAME_HEADER_LEN, "scanner header buffer")
        check(0 <= scanner._payload_left <= S.MAX_FRAME_SIZE, "scanner payload count")
        if session.closed:
            return
        conn = session._conn
        check(
            len(conn.incoming_buffer._data) < S.FRAME_HEADER_LEN + S.MAX_FRAME_SIZE,
            "more than one partial frame buffered",
        )
        check(
            len(conn.incoming_buffer._headers_buffer) <= h2.frame_buffer.CONTINUATION_BACKLOG,
            "CONTINUATION backlog",
        )
        check(conn.decoder.header_table._current_size <= 4096, "HPACK table over 4096")
        check(len(conn.streams) <= 100 + len(self.opened) + 1, "streams not culled")

    def finish(self) -> None:
        session = self.session
        if session.closed:
            check(self.error is not None or self.goaway is not None, "closed without a reason")
            return
        session.send_ping(b"\0usable\0")
        frames = frames_of(session.data_to_send())
        check(
            isinstance(frames[-1], PingFrame) and frames[-1].opaque_data == b"\0usable\0",
            "an open session could not send a PING",
        )


def TestOneInput(data: bytes) -> None:  # (the name atheris and libFuzzer docs use)
    if len(data) < 2:
        return
    mode, size = data[0], data[1]
    payload = data[2:]
    if mode & 4:
        payload = frames_from_records(payload)
        if mode & 3 == 1:  # a fresh agent: the client preface first
            payload = S.CLIENT_PREFACE + payload
    cut = run(mode, payload, size)
    if size:
        # However the bytes were cut, the session ends the same way.
        whole = run(mode, payload, 0)
        check(outcome(cut) == outcome(whole), f"cut in {size}: {outcome(cut)} != {outcome(whole)}")


def run(mode: int, payload: bytes, size: int) -> Checked:
    role = S.Role.AGENT if mode & 1 else S.Role.GATEWAY
    opened: set[int] = set()
    if mode & 2:
        gw, ag = handshaken_pair()
        session = ag if role is S.Role.AGENT else gw
        if role is S.Role.GATEWAY:
            opened = {gw.open_stream(CONNECT, end_stream=False) for _ in range(3)}
    else:
        session = S.TunnelSession(role)
        session.initiate()
    session.data_to_send()
    checked = Checked(session, opened)
    step = size or len(payload) or 1
    for pos in range(0, len(payload), step):
        checked.feed(payload[pos : pos + step])
    checked.finish()
    return checked


def outcome(checked: Checked) -> tuple[object, ...]:
    """Closed? by a protocol error? with which GOAWAY from the peer? (Not the
    error code: the frame-size check sees all of a call's frame headers before
    h2 parses the first frame, so which fault is named first can differ.)"""
    return (checked.session.closed, checked.error is not None, checked.goaway)


def main() -> None:
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris (see fuzz/README.md)")
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
