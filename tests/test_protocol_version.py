"""The protocol version (the WebSocket subprotocol ``revconn.v2``), from both sides.

An agent that does not offer it is accepted and closed with 4426 and a reason
saying what the gateway speaks, and never registered. An agent whose gateway
did not select it, or closed with 4426, stops for good with
ProtocolVersionError: redialling cannot help.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import attrs
import pytest
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from revconn import Agent, AgentConfig, Backoff, ProtocolVersionError
from revconn._proto.connect import WS_SUBPROTOCOL
from revconn._proto.session import Role, TunnelSession

from ._gateway_helpers import raw_agent, running_gateway

MISMATCH_CODE = 4426
MISMATCH_REASON = f"protocol version mismatch: this gateway speaks {WS_SUBPROTOCOL}"


# -- the gateway's side ------------------------------------------------------------------
async def test_agent_without_the_subprotocol_is_closed_4426_and_never_registered() -> None:
    with trio.fail_after(5):
        async with (
            running_gateway() as gw,
            gw.gateway.registry.subscribe() as sub,
            raw_agent(gw, "x", subprotocols=[], handshake=False) as (ws, _),
        ):
            assert ws.subprotocol is None  # accepted, nothing selected
            with pytest.raises(ConnectionClosed) as info:
                while True:  # no tunnel starts: not even the gateway's SETTINGS
                    message = await ws.get_message()
                    pytest.fail(f"unexpected message {message!r}")
            reason = info.value.reason
            assert reason is not None
            assert (reason.code, reason.reason) == (MISMATCH_CODE, MISMATCH_REASON)
            assert gw.gateway.registry.lookup("x") is None
            with trio.move_on_after(0.05):
                async for event in sub:
                    pytest.fail(f"unexpected registry event {event}")


# -- the agent's side, against fake gateways ---------------------------------------------
@attrs.define
class FakeGateway:
    url: str
    connections: int = 0
    offered: list[list[str]] = attrs.Factory(list)
    closed_by_agent: list[CloseReason | None] = attrs.Factory(list)
    redialled: trio.Event = attrs.Factory(trio.Event)
    """Set by a second connection: the agent retried."""
    agent_closed: trio.Event = attrs.Factory(trio.Event)


Behaviour = Callable[[WebSocketRequest], Awaitable[WebSocketConnection]]


@asynccontextmanager
async def fake_gateway(behaviour: Behaviour) -> AsyncIterator[FakeGateway]:
    """A trio-websocket server on 127.0.0.1: ``behaviour`` accepts each request
    (and may close); then the agent's close reason is recorded."""
    fake = FakeGateway("")

    async def handler(request: WebSocketRequest) -> None:
        fake.connections += 1
        if fake.connections > 1:
            fake.redialled.set()
        fake.offered.append(list(request.proposed_subprotocols))
        ws = await behaviour(request)
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            fake.closed_by_agent.append(exc.reason)
            fake.agent_closed.set()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, handler, "127.0.0.1", 0, None))
        fake.url = f"http://127.0.0.1:{server.port}"
        yield fake
        nursery.cancel_scope.cancel()


async def run_agent(fake: FakeGateway) -> BaseException | None:
    """Run an agent against ``fake``; what ``run()`` raised, or None if it
    redialled instead (it is then stopped at once, not after a timeout)."""
    config = AgentConfig(
        gateway=fake.url,
        name="probe",
        secret="s3cret",
        upstream="http://127.0.0.1:9",  # never reached: no request goes through
        backoff=Backoff(0.01, 0.02),  # a retry comes at once
        handshake_timeout=2.0,
    )
    agent = Agent(config, uniform01=lambda: 0.0)
    raised: list[BaseException] = []

    async def run() -> None:
        try:
            await agent.run()
        except Exception as exc:
            raised.append(exc)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await fake.redialled.wait()
        nursery.cancel_scope.cancel()
    return raised[0] if raised else None


async def select_nothing(request: WebSocketRequest) -> WebSocketConnection:
    """An older gateway: it knows no subprotocol."""
    return await request.accept()


async def select_then_close(request: WebSocketRequest) -> WebSocketConnection:
    """Selects the version, then closes 4426 before the tunnel handshake."""
    ws = await request.accept(subprotocol=WS_SUBPROTOCOL)
    await ws.aclose(MISMATCH_CODE, MISMATCH_REASON)
    return ws


async def handshake_then_close(request: WebSocketRequest) -> WebSocketConnection:
    """Selects the version, completes the tunnel handshake, then closes 4426."""
    ws = await request.accept(subprotocol=WS_SUBPROTOCOL)
    session = TunnelSession(Role.GATEWAY)
    session.initiate()
    await ws.send_message(session.data_to_send())
    while not session.handshake_complete:
        message = await ws.get_message()
        assert isinstance(message, bytes)
        session.receive_data(message)
        if out := session.data_to_send():
            await ws.send_message(out)
    await ws.aclose(MISMATCH_CODE, MISMATCH_REASON)
    return ws


async def test_gateway_that_selects_no_subprotocol_stops_the_agent_with_4426() -> None:
    with trio.fail_after(5):
        async with fake_gateway(select_nothing) as fake:
            error = await run_agent(fake)
            assert isinstance(error, ProtocolVersionError), error
            assert WS_SUBPROTOCOL in str(error)
            await fake.agent_closed.wait()
    assert fake.connections == 1
    assert fake.offered == [[WS_SUBPROTOCOL]]
    (reason,) = fake.closed_by_agent
    assert reason is not None
    assert reason.code == MISMATCH_CODE


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(select_then_close, id="closed-during-tunnel-handshake"),
        pytest.param(handshake_then_close, id="closed-after-tunnel-handshake"),
    ],
)
async def test_gateway_closing_4426_stops_the_agent(behaviour: Behaviour) -> None:
    with trio.fail_after(5):
        async with fake_gateway(behaviour) as fake:
            error = await run_agent(fake)
    assert isinstance(error, ProtocolVersionError), error
    assert fake.connections == 1
