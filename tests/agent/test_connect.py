"""The agent against listeners that are not a WebSocket gateway: every attempt
fails at once with a message naming the likely cause, on the backoff schedule.

Before the fix trio-websocket waited out the whole handshake timeout (10 s
here) whenever the peer closed or broke the connection during the handshake,
so a "gateway" that accepts and closes was dialed once every ~11 s whatever
the backoff said.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from revconn import Agent, AgentConfig, AuthError, Backoff, ConfigError

Handler = Callable[[trio.SocketStream], Awaitable[None]]

UPSTREAM = "http://127.0.0.1:9"  # never reached: no request goes through
ATTEMPTS = 3
BACKOFF = Backoff(0.1, 0.2)
HANDSHAKE_TIMEOUT = 10.0  # what each attempt waited before the fix


def agent_for(gateway: str) -> Agent:
    config = AgentConfig(
        gateway=gateway,
        name="probe",
        secret="s3cret",
        upstream=UPSTREAM,
        backoff=BACKOFF,
        handshake_timeout=HANDSHAKE_TIMEOUT,
    )
    return Agent(config, uniform01=lambda: 0.0)  # every delay is exactly BACKOFF.minimum


async def listen(nursery: trio.Nursery, handler: Handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def read_head(stream: trio.SocketStream) -> None:
    """Read the agent's request head (it has no body), so closing sends FIN, not RST."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        if not chunk:
            return
        data += chunk


async def drain(stream: trio.SocketStream) -> None:
    """Read until the agent hangs up (it does when its attempt fails)."""
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass


def close_at_once() -> Handler:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.aclose()

    return handler


def answer(data: bytes, *, read: Callable[[trio.SocketStream], Awaitable[object]]) -> Handler:
    """Read what ``read`` reads, answer ``data``, end our side, wait for the agent to hang up."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await read(stream)
            try:
                await stream.send_all(data)
                await stream.send_eof()
            except trio.BrokenResourceError:
                return
            await drain(stream)

    return handler


def answer_and_stay(data: bytes) -> Handler:
    """Answer ``data`` to the request head and keep the connection open."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await read_head(stream)
            await stream.send_all(data)
            await drain(stream)

    return handler


def http_answer(data: bytes) -> Handler:
    return answer(data, read=read_head)


def plain_http_port() -> Handler:
    """What a plain-HTTP server answers a TLS ClientHello with."""
    bad_request = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    return answer(bad_request, read=lambda stream: stream.receive_some())


CHECK = "is --gateway the right host, port and scheme (http vs https)?"


@pytest.mark.parametrize(
    ("scheme", "handler", "messages"),
    [
        pytest.param(
            "http",
            close_at_once(),
            # "closed" or "broke": the listener may close before the request arrives
            ["the connection during the WebSocket handshake", CHECK],
            id="accepts-and-closes",
        ),
        pytest.param(
            "http",
            http_answer(b"SSH-2.0-OpenSSH_9.6\r\n"),
            [
                "the gateway closed the connection during the WebSocket handshake "
                "(it answered 'SSH-2.0-OpenSSH_9.6')",
                CHECK,
            ],
            id="garbage-then-close",
        ),
        pytest.param(
            "http",
            answer_and_stay(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
            [
                "the gateway's answer is not a WebSocket handshake "
                "(it answered 'SSH-2.0-OpenSSH_9.6')",
                CHECK,
            ],
            id="garbage-head-kept-open",
        ),
        pytest.param(
            "http",
            answer_and_stay(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
            ["the gateway answered HTTP 200 instead of accepting the WebSocket upgrade", CHECK],
            id="http-200-no-upgrade",
        ),
        pytest.param(
            "http",
            http_answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>"),
            [
                "the gateway closed the connection during the WebSocket handshake "
                "(it answered 'HTTP/1.0 200 OK')",
                CHECK,
            ],
            id="http-200-body-until-close",
        ),
        pytest.param(
            "https",
            close_at_once(),
            ["the gateway closed the connection during the TLS handshake", CHECK],
            id="tls-accepts-and-closes",
        ),
        pytest.param(
            "https",
            plain_http_port(),
            ["the gateway port does not speak TLS", "use http:// or ws://"],
            id="tls-against-plain-http",
        ),
    ],
)
async def test_attempt_fails_at_once_and_follows_backoff(
    scheme: str, handler: Handler, messages: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="revconn.agent")
    accepted: list[float] = []
    enough = trio.Event()

    async def counting(stream: trio.SocketStream) -> None:
        accepted.append(trio.current_time())
        if len(accepted) == ATTEMPTS:
            enough.set()
        await handler(stream)

    async with trio.open_nursery() as nursery:
        port = await listen(nursery, counting)
        agent = agent_for(f"{scheme}://127.0.0.1:{port}")
        nursery.start_soon(agent.run)
        # Three attempts and two 0.1 s delays; one attempt alone took 10 s.
        with trio.fail_after(2.0):
            await enough.wait()
        nursery.cancel_scope.cancel()

    gaps = [later - earlier for earlier, later in itertools.pairwise(accepted[:ATTEMPTS])]
    # The backoff delay, plus a failure that costs far less than the handshake timeout.
    assert all(BACKOFF.minimum <= gap < 0.6 for gap in gaps), gaps
    last_error = agent.statistics().last_error
    assert last_error is not None
    assert last_error.startswith("ConnectError: ")
    for message in messages:
        assert message in last_error
    retries = [r for r in caplog.records if r.getMessage().startswith("failed: ")]
    assert len(retries) >= ATTEMPTS - 1
    assert {r.levelno for r in retries} == {logging.WARNING}
    assert all("attempt" in r.getMessage() and messages[0] in r.getMessage() for r in retries)


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (404, ConfigError, "answered HTTP 404 Not Found: is --gateway the URL of a revconn"),
        (401, AuthError, "rejected the credentials (HTTP 401)"),
        (403, AuthError, "rejected the credentials (HTTP 403)"),
    ],
)
async def test_rejection_status_is_fatal(
    status: int, error: type[Exception], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    """404 (a path typo, or not a revconn gateway) is a configuration error like
    401/403 are credential errors: the agent stops after one attempt, and its
    log's story ends saying why."""
    caplog.set_level(logging.INFO, logger="revconn.agent")
    reply = f"HTTP/1.1 {status} Nope\r\nContent-Length: 4\r\n\r\nnope".encode()
    async with trio.open_nursery() as nursery:
        port = await listen(nursery, answer_and_stay(reply))
        agent = agent_for(f"http://127.0.0.1:{port}")
        with trio.fail_after(5), pytest.raises(error) as info:
            await agent.run()
        nursery.cancel_scope.cancel()
    assert message in str(info.value)
    if status == 404:
        assert f"ws://127.0.0.1:{port}/ws/connect answered" in str(info.value)
    assert agent.statistics().attempts == 1
    told = [r.getMessage() for r in caplog.records if r.name == "revconn.agent"]
    assert told[-1] == f"offline: {info.value}"  # once, last
    assert (agent.monitor.state, agent.monitor.last_error) == ("stopped", str(info.value))


def test_agent_with_nothing_to_serve_is_refused_at_construction() -> None:
    config = AgentConfig(gateway="http://127.0.0.1:9", name="idle", secret="s3cret")
    with pytest.raises(ConfigError, match="nothing to serve"):
        Agent(config)
