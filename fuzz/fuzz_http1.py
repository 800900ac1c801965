"""atheris harness: HTTP/1.1 message boundaries (revconn._proto.http1).

Run: ``python fuzz/fuzz_http1.py fuzz/corpus/http1 -max_total_time=60``
(fuzz/README.md). Without atheris the module still imports, and
``TestOneInput`` can be called directly (tests/test_fuzz_harness.py does).

Input format: byte 0, bit 0 = a response (else requests; a client's
pipelined requests), bits 1-2 = the request method a response answers
(GET, HEAD, POST, GET); byte 1 = the piece size for the second run (0 = one
byte at a time); the rest is the connection's bytes, then EOF.

Property: the parsers raise nothing but ParseError, with a status their
docstrings name (400/414/431/501/505 for requests, 502 for responses); the
events are of the documented types; and the input fed whole or in pieces
gives the same events (body pieces merged), the same error status, the same
bytes after an upgrade. (Above the 64 KiB head and framing limits, where
the cut points decide when a limit is noticed, only the events before an
error must agree.)
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
    from revconn._proto import http1

METHODS = (b"GET", b"HEAD", b"POST", b"GET")
REQUEST_STATUSES = frozenset({400, 414, 431, 501, 505})
RESPONSE_STATUSES = frozenset({502})
LIMIT = 64 * 1024  # both parsers' default max_head, and the chunk-framing bound
Outcome = tuple[list[object], int | None, bytes | None]


class Violation(AssertionError):
    """A parser broke its contract on this input."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise Violation(message)


def run(pieces: list[bytes], response: bool, method: bytes) -> Outcome:
    """(events with body pieces merged, error status or None, bytes after an upgrade)."""
    parser: http1.RequestParser | http1.ResponseParser
    if response:
        parser = http1.ResponseParser()
        parser.expect(method)
        kinds: tuple[type, ...] = (http1.Informational, http1.ResponseHead)
        statuses = RESPONSE_STATUSES
    else:
        parser = http1.RequestParser()
        kinds = (http1.RequestHead,)
        statuses = REQUEST_STATUSES
    events: list[object] = []
    status: int | None = None

    def drain() -> int | None:
        while True:
            try:
                event = parser.next_event()
            except http1.ParseError as exc:
                check(exc.status in statuses, f"status {exc.status}: {exc.detail}")
                return exc.status
            if event is None:
                return None
            check(isinstance(event, (*kinds, http1.Body, http1.EndOfMessage)), f"{event!r}")
            if isinstance(event, http1.Body):
                check(event.data, "an empty Body event")
                if events and isinstance(events[-1], http1.Body):
                    events[-1] = http1.Body(events[-1].data + event.data)
                    continue
            events.append(event)

    for i, piece in enumerate(pieces):
        try:
            parser.feed(piece)
        except http1.ParseError as exc:
            check(exc.status in statuses, f"status {exc.status}: {exc.detail}")
            status = exc.status
        drained = drain()
        if status is not None:
            check(drained == status, "next_event raised another error than feed")
            return events, status, None
        if drained is not None:  # (responses: bytes after a complete one)
            return events, drained, None
        if parser.upgrade_trailing is not None:
            return events, None, parser.upgrade_trailing + b"".join(pieces[i + 1 :])
    try:
        parser.feed_eof()
    except http1.ParseError as exc:
        check(response and exc.status in statuses, f"feed_eof: {exc.status}")
        status = exc.status
    drained = drain()
    if status is not None:
        check(drained in (None, status), "next_event raised another error than feed_eof")
    return events, status if status is not None else drained, None


def TestOneInput(data: bytes) -> None:  # (the name atheris and libFuzzer docs use)
    if len(data) < 2:
        return
    mode, size = data[0], data[1] or 1
    payload = data[2:]
    response = bool(mode & 1)
    method = METHODS[(mode >> 1) & 3]
    whole = run([payload] if payload else [], response, method)
    cut = run([payload[i : i + size] for i in range(0, len(payload), size)], response, method)
    if len(payload) < LIMIT:
        check(cut == whole, f"pieces of {size} changed the outcome: {cut!r} != {whole!r}")
    else:
        # Limits are noticed at cut points: only the events before an error agree.
        short, long_ = sorted((whole[0], cut[0]), key=len)
        check(long_[: len(short) - 1] == short[:-1], "the events differ")


def main() -> None:
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris (see fuzz/README.md)")
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
