"""A real gateway in-process on 127.0.0.1:0 with in-process and hand-driven agents."""

from __future__ import annotations

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from revconn import (
    Agent,
    AgentConfig,
    AuthError,
    Backoff,
    Heartbeat,
    RegistryEventKind,
    ReplacedError,
)
from revconn._proto.session import SessionEnded

from .._gateway_helpers import SECRET, raw_agent, running_gateway, wait_for

AUTH = {"Authorization": f"Bearer {SECRET}"}


def agent_for(url: str, name: str, **kw: object) -> Agent:
    cfg = AgentConfig(
        gateway=url,
        name=name,
        secret=kw.pop("secret", SECRET),  # type: ignore[arg-type]
        backoff=Backoff(0.05, 0.2),
        upstream=kw.pop(
            "upstream", "http://127.0.0.1:9"
        ),  # nothing listens: these tests forward nothing
        **kw,  # type: ignore[arg-type]
    )
    return Agent(cfg)


async def get(url: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(url + path, headers=headers)


async def test_healthz_and_endpoints_auth() -> None:
    async with running_gateway() as gw:
        r = await get(gw.admin_url, "/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        r = await get(gw.admin_url, "/endpoints")
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await get(gw.admin_url, "/endpoints?token=" + SECRET)  # never from the query
        assert r.status_code == 401
        r = await get(gw.admin_url, "/endpoints", {"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await get(gw.admin_url, "/endpoints", AUTH)
        assert (r.status_code, r.json()) == (200, {"endpoints": []})
        r = await get(gw.admin_url, "/nope")
        assert (r.status_code, r.json()["error"]) == (404, "not_found")


async def test_operator_surface_is_not_on_the_data_plane() -> None:
    """/endpoints is served on --admin-bind only: on --bind it is a JSON 404 like
    any unknown path, with or without a valid credential."""
    async with running_gateway() as gw:
        for headers in (None, AUTH):
            r = await get(gw.url, "/endpoints", headers)
            assert r.status_code == 404
            assert r.json()["error"] == "not_found"
        r = await get(gw.url, "/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        async with httpx.AsyncClient() as client:
            r = await client.post(gw.url + "/healthz")
        assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD")
        # and nothing of the data plane is on the admin surface
        r = await get(gw.admin_url, "/a/web/")
        assert r.status_code == 404


async def test_healthz_reports_shutting_down_on_both_surfaces() -> None:
    async with running_gateway() as gw:
        gw.gateway.begin_shutdown()
        for base in (gw.url, gw.admin_url):
            r = await get(base, "/healthz")
            assert (r.status_code, r.json()) == (503, {"status": "shutting_down"})


async def test_agent_online_with_rtt_then_offline() -> None:
    async with running_gateway(heartbeat=Heartbeat(0.1, 1.0)) as gw:
        agent = agent_for(gw.agent_url, "svc-1", heartbeat=Heartbeat(0.1, 1.0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await agent.connected.wait()
            await wait_for(lambda: gw.gateway.registry.lookup("svc-1") is not None)
            await trio.sleep(0.3)
            r = await get(gw.admin_url, "/endpoints", AUTH)
            (row,) = r.json()["endpoints"]
            assert row["name"] == "svc-1"
            assert row["status"] == "online"
            assert row["transport"] == "websocket"
            assert row["remote"].startswith("127.0.0.1:")
            assert row["connected_at"].endswith("Z")
            assert row["epoch"] >= 1
            assert row["rtt_ms"] is not None and 0 <= row["rtt_ms"] < 1000
            agent.stop()
        # stop() said goodbye: the agent is gone at once.
        await wait_for(lambda: gw.gateway.registry.lookup("svc-1") is None, timeout=2)


@pytest.mark.parametrize(("trusted", "listed"), [(True, "203.0.113.7"), (False, "127.0.0.1:")])
async def test_an_agent_behind_a_trusted_proxy_is_listed_from_its_own_address(
    trusted: bool, listed: str
) -> None:
    """Through nginx or Caddy (--trusted-proxy), the registry, /endpoints and
    the events name the agent's address the proxy forwarded, not the proxy;
    from anyone else an X-Forwarded-For is not believed."""
    proxies = ("127.0.0.1/32",) if trusted else ()
    async with running_gateway(trusted_proxies=proxies) as gw:
        forwarded = [(b"x-forwarded-for", b"198.51.100.1, 203.0.113.7")]
        async with raw_agent(gw, "behind", extra_headers=forwarded):
            await wait_for(lambda: gw.gateway.registry.lookup("behind") is not None)
            r = await get(gw.admin_url, "/endpoints", AUTH)
            (row,) = r.json()["endpoints"]
            assert row["remote"].startswith(listed), row


async def test_wrong_secret_is_401_and_leaves_registry_alone() -> None:
    async with running_gateway() as gw:
        good = agent_for(gw.agent_url, "svc")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(good.run)
            await wait_for(lambda: gw.gateway.registry.lookup("svc") is not None)
            bad = agent_for(gw.agent_url, "svc", secret="not-the-secret-at-all")
            with pytest.raises(AuthError) as info:
                await bad.run()
            assert info.value.status == 401
            assert SECRET not in str(info.value)
            assert bad.statistics().attempts == 1  # no retry loop
            assert gw.gateway.registry.lookup("svc") is not None
            assert good.tunnel is not None and good.tunnel.end is None
            nursery.cancel_scope.cancel()


async def upgrade(url: str, query: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """A WebSocket upgrade request sent as plain HTTP: the refusal must be plain HTTP."""
    all_headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        **(headers or {}),
    }
    async with httpx.AsyncClient() as client:
        return await client.get(f"{url}/ws/connect?{query}", headers=all_headers)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-secret"},
        {"Authorization": f"Basic {SECRET}"},
        {"Cookie": f"token={SECRET}"},
    ],
)
async def test_missing_or_wrong_credentials_is_401(headers: dict[str, str]) -> None:
    async with running_gateway() as gw:
        r = await upgrade(gw.agent_url, "name=svc", headers)
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
        r = await upgrade(gw.agent_url, f"name=svc&token={SECRET}", headers)
        assert r.status_code == 401


@pytest.mark.parametrize(
    "query",
    [
        "name=UPPER",
        "name=-lead",
        "name=trail-",
        "name=" + "a" * 64,
        "name=",
        "name=a.b",
        "name=a_b",
        "name=%C3%A9t%C3%A9",
        "",
        "name=a&name=b",
    ],
)
async def test_invalid_names_are_400(query: str) -> None:
    async with running_gateway() as gw:
        r = await upgrade(gw.agent_url, query, AUTH)
        assert r.status_code == 400
        assert r.json()["error"] == "invalid_name"
        assert len(gw.gateway.registry) == 0  # type: ignore[arg-type]


async def test_longest_valid_name_accepted() -> None:
    name = "a" + "-" * 61 + "z"
    async with running_gateway() as gw:
        agent = agent_for(gw.agent_url, name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await wait_for(lambda: gw.gateway.registry.lookup(name) is not None)
            nursery.cancel_scope.cancel()


async def test_replaced_agent_exits_and_newer_stays() -> None:
    async with running_gateway() as gw:
        first, second = agent_for(gw.agent_url, "twin"), agent_for(gw.agent_url, "twin")
        errors: list[BaseException] = []

        async def run_first() -> None:
            try:
                await first.run()
            except ReplacedError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_first)
            await first.connected.wait()
            (row1,) = await gw.gateway.registry.snapshot()
            nursery.start_soon(second.run)
            await wait_for(lambda: bool(errors))
            await trio.sleep(0.2)  # the old session's cleanup must not remove the new one
            (row2,) = await gw.gateway.registry.snapshot()
            assert row2.epoch > row1.epoch
            assert second.tunnel is not None and second.tunnel.end is None
            assert "replaced" in str(errors[0])
            nursery.cancel_scope.cancel()


async def test_replaced_close_code_and_goaway_seen_by_raw_client() -> None:
    async with (
        running_gateway() as gw,
        raw_agent(gw, "raw") as (ws1, s1),
        raw_agent(gw, "raw"),
    ):
        events = []
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            while True:
                events += s1.receive_data(await ws1.get_message())
        assert info.value.reason.code == 4409
        assert info.value.reason.reason == "replaced"
        assert SessionEnded(0, "replaced") in events


async def test_handshake_timeout_never_listed() -> None:
    async with (
        running_gateway(handshake_timeout=0.3) as gw,
        gw.gateway.registry.subscribe() as sub,
        raw_agent(gw, "mute", handshake=False) as (ws, _),
    ):
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            while True:  # the gateway's SETTINGS, then GOAWAY, then the close
                await ws.get_message()
        assert info.value.reason.code == 4408
        assert len(gw.gateway.registry) == 0  # type: ignore[arg-type]
        with trio.move_on_after(0.05):
            async for event in sub:
                pytest.fail(f"unexpected registry event {event}")


async def test_oversized_message_closes_1009_and_drops_the_agent() -> None:
    """A message above max_message_size: close 1009, the agent is off the list
    at once (not only when its heartbeat lapses), others are unharmed."""
    hb = Heartbeat(0.2, 0.3)
    async with running_gateway(heartbeat=hb) as gw, trio.open_nursery() as nursery:
        other = agent_for(gw.agent_url, "bystander", heartbeat=hb)
        nursery.start_soon(other.run)
        await other.connected.wait()
        async with raw_agent(gw, "big") as (ws, _):
            await wait_for(lambda: gw.gateway.registry.lookup("big") is not None)
            await ws.send_message(b"\x00" * (2 << 20))
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                while True:
                    await ws.get_message()
            assert info.value.reason.code == 1009
            start = trio.current_time()
            await wait_for(lambda: gw.gateway.registry.lookup("big") is None)
            assert trio.current_time() - start < hb.interval + hb.timeout + 0.5
        assert other.tunnel is not None and other.tunnel.end is None  # others unharmed
        nursery.cancel_scope.cancel()


async def test_silent_agent_dropped_after_heartbeat_timeout() -> None:
    async with (
        running_gateway(heartbeat=Heartbeat(0.2, 0.3)) as gw,
        gw.gateway.registry.subscribe() as sub,
        raw_agent(gw, "frozen"),  # never reads, so never answers a PING
    ):
        start = trio.current_time()
        kinds = []
        with trio.fail_after(5):
            async for event in sub:
                kinds.append(event.kind)
                if event.kind is RegistryEventKind.OFFLINE:
                    break
        elapsed = trio.current_time() - start
        assert kinds == [RegistryEventKind.ONLINE, RegistryEventKind.OFFLINE]
        assert 0.4 <= elapsed < 1.5


async def test_gateway_shutdown_says_goodbye() -> None:
    async with running_gateway() as gw, raw_agent(gw, "leaving") as (ws, session):
        gw.gateway.close_all_agents()
        events = []
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            while True:
                events += session.receive_data(await ws.get_message())
        assert info.value.reason.code == 1001
        assert SessionEnded(0, "shutdown") in events
        # New agents are refused while shutting down.
        r = await upgrade(gw.agent_url, "name=late", AUTH)
        assert r.status_code == 503


async def test_shutdown_lets_requests_in_flight_finish() -> None:
    async def slow_app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        await trio.sleep(1.0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"finished"})

    stop = trio.Event()
    from functools import partial

    from revconn import Gateway, GatewayConfig, SharedSecretPolicy

    config = GatewayConfig(binds=("127.0.0.1:0",), admin_binds=())
    gateway = Gateway(config, SharedSecretPolicy(SECRET))
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(partial(gateway.serve, shutdown_trigger=stop.wait))
        base = urls[0]
        agent = Agent(
            AgentConfig(gateway=base, name="slow", secret=SECRET, backoff=Backoff(5, 10)),
            app=slow_app,
        )
        nursery.start_soon(agent.run)
        await wait_for(lambda: gateway.registry.lookup("slow") is not None)
        results: list[httpx.Response] = []

        async def call() -> None:
            async with httpx.AsyncClient(timeout=10) as client:
                results.append(await client.get(base + "/a/slow/"))

        nursery.start_soon(call)
        await trio.sleep(0.3)
        stop.set()  # shutdown begins while the request is in flight
        await wait_for(lambda: bool(results), timeout=8)
        assert results[0].status_code == 200
        assert results[0].text == "finished"
        nursery.cancel_scope.cancel()


async def test_replacement_storm_does_not_take_the_gateway_down() -> None:
    """Both sides closing at once on replacement once crashed hypercorn's connection
    handler (BusyResourceError) and with it the whole gateway. 40 quick replacements."""
    async with running_gateway() as gw:
        replaced = 0
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                agent = agent_for(gw.agent_url, "storm")

                async def run(a: Agent = agent) -> None:
                    nonlocal replaced
                    try:
                        await a.run()
                    except ReplacedError:
                        replaced += 1

                nursery.start_soon(run)
                await agent.connected.wait()
            await wait_for(lambda: replaced == 39, timeout=10)
            r = await get(gw.url, "/healthz")
            assert r.status_code == 200
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_streams_per_agent", 0, "--max-streams-per-agent 0: must be at least 1"),
        ("max_message_size", 1000, "--max-message-size 1000: must be at least 262144"),
        ("max_pending_connections", 0, "--max-pending-connections 0: must be at least 1"),
    ],
)
def test_limits_below_their_floor_are_config_errors(field: str, value: int, message: str) -> None:
    from revconn import ConfigError, GatewayConfig

    with pytest.raises(ConfigError) as info:
        GatewayConfig(**{field: value})  # type: ignore[arg-type]
    assert str(info.value) == message
