"""End to end: the real revconn-gateway and revconn-agent executables on 127.0.0.1."""

from __future__ import annotations

import re
import signal
import stat
import time
from pathlib import Path

import httpx
import pytest

from ._procs import Proc, executable, free_port

pytestmark = pytest.mark.e2e

SECRET = "e2e-secret-abcdefghijklmnop"
FAST_HB = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "0.5"]
UPSTREAM = "http://127.0.0.1:9"  # discard: nothing here sends requests through


def start_gateway(
    procs: list[Proc],
    *extra: str,
    port: int = 0,
    admin_port: int = 0,
    secret: str | None = SECRET,
) -> tuple[Proc, str, str]:
    """A gateway; returns it, its data plane's URL (agents dial it) and its
    admin URL (/endpoints)."""
    args = [
        *executable("revconn-gateway"),
        "--bind",
        f"127.0.0.1:{port}",
        "--admin-bind",
        f"127.0.0.1:{admin_port}",
        *extra,
    ]
    env = {"REVCONN_SECRET": secret} if secret is not None else {}
    gw = Proc(args, env)
    procs.append(gw)
    url = gw.wait_for(r"listening on (http://127\.0\.0\.1:\d+)", stream="out").group(1)
    admin = gw.wait_for(r"admin API on (http://127\.0\.0\.1:\d+)", stream="out").group(1)
    return gw, url, admin


def start_agent(procs: list[Proc], url: str, name: str, *extra: str, secret: str = SECRET) -> Proc:
    if "--upstream" not in extra and "--app" not in extra:
        extra = (*extra, "--upstream", UPSTREAM)  # an agent needs something to serve
    args = [*executable("revconn-agent"), "serve", "--gateway", url, "--name", name, *extra]
    agent = Proc(args, {"REVCONN_SECRET": secret})
    procs.append(agent)
    return agent


def endpoints(url: str) -> list[dict[str, object]]:
    r = httpx.get(f"{url}/endpoints", headers={"Authorization": f"Bearer {SECRET}"})
    assert r.status_code == 200
    rows: list[dict[str, object]] = r.json()["endpoints"]
    return rows


def names(url: str) -> list[object]:
    return [row["name"] for row in endpoints(url)]


def eventually(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_verification_steps(procs: list[Proc]) -> None:
    """The original checklist: healthz, connect, online, gone after stop."""
    gw, url, admin = start_gateway(procs)
    # (1) healthz
    r = httpx.get(f"{url}/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    # (2) serve starts and the WebSocket is established
    agent = start_agent(procs, url, "laptop", "--upstream", "http://127.0.0.1:9")
    agent.wait_for(r"\(agent 'laptop'\)")
    # (3) /endpoints lists it online
    eventually(lambda: names(admin) == ["laptop"])
    (row,) = endpoints(admin)
    assert row["status"] == "online"
    assert row["transport"] == "websocket"
    # (4) after serve stops it is gone at once
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0
    assert names(admin) == []
    gw.wait_for(r"agent 'laptop' offline")
    # The secret never appears in the agent's output.
    assert SECRET not in agent.stdout + agent.stderr
    # Gateway exits 0 on SIGTERM.
    gw.signal(signal.SIGTERM)
    assert gw.wait() == 0


def test_killed_agent_disappears_at_once(procs: list[Proc]) -> None:
    _, url, admin = start_gateway(procs)
    agent = start_agent(procs, url, "victim")
    agent.wait_for("online: ")
    eventually(lambda: names(admin) == ["victim"])
    agent.popen.kill()
    agent.wait()
    eventually(lambda: names(admin) == [], timeout=2)


def test_agent_retries_with_growing_delays_until_gateway_is_up(procs: list[Proc]) -> None:
    port, admin_port = free_port(), free_port()
    url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    agent = start_agent(procs, url, "patient", "--backoff-min", "0.2", "--backoff-max", "1.6")
    eventually(lambda: agent.count("retry in") >= 4, timeout=15)
    delays = [float(d) for d in re.findall(r"retry in ([\d.]+) s", agent.stderr)]
    caps = [0.4, 0.8, 1.6, 1.6, 1.6, 1.6, 1.6, 1.6]  # min * 2 ** (n + 1), capped at max
    assert all(0.2 <= d <= cap + 0.005 for d, cap in zip(delays, caps, strict=False)), delays
    assert "cannot reach the gateway" in agent.stderr
    start_gateway(procs, port=port, admin_port=admin_port)
    agent.wait_for(r"\(agent 'patient'\)", timeout=10)
    eventually(lambda: names(admin) == ["patient"])


def test_gateway_restart_agent_reconnects(procs: list[Proc]) -> None:
    port, admin_port = free_port(), free_port()
    gw, url, admin = start_gateway(procs, port=port, admin_port=admin_port)
    agent = start_agent(procs, url, "sticky", "--backoff-min", "0.2", "--backoff-max", "1")
    agent.wait_for("online: ")
    gw.signal(signal.SIGTERM)
    assert gw.wait() == 0
    agent.wait_for(r"lost: the gateway is shutting down, retry in [\d.]+ s")
    agent.wait_for(r"retry in")
    start_gateway(procs, port=port, admin_port=admin_port)
    eventually(lambda: agent.count(r"\(agent 'sticky'\)") == 2)
    eventually(lambda: names(admin) == ["sticky"])


def test_replacement_older_agent_exits_with_replaced(procs: list[Proc]) -> None:
    gw, url, admin = start_gateway(procs)
    first = start_agent(procs, url, "twin")
    first.wait_for("online: ")
    second = start_agent(procs, url, "twin")
    second.wait_for("online: ")
    assert first.wait() == 4
    assert "replaced" in first.stderr
    time.sleep(0.5)
    assert second.popen.poll() is None  # the newer one stays, no fight
    assert gw.popen.poll() is None, gw.stderr
    (row,) = endpoints(admin)
    assert row["name"] == "twin"


def test_wrong_secret_exits_non_zero_without_retry(procs: list[Proc]) -> None:
    _, url, admin = start_gateway(procs)
    agent = start_agent(procs, url, "intruder", secret="wrong-secret-wrong-secret")
    assert agent.wait() == 3
    assert "rejected the credentials" in agent.stderr
    assert "retry" not in agent.stderr
    assert "wrong-secret-wrong-secret" not in agent.stderr + agent.stdout
    assert names(admin) == []


@pytest.mark.parametrize("name", ["Bad_Name", "-x", "a" * 64])
def test_invalid_name_is_refused_before_dialing(procs: list[Proc], name: str) -> None:
    _, url, _ = start_gateway(procs)
    agent = start_agent(procs, url, name)
    assert agent.wait() == 2
    assert "lowercase DNS label" in agent.stderr
    assert "Traceback" not in agent.stderr


@pytest.mark.parametrize(
    ("gateway", "message"),
    [("ftp://x", "must start with"), ("http://", "no host"), ("http://h:99999", "malformed")],
)
def test_bad_gateway_url_is_a_clear_cli_error(
    procs: list[Proc], gateway: str, message: str
) -> None:
    agent = start_agent(procs, gateway, "ok")
    assert agent.wait() == 2
    assert message in agent.stderr
    assert "Traceback" not in agent.stderr


def test_half_open_agent_dropped_after_heartbeat_timeout(procs: list[Proc]) -> None:
    """A frozen agent process (SIGSTOP) stops answering PINGs: dropped within interval+timeout."""
    _, url, admin = start_gateway(procs, *FAST_HB)
    agent = start_agent(procs, url, "frozen")
    agent.wait_for("online: ")
    eventually(lambda: names(admin) == ["frozen"])
    agent.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    eventually(lambda: names(admin) == [], timeout=5)
    assert time.monotonic() - stopped_at < 2.5
    # Thawed, it notices and comes back on its own.
    agent.signal(signal.SIGCONT)
    eventually(lambda: names(admin) == ["frozen"], timeout=10)


def test_agent_leaves_silent_gateway(procs: list[Proc]) -> None:
    """A frozen gateway (half-open from the agent's view): the agent redials."""
    gw, url, _ = start_gateway(procs)
    agent = start_agent(procs, url, "watchful", *FAST_HB, "--backoff-min", "0.2")
    agent.wait_for("online: ")
    gw.signal(signal.SIGSTOP)
    try:
        agent.wait_for(r"lost: heartbeat timeout \(no PING acknowledgement", timeout=5)
        agent.wait_for(r"retry in", timeout=5)
    finally:
        gw.signal(signal.SIGCONT)
    eventually(lambda: agent.count(r"\(agent 'watchful'\)") >= 2, timeout=15)


def test_gateway_generates_secret_when_none_given(procs: list[Proc], tmp_path: Path) -> None:
    """Kept 0600 in --state-dir, so that a restart keeps it (agents keep working)."""
    state = tmp_path / "state"
    gw, _, admin = start_gateway(procs, "--state-dir", str(state), secret=None)
    kept = gw.wait_for(r"generated a secret, kept in (\S+) \(0600\)", stream="out").group(1)
    assert kept == str(state / "secret")
    generated = (state / "secret").read_text().strip()
    assert len(generated) >= 32
    assert generated not in gw.stdout + gw.stderr  # never printed: stdout is the journal
    gw.wait_for(rf"Bearer \$\(cat {state / 'secret'}\)", stream="out")
    assert stat.S_IMODE((state / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    r = httpx.get(f"{admin}/endpoints", headers={"Authorization": f"Bearer {generated}"})
    assert r.status_code == 200
    gw.signal(signal.SIGTERM)
    assert gw.wait() == 0
    again, _, admin = start_gateway(procs, "--state-dir", str(state), secret=None)
    again.wait_for(rf"using the secret kept in {state / 'secret'}", stream="out")
    assert generated not in again.stdout  # shown once only
    r = httpx.get(f"{admin}/endpoints", headers={"Authorization": f"Bearer {generated}"})
    assert r.status_code == 200
    (state / "secret").chmod(0o644)
    refused = Proc([*executable("revconn-gateway"), "--state-dir", str(state)])
    procs.append(refused)
    assert refused.wait() == 2
    assert "is accessible to other users (mode 0644)" in refused.stderr


def test_gateway_refuses_empty_or_weak_secret(procs: list[Proc], tmp_path: object) -> None:
    gw = Proc([*executable("revconn-gateway"), "--bind", "127.0.0.1:0"], {"REVCONN_SECRET": ""})
    procs.append(gw)
    assert gw.wait() == 2
    assert "secret is empty" in gw.stderr
    gw2 = Proc([*executable("revconn-gateway"), "--bind", "127.0.0.1:0", "--secret", "short"])
    procs.append(gw2)
    assert gw2.wait() == 2
    assert "too short" in gw2.stderr


def test_gateway_bad_bind_is_a_clear_error(procs: list[Proc]) -> None:
    for bind, message in [("nonsense", "expected HOST:PORT"), ("127.0.0.1:http", "not a number")]:
        gw = Proc([*executable("revconn-gateway"), "--bind", bind], {"REVCONN_SECRET": SECRET})
        procs.append(gw)
        assert gw.wait() == 2
        assert message in gw.stderr
        assert "Traceback" not in gw.stderr


def test_demo_mode(procs: list[Proc]) -> None:
    gw = Proc(
        [
            *executable("revconn-gateway"),
            "--bind",
            "127.0.0.1:0",
            "--admin-bind",
            "127.0.0.1:0",
            "--demo",
        ]
    )
    procs.append(gw)
    gw.wait_for(r"listening on (http://127\.0\.0\.1:\d+)", stream="out")
    secret = gw.wait_for(r"generated secret \(shown once\): (\S+)", stream="out").group(1)
    admin = gw.wait_for(r"admin API on (http://127\.0\.0\.1:\d+)", stream="out").group(1)
    gw.wait_for(r"curl -H \"Authorization: Bearer ", stream="out")

    def demo_online() -> bool:
        r = httpx.get(f"{admin}/endpoints", headers={"Authorization": f"Bearer {secret}"})
        return [row["name"] for row in r.json()["endpoints"]] == ["demo"]

    eventually(demo_online)
    gw.signal(signal.SIGINT)
    assert gw.wait() == 0


def test_repeated_replacement_keeps_gateway_alive(procs: list[Proc]) -> None:
    """Simultaneous closes on replacement (both sides closing at once) must leave
    the gateway serving (they once crashed its connection handler)."""
    gw, url, admin = start_gateway(procs)
    previous = None
    for _ in range(6):
        agent = start_agent(procs, url, "flappy")
        agent.wait_for("online: ")
        if previous is not None:
            assert previous.wait() == 4
        previous = agent
        assert gw.popen.poll() is None, gw.stderr
    (row,) = endpoints(admin)
    assert row["flapping"] is True
    assert "flapping" in gw.stderr
