"""HTTP/1.1 message boundaries, sans-I/O, on httptools (llhttp).

``RequestParser`` reads a public client's requests (server side),
``ResponseParser`` the responses an upstream sends back over a byte pipe
(client side). Both are fed bytes and queue events: a head, the decoded body
in pieces (``Body``), then ``END``. The helpers at the bottom serialise heads
and chunks.

llhttp parses and validates everything (strictly: no bare LF, no obs-fold, no
CR/NUL in values, no Content-Length with Transfer-Encoding). httptools exposes
no byte offsets, so the parsers cut the input themselves at the only places a
head or a message can end, and never hand llhttp bytes past a message end:

* a head ends right after the first ``CRLF CRLF`` (llhttp rejects bare LF and
  CR inside lines), which also gives the exact head size for the limit;
* a Content-Length body ends after exactly that many bytes;
* a chunked body ends right after *some* ``CRLF CRLF`` (the last chunk's line
  or the last trailer line, then the empty line; the byte before it is never
  CR or LF, so a left-to-right search cannot step over it), so the body is fed
  in pieces cut after each occurrence and the end always falls on a cut.

That keeps llhttp from running into the next message, which is what lets the
response side end a HEAD response by itself and reject unsolicited bytes.
If llhttp ever began a message inside a piece anyway, ``on_message_begin``
notices and the parser fails rather than misframe.

Status decisions (``ParseError.status``), requests: 400 for malformed syntax
and for a Transfer-Encoding whose final coding is not ``chunked`` (RFC 9112
section 6.3 says MUST 400, since the body length is unknowable); 501 for
``chunked`` preceded by another coding such as ``gzip, chunked`` (section 6.1:
we cannot forward a transfer coding we do not understand); 431 for a head over
``max_head``; 505 for a version other than 1.0/1.1. Responses: 502 for every
upstream fault, including any Transfer-Encoding other than exactly
``chunked``. Status 500 means the caller misused the parser (feeding after an
upgrade or after ``feed_eof``, ``expect()`` mid-response).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import attrs
import httptools

from .._errors import RevconnError

if TYPE_CHECKING:
    from httptools.parser.parser import HttpParser

__all__ = [
    "END",
    "LAST_CHUNK",
    "Body",
    "EndOfMessage",
    "Informational",
    "ParseError",
    "RequestHead",
    "RequestParser",
    "ResponseHead",
    "ResponseParser",
    "chunk",
    "request_head",
    "response_head",
]

Headers = list[tuple[bytes, bytes]]


class ParseError(RevconnError):
    """The peer sent something that is not acceptable HTTP/1.1.

    ``status`` is the HTTP status to answer with (400, 431, 501, 505 for a
    client; 502 for an upstream; 500 for a caller's misuse), ``detail`` a
    reason that is safe to show the client.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def __repr__(self) -> str:
        return f"ParseError({self.status}, {self.detail!r})"


@attrs.frozen(slots=True)
class RequestHead:
    """A request line and its headers (names lower-cased, values stripped)."""

    method: bytes
    target: bytes
    version: bytes
    headers: Headers
    keep_alive: bool
    """The client allows another request on this connection."""
    expect_continue: bool
    """``Expect: 100-continue`` was sent on an HTTP/1.1 request."""
    has_body: bool
    """Content-Length > 0 or chunked. For an upgrade request the body, if
    any, is not parsed: it is part of ``upgrade_trailing``."""
    upgrade: bool
    """llhttp's ``should_upgrade``: Connection: upgrade + Upgrade, or CONNECT."""


@attrs.frozen(slots=True)
class ResponseHead:
    """A final (>= 200, or 101) status line and its headers.

    ``content_length`` is the length of the body that follows as ``Body``
    events: 0 when none may (HEAD, 101, 204, 304; the header itself stays in
    ``headers``), None when it is chunked or close-delimited.
    """

    status: int
    reason: bytes
    version: bytes
    headers: Headers
    keep_alive: bool
    content_length: int | None
    chunked: bool
    close_delimited: bool


@attrs.frozen(slots=True)
class Informational:
    """A 1xx response other than 101 (100 Continue, 103 Early Hints)."""

    status: int
    reason: bytes
    headers: Headers


@attrs.frozen(slots=True)
class Body:
    """A piece of a message body, chunked framing removed."""

    data: bytes


class EndOfMessage:
    """The current message is complete; use the module's ``END``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END = EndOfMessage()

_TERM = b"\r\n\r\n"
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_SCANNED = frozenset({b"content-length", b"transfer-encoding", b"expect"})
_NO_BODY_STATUS = frozenset({101, 204, 304})

# parser states
_HEAD, _LENGTH, _CHUNKED, _UNTIL_EOF = 0, 1, 2, 3  # feeding llhttp
_IDLE, _CLOSED, _SWITCHED, _EOF, _DEAD = 4, 5, 6, 7, 8  # not feeding it


def _scan(headers: Headers) -> tuple[int | None, list[bytes] | None, bool]:
    """Content-Length (llhttp validated it), the transfer-coding tokens,
    and whether ``Expect: 100-continue`` was sent."""
    length = None
    codings: list[bytes] | None = None
    expect = False
    for name, value in headers:
        if name in _SCANNED:
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                tokens = [t.strip(b" \t").lower() for t in value.split(b",")]
                codings = tokens if codings is None else codings + tokens
            else:
                expect = expect or value.lower() == b"100-continue"
    return length, codings, expect


class _Parser:
    """What both directions share: the llhttp callbacks, the cutting feed
    loop and the event queue. Subclasses build heads and decide what
    follows them."""

    __slots__ = (
        "_began",
        "_cb_error",
        "_chunked",
        "_complete",
        "_error",
        "_events",
        "_head",
        "_head_bytes",
        "_headers",
        "_keep_alive",
        "_length",
        "_max_head",
        "_overhead",
        "_p",
        "_remaining",
        "_state",
        "_switching",
        "_tail",
        "_text",
        "_trailing",
    )
    _BAD = 400  # status of a malformed message
    _WHAT = "request"
    _p: HttpParser

    def __init__(self, max_head: int, state: int) -> None:
        self._max_head = max_head
        self._state = state
        self._events: deque[object] = deque()
        self._error: ParseError | None = None
        self._cb_error: ParseError | None = None
        self._head: object = None
        self._began = self._complete = self._switching = self._chunked = False
        self._keep_alive = False
        self._head_bytes = self._remaining = self._overhead = 0
        self._length: int | None = None
        self._tail = self._text = b""
        self._headers: Headers = []
        self._trailing: bytes | None = None

    # -- llhttp callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # llhttp went past a message end we cut at
            raise self._cb(ParseError(self._BAD, f"{self._WHAT} framing out of sync"))
        self._began = True
        self._text = b""
        self._headers = []

    def on_url(self, data: bytes) -> None:
        self._text += data

    on_status = on_url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value.strip(b" \t")))

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        self._complete = True

    def _cb(self, error: ParseError) -> ParseError:
        """Remember an error raised inside a callback (httptools wraps it)."""
        self._cb_error = error
        return error

    # -- feeding ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse ``data`` and queue its events. Raises ParseError on malformed
        input; events queued before the fault stay available to
        ``next_event``, which then raises the same error."""
        if self._error is not None:
            raise self._error
        try:
            self._run(data)
        except ParseError as exc:
            self._fail(exc)
            raise

    def _next(self) -> object:
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        return None

    def _fail(self, error: ParseError) -> None:
        self._error = error
        self._state = _DEAD

    def _run(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _HEAD:
                pos = self._feed_head(data, view, pos, end)
            elif state == _LENGTH:
                stop = min(end, pos + self._remaining)
                self._execute(view[pos:stop])
                self._remaining -= stop - pos
                pos = stop
                if not self._remaining:
                    self._end_message()
            elif state == _CHUNKED:
                pos = self._feed_chunked(data, view, pos, end)
            elif state == _UNTIL_EOF:
                self._execute(view[pos:])
                return
            else:
                self._leftover(state)
                return

    def _cut(self, data: bytes, pos: int, end: int) -> int:
        """Where the next piece ends: after the next CRLF CRLF (one may
        straddle the previous feed, whose last bytes are ``_tail``) or at
        ``end``."""
        tail = self._tail
        if tail:
            self._tail = b""
            j = (tail + data[pos : pos + 3]).find(_TERM)
            if j >= 0:
                return pos + j + 4 - len(tail)
        i = data.find(_TERM, pos)
        return end if i < 0 else i + 4

    def _keep_tail(self, tail: bytes, data: bytes, pos: int, end: int) -> None:
        self._tail = (tail + data[max(pos, end - 3) : end])[-3:]

    def _execute(self, piece: memoryview | bytes) -> bool:
        """Feed llhttp; True if it stopped for an upgrade (switching)."""
        try:
            self._p.feed_data(piece)
        except httptools.HttpParserUpgrade:
            return True
        except httptools.HttpParserError as exc:
            if self._switching:  # llhttp pauses after a 101 even without Upgrade
                return True
            error = self._cb_error
            if error is None:
                reason = str(exc.args[0]) if exc.args else type(exc).__name__
                error = ParseError(self._BAD, f"malformed {self._WHAT}: {reason}")
            raise error from None
        return False

    def _feed_head(self, data: bytes, view: memoryview, pos: int, end: int) -> int:
        tail = self._tail
        stop = self._cut(data, pos, end)
        size = self._head_bytes + stop - pos
        if size > self._max_head:
            raise self._too_large()
        switching = self._execute(data if pos == 0 and stop == end else view[pos:stop])
        head = self._head
        if head is None:  # incomplete, or only empty lines before a message
            self._head_bytes = size
            if stop == end:
                self._keep_tail(tail, data, pos, end)
            return stop
        self._head = None
        self._head_bytes = 0
        self._began = False
        self._events.append(head)
        return self._head_done(head, switching, view, stop, end)

    def _feed_chunked(self, data: bytes, view: memoryview, pos: int, end: int) -> int:
        tail = self._tail
        stop = self._cut(data, pos, end)
        queued = len(self._events)
        self._execute(view[pos:stop])
        if self._complete:
            self._end_message()
            return stop
        # Bound what httptools buffers (trailer lines) and what llhttp skips
        # (chunk extensions): bytes that yielded no body data.
        if len(self._events) == queued:
            self._overhead += stop - pos
            if self._overhead > self._max_head:
                raise ParseError(self._BAD, f"{self._WHAT} chunk framing or trailers too large")
        else:
            self._overhead = 0
        if stop == end:
            self._keep_tail(tail, data, pos, end)
        return stop

    def _switch(self, view: memoryview, stop: int, end: int) -> int:
        self._events.append(END)
        self._trailing = bytes(view[stop:])
        self._state = _SWITCHED
        return end

    def _end_message(self) -> None:
        if not self._complete:
            raise ParseError(self._BAD, f"{self._WHAT} framing out of sync")
        self._complete = False
        self._events.append(END)
        self._state = self._after_message()

    def _too_large(self) -> ParseError:
        raise NotImplementedError

    def _head_done(
        self, head: object, switching: bool, view: memoryview, stop: int, end: int
    ) -> int:
        raise NotImplementedError

    def _after_message(self) -> int:
        raise NotImplementedError

    def _leftover(self, state: int) -> None:
        raise NotImplementedError

    @property
    def upgrade_trailing(self) -> bytes | None:
        """After a protocol switch: the bytes that followed its head (the new
        protocol's data, possibly empty); None otherwise."""
        return self._trailing

    def _misuse(self, state: int) -> ParseError:
        if state == _SWITCHED:
            return ParseError(500, "feed() after the connection switched protocols")
        return ParseError(500, "feed() after feed_eof()")


class RequestParser(_Parser):
    """Finds request boundaries on a client connection (server side).

    Pipelined requests come out in order. After a request that does not
    keep the connection alive, further bytes are ignored (RFC 9112 section
    9.6: the server must not process them). After an upgrade request,
    ``feed`` raises ParseError(500): the connection speaks another protocol,
    whose first bytes are in ``upgrade_trailing``.
    """

    __slots__ = ("_eof", "_max_fields", "_max_target")
    _p: httptools.HttpRequestParser

    def __init__(
        self, *, max_head: int = 64 * 1024, max_fields: int = 100, max_target: int = 8 * 1024
    ) -> None:
        """``max_head``: request line + header fields (431 beyond);
        ``max_fields``: header fields (431); ``max_target``: the request
        target (414)."""
        super().__init__(max_head, _HEAD)
        self._p = httptools.HttpRequestParser(self)
        self._eof = False
        self._max_fields = max_fields
        self._max_target = max_target

    def on_url(self, data: bytes) -> None:
        self._text += data
        if len(self._text) > self._max_target:
            raise self._cb(ParseError(414, f"request target longer than {self._max_target} bytes"))

    def next_event(self) -> RequestHead | Body | EndOfMessage | None:
        """The next queued event, or None when more data is needed; raises
        the ParseError once the events before it are consumed."""
        return cast("RequestHead | Body | EndOfMessage | None", self._next())

    @property
    def head_started(self) -> bool:
        """Bytes of a not-yet-complete request head are buffered."""
        return self._began

    @property
    def eof(self) -> bool:
        """``feed_eof`` was called."""
        return self._eof

    def feed_eof(self) -> None:
        """The client half-closed. Mid-request, ``next_event`` raises
        ParseError(400) once it reaches that point; between requests it
        keeps returning None."""
        self._eof = True
        state = self._state
        if state == _HEAD and not self._began:
            self._state = _EOF
        elif state < _IDLE:
            self._fail(ParseError(400, "connection closed with an incomplete request"))

    def on_headers_complete(self) -> None:
        p = self._p
        headers = self._headers
        self._headers = []  # trailers, if any, land here and are dropped
        version = _VERSIONS.get(p.get_http_version())
        if version is None:
            raise self._cb(ParseError(505, "only HTTP/1.0 and HTTP/1.1 are supported"))
        if len(headers) > self._max_fields:
            raise self._cb(ParseError(431, f"more than {self._max_fields} header fields"))
        length, codings, expect = _scan(headers)
        chunked = codings is not None
        if chunked and version == b"1.0":
            # RFC 9112 6.1: its framing must be treated as faulty (a smuggling vector).
            raise self._cb(ParseError(400, "Transfer-Encoding on an HTTP/1.0 message"))
        if codings is not None and codings != [b"chunked"]:
            if codings[-1] != b"chunked":
                raise self._cb(ParseError(400, "Transfer-Encoding must end with chunked"))
            raise self._cb(ParseError(501, "unsupported transfer-coding: only chunked"))
        self._length = length
        self._chunked = chunked
        self._keep_alive = keep_alive = p.should_keep_alive()
        self._switching = upgrade = p.should_upgrade()
        self._head = RequestHead(
            p.get_method(),
            self._text,
            version,
            headers,
            keep_alive,
            expect and version == b"1.1",
            chunked or bool(length),
            upgrade,
        )

    def _head_done(
        self, head: object, switching: bool, view: memoryview, stop: int, end: int
    ) -> int:
        if switching:
            return self._switch(view, stop, end)
        if self._chunked:
            self._state = _CHUNKED
            self._overhead = 0
        elif self._length and not self._complete:
            self._state = _LENGTH
            self._remaining = self._length
        else:
            self._end_message()
        return stop

    def _after_message(self) -> int:
        return _HEAD if self._keep_alive else _CLOSED

    def _too_large(self) -> ParseError:
        return ParseError(431, f"request head larger than {self._max_head} bytes")

    def _leftover(self, state: int) -> None:
        if state != _CLOSED:
            raise self._misuse(state)


class ResponseParser(_Parser):
    """Finds response boundaries on an upstream connection (client side).

    Call ``expect(method)`` before each response; 1xx responses come out as
    ``Informational`` before the final ``ResponseHead``. Nothing may follow a
    complete response until the next ``expect()``. A 101 response ends the
    HTTP exchange: ``upgrade_trailing`` holds the bytes after its head.
    """

    __slots__ = ("_head_method", "stray")
    _BAD = 502
    _WHAT = "response"
    _p: httptools.HttpResponseParser

    def __init__(self, *, max_head: int = 64 * 1024) -> None:
        super().__init__(max_head, _IDLE)
        self._p = httptools.HttpResponseParser(self)
        self._head_method = False
        self.stray = False
        """Bytes came after a complete response (before the next ``expect()``):
        an upstream that miscounted a body. They are dropped; the connection
        must not carry another request."""

    def next_event(self) -> Informational | ResponseHead | Body | EndOfMessage | None:
        """The next queued event, or None when more data is needed; raises
        the ParseError once the events before it are consumed."""
        return cast("Informational | ResponseHead | Body | EndOfMessage | None", self._next())

    def expect(self, method: bytes) -> None:
        """A request with ``method`` was sent: the next response answers it."""
        if self._error is not None:
            raise self._error
        if self._state != _IDLE:
            raise ParseError(500, "expect() is only valid between responses")
        self._head_method = method == b"HEAD"
        self._state = _HEAD

    def feed_eof(self) -> None:
        """The upstream closed: a close-delimited body ends here (END is
        queued); mid-response this raises ParseError(502)."""
        state = self._state
        if state == _UNTIL_EOF:
            self._complete = True
            self._end_message()
        elif state == _DEAD and self._error is not None:
            raise self._error
        elif state < _IDLE:
            if state == _HEAD and not self._began:
                detail = "upstream closed the connection without a response"
            else:
                detail = "response truncated: upstream closed the connection mid-message"
            error = ParseError(502, detail)
            self._fail(error)
            raise error
        if self._state in (_IDLE, _EOF):
            self._state = _EOF

    def on_headers_complete(self) -> None:
        p = self._p
        status = p.get_status_code()
        headers = self._headers
        self._headers = []
        if not 100 <= status <= 599:  # RFC 9110 15: llhttp takes any three digits
            raise self._cb(ParseError(502, f"upstream status {status} is not a valid HTTP status"))
        if status < 200 and status != 101:
            self._head = Informational(status, self._text, headers)
            return
        version = _VERSIONS.get(p.get_http_version())
        if version is None:
            raise self._cb(ParseError(502, "upstream response is not HTTP/1.0 or HTTP/1.1"))
        length, codings, _ = _scan(headers)
        keep_alive = p.should_keep_alive()
        if self._head_method or status in _NO_BODY_STATUS:
            if self._head_method and length is None and codings is None:
                keep_alive = _persistent(version, headers)  # llhttp expects an EOF body
            self._switching = status == 101
            length, chunked, close = 0, False, False
            keep_alive = keep_alive and status != 101
        else:
            if codings is not None and codings != [b"chunked"]:
                raise self._cb(ParseError(502, "upstream sent an unsupported transfer-coding"))
            chunked = codings is not None
            close = not chunked and length is None
        self._length = length
        self._chunked = chunked
        self._head = ResponseHead(
            status, self._text, version, headers, keep_alive, length, chunked, close
        )

    def _head_done(
        self, head: object, switching: bool, view: memoryview, stop: int, end: int
    ) -> int:
        if type(head) is Informational:
            self._complete = False  # llhttp ended it; the final response follows
            return stop
        if switching:
            self._switching = False
            return self._switch(view, stop, end)
        if self._head_method and not self._complete:
            # llhttp does not know the request was HEAD and waits for a body
            self._p = httptools.HttpResponseParser(self)
            self._complete = True
        if self._complete:
            self._end_message()
        elif self._chunked:
            self._state = _CHUNKED
            self._overhead = 0
        elif self._length:
            self._state = _LENGTH
            self._remaining = self._length
        else:
            self._state = _UNTIL_EOF
        return stop

    def _after_message(self) -> int:
        return _IDLE

    def _too_large(self) -> ParseError:
        return ParseError(502, f"upstream response head larger than {self._max_head} bytes")

    def _leftover(self, state: int) -> None:
        if state == _IDLE:
            # Not fatal for the response just completed (its events are
            # queued); the connection is unusable from here on.
            self.stray = True
            self._state = _DEAD
            self._error = ParseError(502, "unsolicited data from upstream outside a response")
            return
        raise self._misuse(state)


def _persistent(version: bytes, headers: Headers) -> bool:
    """Connection persistence from the Connection header alone (RFC 9112 9.3)."""
    tokens = {
        t.strip(b" \t").lower()
        for name, value in headers
        if name == b"connection"
        for t in value.split(b",")
    }
    return b"close" not in tokens if version == b"1.1" else b"keep-alive" in tokens


# -- serialisation: no validation, pass headers already cleaned -------------


def request_head(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``METHOD target HTTP/1.1`` CRLF, the header lines, CRLF."""
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    lines += [name + b": " + value for name, value in headers]
    lines += (b"", b"")
    return b"\r\n".join(lines)


def response_head(
    status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]], version: bytes = b"1.1"
) -> bytes:
    """``HTTP/version status reason`` CRLF, the header lines, CRLF."""
    lines = [b"HTTP/%s %d %s" % (version, status, reason)]
    lines += [name + b": " + value for name, value in headers]
    lines += (b"", b"")
    return b"\r\n".join(lines)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; ``data`` must not be empty (that would
    be the last chunk, ``LAST_CHUNK``)."""
    if not data:
        raise ValueError("an empty chunk would end the body; send LAST_CHUNK")
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
