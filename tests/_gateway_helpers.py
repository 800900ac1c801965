"""Helpers for tests that run a real gateway in-process on 127.0.0.1:0."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from revconn import AuthPolicy, Gateway, GatewayConfig, Heartbeat, SharedSecretPolicy
from revconn._gateway.addresses import AddressPolicy
from revconn._proto.connect import WS_SUBPROTOCOL
from revconn._proto.session import Role, TunnelSession

SECRET = "test-secret-0123456789"


@attrs.define
class RunningGateway:
    gateway: Gateway
    url: str
    """The data plane: agents dial it, public requests go to it."""
    admin_url: str
    """The operator surface (/endpoints)."""

    @property
    def agent_url(self) -> str:
        return self.url

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)


@asynccontextmanager
async def running_gateway(
    heartbeat: Heartbeat = Heartbeat(15, 10),
    *,
    address_policy: AddressPolicy | None = None,
    url_ssl_context: ssl.SSLContext | None = None,
    auth: AuthPolicy | None = None,
    **config: object,
) -> AsyncIterator[RunningGateway]:
    config.setdefault("admin_binds", ("127.0.0.1:0",))
    cfg = GatewayConfig(binds=("127.0.0.1:0",), heartbeat=heartbeat, **config)  # type: ignore[arg-type]
    gateway = Gateway(
        cfg,
        SharedSecretPolicy(SECRET) if auth is None else auth,
        address_policy=address_policy,
        url_ssl_context=url_ssl_context,
    )
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(partial(gateway.serve, shutdown_trigger=stop.wait))
        try:
            admin = gateway.admin_urls[0] if gateway.admin_urls else ""
            yield RunningGateway(gateway, urls[0], admin)
        finally:
            stop.set()
            with trio.move_on_after(5) as scope:
                scope.shield = True
                while len(nursery.child_tasks):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def raw_agent(
    gw: RunningGateway,
    name: str,
    *,
    secret: str = SECRET,
    handshake: bool = True,
    subprotocols: list[str] | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[tuple[WebSocketConnection, TunnelSession]]:
    """A hand-driven agent: a WebSocket plus a TunnelSession we pump ourselves.

    ``subprotocols``: what it offers (the current protocol version by default).
    The TCP stream is ours and is closed on exit (trio-websocket would leak it
    if its nursery were just cancelled).
    """
    port = int(gw.agent_url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery,
            stream,
            f"127.0.0.1:{port}",
            f"/ws/connect?name={name}",
            extra_headers=[(b"authorization", f"Bearer {secret}".encode()), *(extra_headers or [])],
            max_message_size=8 << 20,
            subprotocols=[WS_SUBPROTOCOL] if subprotocols is None else subprotocols,
        )
        session = TunnelSession(Role.AGENT)
        session.initiate()
        if handshake:
            await ws.send_message(session.data_to_send())
            while not session.handshake_complete:
                session.receive_data(await ws.get_message())
                out = session.data_to_send()
                if out:
                    await ws.send_message(out)
        yield ws, session
        nursery.cancel_scope.cancel()


async def wait_for(predicate: object, timeout: float = 5.0, step: float = 0.01) -> None:
    """Poll ``predicate()`` (sync or async) until true; fail after ``timeout``."""
    with trio.fail_after(timeout):
        while True:
            result = predicate()  # type: ignore[operator]
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await trio.sleep(step)
