"""The sans-I/O tunnel session, at the byte level (no sockets, no trio)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from revconn import LocalProtocolError, RemoteProtocolError
from revconn._proto.session import (
    CLIENT_PREFACE,
    STREAM_WINDOW,
    DataReceived,
    HandshakeComplete,
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


def control(events: list[object]) -> list[object]:
    """The events a test looks at: flow-control credit is noise here."""
    return [e for e in events if not isinstance(e, WindowOpened)]


def pump(a: TunnelSession, b: TunnelSession) -> tuple[list[object], list[object]]:
    """Deliver queued bytes both ways until quiet; returns the events each side saw
    (WindowOpened left out)."""
    ev_a: list[object] = []
    ev_b: list[object] = []
    for _ in range(10):
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            break
        if out_a:
            ev_b += b.receive_data(out_a)
        if out_b:
            ev_a += a.receive_data(out_b)
    return control(ev_a), control(ev_b)


def connected_pair() -> tuple[TunnelSession, TunnelSession]:
    gw, ag = TunnelSession(Role.GATEWAY), TunnelSession(Role.AGENT)
    gw.initiate()
    ag.initiate()
    ev_gw, ev_ag = pump(gw, ag)
    assert ev_gw == [HandshakeComplete()]
    assert ev_ag == [HandshakeComplete()]
    return gw, ag


def test_handshake_completes_once_on_both_sides() -> None:
    gw, ag = connected_pair()
    assert gw.handshake_complete and ag.handshake_complete
    assert pump(gw, ag) == ([], [])


def test_handshake_needs_ack_of_our_settings() -> None:
    gw, ag = TunnelSession(Role.GATEWAY), TunnelSession(Role.AGENT)
    gw.initiate()
    ag.initiate()
    # The agent sees the gateway's preface + SETTINGS: not complete until its own are acked.
    assert control(ag.receive_data(gw.data_to_send())) == []
    assert not ag.handshake_complete
    assert control(gw.receive_data(ag.data_to_send())) == [HandshakeComplete()]
    assert control(ag.receive_data(gw.data_to_send())) == [HandshakeComplete()]


def test_handshake_byte_by_byte() -> None:
    gw, ag = TunnelSession(Role.GATEWAY), TunnelSession(Role.AGENT)
    gw.initiate()
    ag.initiate()
    events: list[object] = []
    for byte in gw.data_to_send():
        events += ag.receive_data(bytes([byte]))
    for byte in ag.data_to_send():
        events += gw.receive_data(bytes([byte]))
    for byte in gw.data_to_send():
        events += ag.receive_data(bytes([byte]))
    assert control(events) == [HandshakeComplete(), HandshakeComplete()]


@pytest.mark.parametrize("role", [Role.GATEWAY, Role.AGENT])
def test_ping_round_trip(role: Role) -> None:
    gw, ag = connected_pair()
    me, peer = (gw, ag) if role is Role.GATEWAY else (ag, gw)
    me.send_ping(b"12345678")
    ev_me, ev_peer = pump(me, peer)
    assert ev_me == [PingAcknowledged(b"12345678")]
    assert ev_peer == []


def test_ping_payload_must_be_8_bytes() -> None:
    gw, _ = connected_pair()
    with pytest.raises(LocalProtocolError):
        gw.send_ping(b"short")


def test_goaway_carries_reason() -> None:
    gw, ag = connected_pair()
    gw.close(0, "replaced")
    _, ev_ag = pump(gw, ag)
    assert ev_ag == [SessionEnded(0, "replaced")]
    assert ag.closed and gw.closed
    with pytest.raises(LocalProtocolError):
        gw.send_ping(b"12345678")
    gw.close(0, "again")  # idempotent
    assert gw.data_to_send() == b""


def test_goaway_reason_is_truncated() -> None:
    gw, ag = connected_pair()
    gw.close(0, "x" * 500)
    _, ev_ag = pump(gw, ag)
    (ended,) = ev_ag
    assert isinstance(ended, SessionEnded)
    assert len(ended.reason) == 123


def _frame(length: int, type_: int = 0, flags: int = 0, stream: int = 0) -> bytes:
    return length.to_bytes(3, "big") + bytes([type_, flags]) + stream.to_bytes(4, "big")


@pytest.mark.parametrize("split", range(1, 9))
def test_oversized_frame_rejected_from_its_header(split: int) -> None:
    gw, ag = connected_pair()
    header = _frame(1 << 20)  # 1 MiB DATA frame announced, nothing more sent
    ag.receive_data(header[:split])
    with pytest.raises(RemoteProtocolError) as info:
        ag.receive_data(header[split:])
    assert info.value.h2_error == 0x6  # FRAME_SIZE_ERROR
    assert info.value.close_code == 1002
    # A GOAWAY(FRAME_SIZE_ERROR) was queued for the peer.
    _, ev_gw = pump(ag, gw)
    assert ev_gw == [] or isinstance(ev_gw[0], SessionEnded)
    assert ag.receive_data(b"more") == []


def test_scanner_follows_frames_split_at_every_offset() -> None:
    """A stream of valid frames is accepted however it is cut."""
    gw, _ag = connected_pair()
    for i in range(5):
        gw.send_ping(i.to_bytes(8, "big"))
    stream = gw.data_to_send()
    for cut in range(1, len(stream)):
        g2, a2 = connected_pair()
        for i in range(5):
            g2.send_ping(i.to_bytes(8, "big"))
        data = g2.data_to_send()
        assert data == stream
        a2.receive_data(data[:cut])
        a2.receive_data(data[cut:])
        got = control(g2.receive_data(a2.data_to_send()))
        assert got == [PingAcknowledged(i.to_bytes(8, "big")) for i in range(5)]


def test_bad_preface_is_a_remote_error() -> None:
    ag = TunnelSession(Role.AGENT)
    ag.initiate()
    with pytest.raises(RemoteProtocolError):
        ag.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def test_request_stream_round_trip_with_flow_control() -> None:
    gw, ag = connected_pair()
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"x"),
        (b":path", b"/p?q=%20"),
    ]
    sid = gw.open_stream(headers, end_stream=False)
    body = bytes(range(256)) * (STREAM_WINDOW // 128)  # two stream windows
    sent = gw.send_data(sid, body, end_stream=True)
    assert sent == STREAM_WINDOW  # the agent's per-stream window
    ev_gw, ev_ag = pump(gw, ag)
    assert isinstance(ev_ag[0], RequestReceived)
    assert ev_ag[0].headers[:4] == headers
    data = [e for e in ev_ag if isinstance(e, DataReceived)]
    assert b"".join(e.data for e in data) == body[:sent]
    assert not any(e.end_stream for e in data)
    # Nothing more fits until the agent consumes (acknowledges) what it got.
    assert gw.send_window(sid) == 0
    ag.ack_data(sid, sum(e.flow_length for e in data))
    gw.receive_data(ag.data_to_send())
    assert gw.send_window(sid) > 0
    assert gw.send_data(sid, body[sent:], end_stream=True) == len(body) - sent
    _, ev_ag = pump(gw, ag)
    rest = [e for e in ev_ag if isinstance(e, DataReceived)]
    assert b"".join(e.data for e in rest) == body[sent:]
    assert rest[-1].end_stream
    ag.send_response(sid, 201, [(b"x-a", b"1"), (b"x-a", b"2")], end_stream=True)
    ev_gw, _ = pump(gw, ag)
    assert ev_gw == [ResponseReceived(sid, 201, [(b"x-a", b"1"), (b"x-a", b"2")], True)]


def test_reset_reaches_peer_and_session_survives() -> None:
    gw, ag = connected_pair()
    sid = gw.open_stream(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")],
        end_stream=True,
    )
    pump(gw, ag)
    gw.reset_stream(sid, 0x8)
    _, ev_ag = pump(gw, ag)
    assert ev_ag == [StreamReset(sid, 0x8)]
    gw.reset_stream(sid, 0x8)  # idempotent
    gw.send_ping(b"abcdefgh")
    ev_gw, _ = pump(gw, ag)
    assert ev_gw == [PingAcknowledged(b"abcdefgh")]


def test_max_concurrent_streams_respected() -> None:
    gw = TunnelSession(Role.GATEWAY)
    ag = TunnelSession(Role.AGENT, max_concurrent_streams=2)
    gw.initiate()
    ag.initiate()
    pump(gw, ag)
    req = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]
    gw.open_stream(req, end_stream=True)
    gw.open_stream(req, end_stream=True)
    with pytest.raises(StreamLimitReached):
        gw.open_stream(req, end_stream=True)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([Role.GATEWAY, Role.AGENT]))
def test_arbitrary_bytes_only_raise_remote_protocol_error(data: bytes, role: Role) -> None:
    session = TunnelSession(role)
    session.initiate()
    try:
        session.receive_data(data)
    except RemoteProtocolError as exc:
        assert exc.close_code == 1002
    session.data_to_send()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_frames_after_handshake(data: bytes) -> None:
    _gw, ag = connected_pair()
    try:
        ag.receive_data(data)
    except RemoteProtocolError:
        assert ag.closed


def test_client_preface_constant() -> None:
    assert len(CLIENT_PREFACE) == 24


def test_late_response_on_a_stream_the_gateway_reset_is_ignored() -> None:
    """The client went away, the gateway reset the stream, and the agent's
    response was already on the wire: the late HEADERS and DATA must only be
    dropped (h2 checks the gateway's own stream limit before it recognises a
    reset stream, so a limit of 0 made this a connection error)."""
    gw, ag = connected_pair()
    sid = gw.open_stream(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")],
        end_stream=True,
    )
    _, ev_ag = pump(gw, ag)
    assert ev_ag == [RequestReceived(sid, ev_ag[0].headers, True)]  # type: ignore[attr-defined]
    ag.send_response(sid, 200, [(b"content-length", b"5")], end_stream=False)
    ag.send_data(sid, b"hello", end_stream=True)
    in_flight = ag.data_to_send()
    gw.reset_stream(sid)
    # The next request opens before the late response arrives; counting its
    # streams makes h2 forget the reset one.
    sid2 = gw.open_stream(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/2")],
        end_stream=True,
    )
    assert gw.receive_data(in_flight) == []
    assert not gw.closed
    # The session goes on: the next request round-trips.
    pump(gw, ag)
    ag.send_response(sid2, 204, [], end_stream=True)
    ev_gw, _ = pump(gw, ag)
    assert ev_gw == [ResponseReceived(sid2, 204, [], True)]


def test_malformed_response_head_is_an_event_not_a_connection_error() -> None:
    """A broken :status or header from one upstream must not end the session
    (h2's inbound validation would make it a connection error): the status
    arrives as 0 (the front ends answer 502) and bad headers are left to
    clean_headers()."""
    gw, ag = connected_pair()
    sid = gw.open_stream(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")],
        end_stream=True,
    )
    pump(gw, ag)
    ag._conn.send_headers(sid, [(b":status", b"2x0"), (b"Bad Name", b"v\x00")], end_stream=True)
    ev_gw, _ = pump(gw, ag)
    assert ev_gw == [ResponseReceived(sid, 0, [(b"Bad Name", b"v\x00")], True)]
    assert not gw.closed


def test_header_literals_travel_without_huffman_coding() -> None:
    gw, ag = connected_pair()
    value = b"a literal value, not yet in the table"
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x")]
    stream_id = gw.open_stream([*headers, (b":path", b"/"), (b"x-test", value)], end_stream=True)
    block = gw.data_to_send()
    assert value in block  # HPACK string literal with the H bit clear
    [request] = [e for e in ag.receive_data(block) if isinstance(e, RequestReceived)]
    assert request.stream_id == stream_id
    assert (b"x-test", value) in request.headers
