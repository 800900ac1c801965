"""End to end with the real executables: ``revconn-agent serve --metrics-bind``
(GET /metrics, GET /status) and ``revconn-agent status``, as a user meets them:
an online agent, a gateway restart, an agent nobody runs, bad flags."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ._procs import Proc, executable, free_port
from .test_e2e import SECRET, eventually, start_agent, start_gateway
from .test_e2e_web import start_upstream

pytestmark = pytest.mark.e2e

BACKOFF = ("--backoff-min", "0.2", "--backoff-max", "1")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def status(target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """``revconn-agent status --agent TARGET``, with no REVCONN_* from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVCONN_")}
    return subprocess.run(
        [*executable("revconn-agent"), "status", "--agent", target, *extra],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def status_json(port: int) -> dict[str, object]:
    done = status(f"127.0.0.1:{port}", "--json")
    assert done.returncode in (0, 5), done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def metrics(port: int) -> Samples:
    """GET /metrics, parsed as a Prometheus scraper would."""
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def table(text: str) -> dict[str, str]:
    """``revconn-agent status``'s rows: label -> value."""
    rows = {}
    for line in text.splitlines():
        label, _, rest = line.partition("  ")
        rows[label.strip()] = rest.strip()
    return rows


def metrics_agent(procs: list[Proc], url: str, name: str, *extra: str) -> tuple[Proc, int]:
    port = free_port()
    agent = start_agent(procs, url, name, "--metrics-bind", f"127.0.0.1:{port}", *extra)
    agent.wait_for(rf"metrics on http://127\.0\.0\.1:{port}/metrics")
    return agent, port


def assert_stops_cleanly(agent: Proc) -> None:
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0, agent.stderr
    lines = agent.stderr.strip().splitlines()
    assert lines[-1].endswith("offline: stopped"), agent.stderr
    assert "Traceback" not in agent.stderr
    assert SECRET not in agent.stdout + agent.stderr


def test_an_online_agent_status_and_metrics(procs: list[Proc]) -> None:
    upstream = start_upstream(procs)
    _, url, _ = start_gateway(procs)
    agent, port = metrics_agent(procs, url, "mon", "--upstream", upstream)
    agent.wait_for(rf"online: {url}/a/mon/ \(agent 'mon'\)")

    done = status(f"127.0.0.1:{port}")
    assert done.returncode == 0, done.stderr
    rows = table(done.stdout)
    assert rows["agent"].startswith("mon (revconn-agent ")
    assert rows["state"].startswith("online")
    assert rows["public"] == f"{url}/a/mon/"
    assert rows["gateway"] == url
    assert rows["upstream"] == upstream
    assert rows["sessions"].startswith("1 up (0 reconnects)")
    # The URL form of --agent reads the same.
    assert status(f"http://127.0.0.1:{port}/").returncode == 0

    n = 5
    for i in range(n):
        r = httpx.get(f"{url}/a/mon/echo/{i}", timeout=5)
        assert r.status_code == 200
        assert r.json()["raw_path"] == f"/echo/{i}"
    answer = status_json(port)
    assert answer["state"] == "online"
    assert answer["public_urls"] == [f"{url}/a/mon/"]
    assert (answer["connects"], answer["reconnects"], answer["disconnects"]) == (1, 0, {})
    # The gateway pools its tunnel streams (one kept-alive upstream connection
    # each): n requests in turn ride on 1..n streams, idle ones stay open.
    assert answer["answers"] == n, answer
    streams, open_now = answer["streams"], answer["streams_open"]
    assert isinstance(streams, int) and isinstance(open_now, int)
    assert 1 <= streams <= n and 0 <= open_now <= streams, answer
    assert answer["upstream_unreachable"] == 0

    samples = metrics(port)
    assert value(samples, "revconn_tunnel_up") == 1
    assert value(samples, "revconn_tunnel_state", state="online") == 1
    assert value(samples, "revconn_tunnel_state", state="retrying") == 0
    assert value(samples, "revconn_tunnel_connects_total") == 1
    assert value(samples, "revconn_tunnel_reconnects_total") == 0
    assert value(samples, "revconn_upstream_latency_seconds_count") == n  # one per exchange
    assert value(samples, "revconn_upstream_latency_seconds_bucket", le="+Inf") == n
    assert value(samples, "revconn_tunnel_streams_total") == streams
    assert value(samples, "revconn_tunnel_streams_open") == open_now
    assert value(samples, "revconn_upstream_unreachable_total") == 0
    assert 1 <= value(samples, "revconn_upstream_connect_seconds_count") <= n
    info = [key for key in samples if key[0] == "revconn_agent_info"]
    assert len(info) == 1 and dict(info[0][1])["name"] == "mon"
    assert SECRET not in httpx.get(f"http://127.0.0.1:{port}/status").text

    assert_stops_cleanly(agent)


def test_status_follows_a_gateway_restart(procs: list[Proc]) -> None:
    upstream = start_upstream(procs)
    gw_port, admin_port = free_port(), free_port()
    gw, url, _ = start_gateway(procs, port=gw_port, admin_port=admin_port)
    agent, port = metrics_agent(procs, url, "phoenix", "--upstream", upstream, *BACKOFF)
    agent.wait_for("online: ")
    for i in range(2):
        assert httpx.get(f"{url}/a/phoenix/echo/{i}", timeout=5).status_code == 200

    gw.signal(signal.SIGTERM)
    assert gw.wait() == 0
    agent.wait_for(r"lost: the gateway is shutting down, retry in [\d.]+ s")
    agent.wait_for(r"failed: .*, retry in [\d.]+ s \(attempt 2\)")

    def retrying() -> bool:
        done = status(f"127.0.0.1:{port}")
        assert done.returncode == 5, (done.returncode, done.stdout, done.stderr)
        return table(done.stdout)["state"].startswith("retrying in ")

    eventually(retrying, timeout=5)
    samples = metrics(port)
    assert value(samples, "revconn_tunnel_up") == 0
    assert value(samples, "revconn_tunnel_disconnects_total", reason="gateway shutdown") == 1
    assert value(samples, "revconn_tunnel_connect_failures_total") >= 1
    # The session's streams have all closed with it.
    assert value(samples, "revconn_tunnel_streams_open") == 0
    assert 1 <= value(samples, "revconn_tunnel_streams_total") <= 2
    answer = status_json(port)
    assert answer["state"] in ("retrying", "connecting")
    assert answer["public_urls"] == []
    assert answer["disconnects"] == {"gateway shutdown": 1}
    assert answer["last_error"]

    start_gateway(procs, port=gw_port, admin_port=admin_port)
    eventually(lambda: agent.count(r"online: .*\(agent 'phoenix'\)") == 2, timeout=10)
    done = status(f"127.0.0.1:{port}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert table(done.stdout)["sessions"].startswith("2 up (1 reconnects)")
    samples = metrics(port)
    assert value(samples, "revconn_tunnel_up") == 1
    assert value(samples, "revconn_tunnel_connects_total") == 2
    assert value(samples, "revconn_tunnel_reconnects_total") == 1
    assert status_json(port)["reconnects"] == 1
    assert httpx.get(f"{url}/a/phoenix/echo/again", timeout=5).status_code == 200

    assert_stops_cleanly(agent)


def test_status_of_no_agent_names_metrics_bind() -> None:
    done = status(f"127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "cannot reach" in done.stderr
    assert "--metrics-bind" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "did not answer HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "did not answer JSON"),
    ],
)
def test_status_of_something_else_says_so_without_a_traceback(answer: bytes, says: str) -> None:
    """--agent pointed at another service's port (an SSH daemon, a web server)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(10)
        port = server.getsockname()[1]
        with subprocess.Popen(
            [*executable("revconn-agent"), "status", "--agent", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(answer)
            out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1, err
    assert (out, says in err, "Traceback" in err) == ("", True, False), err
    assert "--metrics-bind" in err


def test_metrics_bind_on_a_port_in_use_is_a_clear_error(procs: list[Proc]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = start_agent(
            procs, "http://127.0.0.1:9", "busy", "--metrics-bind", f"127.0.0.1:{port}"
        )
        assert agent.wait() == 1  # a FatalError, like a --listen port in use
    assert f"cannot listen on 127.0.0.1:{port} (--metrics-bind)" in agent.stderr
    assert "Traceback" not in agent.stderr
    assert "connecting to" not in agent.stderr  # refused before dialing


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--metrics-bind", "nonsense"), "--metrics-bind 'nonsense': expected HOST:PORT"),
        (("--metrics-bind", "127.0.0.1:99999"), "--metrics-bind '127.0.0.1:99999': the port"),
    ],
    ids=["malformed", "port-out-of-range"],
)
def test_bad_metrics_bind_exits_2(procs: list[Proc], extra: tuple[str, ...], message: str) -> None:
    agent = start_agent(procs, "http://127.0.0.1:9", "bad", *extra)
    assert agent.wait() == 2
    assert message in agent.stderr
    assert "Traceback" not in agent.stderr


def test_no_tunnel_with_metrics_bind_exits_2(procs: list[Proc]) -> None:
    args = [*executable("revconn-agent"), "serve", "--no-tunnel", "--app", "tests.upstream_app:app"]
    agent = Proc([*args, "--metrics-bind", f"127.0.0.1:{free_port()}"])
    procs.append(agent)
    assert agent.wait() == 2
    assert "--no-tunnel and --metrics-bind do not go together" in agent.stderr
    assert "Traceback" not in agent.stderr


def test_metrics_endpoint_refuses_other_methods_and_paths(procs: list[Proc]) -> None:
    """No gateway at all: the agent retries, and still answers (status exit 5)."""
    agent, port = metrics_agent(procs, f"http://127.0.0.1:{free_port()}", "lonely", *BACKOFF)
    base = f"http://127.0.0.1:{port}"
    for path in ("/metrics", "/status"):
        r = httpx.post(f"{base}{path}", content=b"x", timeout=5)
        assert r.status_code == 405
        assert r.headers["content-type"] == "application/json"
        assert r.headers["allow"] == "GET, HEAD"
        assert r.json()["error"] == "method_not_allowed"
        head = httpx.head(f"{base}{path}", timeout=5)
        assert (head.status_code, head.content) == (200, b"")
    for path in ("/", "/nope", "/metrics/x"):
        r = httpx.get(f"{base}{path}", timeout=5)
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"] == "not_found"
    agent.wait_for(r"failed: cannot reach the gateway.*, retry in [\d.]+ s")
    done = status(f"127.0.0.1:{port}")
    assert done.returncode == 5
    assert table(done.stdout)["state"].split()[0] in ("retrying", "connecting")
    assert value(metrics(port), "revconn_tunnel_up") == 0
    assert_stops_cleanly(agent)
