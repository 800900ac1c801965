"""HTTP/1.1 message boundaries (sans-I/O): every split offset, random splits,
each error's status, and round-trips of the serialisation helpers."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from revconn._proto.http1 import (
    END,
    LAST_CHUNK,
    Body,
    Informational,
    ParseError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    chunk,
    request_head,
    response_head,
)

# -- corpus: pipelined requests ------------------------------------------------

REQUESTS = (
    b"GET /a/x/y?z=1 HTTP/1.1\r\nHost: example.com\r\nX-Pad:  v  w \t\r\n\r\n"
    b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5;ext=1;q="a b"\r\nhello\r\n6\r\n world\r\n0;last\r\nTrailer-A: v\r\nT2: w\r\n\r\n'
    b"PUT /d HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n\r\n\r\n"
    b"POST /e HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"7\r\n0\r\n\r\n\r\n\r\n4\r\n\r\n\r\n\r\n0\r\n\r\n"  # body looks like framing
    b"\r\nGET /f HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"  # a stray CRLF is skipped
    b"GET /g HTTP/1.1\r\nConnection: close\r\n\r\n"
    b"GET /ignored HTTP/1.1\r\n\r\n"  # after Connection: close: not processed
)


def req(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], **kw: object) -> object:
    fields: dict[str, object] = {"version": b"1.1", "keep_alive": True, "upgrade": False}
    fields |= {"expect_continue": False, "has_body": False} | kw
    return RequestHead(method=method, target=target, headers=headers, **fields)  # type: ignore[arg-type]


def resp(status: int, headers: list[tuple[bytes, bytes]], **kw: object) -> object:
    fields: dict[str, object] = {"reason": b"OK", "version": b"1.1", "keep_alive": True}
    fields |= {"content_length": 0, "chunked": False, "close_delimited": False} | kw
    return ResponseHead(status=status, headers=headers, **fields)  # type: ignore[arg-type]


def msgs(*items: object) -> list[object]:
    """Events from ``(head, body)`` pairs (then END) and bare Informational heads."""
    out: list[object] = []
    for item in items:
        if isinstance(item, tuple):
            out += [item[0], *([Body(item[1])] if item[1] else []), END]
        else:
            out.append(item)
    return out


CL, TE = b"content-length", b"transfer-encoding"
CONTINUE: dict[str, object] = {"expect_continue": True, "has_body": True}
UNTIL_EOF: dict[str, object] = {"version": b"1.0", "keep_alive": False, "content_length": None}
EXPECTED_REQUESTS = msgs(
    (req(b"GET", b"/a/x/y?z=1", [(b"host", b"example.com"), (b"x-pad", b"v  w")]), b""),
    (req(b"POST", b"/b", [(CL, b"5")], has_body=True), b"hello"),
    (req(b"POST", b"/c", [(TE, b"chunked")], has_body=True), b"hello world"),
    (req(b"PUT", b"/d", [(b"expect", b"100-continue"), (CL, b"4")], **CONTINUE), b"\r\n\r\n"),
    (req(b"POST", b"/e", [(TE, b"chunked")], has_body=True), b"0\r\n\r\n\r\n\r\n\r\n"),
    (req(b"GET", b"/f", [(b"connection", b"keep-alive")], version=b"1.0"), b""),
    (req(b"GET", b"/g", [(b"connection", b"close")], keep_alive=False), b""),
)

# -- corpus: responses on keep-alive connections (method, bytes); EOF at the end

CONN_1 = [
    (
        b"POST",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    ),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nETag: e\r\n\r\n"),
    (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n"),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nETag: e\r\n\r\n"),
    (
        b"GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;x=y\r\nab\r\n\r\n3\r\n\r\n0\r\n0\r\nT: 1\r\n\r\n",
    ),
    (b"GET", b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nuntil eof\r\n\r\n"),
]
CONN_2 = [(b"GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi")]
EXPECTED_1 = msgs(
    Informational(100, b"Continue", []),
    Informational(103, b"Early Hints", [(b"link", b"</s.css>")]),
    (resp(200, [(CL, b"3")], content_length=3), b"abc"),
    (resp(200, [(CL, b"1234")]), b""),  # HEAD: no body, still keep-alive
    (resp(200, [(b"etag", b"e")]), b""),
    (resp(204, [(CL, b"7")], reason=b"No Content"), b""),
    (resp(304, [(b"etag", b"e")], reason=b"Not Modified"), b""),
    (resp(200, [(TE, b"chunked")], content_length=None, chunked=True), b"ab\r\n\r\n0"),
    (resp(200, [(b"server", b"old")], close_delimited=True, **UNTIL_EOF), b"until eof\r\n\r\n"),
)
EXPECTED_2 = msgs(
    (resp(200, [(b"connection", b"close"), (CL, b"2")], keep_alive=False, content_length=2), b"hi")
)


def drain(parser: RequestParser | ResponseParser, out: list[object] | None = None) -> list[object]:
    """The queued events, appended to ``out`` with consecutive Body pieces
    merged: how a body was split is not compared."""
    out = [] if out is None else out
    for event in iter(parser.next_event, None):
        if isinstance(event, Body) and out and isinstance(out[-1], Body):
            out[-1] = Body(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def cutter(i: int) -> Callable[[bytes], list[bytes]]:
    return lambda data: split(data, [i])


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def run_requests(pieces: list[bytes]) -> list[object]:
    parser, events = RequestParser(), list[object]()
    for piece in pieces:
        parser.feed(piece)
        drain(parser, events)
    return events


def run_connection(
    conn: list[tuple[bytes, bytes]], cut: Callable[[bytes], list[bytes]]
) -> list[object]:
    """One upstream connection: expect(), feed the response in pieces
    (``cut(data)`` splits it), repeat; EOF at the end."""
    parser, events = ResponseParser(), list[object]()
    for method, data in conn:
        parser.expect(method)
        for piece in cut(data):
            parser.feed(piece)
            drain(parser, events)
    parser.feed_eof()
    return drain(parser, events)


def test_requests_split_at_every_offset_and_byte_by_byte() -> None:
    for i in range(len(REQUESTS) + 1):  # i == 0 and len: in one piece
        assert run_requests(split(REQUESTS, [i])) == EXPECTED_REQUESTS, i
    assert run_requests(bytewise(REQUESTS)) == EXPECTED_REQUESTS


@pytest.mark.parametrize(("conn", "expected"), [(CONN_1, EXPECTED_1), (CONN_2, EXPECTED_2)])
def test_responses_split_at_every_offset_and_byte_by_byte(
    conn: list[tuple[bytes, bytes]], expected: list[object]
) -> None:
    for i in range(max(len(d) for _, d in conn) + 1):
        assert run_connection(conn, cutter(i)) == expected, i
    assert run_connection(conn, bytewise) == expected


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_splits_give_the_same_events(data: st.DataObject) -> None:
    cuts = st.lists(st.integers(0, len(REQUESTS)), max_size=30)
    assert run_requests(split(REQUESTS, data.draw(cuts))) == EXPECTED_REQUESTS

    def cut(d: bytes) -> list[bytes]:
        return split(d, data.draw(st.lists(st.integers(0, len(d)), max_size=10)))

    assert run_connection(CONN_1, cut) == EXPECTED_1


# -- requests: errors and edge cases -----------------------------------------

H = b"POST / HTTP/1.1\r\n"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc", 400),
        (H + b"Content-Length: 3x\r\n\r\nabc", 400),
        (H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabc", 400),
        (b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\nHost: x\n\n", 400),  # bare LF
        (b"GET / HTTP/1.1\r\nHost: x\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX : x\r\n\r\n", 400),
        (b"G@T / HTTP/1.1\r\n\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET /\r\n\r\n", 505),  # HTTP/0.9
        (H + b"Transfer-Encoding: gzip\r\n\r\nabc", 400),  # chunked not final
        (H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX", 400),
    ],
)
def test_malformed_request(raw: bytes, status: int) -> None:
    for pieces in ([raw], bytewise(raw)):
        parser = RequestParser()
        with pytest.raises(ParseError) as info:
            for piece in pieces:
                parser.feed(piece)
        assert info.value.status == status
        assert isinstance(info.value.detail, str)
        assert info.value.detail
        assert str(info.value) == info.value.detail


def test_events_before_an_error_stay_available() -> None:
    parser = RequestParser()
    with pytest.raises(ParseError):
        parser.feed(b"GET /ok HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nBad Name: x\r\n\r\n")
    assert isinstance(parser.next_event(), RequestHead)
    assert parser.next_event() is END
    with pytest.raises(ParseError) as info:
        parser.next_event()
    assert info.value.status == 400
    with pytest.raises(ParseError):
        parser.feed(b"GET / HTTP/1.1\r\n\r\n")


def test_head_limit_counts_the_whole_head_and_raises_before_it_is_complete() -> None:
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * 77 + b"\r\n\r\n"
    assert len(head) == 100
    RequestParser(max_head=100).feed(head)
    with pytest.raises(ParseError) as info:
        RequestParser(max_head=99).feed(head)
    assert info.value.status == 431
    parser, fed = RequestParser(max_head=100), 0
    with pytest.raises(ParseError) as info:
        for piece in [head[:19]] + [b"a" * 10] * 20:
            fed += len(piece)
            parser.feed(piece)
    assert info.value.status == 431
    assert 100 < fed <= 110


def test_endless_trailers_are_bounded() -> None:
    parser = RequestParser(max_head=100)
    parser.feed(H + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nT: ")
    with pytest.raises(ParseError) as info:
        for _ in range(20):
            parser.feed(b"b" * 10)
    assert info.value.status == 400
    assert "trailers" in info.value.detail


def test_upgrade_request_keeps_the_trailing_bytes() -> None:
    parser = RequestParser()
    upgrade = b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    parser.feed(upgrade + b"\x81\x05hello")
    headers = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    assert drain(parser) == msgs((req(b"GET", b"/ws", headers, upgrade=True), b""))
    assert parser.upgrade_trailing == b"\x81\x05hello"
    with pytest.raises(ParseError) as info:
        parser.feed(b"more")
    assert info.value.status == 500
    plain = RequestParser()
    plain.feed(upgrade[:-1])
    assert plain.upgrade_trailing is None
    plain.feed(upgrade[-1:])
    assert plain.upgrade_trailing == b""


@pytest.mark.parametrize(
    ("raw", "keep_alive", "expect_continue"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", False, False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True, False),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False, False),
        (b"GET / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n", True, True),
        (b"GET / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n", False, False),  # 1.1 only
    ],
)
def test_keep_alive_and_expect(raw: bytes, keep_alive: bool, expect_continue: bool) -> None:
    parser = RequestParser()
    parser.feed(raw)
    head = parser.next_event()
    assert isinstance(head, RequestHead)
    assert (head.keep_alive, head.expect_continue) == (keep_alive, expect_continue)


@pytest.mark.parametrize(
    ("raw", "started", "clean"),
    [
        (b"GET / HTTP/1.1\r\n\r\n\r\n", False, True),  # between requests
        (b"GET / HT", True, False),
        (H + b"Content-Length: 5\r\n\r\nab", False, False),
    ],
)
def test_eof(raw: bytes, started: bool, clean: bool) -> None:
    parser = RequestParser()
    parser.feed(raw)
    assert parser.head_started is started
    parser.feed_eof()
    assert parser.eof
    if clean:
        assert drain(parser)[-1] is END
        assert parser.next_event() is None
        return
    with pytest.raises(ParseError) as info:
        drain(parser)
    assert info.value.status == 400
    assert "incomplete" in info.value.detail


# -- responses: errors and edge cases ----------------------------------------

OK = b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (OK + b"Content-Length: 5\r\n\r\nabc", "truncated"),  # all at EOF
        (OK + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", "truncated"),
        (OK + b"Content-Le", "truncated"),
        (b"", "without a response"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed response"),  # all at feed
        (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "malformed response"),
        (OK + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "malformed"),
        (OK + b"Transfer-Encoding: gzip\r\n\r\nabc", "transfer-coding"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "HTTP/1.1"),
        (OK + b"X: " + b"a" * 200 + b"\r\n\r\n", "larger than 100"),
    ],
)
def test_bad_or_truncated_response(raw: bytes, words: str) -> None:
    parser = ResponseParser(max_head=100)
    parser.expect(b"GET")
    with pytest.raises(ParseError) as info:
        parser.feed(raw)
        drain(parser)
        parser.feed_eof()
    assert info.value.status == 502
    assert words in info.value.detail


def test_unsolicited_data_after_the_response() -> None:
    """Bytes after a complete response (an upstream that miscounted a body)
    are dropped and flag the connection (``stray``) without destroying the
    response before them; the parser then refuses to go on."""
    parser = ResponseParser()
    parser.feed(OK + b"\r\n")  # nothing was requested
    assert parser.stray
    with pytest.raises(ParseError) as info:
        parser.next_event()
    assert info.value.status == 502
    parser = ResponseParser()
    parser.expect(b"HEAD")
    parser.feed(OK + b"Content-Length: 3\r\n\r\nabc")  # a body after a HEAD response
    assert parser.stray
    assert isinstance(parser.next_event(), ResponseHead)  # the response is still delivered
    assert parser.next_event() is END
    with pytest.raises(ParseError) as info:
        parser.next_event()
    assert "unsolicited" in info.value.detail
    parser = ResponseParser()
    parser.expect(b"GET")
    parser.feed(OK + b"Content-Length: 0\r\n\r\n")
    assert drain(parser)[-1] is END
    assert not parser.stray
    parser.feed(b"\r\n")
    assert parser.stray
    with pytest.raises(ParseError) as info:
        parser.expect(b"GET")  # the connection carries no more requests
    assert info.value.status == 502


def test_switching_protocols_response() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    raw = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    parser.feed(raw + b"\x81\x00")
    head, end = drain(parser)
    assert isinstance(head, ResponseHead)
    assert (head.status, head.keep_alive, end) == (101, False, END)
    assert parser.upgrade_trailing == b"\x81\x00"
    with pytest.raises(ParseError) as info:
        parser.expect(b"GET")  # a misuse: the connection no longer speaks HTTP
    assert info.value.status == 500


# -- serialisation helpers ---------------------------------------------------


@given(st.lists(st.binary(min_size=1, max_size=50), max_size=5), st.binary(max_size=50))
def test_helpers_round_trip(chunks: list[bytes], body: bytes) -> None:
    headers = [(b"host", b"h"), (b"transfer-encoding", b"chunked")]
    wire = request_head(b"POST", b"/x?y=1", headers)
    wire += b"".join(chunk(c) for c in chunks) + LAST_CHUNK
    assert run_requests([wire]) == msgs(
        (req(b"POST", b"/x?y=1", headers, has_body=True), b"".join(chunks))
    )
    length = [(CL, b"%d" % len(body))]
    wire = response_head(404, b"Not Found", length, version=b"1.0") + body
    head = resp(
        404, length, reason=b"Not Found", version=b"1.0", keep_alive=False, content_length=len(body)
    )
    assert run_connection([(b"GET", wire)], bytewise) == msgs((head, body))


def test_helpers_output() -> None:
    assert request_head(b"GET", b"/x", [(b"a", b"1"), (b"b", b"")]) == (
        b"GET /x HTTP/1.1\r\na: 1\r\nb: \r\n\r\n"
    )
    assert response_head(204, b"No Content", []) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    with pytest.raises(ValueError, match="LAST_CHUNK"):
        chunk(b"")


@pytest.mark.parametrize("status", [b"999", b"600", b"000", b"099"])
def test_a_status_outside_100_to_599_is_malformed(status: bytes) -> None:
    """RFC 9110 15: llhttp accepts any three digits; an agent's upstream that
    answers 999 gets the client a 502, not a 999."""
    parser = ResponseParser()
    parser.expect(b"GET")
    with pytest.raises(ParseError) as caught:
        parser.feed(b"HTTP/1.1 " + status + b" X\r\nContent-Length: 2\r\n\r\nok")
        parser.next_event()
    assert caught.value.status == 502
