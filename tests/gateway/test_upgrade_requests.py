"""Upgrade requests on the data plane, at the HTTP/1.1 byte level.

Only WebSocket upgrades reach an agent (tests/gateway/test_websocket_passthrough.py).
Anything else that asks for an Upgrade — h2c from ``curl --http2`` over plain
http (``Connection: Upgrade, HTTP2-Settings``, ``Upgrade: h2c``), raw TCP
protocols — is refused with 400 ``upgrade_not_supported`` before any stream
is opened, and the connection closes (never a raw pipe by accident). A
CONNECT is not forwarded: 405, and the connection closes. The gateway's own
routes ignore an Upgrade (RFC 9110 7.8).

An in-process gateway and an in-process agent serving the test upstream app;
clients are raw sockets.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from revconn import Agent, AgentConfig, Backoff
from revconn._runtime.tunnel import Tunnel

from .._gateway_helpers import SECRET, RunningGateway, running_gateway, wait_for
from ..upstream_app import app, pattern
from .test_exchange import connect, get

pytestmark = pytest.mark.e2e

H2C = (
    "Connection: Upgrade, HTTP2-Settings",
    "Upgrade: h2c",
    "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
)


@asynccontextmanager
async def public_stack() -> AsyncIterator[tuple[RunningGateway, int]]:
    """A gateway with agent "web" online; yields the data plane's port."""
    async with running_gateway() as gw:
        agent = Agent(
            AgentConfig(gateway=gw.url, name="web", secret=SECRET, backoff=Backoff(0.1, 1)),
            app=app,
        )
        stopped = trio.Event()

        async def run() -> None:
            await agent.run()
            stopped.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            try:
                await wait_for(lambda: gw.gateway.registry.lookup("web") is not None)
                yield gw, int(gw.url.rsplit(":", 1)[1])
            finally:
                # A drain, not a cancellation (a cancelled Agent.run waits 2 s
                # for its WebSocket close).
                agent.stop()
                with trio.move_on_after(2):
                    await stopped.wait()


def head(method: str, target: str, *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: example.test", *extra, "", ""]
    return "\r\n".join(lines).encode()


def chunked(data: bytes, size: int) -> list[bytes]:
    """``data`` as chunks of ``size`` bytes, then the last chunk."""
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


DATA = pattern(100_000, 5)


def writes_with_length() -> list[bytes]:
    """Head and body in one write: the body is what follows the upgrade head."""
    return [head("POST", "/a/web/echo/h2c", *H2C, f"Content-Length: {len(DATA)}") + DATA]


def writes_split() -> list[bytes]:
    """The head alone, then the body in two writes (nothing follows the head at first)."""
    return [
        head("POST", "/a/web/echo/h2c", *H2C, f"Content-Length: {len(DATA)}"),
        DATA[:7],
        DATA[7:],
    ]


def writes_chunked() -> list[bytes]:
    """The head with its first chunk, then the other chunks one write each."""
    first, *rest = chunked(DATA, 30_000)
    return [head("POST", "/a/web/echo/h2c", *H2C, "Transfer-Encoding: chunked") + first, *rest]


@pytest.mark.parametrize(
    "writes",
    [writes_with_length, writes_split, writes_chunked],
    ids=["content-length", "content-length-later", "chunked"],
)
async def test_h2c_upgrade_with_a_body_is_refused_and_closed(writes: object) -> None:
    with trio.fail_after(5):
        async with public_stack() as (gw, port), connect(port) as client:
            for data in writes():  # type: ignore[operator]
                await client.send_raw(data)
            response, body = await client.response("POST")
            assert response.status_code == 400
            assert json.loads(body)["error"] == "upgrade_not_supported"
            assert (b"connection", b"close") in response.headers
            assert await client.closed_by_peer()
            session = gw.gateway.registry.lookup("web")
            assert isinstance(session, Tunnel)
            assert session.pooled_streams == 0  # no stream was opened for it


@pytest.mark.parametrize(
    "upgrade",
    [
        (
            "Connection: Upgrade, HTTP2-Settings",
            "Upgrade: h2c",
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        ),
        ("Connection: Upgrade", "Upgrade: tcp"),
        ("Connection: Upgrade", "Upgrade: websocket, h2c"),
        ("Connection: Upgrade", "Upgrade: TLS/1.2"),
    ],
)
async def test_other_upgrades_to_an_agent_are_refused(upgrade: tuple[str, ...]) -> None:
    """What ``curl --http2 http://...`` sends for a GET, and other protocols."""
    with trio.fail_after(5):
        async with public_stack() as (_, port):
            async with connect(port) as client:
                await client.send_raw(head("GET", "/a/web/echo/get?x=1", *upgrade))
                response, body = await client.response()
                assert response.status_code == 400
                error = json.loads(body)
                assert error["error"] == "upgrade_not_supported"
                assert "WebSocket" in error["detail"]
                assert await client.closed_by_peer()
            async with connect(port) as client:
                await client.send_raw(get("/a/web/status/200"))
                ok, ok_body = await client.response()
                assert (ok.status_code, ok_body) == (200, b"status 200")


async def test_the_gateways_own_routes_ignore_an_upgrade() -> None:
    with trio.fail_after(5):
        async with public_stack() as (_, port), connect(port) as client:
            await client.send_raw(head("GET", "/healthz", *H2C))
            response, body = await client.response()
            assert (response.status_code, json.loads(body)) == (200, {"status": "ok"})
            assert await client.closed_by_peer()


@pytest.mark.parametrize("target", ["/a/web/", "example.test:443"])
async def test_connect_is_405_and_closes_and_the_agent_is_unaffected(target: str) -> None:
    with trio.fail_after(5):
        async with public_stack() as (gw, port):
            async with connect(port) as client:
                await client.send_raw(head("CONNECT", target))
                response, body = await client.response()
                assert response.status_code == 405
                assert json.loads(body)["error"] == "method_not_allowed"
                assert (b"connection", b"close") in response.headers
                assert await client.closed_by_peer()
            session = gw.gateway.registry.lookup("web")
            assert isinstance(session, Tunnel)
            assert session.pooled_streams == 0  # no stream was opened for it
            async with connect(port) as client:
                await client.send_raw(get("/a/web/status/200"))
                ok, ok_body = await client.response()
                assert (ok.status_code, ok_body) == (200, b"status 200")
            assert gw.gateway.registry.lookup("web") is session
