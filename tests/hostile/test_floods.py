"""Floods (issue 12): PINGs from an agent, failed handshakes, half-open TCP
connections, more connections than ``--max-pending-connections``.

Each flood runs beside a well-behaved agent ("web": a real Agent in front of
an upstream), and each test checks that "web" keeps serving, that the
gateway's state stays bounded (registry, tunnels, limiter, pending count,
tasks, file descriptors, the connection objects it keeps) and, where the
flood comes in rounds, that memory is flat: what the process retains after
2N rounds is within ``GROWTH`` of what it retained after N."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import struct
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial

import pytest
import trio
from hyperframe.frame import PingFrame
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Ping, Pong, Request

from revconn import Heartbeat
from revconn._gateway.exchange import HttpConnection
from revconn._gateway.listener import PendingLimit
from revconn._proto.connect import WS_SUBPROTOCOL
from revconn._runtime.tunnel import Tunnel

from .._gateway_helpers import SECRET, RunningGateway, raw_agent, wait_for
from .._raw_upstream import read_head, respond
from .test_limits import Recorder, agent_in_front_of, close_code, fine, wsproto_agent

pytestmark = pytest.mark.e2e

GROWTH = 32 * 1024
"""How much more the process may retain after 2N rounds than after N: above
the noise of trio's and the allocator's caches (some 20 KiB, measured), below
what keeping a few hundred bytes per connection or per message would add."""


# -- measuring --------------------------------------------------------------------


@contextmanager
def tracing() -> Iterator[None]:
    """tracemalloc on, one frame deep (cheap enough for a flood)."""
    tracemalloc.start(1)
    try:
        yield
    finally:
        tracemalloc.stop()


def retained() -> int:
    """Bytes allocated since ``tracing()`` began and still held."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def task_count() -> int:
    """Tasks alive in this trio run (the gateway's, the agent's, the test's)."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


def open_fds() -> int:
    """File descriptors this process holds (every socket is one)."""
    return len(os.listdir("/proc/self/fd"))


def alive(kind: type) -> int:
    """Instances of ``kind`` still alive."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


class Baseline:
    """The gateway's resources before a flood, to come back to after it."""

    def __init__(self, gw: RunningGateway) -> None:
        self.gw = gw
        self.tasks = task_count()
        self.fds = open_fds()
        self.connections = alive(HttpConnection)
        self.tunnels = alive(Tunnel)
        self.agents = len(gw.gateway._tunnels)

    async def back(self) -> None:
        """Wait (bounded) until the flood's tasks and sockets are gone; then
        no connection or tunnel object of it may be left either."""
        await wait_for(lambda: task_count() <= self.tasks and open_fds() <= self.fds)
        assert len(self.gw.gateway._tunnels) == self.agents
        assert alive(HttpConnection) <= self.connections
        assert alive(Tunnel) <= self.tunnels


def port_of(gw: RunningGateway) -> int:
    return int(gw.url.rsplit(":", 1)[1])


def web_session(gw: RunningGateway) -> object:
    session = gw.gateway.registry.lookup("web")
    assert session is not None
    return session


# -- 1. PING floods from an agent -------------------------------------------------

PING_ACK = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00"
"""An HTTP/2 PING ACK's frame header (8 bytes, type 6, flag ACK, stream 0)."""


async def test_a_ping_flood_leaves_memory_flat_and_others_served() -> None:
    """Agent "bad" sends rounds of WebSocket pings, HTTP/2 PINGs and
    unsolicited PING ACKs, reading what comes back: every ping is answered,
    memory after 2N rounds is what it was after N, and "web" is served
    throughout."""
    pings, frames, rounds = 50, 500, 12
    with trio.fail_after(20):
        async with (
            agent_in_front_of(Recorder()) as (gw, port),
            wsproto_agent(gw, "bad") as (stream, ws),
            trio.open_nursery() as nursery,
        ):
            await wait_for(lambda: gw.gateway.registry.lookup("bad") is not None)
            pongs = 0
            marks: dict[bytes, trio.Event] = {}

            async def read_answers() -> None:
                """Count pongs; set a mark's event when its PING ACK arrives."""
                nonlocal pongs
                tail = b""
                while data := await stream.receive_some(65536):
                    ws.receive_data(data)
                    for event in ws.events():
                        if isinstance(event, Pong):
                            pongs += 1
                        elif isinstance(event, BytesMessage):
                            seen = tail + bytes(event.data)
                            for mark, arrived in marks.items():
                                if PING_ACK + mark in seen:
                                    arrived.set()
                            tail = seen[-(len(PING_ACK) + 8) :]

            nursery.start_soon(read_answers)
            flood = (
                PingFrame(0, opaque_data=b"flooding").serialize() * frames
                + PingFrame(0, opaque_data=b"unasked!", flags=["ACK"]).serialize() * frames
            )
            measured: list[int] = []
            with tracing():
                for n in range(2 + 2 * rounds):
                    out = b"".join(ws.send(Ping(b"p%07d" % i)) for i in range(pings))
                    mark = b"mark%04d" % n
                    marks[mark] = trio.Event()
                    flood_message = flood + PingFrame(0, opaque_data=mark).serialize()
                    await stream.send_all(out + ws.send(BytesMessage(flood_message)))
                    await marks[mark].wait()  # (the PINGs before it are answered too)
                    del marks[mark]
                    assert pongs == pings * (n + 1)
                    if n % 6 == 0:
                        await fine(port)
                    if n in (1 + rounds, 1 + 2 * rounds):
                        measured.append(retained())
            assert measured[1] - measured[0] < GROWTH, measured
            await fine(port)
            assert gw.gateway.registry.lookup("bad") is not None  # (answered, not punished)
            nursery.cancel_scope.cancel()


async def test_an_agent_that_floods_pings_and_reads_nothing_is_dropped() -> None:
    """Agent "bad" floods HTTP/2 PINGs and never reads the ACKs: the gateway
    stops reading it rather than queueing ACKs without end (the flood cannot
    push far beyond the sockets' buffers), drops it when its heartbeat
    lapses, closes its connection; "web" is served meanwhile."""
    hb = Heartbeat(0.3, 0.3)
    cap = 256 * 1024 * 1024  # what an unbounded reader would let through
    with trio.fail_after(15):
        async with agent_in_front_of(Recorder(), heartbeat=hb) as (gw, port):
            before = Baseline(gw)
            web = web_session(gw)
            async with wsproto_agent(gw, "bad") as (stream, ws):
                await wait_for(lambda: gw.gateway.registry.lookup("bad") is not None)
                message = ws.send(BytesMessage(PingFrame(0).serialize() * 30_000))
                sent = 0
                closed = trio.Event()

                async def flood() -> None:
                    nonlocal sent
                    try:
                        while sent < cap:
                            await stream.send_all(message)
                            sent += len(message)
                    except trio.BrokenResourceError:
                        closed.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(flood)
                    started = trio.current_time()
                    await fine(port)  # while "bad" floods
                    await wait_for(lambda: gw.gateway.registry.lookup("bad") is None)
                    assert trio.current_time() - started < 2 * (hb.interval + hb.timeout) + 1
                    await fine(port)
                    await closed.wait()  # the gateway closed the connection
                assert sent < 64 * 1024 * 1024, sent
            assert web_session(gw) is web
            await before.back()
            await fine(port)


# -- 2. failed handshakes ---------------------------------------------------------


def upgrade(name: str = "web", *, secret: str = SECRET, extra: bytes = b"") -> bytes:
    return (
        f"GET /ws/connect?name={name} HTTP/1.1\r\nHost: g\r\nConnection: Upgrade\r\n"
        f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {secret}\r\n"
    ).encode() + extra


GARBAGE = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
"""Another protocol where the tunnel's HTTP/2 preface belongs."""
KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


async def refused(port: int, raw: bytes) -> tuple[int, str]:
    """The gateway's refusal of a handshake: status and error. (Read until
    the gateway closes, bounded by the test's deadline: a deadline per
    attempt would stay in trio's deadline heap, and read as growth.)"""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    answer = b""
    async with stream:
        await stream.send_all(raw)
        while data := await stream.receive_some(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


async def upgraded_then(port: int, subprotocol: str, garbage: bytes | None) -> int | None:
    """A handshake the gateway accepts (101) as agent "web", then ``garbage``
    instead of the tunnel handshake (None: nothing); the close code it ends with."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(
            host="g",
            target="/ws/connect?name=web",
            subprotocols=[subprotocol],
            extra_headers=[(b"authorization", f"Bearer {SECRET}".encode())],
        )
        await stream.send_all(ws.send(request))
        accepted = False
        while not accepted:
            ws.receive_data(await stream.receive_some(65536))
            accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
        if garbage is not None:
            await stream.send_all(ws.send(BytesMessage(garbage)))
        return await close_code(stream, ws)


async def handshake_round(port: int, n: int) -> dict[str, list[object]]:
    """One round of failed handshakes; what each kind got. First one address
    keeps guessing (12 times in the first round, then 3), then the others
    fail all at once."""
    got: dict[str, list[object]] = {}
    locked = b"X-Forwarded-For: 203.0.113.9\r\n"
    for _ in range(12 if n == 0 else 3):
        raw = upgrade(secret="wrong-secret-0123456789", extra=KEY + locked) + b"\r\n"
        got.setdefault("locked", []).append(await refused(port, raw))

    async def one(kind: str, attempt: Awaitable[object]) -> None:
        got.setdefault(kind, []).append(await attempt)

    async with trio.open_nursery() as nursery:
        for i in range(30):  # wrong secrets from as many addresses (behind the proxy)
            forwarded = f"X-Forwarded-For: 198.18.{n}.{i}\r\n".encode()
            raw = upgrade(secret="wrong-secret-0123456789", extra=KEY + forwarded) + b"\r\n"
            nursery.start_soon(one, "wrong", refused(port, raw))
        for _ in range(4):
            nursery.start_soon(one, "no-key", refused(port, upgrade() + b"\r\n"))
            nursery.start_soon(one, "bad-name", refused(port, upgrade("..") + KEY + b"\r\n"))
            nursery.start_soon(one, "old", upgraded_then(port, "revconn.v1", None))
            nursery.start_soon(one, "garbage", upgraded_then(port, WS_SUBPROTOCOL, GARBAGE))
            nursery.start_soon(one, "silent", upgraded_then(port, WS_SUBPROTOCOL, None))
    return got


async def test_a_flood_of_failed_handshakes_leaves_memory_flat() -> None:
    """Rounds of agent handshakes that fail every way (wrong secret from many
    addresses, no key, a bad name, another protocol version, garbage or
    silence instead of the tunnel handshake, all for the name "web"): each
    gets its clear refusal; the limiter stays within its bound, the
    guessing address is locked out but nobody else is, "web" is never
    replaced and keeps serving, and memory after 2N rounds is what it was
    after N."""
    rounds = 2
    with trio.fail_after(20):
        async with agent_in_front_of(
            Recorder(),
            handshake_timeout=0.25,
            # (short: each connection's idle deadline stays in trio's deadline
            # heap until it passes, which would read as growth)
            idle_timeout=0.3,
            trusted_proxies=("127.0.0.1/32",),
        ) as (gw, port):
            limiter = gw.gateway.auth_limiter
            limiter.max_tracked = 16  # (10,000 by default: the same eviction, sooner)
            web = web_session(gw)
            before = Baseline(gw)
            measured: list[int] = []
            with tracing():
                for n in range(1 + 2 * rounds):
                    got = await handshake_round(port, n)
                    assert got["wrong"] == [(401, "unauthorized")] * 30, got["wrong"]
                    assert got["no-key"] == [(400, "bad_websocket_handshake")] * 4
                    assert got["bad-name"] == [(400, "invalid_name")] * 4
                    assert got["old"] == [4426] * 4
                    assert got["garbage"] == [1002] * 4
                    assert got["silent"] == [4408] * 4
                    # The guesser's 11th guess and those after it are refused
                    # unseen, however many addresses fail beside it.
                    too_many = (429, "too_many_auth_failures")
                    if n == 0:
                        assert got["locked"] == [(401, "unauthorized")] * 10 + [too_many] * 2
                    else:
                        assert got["locked"] == [too_many] * 3
                    assert len(limiter) <= 16
                    await before.back()
                    assert web_session(gw) is web
                    await fine(port)
                    if n in (rounds, 2 * rounds):
                        measured.append(retained())
            assert measured[1] - measured[0] < GROWTH, measured
            # Among 150 newer addresses, the locked-out one is still remembered.
            assert limiter.retry_after("203.0.113.9") is not None
            assert limiter.retry_after("127.0.0.1") is None
            async with raw_agent(gw, "other"):  # the proxy's own address is not locked out
                await wait_for(lambda: gw.gateway.registry.lookup("other") is not None)
            await fine(port)


# -- 3. half-open TCP connections -------------------------------------------------

PARTIAL_HEAD = b"GET /a/web/fine HTTP/1.1\r\nHost: g\r\nX-Slow: "
PARTIAL_UPGRADE = b"GET /ws/connect?name=web HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\n"
KINDS = ("silent", "partial", "upgrade", "reset")


def _reset_on_close(stream: trio.SocketStream) -> None:
    """Closing ``stream`` sends RST, not FIN (a client that vanished)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def half_open_round(
    port: int, count: int, held: Callable[[], Awaitable[None]] | None = None
) -> dict[str, list[bytes]]:
    """``count`` connections that never finish a request: silent, a partial
    head, a partial agent upgrade, or reset after a partial head. Once all are
    open, ``held()`` runs (while the gateway holds them); returns what each
    kind read before the gateway closed it."""
    got: dict[str, list[bytes]] = {kind: [] for kind in KINDS}
    opened = 0
    all_open = trio.Event()

    async def one(kind: str) -> None:
        nonlocal opened
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if kind == "reset":
                _reset_on_close(stream)
            if kind != "silent":
                await stream.send_all(PARTIAL_UPGRADE if kind == "upgrade" else PARTIAL_HEAD)
            opened += 1
            if opened == count:
                all_open.set()
            if kind == "reset":
                await all_open.wait()
                return
            data = b""
            try:
                while chunk := await stream.receive_some(65536):
                    data += chunk
            except trio.BrokenResourceError:
                pass
            got[kind].append(data)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, KINDS[i % len(KINDS)])
        await all_open.wait()
        if held is not None:
            await held()
            assert not any(got.values()), got  # (all still held meanwhile)
    return got


async def test_a_flood_of_half_open_connections_leaves_memory_flat() -> None:
    """Rounds of connections that never finish a request head: "web" is
    served while they are held; each is closed at the idle timeout (408 if a
    head had begun); after each round no task, socket or connection object
    of theirs is left, and memory after 2N rounds is what it was after N."""
    rounds, count = 2, 100
    with trio.fail_after(20):
        async with agent_in_front_of(Recorder(), idle_timeout=0.3) as (gw, port):
            await fine(port)
            web = web_session(gw)
            before = Baseline(gw)
            measured: list[int] = []
            with tracing():
                for n in range(1 + 2 * rounds):
                    got = await half_open_round(port, count, lambda: fine(port))
                    each = count // len(KINDS)
                    assert got["silent"] == [b""] * each, got["silent"]
                    for kind in ("partial", "upgrade"):
                        assert len(got[kind]) == each
                        assert all(d.startswith(b"HTTP/1.1 408 ") for d in got[kind]), got[kind]
                    await before.back()
                    if n in (rounds, 2 * rounds):
                        measured.append(retained())
            assert measured[1] - measured[0] < GROWTH, measured
            assert web_session(gw) is web
            await fine(port)


# -- 4. more connections than --max-pending-connections ---------------------------


class Held:
    """An upstream: ``/held`` is answered once ``release`` is set (``arrived``
    is set when it is asked for); anything else at once."""

    def __init__(self) -> None:
        self.arrived = trio.Event()
        self.release = trio.Event()

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            conn, request = await read_head(stream)
            if request.target == b"/held":
                self.arrived.set()
                await self.release.wait()
                await respond(conn, stream, 200, b"held")
            else:
                await respond(conn, stream, 200, b"fine")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def send_request(stream: trio.SocketStream, target: bytes) -> None:
    await stream.send_all(b"GET /a/web" + target + b" HTTP/1.1\r\nHost: g\r\n\r\n")


async def read_response(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """One response with a Content-Length (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed mid-body: {data!r}"
        body += chunk
    return head, body


async def ask(stream: trio.SocketStream, target: bytes) -> bytes:
    """A keep-alive GET on ``stream``: its body (the status must be 200)."""
    await send_request(stream, target)
    head, body = await read_response(stream)
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"connection: close" not in head.lower(), head
    return body


class Crowd:
    """Connections that connect and send nothing; counts those the gateway
    closes (``closed``), with an event once ``expected`` of them are."""

    def __init__(self, port: int, expected: int) -> None:
        self.port = port
        self.expected = expected
        self.closed = 0
        self.all_closed = trio.Event()

    async def one(self) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            assert data == b"", data  # closed unanswered
            self.closed += 1
            if self.closed == self.expected:
                self.all_closed.set()


async def test_beyond_max_pending_connections_the_longest_waiting_make_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With --max-pending-connections 16: an idle keep-alive connection (C),
    a request in flight (D, which holds no place: its head is in), then 40
    silent connections. The line stays at 16 and the longest-waiting are
    closed to make room, long before the idle timeout: C first (as nginx
    reuses idle keep-alive connections), then the crowd's oldest, 25 in all,
    with one warning. D's response arrives whole and D goes on; a newcomer
    that sends its head at once is served however many wait; agent "web" is
    untouched; once the crowd leaves nothing of it is held (no leak)."""
    limit, crowd_size = 16, 40
    upstream = Held()
    caplog.set_level(logging.WARNING, logger="revconn.listener")
    with trio.fail_after(15):
        front = agent_in_front_of(upstream, idle_timeout=10, max_pending_connections=limit)
        async with front as (gw, port):
            listener = gw.gateway.listener
            assert listener is not None
            pending = listener.pending
            web = web_session(gw)
            c = await trio.open_tcp_stream("127.0.0.1", port)
            d = await trio.open_tcp_stream("127.0.0.1", port)
            async with c, d:
                assert await ask(c, b"/fine") == b"fine"
                await send_request(d, b"/held")
                await upstream.arrived.wait()
                await wait_for(lambda: pending.waiting == 1)  # C (D's head is in)
                crowd = Crowd(port, crowd_size - limit)  # (C is the 25th)
                async with trio.open_nursery() as nursery:
                    started = trio.current_time()
                    for _ in range(crowd_size):
                        nursery.start_soon(crowd.one)
                    await crowd.all_closed.wait()
                    assert await c.receive_some(65536) == b""  # C made room first
                    assert trio.current_time() - started < 5  # (the idle timeout is 10)
                    assert (pending.waiting, pending.evicted) == (limit, crowd_size + 1 - limit)
                    # A newcomer that sends its head at once is served.
                    await fine(port)
                    # D's response arrives whole; D waits in line again and goes on.
                    upstream.release.set()
                    head, body = await read_response(d)
                    assert head.startswith(b"HTTP/1.1 200 ") and body == b"held"
                    assert await ask(d, b"/fine") == b"fine"
                    assert pending.waiting == limit
                    assert web_session(gw) is web and len(gw.gateway._tunnels) == 1
                    nursery.cancel_scope.cancel()  # the crowd leaves
                await wait_for(lambda: pending.waiting == 1)  # D, kept alive
            await wait_for(lambda: pending.waiting == 0)
            warnings = [r for r in caplog.records if r.name == "revconn.listener"]
            assert len(warnings) == 1, warnings  # (one per WARN_EVERY, not one per eviction)
            assert "--max-pending-connections" in warnings[0].getMessage()


def test_a_pending_slot_counts_its_connection_once() -> None:
    """PendingLimit (sans-I/O): entering twice takes one place, leaving is
    idempotent; at the limit the longest-waiting evictable slot makes room
    (in the order they entered), one without ``evict`` never does; None is no
    limit."""
    evicted: list[str] = []
    limit = PendingLimit(2)
    a, b, c = (limit.slot(partial(evicted.append, n)) for n in "abc")
    assert a.enter() and a.enter() and limit.waiting == 1
    assert b.enter() and limit.waiting == 2
    assert c.enter() and (limit.waiting, limit.evicted, evicted) == (2, 1, ["a"])
    a.leave()  # (already out: harmless)
    assert limit.waiting == 2
    b.leave()
    b.leave()
    assert limit.waiting == 1
    assert a.enter() and b.enter() and evicted == ["a", "c"]  # c had waited longest
    for slot in (a, b, c):
        slot.leave()
    assert limit.waiting == 0
    fixed = PendingLimit(1)
    first, second = fixed.slot(), fixed.slot()  # (no evict: cannot be closed)
    assert first.enter() and not second.enter()
    assert (fixed.waiting, fixed.evicted) == (1, 0)
    unlimited = PendingLimit(None)
    slots = [unlimited.slot() for _ in range(5000)]
    assert all(slot.enter() for slot in slots)
    assert (unlimited.waiting, unlimited.evicted) == (5000, 0)
