"""What an agent knows about itself: its state and counters (``monitor.py``),
the story its log tells, and ``--metrics-bind``'s /metrics and /status
(``metrics.py``), tested without sockets where they need none."""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

import revconn
from revconn import Agent, AgentConfig, Backoff, ConnectionLost, Heartbeat, HeartbeatTimeout, _codes
from revconn._agent.metrics import metrics_app, status_json
from revconn._agent.monitor import (
    DISCONNECT_REASONS,
    AgentMonitor,
    FirstByteTimer,
    disconnect_reason,
)
from revconn._errors import RemoteProtocolError, ReplacedError
from revconn._runtime.tunnel import TunnelEnd
from revconn._stats import DURATION_BUCKETS, Histogram

from .._gateway_helpers import SECRET, running_gateway

# -- disconnect reasons: a bounded label set ---------------------------------------


@pytest.mark.parametrize(
    ("end", "reason"),
    [
        (TunnelEnd(_codes.WS_GOING_AWAY, _codes.REASON_SHUTDOWN, None, by_peer=False), "stopped"),
        (
            TunnelEnd(
                _codes.WS_GOING_AWAY,
                _codes.REASON_SHUTDOWN,
                ConnectionLost("peer is shutting down", close_code=_codes.WS_GOING_AWAY),
                by_peer=True,
            ),
            "gateway shutdown",
        ),
        (
            TunnelEnd(
                _codes.WS_TIMEOUT,
                _codes.REASON_HEARTBEAT,
                HeartbeatTimeout("no PING acknowledgement within 10 s"),
                by_peer=False,
            ),
            "heartbeat timeout",
        ),
        (
            TunnelEnd(_codes.WS_NORMAL, "socket closed", ConnectionLost("boom"), by_peer=True),
            "connection lost",
        ),
        (TunnelEnd(_codes.WS_NORMAL, "bye", None, by_peer=True), "closed"),
        (
            TunnelEnd(
                _codes.WS_REPLACED,
                "",
                ConnectionLost("replaced", close_code=_codes.WS_REPLACED),
                by_peer=True,
            ),
            "replaced",
        ),
        (TunnelEnd(_codes.WS_REVOKED, _codes.REASON_REVOKED, None, by_peer=True), "revoked"),
        (
            TunnelEnd(_codes.WS_CREDENTIAL_EXPIRED, "", ConnectionLost("x"), by_peer=True),
            "credential expired",
        ),
        (
            TunnelEnd(
                1002, _codes.REASON_PROTOCOL, RemoteProtocolError("bad frame"), by_peer=False
            ),
            "protocol error",
        ),
    ],
)
def test_every_session_end_maps_to_one_counted_reason(end: TunnelEnd, reason: str) -> None:
    assert disconnect_reason(end) == reason
    assert reason in DISCONNECT_REASONS


# -- the monitor's state and counters -----------------------------------------------


def test_monitor_follows_the_connection() -> None:
    now = [1000.0]
    monitor = AgentMonitor(clock=lambda: now[0])
    assert (monitor.state, monitor.state_since, monitor.connects) == ("connecting", 1000.0, 0)
    monitor.failed("cannot reach the gateway")
    now[0] = 1001.0
    monitor.enter("retrying", retry_in=2.5)
    assert (monitor.state, monitor.retry_at, monitor.connect_failures) == ("retrying", 1003.5, 1)
    monitor.enter("connecting")
    assert monitor.retry_at is None
    monitor.online(["https://gw.example/a/laptop/"])
    assert (monitor.state, monitor.public_urls, monitor.reconnects) == (
        "online",
        ["https://gw.example/a/laptop/"],
        0,
    )
    monitor.lost("heartbeat timeout", "heartbeat timeout (no PING acknowledgement within 10 s)")
    monitor.enter("retrying", retry_in=1.0)
    assert monitor.public_urls == []  # only while online
    monitor.online(["https://gw.example/a/laptop/"])
    monitor.lost("gateway shutdown", "the gateway is shutting down")
    monitor.lost("gateway shutdown", "the gateway is shutting down")
    assert (monitor.connects, monitor.reconnects) == (2, 1)
    assert monitor.disconnects == {"heartbeat timeout": 1, "gateway shutdown": 2}
    assert monitor.last_error == "the gateway is shutting down"


async def test_first_byte_timer_measures_each_exchange_from_its_first_request_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    histogram = Histogram(DURATION_BUCKETS)
    timer = FirstByteTimer(histogram)
    timer.answer_bytes(b"HTTP/1.1 200 OK\r\n")  # nothing asked yet: nothing measured
    await trio.sleep(1.0)
    timer.request_bytes()  # t=1: the head
    await trio.sleep(0.5)
    timer.request_bytes()  # t=1.5: the body; the exchange began at 1
    await trio.sleep(0.25)
    timer.answer_bytes(b"HTTP/1.1 200 OK\r\n")  # t=1.75: first answer byte
    await trio.sleep(0.25)
    timer.answer_bytes(b"body")  # the rest of the answer: not a new exchange
    timer.request_bytes()  # t=2: the next request on the same stream
    await trio.sleep(0.01)
    timer.answer_bytes(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert histogram.count == 2
    assert histogram.sum == pytest.approx(0.75 + 0.01)
    index = DURATION_BUCKETS.index(0.01)
    assert histogram.counts[index] == 1  # 0.01 s lands in the <= 0.01 bucket
    assert histogram.counts[DURATION_BUCKETS.index(1.0)] == 1


async def test_first_byte_timer_stops_at_a_switch_to_websocket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    histogram = Histogram(DURATION_BUCKETS)
    timer = FirstByteTimer(histogram)
    timer.request_bytes()
    await trio.sleep(0.2)
    timer.answer_bytes(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    for _ in range(3):  # WebSocket frames both ways: not requests and answers
        timer.request_bytes()
        await trio.sleep(1.0)
        timer.answer_bytes(b"\x81\x05hello")
    assert (histogram.count, histogram.sum) == (1, pytest.approx(0.2))


# -- /metrics and /status -----------------------------------------------------------


def probe_agent(**config: Any) -> Agent:
    return Agent(
        AgentConfig(
            gateway="https://gw.example/revconn",
            name="probe",
            secret=SECRET,
            upstream="http://127.0.0.1:3000/prefix",
            **config,
        )
    )


async def call(app: Any, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    await app(scope, receive, send)
    start, body = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, body["body"]


async def test_status_names_the_agent_its_state_and_counters_but_no_secret() -> None:
    agent = probe_agent()
    agent.monitor.online(["https://gw.example/a/probe/"])
    agent.monitor.lost("heartbeat timeout", "heartbeat timeout (no PING acknowledgement)")
    agent.monitor.online(["https://gw.example/a/probe/"])
    agent.monitor.streams = 7
    agent.monitor.streams_open = 2
    agent.monitor.upstream_latency.observe(0.5)
    status, headers, body = await call(metrics_app(agent), "GET", "/status")
    assert (status, headers["content-type"]) == (200, "application/json")
    answer = json.loads(body)
    assert answer == status_json(agent) | {"retry_in_s": None}
    assert {k: answer[k] for k in ("name", "mode", "gateway", "upstream", "state")} == {
        "name": "probe",
        "mode": "tunnel",
        "gateway": "https://gw.example/revconn",
        "upstream": "http://127.0.0.1:3000/prefix",
        "state": "online",
    }
    assert (answer["connects"], answer["reconnects"], answer["disconnects"]) == (
        2,
        1,
        {"heartbeat timeout": 1},
    )
    assert (answer["streams"], answer["streams_open"], answer["answers"]) == (7, 2, 1)
    assert answer["public_urls"] == ["https://gw.example/a/probe/"]
    assert SECRET not in body.decode()


async def test_metrics_are_prometheus_text_read_at_scrape_time() -> None:
    agent = probe_agent()
    app = metrics_app(agent)

    async def scrape() -> dict[str, float]:
        status, headers, body = await call(app, "GET", "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=")
        return {
            sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    before = await scrape()
    assert before["revconn_tunnel_up{}"] == 0
    assert before['revconn_tunnel_state{"state": "connecting"}'] == 1
    info = 'revconn_agent_info{"mode": "tunnel", "name": "probe", "version": "%s"}'
    assert before[info % revconn.__version__] == 1
    agent.monitor.online([])
    agent.monitor.lost("gateway shutdown", "the gateway is shutting down")
    agent.monitor.online([])
    agent.monitor.upstream_latency.observe(0.02)
    agent.monitor.rtt.observe(0.003)
    after = await scrape()
    assert after["revconn_tunnel_up{}"] == 1
    assert after['revconn_tunnel_state{"state": "online"}'] == 1
    assert after['revconn_tunnel_state{"state": "connecting"}'] == 0
    assert after["revconn_tunnel_connects_total{}"] == 2
    assert after["revconn_tunnel_reconnects_total{}"] == 1
    assert after['revconn_tunnel_disconnects_total{"reason": "gateway shutdown"}'] == 1
    assert after["revconn_upstream_latency_seconds_count{}"] == 1
    assert after['revconn_upstream_latency_seconds_bucket{"le": "0.025"}'] == 1
    assert after['revconn_upstream_latency_seconds_bucket{"le": "0.01"}'] == 0
    assert after["revconn_tunnel_heartbeat_rtt_seconds_sum{}"] == pytest.approx(0.003)


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("POST", "/metrics", 405, "method_not_allowed"),
        ("DELETE", "/status", 405, "method_not_allowed"),
        ("GET", "/", 404, "not_found"),
        ("GET", "/status/../metrics", 404, "not_found"),
    ],
)
async def test_anything_else_gets_a_json_reason(
    method: str, path: str, status: int, error: str
) -> None:
    got, headers, body = await call(metrics_app(probe_agent()), method, path)
    assert (got, headers["content-type"], json.loads(body)["error"]) == (
        status,
        "application/json",
        error,
    )
    if status == 405:
        assert headers["allow"] == "GET, HEAD"


async def test_head_answers_the_headers_without_the_body() -> None:
    status, headers, body = await call(metrics_app(probe_agent()), "HEAD", "/status")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 0


# -- the story the log tells -----------------------------------------------------------


def story(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "revconn.agent" and r.levelno >= logging.INFO
    ]


async def test_the_log_tells_connecting_online_lost_failed_and_offline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Real sockets, exact delays (the jitter draw is 0: every delay is the minimum)."""
    caplog.set_level(logging.INFO, logger="revconn.agent")
    async with trio.open_nursery() as nursery:
        async with running_gateway(Heartbeat(15, 10)) as gw:
            config = AgentConfig(
                gateway=gw.url,
                name="story",
                secret=SECRET,
                upstream="http://127.0.0.1:9",
                backoff=Backoff(0.25, 0.25),
            )
            agent = Agent(config, uniform01=lambda: 0.0)
            nursery.start_soon(agent.run)
            with trio.fail_after(5):
                await agent.connected.wait()
            assert agent.monitor.state == "online"
        # the gateway has shut down: lost, then attempts that fail
        with trio.fail_after(5):
            while agent.monitor.connect_failures < 1:
                await trio.sleep(0.01)
        assert agent.monitor.state in ("retrying", "connecting")
        assert agent.monitor.disconnects == {"gateway shutdown": 1}
        agent.stop()
    url = f"{gw.url.replace('http://', 'ws://')}/ws/connect"
    lines = story(caplog)
    assert lines[:5] == [
        f"connecting to {url} as 'story'",
        f"online: {gw.url}/a/story/ (agent 'story')",
        "lost: the gateway is shutting down, retry in 0.25 s",
        f"connecting to {url} as 'story'",
        f"failed: cannot reach the gateway at {url}: "
        + lines[4].split(": ", 3)[-1].split(", retry in")[0]
        + ", retry in 0.25 s (attempt 2)",
    ]
    assert lines[-1] == "offline: stopped"
    assert agent.monitor.state == "stopped"


async def test_a_fatal_end_is_told_once_and_not_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="revconn.agent")
    async with running_gateway(Heartbeat(15, 10)) as gw:
        config = AgentConfig(
            gateway=gw.url, name="twin", secret=SECRET, upstream="http://127.0.0.1:9"
        )
        first, second = Agent(config), Agent(config)

        async def first_is_replaced() -> None:
            with pytest.raises(ReplacedError):
                await first.run()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_is_replaced)
            with trio.fail_after(5):
                await first.connected.wait()
            nursery.start_soon(second.run)
            with trio.fail_after(5):
                await second.connected.wait()
                while first.monitor.state != "stopped":
                    await trio.sleep(0.01)
            second.stop()
    replaced = [line for line in story(caplog) if line.startswith("offline: replaced")]
    assert replaced == ["offline: replaced: another agent connected with the same name"]
    assert not any(line.startswith("lost: ") for line in story(caplog))
    assert first.monitor.disconnects == {"replaced": 1}
    assert first.monitor.last_error == "replaced: another agent connected with the same name"
