"""How a request should ride the tunnel: the stream mappings measured in-process.

Both tunnel ends run in one trio loop over an in-memory transport (no sockets,
no upstream), so the figures are the protocol work alone, gateway and agent
together, for a GET answered with 1 KiB. Interleaved rounds, medians of CPU
time per request:

* **v1 mapping** (revconn 0.1): a stream per request, the request as HPACK
  HEADERS, the response as HEADERS + DATA;
* **CONNECT per request**: a fresh extended CONNECT stream per request carrying
  raw HTTP/1.1 bytes, closed after the response;
* **pooled CONNECT** (this tree): the same stream lent again and again.

Plus the message-boundary work per request and response: h11 (both sides, as
the v1 gateway and agent did) against ``revconn._proto.http1`` (httptools).

    python benchmarks/stream_mapping.py [--requests 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable

import h11
import trio

from revconn._errors import ConnectionLost
from revconn._proto.connect import PROTOCOL_TOKEN
from revconn._proto.http1 import END, RequestParser, ResponseParser
from revconn._proto.session import Role, TunnelSession
from revconn._runtime.heartbeat import Heartbeat, HeartbeatScheduler
from revconn._runtime.streams import TunnelStream
from revconn._runtime.tunnel import Tunnel

BODY = b"x" * 1024
REQUEST = (
    b"GET /small.bin HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nuser-agent: bench\r\naccept: */*\r\n"
    b"x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: gw:8000\r\n"
    b"x-forwarded-prefix: /a/bench\r\nvia: 1.1 revconn\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nserver: nginx\r\ncontent-type: application/octet-stream\r\n"
    b"content-length: 1024\r\nlast-modified: Wed, 02 Dec 2026 07:00:00 GMT\r\n"
    b'etag: "692e8e30-400"\r\naccept-ranges: bytes\r\n\r\n' + BODY
)
V1_REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"gw:8000"),
    (b":path", b"/small.bin"),
    (b"user-agent", b"bench"),
    (b"accept", b"*/*"),
    (b"x-forwarded-for", b"127.0.0.1"),
    (b"x-forwarded-proto", b"http"),
    (b"x-forwarded-host", b"gw:8000"),
    (b"x-forwarded-prefix", b"/a/bench"),
    (b"via", b"1.1 revconn"),
]
V1_RESPONSE = [
    (b"server", b"nginx"),
    (b"content-type", b"application/octet-stream"),
    (b"content-length", b"1024"),
    (b"last-modified", b"Wed, 02 Dec 2026 07:00:00 GMT"),
    (b"etag", b'"692e8e30-400"'),
    (b"accept-ranges", b"bytes"),
]


class _Transport:
    def __init__(
        self, send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]
    ):
        self._send, self._receive = send, receive

    async def send_message(self, data: bytes) -> None:
        try:
            await self._send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionLost("gone") from None

    async def receive_message(self) -> bytes:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionLost("gone") from None

    async def close(self, code: int, reason: str) -> None:
        self._send.close()


async def _agent_v1(stream: TunnelStream) -> None:
    await stream.respond(200, V1_RESPONSE, end_stream=False)
    await stream.send_body(BODY, end_stream=True)


async def _agent_raw(stream: TunnelStream) -> None:
    """A byte pump whose upstream is a constant: one response per request head."""
    assert stream.request is not None
    assert dict(stream.request.headers)[b":protocol"] == PROTOCOL_TOKEN
    await stream.respond(200, [], end_stream=False)
    pending = b""
    while (data := await stream.read()) is not None:
        pending += data
        while b"\r\n\r\n" in pending:
            _, _, pending = pending.partition(b"\r\n\r\n")
            await stream.send_body(RESPONSE)
    await stream.end()


async def _v1(gw: Tunnel) -> None:
    stream = gw.open_request(V1_REQUEST, end_stream=True)
    await gw.flush()
    await stream.receive_response()
    while await stream.read() is not None:
        pass
    stream.close()


async def _raw(gw: Tunnel, *, reuse: bool) -> None:
    stream, _ = await gw.acquire()
    await stream.send_body(REQUEST)
    parser = ResponseParser()
    parser.expect(b"GET")
    while True:
        event = parser.next_event()
        if event is END:
            break
        if event is None:
            data = await stream.read()
            assert data is not None
            parser.feed(data)
    gw.release(stream, reusable=reuse)


async def _measure(
    handler: Callable[[TunnelStream], Awaitable[None]],
    one: Callable[[Tunnel], Awaitable[None]],
    n: int,
) -> float:
    """CPU seconds per request, both tunnel ends included."""
    a_send, b_receive = trio.open_memory_channel[bytes](64)
    b_send, a_receive = trio.open_memory_channel[bytes](64)
    hb = Heartbeat(3600, 3600)
    gw = Tunnel(TunnelSession(Role.GATEWAY), _Transport(a_send, a_receive), heartbeat=hb)
    ag = Tunnel(TunnelSession(Role.AGENT), _Transport(b_send, b_receive), heartbeat=hb)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.handshake)
        nursery.start_soon(ag.handshake)
    async with trio.open_nursery() as nursery:
        scheduler = HeartbeatScheduler(hb)
        await nursery.start(scheduler.run)
        nursery.start_soon(gw.serve, scheduler)
        nursery.start_soon(lambda: ag.serve(on_request=handler))
        for _ in range(50):  # warm-up (HPACK table, pool)
            await one(gw)
        start = time.process_time()
        for _ in range(n):
            await one(gw)
        elapsed = time.process_time() - start
        nursery.cancel_scope.cancel()
    return elapsed / n


def _h11_pair() -> None:
    server = h11.Connection(h11.SERVER)
    server.receive_data(REQUEST)
    while not isinstance(server.next_event(), h11.EndOfMessage):
        pass
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/small.bin", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(RESPONSE)
    while not isinstance(client.next_event(), h11.EndOfMessage):
        pass


_REQUESTS = RequestParser()
_RESPONSES = ResponseParser()


def _httptools_pair() -> None:
    _REQUESTS.feed(REQUEST)
    while _REQUESTS.next_event() is not END:
        pass
    _RESPONSES.expect(b"GET")
    _RESPONSES.feed(RESPONSE)
    while _RESPONSES.next_event() is not END:
        pass


def _parse_cost(fn: Callable[[], None], n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    modes: dict[str, Callable[[], Awaitable[float]]] = {
        "v1 mapping (a stream per request, HPACK heads)": lambda: _measure(
            _agent_v1, _v1, args.requests
        ),
        "CONNECT per request, raw HTTP/1.1": lambda: _measure(
            _agent_raw, lambda gw: _raw(gw, reuse=False), args.requests
        ),
        "pooled CONNECT stream, raw HTTP/1.1 (this tree)": lambda: _measure(
            _agent_raw, lambda gw: _raw(gw, reuse=True), args.requests
        ),
    }
    results: dict[str, list[float]] = {name: [] for name in modes}
    parse: dict[str, list[float]] = {"h11 (request + response)": [], "httptools (http1.py)": []}
    for _ in range(args.rounds):
        for name, run in modes.items():
            results[name].append(trio.run(run))
        parse["h11 (request + response)"].append(_parse_cost(_h11_pair, args.requests))
        parse["httptools (http1.py)"].append(_parse_cost(_httptools_pair, args.requests))
    print(
        f"# python benchmarks/stream_mapping.py --requests {args.requests} --rounds {args.rounds}"
    )
    print("| tunnel work per GET + 1 KiB answer (both ends) | us | vs v1 |")
    print("|---|---|---|")
    base = statistics.median(next(iter(results.values())))
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {med * 1e6:.0f} | {med / base:.2f} |")
    print("| message boundaries per request + response | us | vs h11 |")
    h11_med = statistics.median(parse["h11 (request + response)"])
    for name, values in parse.items():
        med = statistics.median(values)
        print(f"| {name} | {med * 1e6:.1f} | {med / h11_med:.2f} |")


if __name__ == "__main__":
    main()
