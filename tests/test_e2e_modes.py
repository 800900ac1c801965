"""End to end, the agent's other modes with the real executables on 127.0.0.1:
announce mode (``--tunnel-url``: the gateway connects to the agent's URL) beside
tunnel mode, and ``--no-tunnel``."""

from __future__ import annotations

import datetime
import hashlib
import random
import re
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from ._procs import Proc, executable, free_port
from .test_e2e import SECRET, endpoints, eventually, names, start_agent, start_gateway
from .upstream_app import pattern

pytestmark = pytest.mark.e2e

APP = "tests.upstream_app:app"
ALLOW_LOOPBACK = ("--announce-allow", "127.0.0.0/8")
INTERVAL = 1.0
TTL = 3 * INTERVAL  # an announcement lives three intervals
BIG = 50_000_000


def start_url_agent(
    procs: list[Proc], gateway: str, name: str, tunnel_url: str, *extra: str
) -> Proc:
    """``revconn-agent serve --tunnel-url`` (announce mode), one announcement a second."""
    args = [
        *executable("revconn-agent"),
        "serve",
        "--gateway",
        gateway,
        "--name",
        name,
        "--tunnel-url",
        tunnel_url,
        "--announce-interval",
        str(INTERVAL),
        *extra,
    ]
    agent = Proc(args, {"REVCONN_SECRET": SECRET})
    procs.append(agent)
    return agent


def start_app_agent(procs: list[Proc], gateway: str, name: str) -> tuple[Proc, str]:
    """A URL agent that serves tests.upstream_app on a local port and announces
    it; returns it (once announced) and its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    agent = start_url_agent(
        procs, gateway, name, url, "--app", APP, "--listen", f"127.0.0.1:{port}"
    )
    agent.wait_for(rf"announced {re.escape(url)} as {name!r} \(ttl 3 s\)")
    return agent, url


def row(admin: str, name: str) -> dict[str, object] | None:
    found = [r for r in endpoints(admin) if r["name"] == name]
    assert len(found) <= 1, found
    return found[0] if found else None


def wall(iso: object) -> float:
    assert isinstance(iso, str), iso
    return datetime.datetime.fromisoformat(iso).timestamp()


def test_url_agent_is_listed_beside_a_websocket_agent(procs: list[Proc]) -> None:
    _, gw, admin = start_gateway(procs, *ALLOW_LOOPBACK)
    _, url = start_app_agent(procs, gw, "web")
    start_agent(procs, gw, "laptop").wait_for(r"\(agent 'laptop'\)")
    eventually(lambda: names(admin) == ["laptop", "web"], timeout=5)
    rows = {r["name"]: r for r in endpoints(admin)}
    assert len(rows) == 2  # one entry per name
    web, laptop = rows["web"], rows["laptop"]
    assert (web["transport"], web["url"], web["status"]) == ("url", url, "online")
    expires_in = wall(web["expires_at"]) - time.time()
    assert 0 < expires_in <= TTL + 0.5, web
    assert (laptop["transport"], laptop["status"]) == ("websocket", "online")
    assert laptop["url"] is None and laptop["expires_at"] is None


def test_50_mb_each_way_through_an_announced_url(procs: list[Proc]) -> None:
    _, gw, _ = start_gateway(procs, *ALLOW_LOOPBACK)
    start_app_agent(procs, gw, "web")
    seed = 7
    expected = hashlib.sha256(pattern(BIG, seed)).hexdigest()  # the pattern is dropped here
    digest, length = hashlib.sha256(), 0
    with httpx.stream("GET", f"{gw}/a/web/bytes?n={BIG}&seed={seed}", timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-length"] == str(BIG)
        for chunk in response.iter_bytes():
            digest.update(chunk)
            length += len(chunk)
    assert (length, digest.hexdigest()) == (BIG, expected)

    sent = hashlib.sha256()

    def body() -> Iterator[bytes]:
        rng = random.Random(11)
        remaining = BIG
        while remaining:
            chunk = rng.randbytes(min(remaining, 1 << 20))
            sent.update(chunk)
            remaining -= len(chunk)
            yield chunk

    response = httpx.post(f"{gw}/a/web/upload", content=body(), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json() == {"length": BIG, "sha256": sent.hexdigest()}


def test_sigterm_withdraws_at_once(procs: list[Proc]) -> None:
    _, gw, admin = start_gateway(procs, *ALLOW_LOOPBACK)
    agent, url = start_app_agent(procs, gw, "web")
    assert httpx.get(f"{gw}/a/web/bytes?n=10", timeout=10).status_code == 200
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0, agent.stderr
    exited = time.monotonic()
    eventually(lambda: row(admin, "web") is None, timeout=1.0)  # far less than the TTL
    assert time.monotonic() - exited < 1.0
    assert f"withdrew {url}" in agent.stderr
    response = httpx.get(f"{gw}/a/web/", timeout=10)
    assert response.status_code == 503
    assert response.json()["error"] == "agent_offline"


def test_sigkill_lapses_within_the_ttl(procs: list[Proc]) -> None:
    _, gw, admin = start_gateway(procs, *ALLOW_LOOPBACK)
    agent, _ = start_app_agent(procs, gw, "web")
    # Wait for a renewal to be seen, so the kill comes mid-schedule.
    first = row(admin, "web")
    assert first is not None
    eventually(
        lambda: (r := row(admin, "web")) is not None and r["expires_at"] != first["expires_at"]
    )
    agent.popen.kill()
    agent.wait()
    killed = time.monotonic()
    listed = row(admin, "web")
    assert listed is not None, "dropped at once, not after its TTL"
    # A renewal already on the wire may land just after the kill: keep the latest expiry.
    expires = wall(listed["expires_at"])
    while (current := row(admin, "web")) is not None:
        expires = max(expires, wall(current["expires_at"]))
        assert time.monotonic() - killed < TTL + 1.0, "still listed after TTL + 1 s"
        time.sleep(0.05)
    gone_wall = time.time()
    gone = time.monotonic() - killed
    last_announced = expires - TTL
    assert gone <= TTL + 1.0
    assert gone_wall - last_announced >= 1.5, (gone_wall, last_announced)
    assert expires - 0.3 <= gone_wall <= expires + 1.0, (gone_wall, expires)
    response = httpx.get(f"{gw}/a/web/", timeout=10)
    assert (response.status_code, response.json()["error"]) == (503, "agent_offline")


def test_name_held_by_a_websocket_is_refused(procs: list[Proc]) -> None:
    _, gw, admin = start_gateway(procs, *ALLOW_LOOPBACK)
    start_agent(procs, gw, "taken").wait_for(r"\(agent 'taken'\)")
    agent = start_url_agent(procs, gw, "taken", f"http://127.0.0.1:{free_port()}/")
    assert agent.wait() == 1, agent.stderr
    assert "name 'taken' is held by a websocket agent" in agent.stderr
    assert "Traceback" not in agent.stderr
    listed = row(admin, "taken")
    assert listed is not None and listed["transport"] == "websocket"


def test_websocket_agent_replaces_a_url_agent(procs: list[Proc]) -> None:
    _, gw, admin = start_gateway(procs, *ALLOW_LOOPBACK)
    url_agent = start_url_agent(procs, gw, "svc", f"http://127.0.0.1:{free_port()}/")
    url_agent.wait_for(r"announced .* as 'svc'")
    ws_agent = start_agent(procs, gw, "svc")
    ws_agent.wait_for(r"\(agent 'svc'\)")
    listed = row(admin, "svc")
    assert listed is not None and listed["transport"] == "websocket"
    assert url_agent.wait(timeout=3 * INTERVAL + 2) == 4, url_agent.stderr
    assert "replaced" in url_agent.stderr
    assert "replaced: a websocket agent connected as 'svc'" in url_agent.stderr
    time.sleep(0.2)
    assert ws_agent.popen.poll() is None
    listed = row(admin, "svc")
    assert listed is not None and listed["transport"] == "websocket"


@pytest.mark.parametrize(
    ("host", "says", "reason"),
    [("127.0.0.1:{port}", "127.0.0.1 is a", "loopback"),
     ("169.254.169.254", "169.254.169.254 is a", "link-local"),
     ("localhost:{port}", "localhost resolves to", "loopback")],
    ids=["loopback", "metadata", "localhost"],
)  # fmt: skip
def test_forbidden_urls_are_refused_without_announce_allow(
    procs: list[Proc], host: str, says: str, reason: str
) -> None:
    _, gw, admin = start_gateway(procs)
    url = f"http://{host.format(port=free_port())}/"
    agent = start_url_agent(procs, gw, "sneaky", url)
    assert agent.wait() == 2, agent.stderr
    assert "url_forbidden" in agent.stderr
    assert says in agent.stderr and reason in agent.stderr
    assert "--announce-allow" in agent.stderr
    assert "Traceback" not in agent.stderr
    assert names(admin) == []


def test_no_tunnel_serves_locally_and_registers_nothing(procs: list[Proc]) -> None:
    _, _, admin = start_gateway(procs, *ALLOW_LOOPBACK)
    port = free_port()
    agent = Proc(
        [*executable("revconn-agent"), "serve", "--no-tunnel", "--app", APP,
         "--listen", f"127.0.0.1:{port}"],
        {"REVCONN_SECRET": SECRET},
    )  # fmt: skip
    procs.append(agent)
    agent.wait_for(r"\(no tunnel: not registered with any gateway\)")
    response = httpx.get(f"http://127.0.0.1:{port}/bytes?n=100000&seed=3", timeout=10)
    assert response.status_code == 200
    assert response.content == pattern(100_000, 3)
    assert names(admin) == []
    agent.signal(signal.SIGINT)
    assert agent.wait() == 0, agent.stderr
    assert names(admin) == []
    assert "Traceback" not in agent.stderr
