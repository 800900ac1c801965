"""Failed authentications, in-process: after ``auth_failures`` failures a
source address gets 429 with Retry-After on every surface that checks a
credential (a good one included) until the window ends; other addresses and
agents already connected are unaffected."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio

from revconn._gateway.auth import Admission, Denial, Grant, Scope
from revconn._gateway.replies import Reply

from .._gateway_helpers import SECRET, RunningGateway, raw_agent, running_gateway, wait_for
from .test_gateway import upgrade

AUTH = {"Authorization": f"Bearer {SECRET}"}
BAD = {"Authorization": "Bearer not-the-secret-at-all"}
BODY = {"url": "http://127.0.0.1:9/", "ttl": 30}


def assert_locked_out(r: httpx.Response, window: float = 60.0) -> None:
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["retry-after"]) <= window
    assert r.json()["error"] == "too_many_auth_failures"


async def test_ws_connect_locks_out_after_n_failures_even_with_a_good_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "revconn.gateway")
    async with running_gateway(auth_failures=3) as gw, raw_agent(gw, "good") as (ws, _):
        await wait_for(lambda: gw.gateway.registry.lookup("good") is not None)
        for _ in range(3):
            r = await upgrade(gw.agent_url, "name=svc", BAD)
            assert r.status_code == 401
        assert_locked_out(await upgrade(gw.agent_url, "name=svc", AUTH))
        assert_locked_out(await upgrade(gw.agent_url, "name=svc", BAD))
        # The agent that was already connected keeps its tunnel.
        assert gw.gateway.registry.lookup("good") is not None
        assert not ws.closed
    lockouts = [r for r in caplog.records if "locked out" in r.getMessage()]
    assert len(lockouts) == 1
    assert "127.0.0.1" in lockouts[0].getMessage()
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert "not-the-secret" not in record.getMessage()


async def test_other_addresses_are_unaffected() -> None:
    async with running_gateway(auth_failures=2) as gw:
        for _ in range(2):
            await upgrade(gw.agent_url, "name=svc", BAD)
        assert_locked_out(await upgrade(gw.agent_url, "name=svc", AUTH))
        # Another loopback address (Linux routes all of 127/8 to lo).
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(transport=transport) as other:
            r = await other.put(f"{gw.url}/announce?name=svc", json=BODY, headers=BAD)
            assert r.status_code == 401
        admitted = gw.gateway.admit_agent(
            b"name=svc", [(b"authorization", AUTH["Authorization"].encode())], remote="127.0.0.2"
        )
        assert isinstance(admitted, Admission) and admitted.name == "svc"


async def test_announce_locks_out_after_n_failures() -> None:
    async with (
        running_gateway(auth_failures=2) as gw,
        httpx.AsyncClient(base_url=gw.url) as client,
    ):
        for _ in range(2):
            r = await client.put("/announce?name=svc", json=BODY, headers=BAD)
            assert r.status_code == 401
        assert_locked_out(await client.put("/announce?name=svc", json=BODY, headers=AUTH))
        assert_locked_out(await client.delete("/announce?name=svc", headers=AUTH))


async def test_admin_endpoints_lock_out_and_share_the_count() -> None:
    async with running_gateway(auth_failures=3) as gw, httpx.AsyncClient() as client:
        r = await client.get(f"{gw.admin_url}/endpoints", headers=AUTH)
        assert r.status_code == 200
        for _ in range(2):
            r = await client.get(f"{gw.admin_url}/endpoints", headers=BAD)
            assert r.status_code == 401
        # One counter per address across surfaces: a third failure elsewhere.
        r = await upgrade(gw.agent_url, "name=svc", BAD)
        assert r.status_code == 401
        assert_locked_out(await client.get(f"{gw.admin_url}/endpoints", headers=AUTH))
        assert (await client.get(f"{gw.admin_url}/healthz")).status_code == 200


async def test_lockout_ends_with_the_window() -> None:
    async def locked(gw: RunningGateway) -> bool:
        return (await upgrade(gw.agent_url, "name=svc", BAD)).status_code == 429

    async with running_gateway(auth_failures=1, auth_failure_window=0.3) as gw:
        assert (await upgrade(gw.agent_url, "name=svc", BAD)).status_code == 401
        r = await upgrade(gw.agent_url, "name=svc", AUTH)
        assert_locked_out(r, window=1)
        await trio.sleep(0.3)
        async with raw_agent(gw, "svc"):
            await wait_for(lambda: gw.gateway.registry.lookup("svc") is not None)
        assert not await locked(gw)  # a 401 again, and a fresh window
        assert await locked(gw)


async def test_behind_a_trusted_proxy_the_forwarded_client_is_counted() -> None:
    async with running_gateway(auth_failures=2, trusted_proxies=("127.0.0.1/32",)) as gw:
        attacker = {**BAD, "X-Forwarded-For": "198.51.100.1, 203.0.113.5"}
        for _ in range(2):
            assert (await upgrade(gw.agent_url, "name=svc", attacker)).status_code == 401
        assert_locked_out(await upgrade(gw.agent_url, "name=svc", attacker))
        # Another client of the same proxy is not slowed down.
        neighbour = {**BAD, "X-Forwarded-For": "203.0.113.6"}
        assert (await upgrade(gw.agent_url, "name=svc", neighbour)).status_code == 401


async def test_a_locked_out_address_is_refused_before_any_credential_is_compared() -> None:
    compared: list[str | None] = []

    class Counting:
        def authenticate(
            self, credential: str | None, *, agent: str | None, scope: Scope
        ) -> Grant | Denial:
            compared.append(credential)
            return Denial(401, "unauthorized", "no")

    async with running_gateway(auth_failures=1) as gw:
        gw.gateway.auth = gw.gateway.announcements.auth = Counting()
        good = [(b"authorization", AUTH["Authorization"].encode())]
        assert isinstance(gw.gateway.admit_agent(b"name=svc", good, remote="10.0.0.1"), Reply)
        assert len(compared) == 1
        refused = gw.gateway.admit_agent(b"name=svc", good, remote="10.0.0.1")
        assert isinstance(refused, Reply) and refused.status == 429
        put = await gw.gateway.announce(b"PUT", b"name=svc", good, b"{}", "10.0.0.1")
        assert put.status == 429
        assert len(compared) == 1
