"""The public side's limits (defaults at least as strict as nginx's): head
size, header count, target length, body size, agents; each refusal is a clear
status, and nothing reaches the agent."""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import ConnectionRejected

from revconn import Agent, AgentConfig, Backoff

from .._gateway_helpers import SECRET, raw_agent, running_gateway, wait_for
from .._raw_upstream import serving
from .test_public_side import Upstream, exchange

pytestmark = pytest.mark.e2e


async def answer_of(port: int, raw: bytes) -> tuple[int, dict[str, object]]:
    data = await exchange(port, raw)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (b"GET /a/web/" + b"x" * 9000 + b" HTTP/1.1\r\nHost: g\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET /a/web/ HTTP/1.1\r\nHost: g\r\nX-Big: " + b"y" * 17000 + b"\r\n\r\n",
            431,
            "request_header_too_large",
        ),
        (
            b"GET /a/web/ HTTP/1.1\r\nHost: g\r\n" + b"X-N: 1\r\n" * 100 + b"\r\n",
            431,
            "request_header_too_large",
        ),
        (
            b"POST /a/web/up HTTP/1.1\r\nHost: g\r\nContent-Length: 1025\r\n\r\n",
            413,
            "payload_too_large",
        ),
        (
            b"POST /a/web/up HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"400\r\n" + b"z" * 1024 + b"\r\n10\r\n" + b"z" * 16 + b"\r\n0\r\n\r\n",
            413,
            "payload_too_large",
        ),
    ],
    ids=["target", "head", "fields", "content-length", "chunked"],
)
async def test_limits(raw: bytes, status: int, error: str) -> None:
    upstream = Upstream()
    with trio.fail_after(20):
        async with serving(upstream) as up_port, running_gateway(max_body_size=1024) as gw:
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
                got, body = await answer_of(port, raw)
                assert (got, body["error"]) == (status, error), body
                assert upstream.completed == []
                if status != 413 or b"chunked" not in raw:
                    assert upstream.targets == []  # refused before anything was sent on
                # Within the limits: fine.
                ok = await exchange(
                    port,
                    b"POST /a/web/fine HTTP/1.1\r\nHost: g\r\nContent-Length: 1024\r\n"
                    b"Connection: close\r\n\r\n" + b"q" * 1024,
                )
                assert ok.startswith(b"HTTP/1.1 200 "), ok[:100]
                agent.stop()
                nursery.cancel_scope.deadline = trio.current_time() + 2


async def test_max_agents() -> None:
    async with running_gateway(max_agents=1) as gw, raw_agent(gw, "first"):
        await wait_for(lambda: gw.gateway.registry.lookup("first") is not None)
        rejected: ConnectionRejected | None = None
        try:
            async with raw_agent(gw, "second"):
                pass
        except BaseException as exc:  # (raised through trio-websocket's nursery)
            rejected = _rejection(exc)
        assert rejected is not None
        assert rejected.status_code == 503
        assert b"too_many_agents" in (rejected.body or b"")
        assert gw.gateway.registry.lookup("first") is not None
        # The same name reconnecting (replacing itself) is not refused.
        async with raw_agent(gw, "first"):
            await wait_for(lambda: len(gw.gateway._tunnels) >= 1)


def _rejection(exc: BaseException) -> ConnectionRejected | None:
    if isinstance(exc, ConnectionRejected):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _rejection(inner)
        if found is not None:
            return found
    return None
