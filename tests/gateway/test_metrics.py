"""What the gateway counts and shows: ``/metrics`` (Prometheus text, parsed
with prometheus-client's own parser), ``/stats`` (the dashboard's JSON) and
the counters behind them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from revconn import Agent, AgentConfig, Backoff, Heartbeat, ReplacedError
from revconn._gateway.traffic import (
    CLIENT_GONE,
    MAX_TRACKED,
    RECENT,
    Traffic,
    status_class,
)
from revconn._stats import Histogram

from .._gateway_helpers import SECRET, RunningGateway, running_gateway, wait_for
from ..upstream_app import app

AUTH = {"Authorization": f"Bearer {SECRET}"}


@asynccontextmanager
async def stack(**config: object) -> AsyncIterator[RunningGateway]:
    """A gateway (heartbeat every 0.2 s) with agent "web" online."""
    async with running_gateway(Heartbeat(0.2, 5), **config) as gw:
        agent = Agent(
            AgentConfig(gateway=gw.url, name="web", secret=SECRET, backoff=Backoff(0.1, 1)),
            app=app,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await wait_for(lambda: gw.gateway.registry.lookup("web") is not None)
            yield gw
            nursery.cancel_scope.cancel()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition: (name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(client: httpx.AsyncClient, gw: RunningGateway) -> dict:  # type: ignore[type-arg]
    r = await client.get(f"{gw.admin_url}/metrics", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return samples(r.text)


async def test_metrics_count_requests_agents_and_refusals() -> None:
    async with stack() as gw, httpx.AsyncClient() as client:
        for path in ("/echo/a", "/echo/b?secret=1", "/status/404", "/status/503"):
            await client.get(f"{gw.url}/a/web{path}")
        r = await client.get(f"{gw.url}/a/nobody/")  # an agent that is not online
        assert r.status_code == 503
        await client.get(f"{gw.admin_url}/endpoints", headers={"Authorization": "Bearer bad"})
        await wait_for(lambda: gw.gateway.rtt.counts != [0] * len(gw.gateway.rtt.counts))
        got = await scrape(client, gw)
        assert got[("revconn_requests_total", (("status_class", "2xx"),))] == 2
        assert got[("revconn_requests_total", (("status_class", "4xx"),))] == 1
        assert got[("revconn_requests_total", (("status_class", "5xx"),))] == 2  # 503 + offline
        assert got[("revconn_request_duration_seconds_count", ())] == 5
        assert got[("revconn_request_duration_seconds_bucket", (("le", "+Inf"),))] == 5
        assert got[("revconn_request_duration_seconds_sum", ())] > 0
        assert got[("revconn_agents_online", (("transport", "websocket"),))] == 1
        assert got[("revconn_agents_online", (("transport", "url"),))] == 0
        assert got[("revconn_agent_connects_total", ())] == 1
        assert got[("revconn_auth_failures_total", (("reason", "unauthorized"),))] == 1
        assert got[("revconn_heartbeat_rtt_seconds_count", ())] >= 1
        assert got[("revconn_streams_in_flight", ())] == 0
        assert got[("revconn_response_bytes_total", ())] > 0
        # No per-agent series unless asked for (cardinality).
        assert not any(name.startswith("revconn_agent_requests") for name, _ in got)


async def test_metrics_need_an_admin_credential() -> None:
    async with running_gateway() as gw, httpx.AsyncClient() as client:
        for path in ("/metrics", "/stats"):
            r = await client.get(f"{gw.admin_url}{path}")
            assert (r.status_code, r.json()["error"]) == (401, "unauthorized")


async def test_per_agent_series_behind_the_flag_and_disconnect_reasons() -> None:
    async with stack(metrics_per_agent=True) as gw, httpx.AsyncClient() as client:
        await client.get(f"{gw.url}/a/web/echo/x")
        got = await scrape(client, gw)
        labels = (("agent", "web"), ("status_class", "2xx"))
        assert got[("revconn_agent_requests_total", labels)] == 1
        assert got[("revconn_agent_response_bytes_total", (("agent", "web"),))] > 0

        # A replacement and its reasons: "dup" twice.
        def dup() -> Agent:
            config = AgentConfig(gateway=gw.url, name="dup", secret=SECRET, backoff=Backoff(0.1, 1))
            return Agent(config, app=app)

        async def replaced_one() -> None:
            with pytest.raises(ReplacedError):
                await dup().run()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(replaced_one)
            await wait_for(lambda: gw.gateway.registry.lookup("dup") is not None)
            nursery.start_soon(dup().run)
            await wait_for(lambda: gw.gateway.presence.replacements == 1)
            got = await scrape(client, gw)
            assert got[("revconn_agent_replacements_total", ())] == 1
            assert got[("revconn_agent_disconnects_total", (("reason", "replaced"),))] == 1
            assert got[("revconn_agent_connects_total", ())] == 3
            nursery.cancel_scope.cancel()


async def test_stats_show_counters_and_the_last_requests_without_queries() -> None:
    async with stack() as gw, httpx.AsyncClient() as client:
        await client.get(f"{gw.url}/a/web/echo/one?token=hunter2", headers={"Cookie": "s=1"})
        await client.post(f"{gw.url}/a/web/echo/two", content=b"x" * 1000)
        r = await client.get(f"{gw.admin_url}/stats", headers=AUTH)
        assert r.status_code == 200
        stats = r.json()
        (row,) = stats["agents"]
        assert row["name"] == "web" and row["transport"] == "websocket"
        traffic = row["traffic"]
        assert (traffic["requests"], traffic["in_flight"]) == (2, 0)
        assert traffic["by_status"]["2xx"] == 2
        last, first = traffic["recent"]
        assert (first["method"], first["path"], first["status"]) == ("GET", "/a/web/echo/one", 200)
        assert (last["method"], last["path"], last["bytes_in"]) == ("POST", "/a/web/echo/two", 1000)
        assert last["bytes_out"] > 0 and last["duration_ms"] > 0
        assert "hunter2" not in r.text and "s=1" not in r.text
        assert stats["totals"]["by_status"]["2xx"] == 2
        assert stats["recent_offline"] == []


async def test_without_metrics_the_data_plane_counts_nothing() -> None:
    async with stack(metrics=False) as gw, httpx.AsyncClient() as client:
        assert gw.gateway.traffic is None
        assert (await client.get(f"{gw.url}/a/web/echo/x")).status_code == 200
        got = await scrape(client, gw)
        assert not any(name.startswith("revconn_requests") for name, _ in got)
        assert got[("revconn_agents_online", (("transport", "websocket"),))] == 1
        r = await client.get(f"{gw.admin_url}/stats", headers=AUTH)
        assert r.json()["agents"][0]["traffic"] is None


# -- the counters, without sockets ---------------------------------------------------


async def test_traffic_counts_and_forgets_idle_agents_beyond_its_bound() -> None:
    traffic = Traffic()
    busy = traffic.begin("busy")  # stays in flight: never forgotten
    for i in range(MAX_TRACKED + 10):
        agent = traffic.begin(f"a{i}")
        traffic.end(agent, b"GET", b"/p?q=1", 200, trio.current_time(), 0, 10)
    assert len(dict(traffic.agents())) == MAX_TRACKED
    assert traffic.agent("busy") is busy
    assert traffic.agent("a0") is None and traffic.agent(f"a{MAX_TRACKED + 9}") is not None
    assert traffic.in_flight == 1
    assert traffic.by_class == [0, MAX_TRACKED + 10, 0, 0, 0]
    for _ in range(RECENT + 5):
        traffic.end(traffic.begin("busy"), b"GET", b"/x", CLIENT_GONE, trio.current_time(), 1, 0)
    assert len(busy.recent) == RECENT
    assert busy.by_class[3] == RECENT + 5  # 499: a client that left counts as 4xx


def test_histogram_buckets_are_upper_bounds_inclusive() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    assert histogram.counts == [1, 2, 1]
    assert histogram.sum == pytest.approx(8.6)


@pytest.mark.parametrize(
    ("status", "expected"), [(101, "1xx"), (204, "2xx"), (499, "4xx"), (503, "5xx"), (999, "5xx")]
)
def test_status_classes(status: int, expected: str) -> None:
    assert status_class(status) == expected
