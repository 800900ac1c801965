"""Tokens on a running gateway: revocation (``--revoked-file`` polling,
``Gateway.revoke``), expiry while online, names and scopes.

Two set-ups: the gateway's ``serve_agent`` over in-memory transports, in
virtual time (``MockClock``), for the exact schedule; and a real gateway on
127.0.0.1 with real agents, for what goes over the wire and what the agent
makes of it.
"""

from __future__ import annotations

import logging
import math
import time
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from revconn import (
    Agent,
    AgentConfig,
    AuthError,
    Backoff,
    ConfigError,
    Gateway,
    GatewayConfig,
    Heartbeat,
    RevconnError,
    RevokedError,
)
from revconn._codes import WS_CREDENTIAL_EXPIRED, WS_REVOKED
from revconn._gateway import gateway as gateway_module
from revconn._gateway.addresses import parse_networks
from revconn._gateway.auth import Admission, SharedSecretPolicy, TokenPolicy
from revconn._gateway.gateway import REVOKED_POLL
from revconn._gateway.registry import RegistryEventKind
from revconn._gateway.tokens import (
    RevocationList,
    SigningKey,
    TokenVerifier,
    issue_token,
)
from revconn._proto.session import Role, TunnelSession
from revconn._runtime.streams import TunnelStream
from revconn._runtime.tunnel import EXPIRED_MESSAGE, Tunnel, TunnelEnd

from .._gateway_helpers import RunningGateway, raw_agent, running_gateway, wait_for
from .._memory import MemoryTransport, read_all, transport_pair
from .test_gateway import upgrade

KEY = SigningKey(bytes(range(32)))
SECRET = "shared-secret-0123456789"
HEARTBEAT = Heartbeat(15, 10)
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]


def token_policy(tmp_path: Path, *, shared: str | None = None) -> TokenPolicy:
    path = tmp_path / "revoked.txt"
    path.write_text("# revoked tokens\n")
    return TokenPolicy(
        TokenVerifier([KEY]),
        revoked=RevocationList(path),
        shared_secret=None if shared is None else SharedSecretPolicy(shared),
    )


def revoked_file(gateway: Gateway) -> Path:
    assert isinstance(gateway.auth, TokenPolicy) and gateway.auth.revoked is not None
    return gateway.auth.revoked.path


def append_revoked(gateway: Gateway, *token_ids: str) -> None:
    with revoked_file(gateway).open("a") as file:
        file.writelines(f"{token_id}\n" for token_id in token_ids)


def bearer(credential: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {credential}".encode())]


# -- in memory, in virtual time ---------------------------------------------------------


@attrs.define
class MemoryAgent:
    """The agent's side of a tunnel whose gateway side ``serve_agent`` runs."""

    name: str
    tunnel: Tunnel
    gateway_transport: MemoryTransport
    """What the gateway's side writes to (and closes)."""
    done: trio.Event = attrs.Factory(trio.Event)
    end: TunnelEnd | None = None
    ended_at: float | None = None
    served: trio.Event = attrs.Factory(trio.Event)
    """``serve_agent`` returned."""


def answer_with(name: str) -> Callable[[TunnelStream], Any]:
    async def handler(stream: TunnelStream) -> None:
        await read_all(stream)
        await stream.respond(200, [], end_stream=False)
        await stream.send_body(f"hello from {name}".encode(), end_stream=True)

    return handler


async def serve(nursery: trio.Nursery, gateway: Gateway, admission: Admission) -> MemoryAgent:
    t_gw, t_ag = transport_pair()
    agent = MemoryAgent(
        admission.name, Tunnel(TunnelSession(Role.AGENT), t_ag, heartbeat=HEARTBEAT), t_gw
    )

    async def gateway_side() -> None:
        await gateway.serve_agent(admission, t_gw, "127.0.0.1:50000")
        agent.served.set()

    async def agent_side() -> None:
        agent.end = await agent.tunnel.serve(on_request=answer_with(admission.name))
        agent.ended_at = trio.current_time()
        agent.done.set()

    nursery.start_soon(gateway_side)
    await agent.tunnel.handshake()
    nursery.start_soon(agent_side)
    await trio.testing.wait_all_tasks_blocked()  # (registered by now; no time passes)
    return agent


def admit(gateway: Gateway, name: str, credential: str) -> Admission:
    admission = gateway.admit_agent(f"name={name}".encode(), bearer(credential), remote="127.0.0.1")
    assert isinstance(admission, Admission), admission
    return admission


async def connect(
    nursery: trio.Nursery, gateway: Gateway, name: str, credential: str
) -> MemoryAgent:
    agent = await serve(nursery, gateway, admit(gateway, name, credential))
    assert gateway.registry.lookup(name) is not None
    return agent


async def request(gateway: Gateway, name: str) -> bytes:
    tunnel = gateway.registry.lookup(name)
    assert isinstance(tunnel, Tunnel)
    stream = tunnel.open_request(REQUEST, end_stream=True)
    await tunnel.flush()
    response = await stream.receive_response()
    assert response.status == 200
    body = await read_all(stream)
    stream.close()
    return body


def fake_time(now: Callable[[], float]) -> types.SimpleNamespace:
    """The ``time`` module as the gateway module sees it, with ``time()`` replaced."""
    real = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    return types.SimpleNamespace(**{**real, "time": now})


def memory_gateway(tmp_path: Path, *, shared: str | None = None) -> Gateway:
    return Gateway(GatewayConfig(admin_binds=()), token_policy(tmp_path, shared=shared))


def assert_revoked(agent: MemoryAgent) -> None:
    assert agent.end is not None
    assert isinstance(agent.end.error, RevokedError)
    assert "revoked" in str(agent.end.error)
    assert agent.end.close_code == WS_REVOKED and agent.end.reason == "revoked"
    closed = agent.gateway_transport.closed_with
    assert closed is not None and (closed.code, closed.reason) == (WS_REVOKED, "revoked")


async def test_a_revoked_token_is_disconnected_at_the_next_poll(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "revconn.gateway")
    gateway = memory_gateway(tmp_path)
    token_a, claims_a = issue_token(KEY, "alpha")
    token_b, claims_b = issue_token(KEY, "beta")
    assert isinstance(gateway.auth, TokenPolicy) and gateway.auth.revoked is not None
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(gateway._watch_revoked, gateway.auth.revoked)
        alpha = await connect(nursery, gateway, "alpha", token_a)
        beta = await connect(nursery, gateway, "beta", token_b)
        assert trio.current_time() == start
        await trio.sleep(1.2)  # two polls with nothing changed
        assert alpha.end is None
        append_revoked(gateway, claims_a.token_id)
        written = trio.current_time()
        await alpha.done.wait()
        assert alpha.ended_at is not None
        # the poll after the change, exactly: polls run every REVOKED_POLL from start
        assert alpha.ended_at == pytest.approx(start + 3 * REVOKED_POLL)
        assert 0 < alpha.ended_at - written <= REVOKED_POLL
        assert_revoked(alpha)
        await alpha.served.wait()
        assert gateway.registry.lookup("alpha") is None
        # the other agent is untouched and keeps serving
        assert beta.end is None
        assert await request(gateway, "beta") == b"hello from beta"
        assert [g.token_id for g in gateway._tunnels.values()] == [claims_b.token_id]
        # nothing more happens on the next polls
        await trio.sleep(2 * REVOKED_POLL)
        assert beta.end is None
        nursery.cancel_scope.cancel()
    reloads = [
        r.getMessage() for r in caplog.records if "revoked tokens reloaded" in r.getMessage()
    ]
    assert len(reloads) == 1
    assert "1 listed (1 new), 1 live sessions closed" in reloads[0]
    for record in caplog.records:
        assert token_a not in record.getMessage()


async def test_a_failed_reload_keeps_the_list_and_the_next_good_one_applies(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = memory_gateway(tmp_path)
    token_a, claims_a = issue_token(KEY, "alpha")
    token_b, claims_b = issue_token(KEY, "beta")
    assert isinstance(gateway.auth, TokenPolicy) and gateway.auth.revoked is not None
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(gateway._watch_revoked, gateway.auth.revoked)
        alpha = await connect(nursery, gateway, "alpha", token_a)
        beta = await connect(nursery, gateway, "beta", token_b)
        append_revoked(gateway, claims_a.token_id)
        await alpha.done.wait()
        assert alpha.ended_at == pytest.approx(start + REVOKED_POLL)
        # a typo: the reload fails, alpha stays revoked, beta stays online
        path = revoked_file(gateway)
        path.write_text(f"{claims_a.token_id}\n{claims_b.token_id} oops\n")
        await trio.sleep(3 * REVOKED_POLL + 0.2)  # (off the poll instants)
        assert beta.end is None
        assert gateway.auth.is_revoked(claims_a.token_id)
        assert not gateway.auth.is_revoked(claims_b.token_id)
        refused = gateway.admit_agent(b"name=alpha", bearer(token_a), remote="127.0.0.1")
        assert not isinstance(refused, Admission) and refused.status == 401
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, "the failed reload is logged once, not at every poll"
        assert f"revoked-tokens file {path} line 2" in errors[0].getMessage()
        assert "the current list stays" in errors[0].getMessage()
        # fixed: applied at the next poll
        path.write_text(f"{claims_a.token_id}\n{claims_b.token_id}\n")
        fixed = trio.current_time()
        await beta.done.wait()
        assert beta.ended_at is not None and 0 < beta.ended_at - fixed <= REVOKED_POLL
        assert_revoked(beta)
        nursery.cancel_scope.cancel()


async def test_an_expiring_token_is_closed_at_its_expiry_with_4401(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = memory_gateway(tmp_path)
    wall0, t0 = time.time(), trio.current_time()
    # The gateway's wall clock, advancing with virtual time.
    monkeypatch.setattr(
        gateway_module, "time", fake_time(lambda: wall0 + (trio.current_time() - t0))
    )
    token, claims = issue_token(KEY, "svc", expires_in=5, now=wall0)
    forever, _ = issue_token(KEY, "other")
    assert claims.expires_at is not None
    lifetime = claims.expires_at - wall0
    assert 4 < lifetime <= 5
    async with trio.open_nursery() as nursery:
        agent = await connect(nursery, gateway, "svc", token)
        other = await connect(nursery, gateway, "other", forever)
        await trio.sleep(lifetime - 0.001)
        assert agent.end is None  # not a moment too early
        await agent.done.wait()
        assert agent.ended_at == pytest.approx(t0 + lifetime, abs=1e-6)
        assert agent.end is not None
        assert agent.end.close_code == WS_CREDENTIAL_EXPIRED
        assert agent.end.reason == "credential expired"
        assert isinstance(agent.end.error, AuthError)
        assert not isinstance(agent.end.error, RevokedError)
        assert str(agent.end.error) == EXPIRED_MESSAGE
        closed = agent.gateway_transport.closed_with
        assert closed is not None and closed.code == WS_CREDENTIAL_EXPIRED
        await agent.served.wait()
        assert gateway.registry.lookup("svc") is None
        # a token without expiry is never closed for it
        await trio.sleep(3600)
        assert other.end is None
        assert await request(gateway, "other") == b"hello from other"
        nursery.cancel_scope.cancel()


async def test_gateway_revoke_closes_the_sessions_of_those_ids_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    gateway = memory_gateway(tmp_path, shared=SECRET)
    token_a, claims_a = issue_token(KEY, "alpha")
    token_a2, claims_a2 = issue_token(KEY, "alpha-2")
    token_b, claims_b = issue_token(KEY, "beta")
    async with trio.open_nursery() as nursery:
        alpha = await connect(nursery, gateway, "alpha", token_a)
        alpha2 = await connect(nursery, gateway, "alpha-2", token_a2)
        beta = await connect(nursery, gateway, "beta", token_b)
        shared = await connect(nursery, gateway, "shared", SECRET)
        assert await gateway.revoke([]) == 0
        assert await gateway.revoke(["not-issued"]) == 0
        start = trio.current_time()
        assert await gateway.revoke({claims_a.token_id, claims_a2.token_id}) == 2
        for agent in (alpha, alpha2):
            await agent.done.wait()
            assert agent.ended_at == start  # at once
            assert_revoked(agent)
        await trio.testing.wait_all_tasks_blocked()
        assert await gateway.revoke([claims_a.token_id]) == 0  # already gone
        assert beta.end is None and shared.end is None
        assert await request(gateway, "shared") == b"hello from shared"
        # revoke() ends sessions; only the file refuses the token next time
        assert isinstance(gateway.auth, TokenPolicy)
        assert not gateway.auth.is_revoked(claims_a.token_id)
        again = await connect(nursery, gateway, "alpha", token_a)
        assert again.end is None
        assert {g.token_id for g in gateway._tunnels.values()} == {
            claims_a.token_id,
            claims_b.token_id,
            None,
        }
        nursery.cancel_scope.cancel()


async def test_a_token_revoked_during_the_handshake_displaces_no_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Admitted, then revoked before the tunnel handshake completed: closed
    with 4403 and never registered, so the agent holding the name (with
    another token) is not replaced."""
    gateway = memory_gateway(tmp_path)
    holder_token, _ = issue_token(KEY, "svc")
    late_token, late = issue_token(KEY, "svc")
    seen: list[RegistryEventKind] = []

    async def collect(events: AsyncIterator[Any]) -> None:
        async for event in events:
            seen.append(event.kind)

    async with trio.open_nursery() as nursery, gateway.registry.subscribe() as events:
        nursery.start_soon(collect, events)
        holder = await connect(nursery, gateway, "svc", holder_token)
        online = gateway.registry.lookup("svc")
        admission = admit(gateway, "svc", late_token)
        append_revoked(gateway, late.token_id)
        await gateway.reload_revoked()
        newcomer = await serve(nursery, gateway, admission)
        await newcomer.done.wait()
        await newcomer.served.wait()
        assert_revoked(newcomer)
        assert holder.end is None
        assert gateway.registry.lookup("svc") is online
        assert await request(gateway, "svc") == b"hello from svc"
        await trio.testing.wait_all_tasks_blocked()
        assert RegistryEventKind.ONLINE in seen  # (the holder: events are collected)
        assert RegistryEventKind.REPLACED not in seen
        nursery.cancel_scope.cancel()


async def test_a_token_that_expired_during_the_handshake_displaces_no_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = memory_gateway(tmp_path)
    holder_token, _ = issue_token(KEY, "svc")
    late_token, late = issue_token(KEY, "svc", expires_in=60)
    async with trio.open_nursery() as nursery:
        holder = await connect(nursery, gateway, "svc", holder_token)
        online = gateway.registry.lookup("svc")
        admission = admit(gateway, "svc", late_token)
        assert late.expires_at is not None
        expires_at = float(late.expires_at)
        monkeypatch.setattr(gateway_module, "time", fake_time(lambda: expires_at))
        newcomer = await serve(nursery, gateway, admission)
        await newcomer.done.wait()
        assert newcomer.end is not None
        assert newcomer.end.close_code == WS_CREDENTIAL_EXPIRED
        assert holder.end is None
        assert gateway.registry.lookup("svc") is online
        nursery.cancel_scope.cancel()


async def test_reload_revoked_needs_a_revoked_file(tmp_path: Path) -> None:
    plain = Gateway(GatewayConfig(admin_binds=()), SharedSecretPolicy(SECRET))
    with pytest.raises(ConfigError, match="without one"):
        await plain.reload_revoked()
    no_file = Gateway(GatewayConfig(admin_binds=()), TokenPolicy(TokenVerifier([KEY])))
    with pytest.raises(ConfigError, match="without one"):
        await no_file.reload_revoked()
    gateway = memory_gateway(tmp_path)
    revoked_file(gateway).write_text("bad line\n")
    with pytest.raises(ConfigError, match="line 1"):
        await gateway.reload_revoked()


# -- a real gateway on 127.0.0.1 -----------------------------------------------------------


@asynccontextmanager
async def token_gateway(
    tmp_path: Path, *, shared: str | None = None, **config: Any
) -> AsyncIterator[RunningGateway]:
    """``running_gateway`` with a TokenPolicy (no shared secret unless given)."""
    policy = token_policy(tmp_path, shared=shared)
    async with running_gateway(HEARTBEAT, auth=policy, **config) as gw:
        yield gw


def named_app(name: str) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = f"hello from {name}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


@attrs.define
class RunningAgent:
    agent: Agent
    done: trio.Event = attrs.Factory(trio.Event)
    error: BaseException | None = None
    ended_at: float | None = None

    @property
    def attempts(self) -> int:
        return self.agent.statistics().attempts


def start_agent(nursery: trio.Nursery, url: str, name: str, credential: str) -> RunningAgent:
    agent = Agent(
        AgentConfig(gateway=url, name=name, secret=credential, backoff=Backoff(0.05, 0.2)),
        app=named_app(name),
    )
    running = RunningAgent(agent)

    async def run() -> None:
        try:
            await agent.run()
        except RevconnError as exc:
            running.error = exc
        finally:
            running.ended_at = trio.current_time()
            running.done.set()

    nursery.start_soon(run)
    return running


async def stop_all(*agents: RunningAgent) -> None:
    """Stop the agents still running (a goodbye, not a cancellation) and
    check that they end cleanly."""
    running = [r for r in agents if not r.done.is_set()]
    for r in running:
        r.agent.stop()
    with trio.fail_after(2):
        for r in running:
            await r.done.wait()
            assert r.error is None, r.error


async def online(gw: RunningGateway, *agents: tuple[RunningAgent, str]) -> None:
    for running, name in agents:
        with trio.fail_after(2):
            await running.agent.connected.wait()
        await wait_for(lambda n=name: gw.gateway.registry.lookup(n) is not None, timeout=2)


async def fetch(client: httpx.AsyncClient, gw: RunningGateway, name: str) -> str:
    r = await client.get(f"{gw.url}/a/{name}/")
    assert r.status_code == 200, r.text
    return r.text


async def test_a_revoked_agent_is_disconnected_within_a_second_and_does_not_retry(
    tmp_path: Path,
) -> None:
    token_a, claims_a = issue_token(KEY, "alpha")
    token_b, _ = issue_token(KEY, "beta")
    async with (
        token_gateway(tmp_path) as gw,
        httpx.AsyncClient() as client,
        trio.open_nursery() as nursery,
    ):
        alpha = start_agent(nursery, gw.url, "alpha", token_a)
        beta = start_agent(nursery, gw.url, "beta", token_b)
        await online(gw, (alpha, "alpha"), (beta, "beta"))
        assert await fetch(client, gw, "alpha") == "hello from alpha"
        append_revoked(gw.gateway, claims_a.token_id)
        written = trio.current_time()
        with trio.fail_after(1.0):
            await alpha.done.wait()
        assert alpha.ended_at is not None and alpha.ended_at - written < 1.0
        assert isinstance(alpha.error, RevokedError), alpha.error
        assert "revoked" in str(alpha.error)
        assert alpha.attempts == 1  # fatal: no retry
        assert gw.gateway.registry.lookup("alpha") is None
        r = await client.get(f"{gw.url}/a/alpha/")
        assert (r.status_code, r.json()["error"]) == (503, "agent_offline")
        # the other agent keeps serving, on its first connection
        for _ in range(3):
            assert await fetch(client, gw, "beta") == "hello from beta"
        assert not beta.done.is_set() and beta.attempts == 1
        # a new connection with the revoked token: 401 revoked, RevokedError, no retry
        r = await upgrade(gw.url, "name=alpha", {"Authorization": f"Bearer {token_a}"})
        assert r.status_code == 401
        assert r.json() == {
            "error": "revoked",
            "detail": "this token was revoked: ask the operator for a new one",
        }
        retry = start_agent(nursery, gw.url, "alpha", token_a)
        with trio.fail_after(2):
            await retry.done.wait()
        assert isinstance(retry.error, RevokedError) and retry.error.status == 401
        assert retry.attempts == 1
        await stop_all(alpha, beta, retry)
        nursery.cancel_scope.cancel()


async def test_an_expiring_token_is_closed_on_the_wire_with_4401(tmp_path: Path) -> None:
    # A lifetime of 0.5-1.5 s from now (expiry is in whole seconds).
    now = time.time()
    ahead = 1 if math.ceil(now) - now >= 0.5 else 2
    token, claims = issue_token(KEY, "svc", expires_in=ahead, now=math.floor(now))
    assert claims.expires_at is not None and 0.5 <= claims.expires_at - now < 1.5 + 0.1
    async with token_gateway(tmp_path) as gw, raw_agent(gw, "svc", secret=token) as (ws, _):
        await wait_for(lambda: gw.gateway.registry.lookup("svc") is not None, timeout=1)
        with trio.fail_after(2), pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.get_message()  # the GOAWAY, then the close
        closed_at = time.time()
        reason = info.value.reason
        assert reason is not None
        assert (reason.code, reason.reason) == (WS_CREDENTIAL_EXPIRED, "credential expired")
        assert claims.expires_at - 0.05 <= closed_at < claims.expires_at + 0.5
        await wait_for(lambda: gw.gateway.registry.lookup("svc") is None, timeout=1)
        # and now the token is refused outright
        r = await upgrade(gw.url, "name=svc", {"Authorization": f"Bearer {token}"})
        assert (r.status_code, r.json()["error"]) == (401, "expired")


async def test_an_agent_whose_token_expires_stops_with_auth_error(tmp_path: Path) -> None:
    now = time.time()
    ahead = 1 if math.ceil(now) - now >= 0.5 else 2
    token, _ = issue_token(KEY, "svc", expires_in=ahead, now=math.floor(now))
    async with token_gateway(tmp_path) as gw, trio.open_nursery() as nursery:
        running = start_agent(nursery, gw.url, "svc", token)
        await online(gw, (running, "svc"))
        with trio.fail_after(2):
            await running.done.wait()
        assert isinstance(running.error, AuthError)
        assert not isinstance(running.error, RevokedError)
        assert "expired" in str(running.error)
        assert running.attempts == 1


async def test_a_token_for_another_name_is_403_and_the_holder_keeps_serving(
    tmp_path: Path,
) -> None:
    token_a, _ = issue_token(KEY, "alpha")
    token_b, _ = issue_token(KEY, "beta")
    async with (
        token_gateway(tmp_path, auth_failures=1) as gw,
        httpx.AsyncClient() as client,
        trio.open_nursery() as nursery,
    ):
        alpha = start_agent(nursery, gw.url, "alpha", token_a)
        await online(gw, (alpha, "alpha"))
        info = (await gw.gateway.registry.snapshot())[0]
        r = await upgrade(gw.url, "name=alpha", {"Authorization": f"Bearer {token_b}"})
        assert r.status_code == 403
        assert r.json() == {"error": "wrong_agent", "detail": "this token connects only as 'beta'"}
        assert "www-authenticate" not in r.headers
        impostor = start_agent(nursery, gw.url, "alpha", token_b)
        with trio.fail_after(2):
            await impostor.done.wait()
        assert isinstance(impostor.error, AuthError)
        assert not isinstance(impostor.error, RevokedError)
        assert impostor.error.status == 403
        assert "wrong_agent" in str(impostor.error)
        assert impostor.attempts == 1
        # the holder is untouched: same epoch, still serving, never redialled
        (row,) = await gw.gateway.registry.snapshot()
        assert (row.name, row.epoch) == ("alpha", info.epoch)
        assert await fetch(client, gw, "alpha") == "hello from alpha"
        assert alpha.attempts == 1 and not alpha.done.is_set()
        # (403s are not failed authentications: with auth_failures=1 nobody is locked out)
        r = await upgrade(gw.url, "name=beta", {"Authorization": f"Bearer {token_b}"})
        assert r.status_code == 101
        await stop_all(alpha, impostor)
        nursery.cancel_scope.cancel()


async def test_admin_token_lists_endpoints_and_agent_tokens_get_403(tmp_path: Path) -> None:
    token, _ = issue_token(KEY, "svc")
    admin, admin_claims = issue_token(KEY, None, admin=True)
    async with (
        token_gateway(tmp_path) as gw,
        httpx.AsyncClient() as client,
        trio.open_nursery() as nursery,
    ):
        running = start_agent(nursery, gw.url, "svc", token)
        await online(gw, (running, "svc"))
        endpoints = f"{gw.admin_url}/endpoints"
        r = await client.get(endpoints, headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200
        assert [row["name"] for row in r.json()["endpoints"]] == ["svc"]
        r = await client.get(endpoints, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 403
        assert r.json()["error"] == "wrong_scope"
        assert "admin token" in r.json()["detail"]
        assert token not in r.text
        r = await client.get(endpoints, headers={"Authorization": f"Bearer {SECRET}"})
        assert (r.status_code, r.json()["error"]) == (401, "unauthorized")  # no shared secret
        # an admin token opens no tunnel
        r = await upgrade(gw.url, "name=svc", {"Authorization": f"Bearer {admin}"})
        assert (r.status_code, r.json()["error"]) == (403, "wrong_scope")
        # a revoked admin token: 401 revoked, once the file is reloaded
        append_revoked(gw.gateway, admin_claims.token_id)
        await gw.gateway.reload_revoked()
        r = await client.get(endpoints, headers={"Authorization": f"Bearer {admin}"})
        assert (r.status_code, r.json()["error"]) == (401, "revoked")
        assert r.headers["www-authenticate"] == 'Bearer realm="revconn", error="invalid_token"'
        assert running.attempts == 1 and not running.done.is_set()  # the agent is unaffected
        await stop_all(running)
        nursery.cancel_scope.cancel()


async def test_the_shared_secret_works_beside_tokens_when_configured(tmp_path: Path) -> None:
    token, _ = issue_token(KEY, "svc")
    async with (
        token_gateway(tmp_path, shared=SECRET) as gw,
        httpx.AsyncClient() as client,
        trio.open_nursery() as nursery,
    ):
        by_token = start_agent(nursery, gw.url, "svc", token)
        by_secret = start_agent(nursery, gw.url, "legacy", SECRET)
        await online(gw, (by_token, "svc"), (by_secret, "legacy"))
        assert await fetch(client, gw, "legacy") == "hello from legacy"
        r = await client.get(
            f"{gw.admin_url}/endpoints", headers={"Authorization": f"Bearer {SECRET}"}
        )
        assert sorted(row["name"] for row in r.json()["endpoints"]) == ["legacy", "svc"]
        await stop_all(by_token, by_secret)
        nursery.cancel_scope.cancel()


async def announce(
    client: httpx.AsyncClient, gw: RunningGateway, name: str, credential: str, port: int = 9
) -> httpx.Response:
    return await client.put(
        f"{gw.url}/announce?name={name}",
        json={"url": f"http://127.0.0.1:{port}/", "ttl": 30},
        headers={"Authorization": f"Bearer {credential}"},
    )


async def test_revoke_withdraws_an_announced_url(tmp_path: Path) -> None:
    token, claims = issue_token(KEY, "svc")
    other, other_claims = issue_token(KEY, "other")
    async with (
        token_gateway(tmp_path, announce_allow=("127.0.0.0/8",)) as gw,
        httpx.AsyncClient() as client,
    ):
        r = await announce(client, gw, "svc", token)
        assert r.status_code == 200, r.text
        assert (await announce(client, gw, "other", other)).status_code == 200
        r = await announce(client, gw, "third", token)
        assert (r.status_code, r.json()["error"]) == (403, "wrong_agent")
        assert gw.gateway.registry.lookup("svc") is not None
        assert await gw.gateway.revoke({claims.token_id}) == 1
        assert gw.gateway.registry.lookup("svc") is None
        assert gw.gateway.registry.lookup("other") is not None
        assert await gw.gateway.revoke({claims.token_id}) == 0
        # listed in the file: withdrawn by the poll, and refused from then on
        assert (await announce(client, gw, "svc", token)).status_code == 200
        append_revoked(gw.gateway, claims.token_id)
        await wait_for(lambda: gw.gateway.registry.lookup("svc") is None, timeout=1.0)
        r = await announce(client, gw, "svc", token)
        assert (r.status_code, r.json()["error"]) == (401, "revoked")
        r = await client.delete(
            f"{gw.url}/announce?name=svc", headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 401
        assert gw.gateway.registry.lookup("other") is not None
        assert not gw.gateway.auth.is_revoked(other_claims.token_id)  # type: ignore[attr-defined]


async def test_revoking_an_announcement_spares_a_tunnel_that_took_the_name(
    tmp_path: Path,
) -> None:
    announced_token, announced = issue_token(KEY, "svc")
    tunnel_token, _ = issue_token(KEY, "svc")
    async with (
        token_gateway(tmp_path, announce_allow=("127.0.0.0/8",)) as gw,
        httpx.AsyncClient() as client,
        trio.open_nursery() as nursery,
    ):
        assert (await announce(client, gw, "svc", announced_token)).status_code == 200
        running = start_agent(nursery, gw.url, "svc", tunnel_token)
        await online(gw, (running, "svc"))
        assert isinstance(gw.gateway.registry.lookup("svc"), Tunnel)
        assert await gw.gateway.revoke({announced.token_id}) == 0
        assert await fetch(client, gw, "svc") == "hello from svc"
        assert not running.done.is_set()
        await stop_all(running)
        nursery.cancel_scope.cancel()


async def test_an_announcement_lasts_no_longer_than_its_token(tmp_path: Path) -> None:
    token, claims = issue_token(KEY, "svc", expires_in=2)
    forever, _ = issue_token(KEY, "other")
    async with (
        token_gateway(tmp_path, announce_allow=("127.0.0.0/8",)) as gw,
        httpx.AsyncClient() as client,
    ):
        r = await announce(client, gw, "svc", token)
        assert r.status_code == 200, r.text
        assert claims.expires_at is not None
        assert 0 < r.json()["ttl"] <= claims.expires_at - claims.issued_at  # not the 30 asked
        assert (await announce(client, gw, "other", forever)).json()["ttl"] == 30
        # It lapses with the token (the registry drops it at its TTL) ...
        await wait_for(lambda: gw.gateway.registry.lookup("svc") is None, timeout=4.0)
        assert gw.gateway.registry.lookup("other") is not None
        # ... and its renewal is refused as expired.
        r = await announce(client, gw, "svc", token)
        assert (r.status_code, r.json()["error"]) == (401, "expired")


async def test_an_events_stream_ends_when_its_admin_token_is_revoked(tmp_path: Path) -> None:
    from .test_events import SSEClient

    admin, claims = issue_token(KEY, None, admin=True)
    async with token_gateway(tmp_path) as gw:
        sse = await SSEClient.open(gw.admin_url, admin)
        async with sse.stream:
            ((kind, _),) = await sse.events(1)
            assert kind == "snapshot"
            append_revoked(gw.gateway, claims.token_id)
            with trio.fail_after(3):
                ((kind, event),) = await sse.events(1)
            assert (kind, event["reason"]) == ("closed", "revoked")


async def test_a_token_revoked_while_its_url_resolves_is_not_announced(tmp_path: Path) -> None:
    """The revocation's reload sees no announcement yet (the URL is being
    resolved): the announcement is withdrawn as soon as it is made, and
    refused."""
    from revconn._gateway.addresses import AddressPolicy

    token, claims = issue_token(KEY, "svc")
    resolving, go_on = trio.Event(), trio.Event()

    class SlowDNS(AddressPolicy):
        async def resolve(self, host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
            resolving.set()
            await go_on.wait()
            return await super().resolve(host, port)

    cfg = GatewayConfig(binds=("127.0.0.1:0",), admin_binds=(), heartbeat=HEARTBEAT)
    policy = SlowDNS(parse_networks(("127.0.0.0/8",)))
    gateway = Gateway(cfg, token_policy(tmp_path), address_policy=policy)
    stop = trio.Event()
    async with trio.open_nursery() as nursery, httpx.AsyncClient() as client:
        (url,) = await nursery.start(partial(gateway.serve, shutdown_trigger=stop.wait))
        answers: list[httpx.Response] = []

        async def put() -> None:
            answers.append(
                await client.put(
                    f"{url}/announce?name=svc",
                    json={"url": "http://127.0.0.1:9/", "ttl": 30},
                    headers={"Authorization": f"Bearer {token}"},
                )
            )

        nursery.start_soon(put)
        await resolving.wait()
        append_revoked(gateway, claims.token_id)
        await gateway.reload_revoked()
        go_on.set()
        await wait_for(lambda: bool(answers))
        (answer,) = answers
        assert (answer.status_code, answer.json()["error"]) == (401, "revoked")
        assert gateway.registry.lookup("svc") is None
        stop.set()
