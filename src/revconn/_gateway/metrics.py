"""``GET /metrics`` (Prometheus text format, by prometheus-client) and
``GET /stats`` (JSON for the dashboard), both read at request time from what
the gateway counts anyway: ``traffic.py``'s request counters, the presence
counters below (fed by a registry subscription), the heartbeat RTT
histogram, refused credentials and the pending-connection line.

Nothing here runs per forwarded request: a scrape builds its metric families
from plain integers (a custom collector on a registry of the gateway's own,
so several gateways in one process do not collide).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Iterator
from typing import Protocol

import trio
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)

from .._stats import Histogram, by_reason_family, histogram_family
from .registry import AgentInfo, Registry, RegistryEvent, RegistryEventKind
from .traffic import STATUS_CLASSES, Traffic, by_status

__all__ = ["GatewayCollector", "MetricsSource", "Presence", "count_presence", "stats_json"]

log = logging.getLogger("revconn.gateway")

RECENT_OFFLINE = 50
"""Disconnects remembered for the dashboard."""
PRESENCE_CAPACITY = 4096
"""Events the counting subscription may fall behind (it never waits on I/O)."""


class Presence:
    """Connects, disconnects by reason and replacements, counted from the
    registry's events; the last disconnects for the dashboard."""

    def __init__(self) -> None:
        self.connects = 0
        self.replacements = 0
        self.disconnects: dict[str, int] = {}
        self.recent_offline: collections.deque[RegistryEvent] = collections.deque(
            maxlen=RECENT_OFFLINE
        )
        self.lost_events = 0
        """Times the counting subscription overflowed (counts may be short)."""

    def count(self, event: RegistryEvent) -> None:
        if event.kind is RegistryEventKind.ONLINE:
            self.connects += 1
        elif event.kind is RegistryEventKind.OFFLINE:
            reason = event.reason or "closed"
            self.disconnects[reason] = self.disconnects.get(reason, 0) + 1
            self.recent_offline.append(event)
        elif event.kind is RegistryEventKind.REPLACED:
            self.replacements += 1


async def count_presence(
    registry: Registry,
    presence: Presence,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Feed ``presence`` for the gateway's lifetime."""
    started = False
    while True:
        async with registry.subscribe(PRESENCE_CAPACITY) as sub:
            if not started:
                started = True
                task_status.started()
            async for event in sub:
                presence.count(event)
        presence.lost_events += 1
        log.warning("presence counting fell %d events behind: resubscribed", PRESENCE_CAPACITY)


class MetricsSource(Protocol):
    """What the collector reads from the gateway."""

    @property
    def traffic(self) -> Traffic | None: ...

    @property
    def presence(self) -> Presence: ...

    @property
    def rtt(self) -> Histogram: ...

    @property
    def auth_refusals(self) -> dict[str, int]: ...

    @property
    def evicted_connections(self) -> int: ...

    @property
    def per_agent_metrics(self) -> bool: ...


class GatewayCollector:
    """The gateway's metric families, built at each scrape."""

    def __init__(self, source: MetricsSource) -> None:
        self._source = source
        self.agents: list[AgentInfo] = []
        """The registry's listing, set just before each scrape (it is async)."""

    def describe(self) -> Iterable[Metric]:
        return []  # (collected at scrape time only)

    def collect(self) -> Iterator[Metric]:
        source = self._source
        online = GaugeMetricFamily(
            "revconn_agents_online", "Agents online, by transport.", labels=["transport"]
        )
        by_transport = collections.Counter(agent.transport for agent in self.agents)
        for transport in ("websocket", "url"):
            online.add_metric([transport], by_transport.get(transport, 0))
        yield online
        presence = source.presence
        yield CounterMetricFamily(
            "revconn_agent_connects", "Agents that came online.", value=presence.connects
        )
        doc = "Agents that went offline, by reason."
        yield by_reason_family("revconn_agent_disconnects", doc, presence.disconnects)
        yield CounterMetricFamily(
            "revconn_agent_replacements",
            "Agents replaced by a newer one of the same name.",
            value=presence.replacements,
        )
        yield histogram_family(
            "revconn_heartbeat_rtt_seconds", "Heartbeat PING round trips.", source.rtt
        )
        yield by_reason_family(
            "revconn_auth_failures", "Refused credentials, by reason.", source.auth_refusals
        )
        yield CounterMetricFamily(
            "revconn_connections_evicted",
            "Connections closed to make room in the --max-pending-connections line.",
            value=source.evicted_connections,
        )
        traffic = source.traffic
        if traffic is None:
            return
        requests = CounterMetricFamily(
            "revconn_requests",
            "Public requests for agents answered, by status class.",
            labels=["status_class"],
        )
        for index, count in enumerate(traffic.by_class):
            requests.add_metric([STATUS_CLASSES[index]], count)
        yield requests
        yield histogram_family(
            "revconn_request_duration_seconds",
            "Public requests for agents, from routing to the response's end.",
            traffic.durations,
        )
        yield CounterMetricFamily(
            "revconn_request_bytes", "Request bytes from public clients.", value=traffic.bytes_in
        )
        yield CounterMetricFamily(
            "revconn_response_bytes", "Response bytes to public clients.", value=traffic.bytes_out
        )
        yield GaugeMetricFamily(
            "revconn_streams_in_flight", "Requests in flight to agents.", value=traffic.in_flight
        )
        if source.per_agent_metrics:
            yield from self._per_agent(traffic)

    def _per_agent(self, traffic: Traffic) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "revconn_agent_requests",
            "Requests forwarded to each agent, by status class.",
            labels=["agent", "status_class"],
        )
        sent = CounterMetricFamily(
            "revconn_agent_response_bytes", "Response bytes from each agent.", labels=["agent"]
        )
        received = CounterMetricFamily(
            "revconn_agent_request_bytes", "Request bytes to each agent.", labels=["agent"]
        )
        in_flight = GaugeMetricFamily(
            "revconn_agent_in_flight", "Requests in flight to each agent.", labels=["agent"]
        )
        for name, agent in traffic.agents():
            for index, count in enumerate(agent.by_class):
                requests.add_metric([name, STATUS_CLASSES[index]], count)
            sent.add_metric([name], agent.bytes_out)
            received.add_metric([name], agent.bytes_in)
            in_flight.add_metric([name], agent.in_flight)
        yield from (requests, sent, received, in_flight)


def stats_json(source: MetricsSource, agents: list[AgentInfo]) -> dict[str, object]:
    """``GET /stats``: every online agent's listing row with its counters, the
    totals and the last disconnects (no bodies, no header values)."""
    traffic = source.traffic
    rows = []
    for agent in agents:
        row = agent.to_json()
        counters = None if traffic is None else traffic.agent(agent.name)
        row["traffic"] = None if counters is None else counters.to_json()
        rows.append(row)
    totals: dict[str, object] | None = None
    if traffic is not None:
        totals = {
            "in_flight": traffic.in_flight,
            "by_status": by_status(traffic.by_class),
            "bytes_in": traffic.bytes_in,
            "bytes_out": traffic.bytes_out,
        }
    return {
        "agents": rows,
        "totals": totals,
        "recent_offline": [e.to_json() for e in reversed(source.presence.recent_offline)],
    }
