"""``revconn-agent serve --metrics-bind``: ``GET /metrics`` (Prometheus text
format, by prometheus-client) and ``GET /status`` (JSON, what
``revconn-agent status`` prints), read at request time from the agent's
monitor (``monitor.py``) and supervisor.

A small ASGI app served by hypercorn (``local.serve_local``), loaded only
when asked for: it answers GET and HEAD on those two paths, 404 or 405 with
a JSON reason to anything else. It has no authentication: bind it to
loopback, or to an address only the scraper reaches (it names the agent,
its gateway and its public URLs; never a credential).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import __version__
from .._stats import by_reason_family, histogram_family
from .dial import redacted
from .monitor import STATES

if TYPE_CHECKING:
    from .agent import Agent
    from .upstream import ASGIApp

__all__ = ["AgentCollector", "metrics_app", "status_json"]


def _mode(agent: Agent) -> str:
    return "tunnel" if agent.config.tunnel_url is None else "announce"


def _upstream(agent: Agent) -> str:
    if agent.config.tunnel_url is not None:
        return "(announce mode: the gateway connects to the tunnel URL)"
    if agent.config.upstream is not None:
        return redacted(agent.config.upstream)  # (AgentConfig refuses credentials in it)
    return "(in-process ASGI app)"


def status_json(agent: Agent) -> dict[str, object]:
    """The agent's state as ``GET /status`` answers it."""
    monitor = agent.monitor
    now = time.time()
    tunnel = agent.tunnel
    rtt = tunnel.rtt if tunnel is not None else None
    return {
        "name": agent.config.name,
        "version": __version__,
        "mode": _mode(agent),
        "gateway": redacted(agent.config.gateway),
        "tunnel_url": agent.config.tunnel_url,
        "upstream": _upstream(agent),
        "state": monitor.state,
        "state_since": round(monitor.state_since, 3),
        "public_urls": list(monitor.public_urls),
        "retry_in_s": (
            None if monitor.retry_at is None else round(max(0.0, monitor.retry_at - now), 3)
        ),
        "last_error": monitor.last_error,
        "attempts": monitor.attempts,
        "connects": monitor.connects,
        "reconnects": monitor.reconnects,
        "connect_failures": monitor.connect_failures,
        "disconnects": dict(sorted(monitor.disconnects.items())),
        "rtt_ms": None if rtt is None else round(rtt * 1000.0, 3),
        "answers": monitor.upstream_latency.count,
        "streams_open": monitor.streams_open,
        "streams": monitor.streams,
        "upstream_unreachable": monitor.upstream_unreachable,
    }


class AgentCollector:
    """The agent's metric families, built at each scrape."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        monitor = agent.monitor
        info = GaugeMetricFamily(
            "revconn_agent_info",
            "This agent: its name, version and mode (always 1).",
            labels=["name", "version", "mode"],
        )
        info.add_metric([agent.config.name, __version__, _mode(agent)], 1)
        yield info
        yield GaugeMetricFamily(
            "revconn_tunnel_up",
            "1 while the agent is online (tunnel up, or announcement accepted).",
            value=1 if monitor.state == "online" else 0,
        )
        state = GaugeMetricFamily(
            "revconn_tunnel_state", "The agent's state (1 for the current one).", labels=["state"]
        )
        for name in STATES:
            state.add_metric([name], 1 if monitor.state == name else 0)
        yield state
        yield GaugeMetricFamily(
            "revconn_tunnel_state_since_seconds",
            "Unix time the current state was entered.",
            value=monitor.state_since,
        )
        yield CounterMetricFamily(
            "revconn_tunnel_attempts",
            "Connection attempts started (announce mode: announcements sent).",
            value=monitor.attempts,
        )
        yield CounterMetricFamily(
            "revconn_tunnel_connects", "Sessions that came up.", value=monitor.connects
        )
        yield CounterMetricFamily(
            "revconn_tunnel_reconnects",
            "Sessions that came up after the first.",
            value=monitor.reconnects,
        )
        yield CounterMetricFamily(
            "revconn_tunnel_connect_failures",
            "Attempts that failed before the session came up.",
            value=monitor.connect_failures,
        )
        yield by_reason_family(
            "revconn_tunnel_disconnects", "Sessions that ended, by reason.", monitor.disconnects
        )
        yield histogram_family(
            "revconn_tunnel_heartbeat_rtt_seconds", "Heartbeat PING round trips.", monitor.rtt
        )
        yield GaugeMetricFamily(
            "revconn_tunnel_streams_open",
            "Tunnel streams open now (idle ones pooled by the gateway included).",
            value=monitor.streams_open,
        )
        yield CounterMetricFamily(
            "revconn_tunnel_streams", "Tunnel streams opened.", value=monitor.streams
        )
        yield CounterMetricFamily(
            "revconn_upstream_unreachable",
            "Streams refused 502 because the upstream could not be connected.",
            value=monitor.upstream_unreachable,
        )
        yield histogram_family(
            "revconn_upstream_connect_seconds",
            "Time to connect to the upstream (--upstream).",
            monitor.upstream_connect,
        )
        yield histogram_family(
            "revconn_upstream_latency_seconds",
            "Upstream latency: from a request's first byte to its answer's first byte "
            "(the count: answers begun).",
            monitor.upstream_latency,
        )


def metrics_app(agent: Agent) -> ASGIApp:
    """The ASGI app served on ``--metrics-bind``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))

    async def app(
        scope: MutableMapping[str, Any],
        receive: Any,
        send: Any,
    ) -> None:
        if scope["type"] == "lifespan":  # nothing to set up or tear down
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":  # (a WebSocket: hypercorn answers 403 to a refusal)
            await send({"type": "websocket.close", "code": 1008})
            return
        path, method = scope["path"], scope["method"]
        headers: list[tuple[bytes, bytes]]
        if path not in ("/metrics", "/status"):
            status, body = 404, _error("not_found", "this agent serves GET /metrics and /status")
            headers = [(b"content-type", b"application/json")]
        elif method not in ("GET", "HEAD"):
            status, body = 405, _error("method_not_allowed", f"{path} answers GET and HEAD")
            headers = [(b"content-type", b"application/json"), (b"allow", b"GET, HEAD")]
        elif path == "/metrics":
            status, body = 200, generate_latest(registry)
            headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]
        else:
            status, body = 200, json.dumps(status_json(agent), indent=2).encode() + b"\n"
            headers = [(b"content-type", b"application/json")]
        headers += [(b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return app


def _error(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode() + b"\n"
