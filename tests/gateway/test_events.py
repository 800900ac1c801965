"""Presence events: the registry's numbered events and snapshot, the
gateway's ``events()`` iterator and ``GET /events`` (server-sent events)."""

from __future__ import annotations

import json
import time
from contextlib import aclosing
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from revconn import (
    Agent,
    AgentConfig,
    Backoff,
    EventsOverflow,
    Gateway,
    GatewayConfig,
    InMemoryRegistry,
    ReplacedError,
    SharedSecretPolicy,
)
from revconn._agent.dial import USER_AGENT
from revconn._errors import ConnectionLost
from revconn._gateway.auth import Grant
from revconn._gateway.events import EventStreams, sse_stream
from revconn._gateway.gateway import offline_reason
from revconn._gateway.registry import PresenceSnapshot, RegistryEvent, RegistryEventKind
from revconn._runtime.tunnel import TunnelEnd

from .._gateway_helpers import SECRET, running_gateway, wait_for

AUTH = {"Authorization": f"Bearer {SECRET}"}
ONLINE, OFFLINE, REPLACED = (
    RegistryEventKind.ONLINE,
    RegistryEventKind.OFFLINE,
    RegistryEventKind.REPLACED,
)


class FakeSession:
    rtt: float | None = 0.0125
    accepting = True

    def request_close(self, close_code: int, reason: str) -> None:
        pass


def agent(url: str, name: str) -> Agent:
    return Agent(
        AgentConfig(
            gateway=url,
            name=name,
            secret=SECRET,
            backoff=Backoff(0.05, 0.2),
            upstream="http://127.0.0.1:9",
        )
    )


# -- the registry: snapshot + numbered events, no gap, no duplicate --------------------


async def test_a_late_subscriber_gets_the_snapshot_then_exactly_the_later_changes() -> None:
    reg = InMemoryRegistry()
    before = [await reg.register(f"a{i}", FakeSession(), remote=f"r{i}") for i in range(3)]  # type: ignore[arg-type]
    await reg.unregister(before[0])
    async with reg.subscribe() as sub:
        assert [a.name for a in sub.snapshot] == ["a1", "a2"]
        assert sub.seq == 4  # three online, one offline before it
        late = await reg.register("b", FakeSession(), remote="rb", version="x/1")  # type: ignore[arg-type]
        await reg.unregister(before[1], "heartbeat timeout")
        first = await sub.__anext__()
        second = await sub.__anext__()
    assert (first.kind, first.name, first.epoch, first.seq) == (ONLINE, "b", late.epoch, 5)
    assert (first.remote, first.version, first.rtt_ms) == ("rb", "x/1", 12.5)
    assert (second.kind, second.reason, second.seq) == (OFFLINE, "heartbeat timeout", 6)
    assert second.to_json()["reason"] == "heartbeat timeout"


async def test_a_replacement_is_offline_replaced_then_online() -> None:
    reg = InMemoryRegistry()
    async with reg.subscribe() as sub:
        old = await reg.register("svc", FakeSession(), remote="a")  # type: ignore[arg-type]
        new = await reg.register("svc", FakeSession(), remote="b")  # type: ignore[arg-type]
        got = [await sub.__anext__() for _ in range(4)]
    assert got == [
        RegistryEvent(ONLINE, "svc", old.epoch),
        RegistryEvent(OFFLINE, "svc", old.epoch, reason="replaced"),
        RegistryEvent(REPLACED, "svc", old.epoch, new_epoch=new.epoch),
        RegistryEvent(ONLINE, "svc", new.epoch),
    ]
    assert got[2].to_json()["new_epoch"] == new.epoch
    # The replaced session's own unregistration comes later and says nothing.
    assert await reg.unregister(old) is False


def test_versions_are_cut_to_printable_ascii() -> None:
    from revconn._gateway.registry import clean_version

    assert clean_version("revconn-agent/0.1.0") == "revconn-agent/0.1.0"
    assert clean_version("evil\r\nX-Injected: 1") == "evilX-Injected: 1"
    assert clean_version("\x00\x01") is None
    assert clean_version("v" * 500) == "v" * 64
    assert clean_version(None) is None


@pytest.mark.parametrize(
    ("end", "reason"),
    [
        (TunnelEnd(4408, "heartbeat timeout", None, False), "heartbeat timeout"),
        (TunnelEnd(4409, "replaced", None, False), "replaced"),
        (TunnelEnd(4403, "revoked", None, False), "revoked"),
        (TunnelEnd(1001, "shutdown", None, False), "shutdown"),
        (TunnelEnd(4401, "credential expired", None, False), "credential expired"),
        (TunnelEnd(1001, "shutdown", None, True), "closed"),  # the agent's own goodbye
        (TunnelEnd(1000, "agent stopping", None, True), "closed"),
        (TunnelEnd(1006, "", ConnectionLost("reset"), True), "connection lost"),
    ],
)
def test_offline_reasons(end: TunnelEnd, reason: str) -> None:
    assert offline_reason(end) == reason


# -- Gateway.events() -------------------------------------------------------------------


async def test_events_follow_a_real_agent_online_replaced_and_offline() -> None:
    async with running_gateway() as gw:
        first = agent(gw.url, "laptop")
        async with trio.open_nursery() as nursery, aclosing(gw.gateway.events()) as events:
            snapshot = await events.__anext__()
            assert snapshot == PresenceSnapshot((), 0)
            replaced = trio.Event()

            async def run_first() -> None:
                with pytest.raises(ReplacedError):
                    await first.run()
                replaced.set()

            nursery.start_soon(run_first)
            online = await events.__anext__()
            assert (online.kind, online.name, online.transport) == (ONLINE, "laptop", "websocket")
            assert online.version == USER_AGENT
            assert online.remote.startswith("127.0.0.1:")
            # A second agent under the same name replaces the first.
            second = agent(gw.url, "laptop")
            nursery.start_soon(second.run)
            kinds = [(e.kind, e.reason) for e in [await events.__anext__() for _ in range(3)]]
            assert kinds == [(OFFLINE, "replaced"), (REPLACED, None), (ONLINE, None)]
            await replaced.wait()
            second.stop()
            offline = await events.__anext__()
            assert (offline.kind, offline.reason) == (OFFLINE, "closed")
            nursery.cancel_scope.cancel()


async def test_a_slow_consumer_is_dropped_with_events_overflow() -> None:
    reg = InMemoryRegistry()
    async with running_gateway() as gw:
        gw.gateway.registry = reg  # (a registry we can fill by hand)
        events = gw.gateway.events(capacity=3)
        await events.__anext__()  # the snapshot: subscribed
        for i in range(10):
            await reg.register(f"a{i}", FakeSession(), remote="x")  # type: ignore[arg-type]
        got = [await events.__anext__() for _ in range(3)]
        assert [e.seq for e in got] == [1, 2, 3]
        with pytest.raises(EventsOverflow, match="fell 3 events behind"):
            await events.__anext__()
        assert not reg._subscribers  # nothing is buffered for it any more


# -- GET /events --------------------------------------------------------------------------


class SSEClient:
    """``GET /events`` over a raw socket (HTTP/1.0: a close-delimited body,
    no chunk framing), read one event at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.head: bytes = b""

    @classmethod
    async def open(cls, admin_url: str, credential: str = SECRET) -> SSEClient:
        port = int(admin_url.rsplit(":", 1)[1])
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await client.stream.send_all(
            f"GET /events HTTP/1.0\r\nAuthorization: Bearer {credential}\r\n\r\n".encode()
        )
        while b"\r\n\r\n" not in client.buffer:
            await client._fill()
        client.head, client.buffer = client.buffer.split(b"\r\n\r\n", 1)
        return client

    async def _fill(self) -> None:
        data = await self.stream.receive_some()
        if not data:
            raise EOFError(self.buffer)
        self.buffer += data

    async def events(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        """The next ``count`` events (comments and the retry line skipped)."""
        got: list[tuple[str, dict[str, Any]]] = []
        while len(got) < count:
            while b"\n\n" not in self.buffer:
                await self._fill()
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields = dict(
                line.split(": ", 1) for line in block.decode().split("\n") if ": " in line
            )
            if "event" in fields:
                got.append((fields["event"], json.loads(fields["data"])))
        return got


async def test_sse_needs_an_admin_credential() -> None:
    async with running_gateway() as gw, httpx.AsyncClient() as client:
        r = await client.get(gw.admin_url + "/events")
        assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
        r = await client.get(gw.admin_url + "/events", headers={"Authorization": "Bearer x"})
        assert r.status_code == 401


async def test_sse_streams_snapshot_then_changes_and_ends_at_shutdown() -> None:
    config = GatewayConfig(
        binds=("127.0.0.1:0",), admin_binds=("127.0.0.1:0",), graceful_timeout=30.0
    )
    gateway = Gateway(config, SharedSecretPolicy(SECRET))
    stop = trio.Event()
    served = trio.Event()

    async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
        await gateway.serve(shutdown_trigger=stop.wait, task_status=task_status)
        served.set()

    async with trio.open_nursery() as nursery:
        (url,) = await nursery.start(serve)
        early = agent(url, "early")
        nursery.start_soon(early.run)
        await wait_for(lambda: gateway.registry.lookup("early") is not None)
        sse = await SSEClient.open(gateway.admin_urls[0])
        async with sse.stream:
            assert sse.head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), sse.head
            assert b"content-type: text/event-stream" in sse.head.lower()
            assert b"cache-control: no-store" in sse.head.lower()
            ((kind, snap),) = await sse.events(1)
            assert kind == "snapshot"
            assert [a["name"] for a in snap["agents"]] == ["early"]
            assert snap["agents"][0]["version"] == USER_AGENT
            late = agent(url, "late")
            nursery.start_soon(late.run)
            ((kind, online),) = await sse.events(1)
            assert (kind, online["name"], online["seq"]) == ("online", "late", snap["seq"] + 1)
            assert set(online) >= {"event", "seq", "at", "epoch", "remote", "version", "rtt_ms"}
            # Shutdown: both agents' offline events, then "shutdown" and the
            # end of the response, well within the 30 s grace (nothing is in
            # flight), and the gateway is done.
            started = trio.current_time()
            stop.set()
            got = await sse.events(3)
            assert [(k, e.get("reason")) for k, e in got] == [
                ("offline", "shutdown"),
                ("offline", "shutdown"),
                ("shutdown", None),
            ]
            with trio.fail_after(5):
                with pytest.raises(EOFError):
                    await sse.events(1)
                await served.wait()
            assert trio.current_time() - started < 5
        nursery.cancel_scope.cancel()


async def test_the_stream_ends_with_a_shutdown_event_when_closed() -> None:
    reg = InMemoryRegistry()
    streams = EventStreams()
    body = sse_stream(reg, streams, keepalive=60)
    assert await body.__anext__() == b"retry: 2000\n\n"
    assert (await body.__anext__()).startswith(b"id: 0\nevent: snapshot\n")

    async def close_soon() -> None:
        await trio.sleep(0.01)
        streams.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_soon)
        last = await body.__anext__()
    assert last.startswith(b"event: shutdown\n")
    with pytest.raises(StopAsyncIteration):
        await body.__anext__()
    assert not reg._subscribers


async def test_a_quiet_stream_sends_a_keepalive_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reg = InMemoryRegistry()
    body = sse_stream(reg, EventStreams(), keepalive=15)
    await body.__anext__()
    await body.__anext__()
    start = trio.current_time()
    assert await body.__anext__() == b": keepalive\n\n"
    assert trio.current_time() - start == 15
    await reg.register("a", FakeSession(), remote="x")  # type: ignore[arg-type]
    assert (await body.__anext__()).startswith(b"id: 1\nevent: online\n")
    assert trio.current_time() - start == 15
    await body.aclose()
    assert not reg._subscribers


async def test_an_sse_consumer_that_falls_behind_gets_overflow_and_the_end() -> None:
    reg = InMemoryRegistry()
    body = sse_stream(reg, EventStreams(), capacity=2, keepalive=60)
    await body.__anext__()
    await body.__anext__()
    for i in range(5):
        await reg.register(f"a{i}", FakeSession(), remote="x")  # type: ignore[arg-type]
    assert (await body.__anext__()).startswith(b"id: 1\nevent: online\n")
    assert (await body.__anext__()).startswith(b"id: 2\nevent: online\n")
    last = await body.__anext__()
    assert last.startswith(b"event: overflow\n") and b'"error":"slow_consumer"' in last
    with pytest.raises(StopAsyncIteration):
        await body.__anext__()


async def test_a_stream_ends_when_its_token_is_revoked() -> None:
    reg = InMemoryRegistry()
    streams = EventStreams()
    mine = sse_stream(reg, streams, grant=Grant("admin-1"), keepalive=60)
    other = sse_stream(reg, streams, grant=Grant("admin-2"), keepalive=60)
    for body in (mine, other):
        await body.__anext__()
        await body.__anext__()  # the snapshot: subscribed and watched
    got: list[bytes] = []

    async def read_mine() -> None:
        got.append(await mine.__anext__())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_mine)
        await trio.testing.wait_all_tasks_blocked()
        assert streams.revoke(frozenset({"admin-1", "agent-9"})) == 1
    assert got == [b'event: closed\ndata: {"event":"closed","reason":"revoked"}\n\n']
    with pytest.raises(StopAsyncIteration):
        await mine.__anext__()
    # The other stream goes on.
    await reg.register("a", FakeSession(), remote="x")  # type: ignore[arg-type]
    assert (await other.__anext__()).startswith(b"id: 1\nevent: online\n")
    await other.aclose()
    assert not reg._subscribers


async def test_a_stream_ends_when_its_token_expires() -> None:
    reg = InMemoryRegistry()
    body = sse_stream(reg, EventStreams(), grant=Grant("t", int(time.time()) + 1), keepalive=60)
    await body.__anext__()
    await body.__anext__()
    with trio.fail_after(3):
        last = await body.__anext__()
    assert last == b'event: closed\ndata: {"event":"closed","reason":"credential expired"}\n\n'
    with pytest.raises(StopAsyncIteration):
        await body.__anext__()
