"""Hostile input from the public side, at the byte level: request smuggling
attempts are answered 400 and the connection closed, never forwarded; path
tricks in the agent segment reach no other agent; CONNECT is refused; a
slowloris crowd does not delay a normal request. A well-behaved agent beside
them keeps serving, and its upstream never sees a smuggled request."""

from __future__ import annotations

import json

import pytest
import trio

from .._gateway_helpers import SECRET, running_gateway, wait_for
from .._raw_upstream import read_body, read_head, respond, serving

pytestmark = pytest.mark.e2e


class Upstream:
    """Counts and records what reaches the agent's upstream."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.completed: list[str] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            conn, request = await read_head(stream)
            self.targets.append(request.target.decode())
            await read_body(conn, stream)
            if request.target != b"/fine":
                self.completed.append(request.target.decode())
            await respond(conn, stream, 200, b"ok " + request.target)
        except Exception:  # (a dropped connection ends this handler)
            return


async def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw``, read until the gateway closes (bounded)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b""
    async with stream:
        await stream.send_all(raw)
        with trio.move_on_after(5):
            try:
                while chunk := await stream.receive_some(65536):
                    data += chunk
            except trio.BrokenResourceError:
                pass
    return data


SMUGGLING = [
    # Content-Length and Transfer-Encoding together (RFC 9112 6.3: a smuggling signal)
    b"POST /a/web/x HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /a/web/smuggled HTTP/1.1\r\nHost: g\r\n\r\n",
    # two differing Content-Lengths
    b"POST /a/web/x HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
    # a Content-Length list
    b"POST /a/web/x HTTP/1.1\r\nHost: g\r\nContent-Length: 4, 40\r\n\r\nabcd",
    # obfuscated Transfer-Encoding
    b"POST /a/web/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"POST /a/web/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"POST /a/web/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"POST /a/web/x HTTP/1.1\r\nHost: g\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # a bare LF in a chunk size line
    b"POST /a/web/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n4\nabcd\r\n0\r\n\r\n",
    # chunked on HTTP/1.0
    b"POST /a/web/x HTTP/1.0\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # a NUL in a header value, a bare CR in the head
    b"GET /a/web/x HTTP/1.1\r\nHost: g\r\nX-A: a\x00b\r\n\r\n",
    b"GET /a/web/x HTTP/1.1\r\nHost: g\rX-A: b\r\n\r\n",
]


@pytest.mark.parametrize("raw", SMUGGLING, ids=[str(i) for i in range(len(SMUGGLING))])
async def test_smuggling_is_a_400_and_never_forwarded(raw: bytes) -> None:
    upstream = Upstream()
    with trio.fail_after(20):
        async with serving(upstream) as up_port, running_gateway() as gw:
            from revconn import Agent, AgentConfig, Backoff

            agent = Agent(
                AgentConfig(
                    gateway=gw.url,
                    name="web",
                    secret=SECRET,
                    upstream=f"http://127.0.0.1:{up_port}",
                    backoff=Backoff(0.1, 1),
                )
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent.run)
                await wait_for(lambda: gw.gateway.registry.lookup("web") is not None)
                port = int(gw.url.rsplit(":", 1)[1])
                answer = await exchange(port, raw)
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
                assert b"connection: close" in head.lower()
                assert json.loads(body)["error"] == "bad_request"
                # Nothing reached the upstream; a malformed chunk (found only in
                # the body, after the head was streamed on) may have sent the
                # request's head, never a complete request nor anything after it.
                assert upstream.targets in ([], ["/x"]), upstream.targets
                assert upstream.completed == []
                # The agent is unaffected.
                fine = await exchange(
                    port, b"GET /a/web/fine HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
                )
                assert fine.startswith(b"HTTP/1.1 200 ") and fine.endswith(b"ok /fine")
                agent.stop()
                nursery.cancel_scope.deadline = trio.current_time() + 2


@pytest.mark.parametrize(
    "target",
    [
        b"/a/../a/other/x",
        b"/a/%2e%2e/other/x",
        b"/a/web%2F..%2Fother/x",
        b"/a/web/..%2F..%2Fa%2Fother/x",
        b"//a/other/x",
        b"/a//other/x",
        b"/a/web\x00other/x",
        b"/a/%6fther/x",
        b"/endpoints",
        b"/a/web/../../a/other/x",
    ],
)
async def test_path_tricks_never_reach_another_agent(target: bytes) -> None:
    """Agent "other" is online: no trick in the agent segment reaches it (or
    the admin surface); what reaches agent "web" is its own, byte-exact."""
    web, other = Upstream(), Upstream()
    with trio.fail_after(20):
        async with (
            serving(web) as web_port,
            serving(other) as other_port,
            running_gateway() as gw,
        ):
            from revconn import Agent, AgentConfig, Backoff

            agents = [
                Agent(
                    AgentConfig(
                        gateway=gw.url,
                        name=name,
                        secret=SECRET,
                        upstream=f"http://127.0.0.1:{port}",
                        backoff=Backoff(0.1, 1),
                    )
                )
                for name, port in (("web", web_port), ("other", other_port))
            ]
            async with trio.open_nursery() as nursery:
                for agent in agents:
                    nursery.start_soon(agent.run)
                await wait_for(lambda: gw.gateway.registry.lookup("other") is not None)
                await wait_for(lambda: gw.gateway.registry.lookup("web") is not None)
                port = int(gw.url.rsplit(":", 1)[1])
                raw = b"GET " + target + b" HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
                answer = await exchange(port, raw)
                assert answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 200 ")), answer[:200]
                assert other.targets == [], other.targets
                if web.targets:  # forwarded to web as its own path, byte-exact
                    assert [t.encode() for t in web.targets] == [target[len(b"/a/web") :]]
                for agent in agents:
                    agent.stop()
                nursery.cancel_scope.deadline = trio.current_time() + 2


async def test_slowloris_does_not_delay_a_normal_request() -> None:
    """200 connections trickling a request head one byte at a time; a normal
    request on a fresh connection is answered at once."""
    with trio.fail_after(30):
        async with running_gateway() as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    async with stream:
                        for byte in b"GET /healthz HTTP/1.1\r\nHost: g\r\nX-Slow: ":
                            await stream.send_all(bytes([byte]))
                            await trio.sleep(0.05)
                        await trio.sleep_forever()

                for _ in range(200):
                    nursery.start_soon(trickle)
                await trio.sleep(1.0)  # they are all trickling now
                started = trio.current_time()
                answer = await exchange(
                    port, b"GET /healthz HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
                )
                elapsed = trio.current_time() - started
                assert answer.startswith(b"HTTP/1.1 200 ")
                assert elapsed < 2.0, elapsed  # (liveness, not a speed target: ms when healthy)
                nursery.cancel_scope.cancel()
