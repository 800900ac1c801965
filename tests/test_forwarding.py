"""End to end forwarding: public client -> revconn-gateway -> revconn-agent -> real upstream."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from ._procs import Proc, executable
from .upstream_app import pattern

pytestmark = pytest.mark.e2e

SECRET = "fwd-secret-abcdefghijklmnop"
ROOT = Path(__file__).resolve().parent.parent


def proc_rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def start_upstream(procs: list[Proc]) -> str:
    up = Proc(
        [
            sys.executable,
            "-m",
            "hypercorn",
            "--worker-class",
            "trio",
            "--bind",
            "127.0.0.1:0",
            "tests.upstream_app:app",
        ]
    )
    procs.append(up)
    return up.wait_for(r"Running on (http://127\.0\.0\.1:\d+)").group(1)


def start_gateway(procs: list[Proc], *extra: str) -> tuple[Proc, str, str]:
    """A gateway; returns it, its admin URL (/endpoints) and its data plane's URL
    (agents dial it, public traffic goes to it)."""
    gw = Proc(
        [
            *executable("revconn-gateway"),
            "--bind",
            "127.0.0.1:0",
            "--admin-bind",
            "127.0.0.1:0",
            *extra,
        ],
        {"REVCONN_SECRET": SECRET},
    )
    procs.append(gw)
    public = gw.wait_for(r"listening on (http://127\.0\.0\.1:\d+)", stream="out").group(1)
    admin = gw.wait_for(r"admin API on (http://127\.0\.0\.1:\d+)", stream="out").group(1)
    return gw, admin, public


def start_agent(procs: list[Proc], gateway: str, name: str, *extra: str, dial: str) -> Proc:
    """An agent dialing ``dial`` (the data plane), seen online at ``gateway`` (admin)."""
    agent = Proc(
        [
            *executable("revconn-agent"),
            "serve",
            "--gateway",
            dial,
            "--name",
            name,
            *extra,
        ],
        {"REVCONN_SECRET": SECRET, "PYTHONPATH": str(ROOT)},
    )
    procs.append(agent)
    agent.wait_for(rf"\(agent '{name}'\)")
    wait_online(gateway, name)
    return agent


def wait_online(gateway: str, name: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{gateway}/endpoints", headers={"Authorization": f"Bearer {SECRET}"})
        if name in [row["name"] for row in r.json()["endpoints"]]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} not online")


@attrs.define
class Stack:
    upstream: str
    gateway: str
    public: str
    gw: Proc
    agent: Proc

    @property
    def dial(self) -> str:
        """Where agents dial: the data plane."""
        return self.public

    def url(self, path: str, name: str = "web") -> str:
        return f"{self.public}/a/{name}{path}"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """One stack (gateway, agent "web", upstream) shared by the module's tests."""
    procs: list[Proc] = []
    try:
        upstream = start_upstream(procs)
        gw, gateway, public = start_gateway(procs)
        agent = start_agent(
            procs, gateway, "web", "--upstream", upstream, "--upstream-timeout", "2", dial=public
        )
        yield Stack(upstream, gateway, public, gw, agent)
    finally:
        for p in procs:
            p.stop()


# -- routing and HTTP semantics ------------------------------------------------------------
def test_path_and_query_are_byte_exact(stack: Stack) -> None:
    r = httpx.get(stack.url("/echo/a%2Fb/%7Euser/caf%C3%A9?x=1&y=%20z&x=2&empty="))
    assert r.status_code == 200
    echo = r.json()
    assert echo["raw_path"] == "/echo/a%2Fb/%7Euser/caf%C3%A9"
    assert echo["query"] == "x=1&y=%20z&x=2&empty="


def test_prefix_without_slash_redirects(stack: Stack) -> None:
    r = httpx.get(f"{stack.public}/a/web?q=1")
    assert r.status_code == 308
    assert r.headers["location"] == "/a/web/?q=1"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_methods(stack: Stack, method: str) -> None:
    r = httpx.request(
        method,
        stack.url("/echo"),
        content=b"x" * 10 if method in ("POST", "PUT", "PATCH") else None,
    )
    assert r.status_code == 200
    assert r.json()["method"] == method


def test_head_has_headers_and_no_body(stack: Stack) -> None:
    r = httpx.head(stack.url("/bytes?n=5000"))
    assert r.status_code == 200
    assert r.headers["content-length"] == "5000"
    assert r.content == b""


@pytest.mark.parametrize("status", [200, 201, 400, 404, 418, 500, 503])
def test_status_codes_pass_through(stack: Stack, status: int) -> None:
    r = httpx.get(stack.url(f"/status/{status}"))
    assert r.status_code == status
    assert r.text == f"status {status}"


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses(stack: Stack, status: int) -> None:
    r = httpx.get(stack.url(f"/status/{status}"))
    assert r.status_code == status
    assert r.content == b""
    assert r.headers["etag"] == '"v1"'


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_pass_location_unchanged(stack: Stack, status: int) -> None:
    r = httpx.get(stack.url(f"/status/{status}"))
    assert r.status_code == status
    assert r.headers["location"] == "/elsewhere?x=%20y"


def test_response_headers_hop_by_hop_dropped_repeats_kept(stack: Stack) -> None:
    r = httpx.get(stack.url("/cookies"))
    assert r.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert r.headers["x-end-to-end"] == "yes"
    assert "x-private" not in r.headers  # named in Connection
    assert "keep-alive" not in r.headers


def test_request_headers_forwarded(stack: Stack) -> None:
    r = httpx.get(
        stack.url("/echo"),
        headers=[
            ("X-Repeat", "1"),
            ("X-Repeat", "2"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "no"),
            ("Proxy-Authorization", "Basic abc"),
            ("TE", "trailers"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-Prefix", "/spoofed"),
            ("X-Forwarded-Host", "spoofed.example"),
        ],
    )
    headers = r.json()["headers"]
    names = [k for k, _ in headers]
    values = {k: [v for kk, v in headers if kk == k] for k in names}
    assert values["x-repeat"] == ["1", "2"]
    for hop in ("x-secret-hop", "proxy-authorization", "te", "upgrade", "transfer-encoding"):
        assert hop not in values
    assert values["x-forwarded-for"] == ["127.0.0.1"]  # not a --trusted-proxy: replaced
    assert values["x-forwarded-prefix"] == ["/a/web"]
    assert values["x-forwarded-proto"] == ["http"]
    assert values["x-forwarded-host"] == [stack.public.removeprefix("http://")]
    assert values["via"] == ["1.1 revconn"]


# -- errors -----------------------------------------------------------------------------------
def test_oversized_request_head_is_refused_without_harming_the_agent(stack: Stack) -> None:
    # Larger than the agent's HTTP/2 header list limit: must never reach h2, where
    # it would be a connection error for every request of the agent.
    r = httpx.get(stack.url("/echo"), headers={"X-Big": "a" * 70_000})
    assert r.status_code in (400, 431)
    assert httpx.get(stack.url("/status/200")).status_code == 200
    assert stack.agent.count("lost: ") == 0


def test_unknown_agent_is_503_agent_offline(stack: Stack) -> None:
    t0 = time.monotonic()
    r = httpx.get(f"{stack.public}/a/nobody/x")
    assert time.monotonic() - t0 < 1
    assert r.status_code == 503
    assert r.json() == {
        "error": "agent_offline",
        "agent": "nobody",
        "detail": "agent is not connected",
    }
    assert r.headers["retry-after"] == "5"


def test_upstream_timeout_is_504(stack: Stack) -> None:
    r = httpx.get(stack.url("/slow?s=5"), timeout=10)
    assert r.status_code == 504
    assert r.json()["error"] == "upstream_timeout"
    assert r.json()["agent"] == "web"


def test_upstream_down_is_502(stack: Stack, procs: list[Proc]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    start_agent(
        procs, stack.gateway, "deadend", "--upstream", f"http://127.0.0.1:{dead}", dial=stack.dial
    )
    r = httpx.get(stack.url("/x", name="deadend"))
    assert r.status_code == 502
    assert r.json()["error"] == "upstream_unreachable"
    assert r.json()["agent"] == "deadend"


def test_agent_busy_is_503(stack: Stack, procs: list[Proc]) -> None:
    start_agent(
        procs,
        stack.gateway,
        "narrow",
        "--upstream",
        stack.upstream,
        "--max-streams",
        "2",
        dial=stack.dial,
    )

    async def run() -> list[int]:
        statuses: list[int] = []
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:

            async def one() -> None:
                r = await client.get(stack.url("/slow?s=1", name="narrow"))
                statuses.append(r.status_code)
                if r.status_code == 503:
                    assert r.json()["error"] == "agent_busy"

            for _ in range(5):
                nursery.start_soon(one)
        return statuses

    statuses = trio.run(run)
    assert statuses.count(200) == 2
    assert statuses.count(503) == 3


# -- streaming, concurrency, flow control -------------------------------------------------
def test_streaming_response_arrives_as_produced(stack: Stack) -> None:
    t0 = time.monotonic()
    arrivals = []
    with httpx.stream("GET", stack.url("/stream?n=4&interval=0.4")) as r:
        assert r.headers["content-type"] == "text/event-stream"
        for chunk in r.iter_raw():
            arrivals.append((time.monotonic() - t0, chunk))
    assert b"".join(c for _, c in arrivals) == b"".join(f"data: {i}\n\n".encode() for i in range(4))
    assert arrivals[0][0] < 0.35  # the first event did not wait for the end (~1.6 s)
    assert arrivals[-1][0] > 1.1


def test_hundred_concurrent_slow_requests_take_about_one_second(stack: Stack) -> None:
    async def run() -> tuple[float, list[int]]:
        statuses: list[int] = []
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=20, limits=limits) as client:
            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(100):

                    async def one() -> None:
                        r = await client.get(stack.url("/slow?s=1"))
                        statuses.append(r.status_code)

                    nursery.start_soon(one)
            return trio.current_time() - t0, statuses

    elapsed, statuses = trio.run(run)
    assert statuses == [200] * 100
    assert elapsed < 4.0  # sequential would be 100 s


def test_large_download_byte_exact_with_bounded_memory(stack: Stack) -> None:
    n = 128 * 1024 * 1024
    expected = hashlib.sha256(pattern(n, 7)).hexdigest()
    agent_pid = stack.agent.popen.pid
    gw_pid = stack.gw.popen.pid
    before = proc_rss_kib(gw_pid) + proc_rss_kib(agent_pid)
    digest = hashlib.sha256()
    peak = before
    with httpx.stream("GET", stack.url(f"/bytes?n={n}&seed=7"), timeout=60) as r:
        assert r.status_code == 200
        for i, chunk in enumerate(r.iter_raw()):
            digest.update(chunk)
            if i % 200 == 0:
                peak = max(peak, proc_rss_kib(gw_pid) + proc_rss_kib(agent_pid))
    assert digest.hexdigest() == expected
    assert (peak - before) / 1024 < 60, f"RSS grew by {(peak - before) / 1024:.1f} MiB"


def test_large_upload_byte_exact(stack: Stack) -> None:
    n = 100 * 1024 * 1024
    data = pattern(n, 11)

    def chunks() -> Iterator[bytes]:
        view = memoryview(data)
        for i in range(0, n, 1 << 20):
            yield bytes(view[i : i + (1 << 20)])

    r = httpx.post(stack.url("/upload"), content=chunks(), timeout=60)
    assert r.status_code == 200
    assert r.json() == {"length": n, "sha256": hashlib.sha256(data).hexdigest()}


def test_stalled_reader_does_not_slow_others(stack: Stack) -> None:
    host, port = stack.public.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)))
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /a/web/bytes?n=500000000&seed=3 HTTP/1.1\r\nHost: x\r\n\r\n")
        stalled.recv(1024)  # the download started; now stop reading
        time.sleep(0.5)
        t0 = time.monotonic()
        for _ in range(20):
            r = httpx.get(stack.url("/bytes?n=100000&seed=1"), timeout=5)
            assert r.status_code == 200
            assert len(r.content) == 100000
        assert time.monotonic() - t0 < 5
    finally:
        stalled.close()


# -- cancellation -----------------------------------------------------------------------------
def events(stack: Stack) -> list[str]:
    return json.loads(httpx.get(f"{stack.upstream}/_events").text)


def test_client_disconnect_cancels_upstream_call(stack: Stack) -> None:
    tag = f"t{time.monotonic_ns()}"
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(stack.url(f"/hang?tag={tag}"), timeout=0.5)
    deadline = time.monotonic() + 3
    while f"disconnect {tag}" not in events(stack):
        assert time.monotonic() < deadline, events(stack)
        time.sleep(0.05)
    assert f"start {tag}" in events(stack)


def test_agent_killed_mid_response_aborts_client(procs: list[Proc]) -> None:
    upstream = start_upstream(procs)
    _, gateway, public = start_gateway(procs)
    agent = start_agent(procs, gateway, "victim", "--upstream", upstream, dial=public)
    got = b""
    with (
        pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
        httpx.stream("GET", f"{public}/a/victim/stream?n=50&interval=0.1", timeout=10) as r,
    ):
        for chunk in r.iter_raw():
            got += chunk
            if got.count(b"\n\n") == 2:
                agent.popen.kill()
    assert got.startswith(b"data: 0\n\ndata: 1\n\n")
    assert b"data: 49" not in got


def test_agent_lost_before_response_is_502(procs: list[Proc]) -> None:
    upstream = start_upstream(procs)
    _, gateway, public = start_gateway(procs)
    agent = start_agent(procs, gateway, "victim", "--upstream", upstream, dial=public)

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
            result: list[httpx.Response] = []

            async def call() -> None:
                result.append(await client.get(f"{public}/a/victim/hang"))

            nursery.start_soon(call)
            await trio.sleep(0.5)
            agent.popen.kill()
        return result[0]

    r = trio.run(run)
    assert r.status_code == 502
    assert r.json()["error"] == "agent_disconnected"


def test_two_agents_routed_separately(stack: Stack, procs: list[Proc]) -> None:
    start_agent(procs, stack.gateway, "other", "--upstream", stack.upstream, dial=stack.dial)
    a = httpx.get(stack.url("/echo")).json()
    b = httpx.get(stack.url("/echo", name="other")).json()
    prefix = {k: v for k, v in a["headers"]}["x-forwarded-prefix"]
    assert prefix == "/a/web"
    assert {k: v for k, v in b["headers"]}["x-forwarded-prefix"] == "/a/other"


def test_replacement_mid_traffic(procs: list[Proc]) -> None:
    upstream = start_upstream(procs)
    _, gateway, public = start_gateway(procs)
    old = start_agent(procs, gateway, "svc", "--upstream", upstream, dial=public)

    async def run() -> list[int]:
        statuses: list[int] = []
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:

            async def call() -> None:
                r = await client.get(f"{public}/a/svc/slow?s=1")
                statuses.append(r.status_code)

            for _ in range(5):
                nursery.start_soon(call)
            await trio.sleep(0.3)
            await trio.to_thread.run_sync(
                lambda: start_agent(procs, gateway, "svc", "--upstream", upstream, dial=public)
            )
        return statuses

    statuses = trio.run(run)
    assert old.wait() == 4
    # In-flight requests on the replaced session fail fast with a clear error, never hang.
    assert set(statuses) <= {200, 502}
    r = httpx.get(f"{public}/a/svc/status/200")
    assert r.status_code == 200


def test_asgi_app_agent(procs: list[Proc]) -> None:
    _, gateway, public = start_gateway(procs)
    start_agent(procs, gateway, "inproc", "--app", "tests.upstream_app:app", dial=public)
    r = httpx.get(f"{public}/a/inproc/echo/x%2Fy?z=1", headers={"X-Test": "1"})
    assert r.status_code == 200
    echo = r.json()
    assert echo["raw_path"] == "/echo/x%2Fy"
    assert echo["query"] == "z=1"
    data = pattern(3_000_000, 5)
    r = httpx.post(f"{public}/a/inproc/upload", content=data)
    assert r.json() == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    r = httpx.get(f"{public}/a/inproc/status/204")
    assert r.status_code == 204


def test_demo_page(procs: list[Proc]) -> None:
    args = ["--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0", "--demo"]
    gw = Proc([*executable("revconn-gateway"), *args])
    procs.append(gw)
    data = gw.wait_for(r"listening on (http://127\.0\.0\.1:\d+)", stream="out").group(1)
    page = gw.wait_for(r"curl '(http://127\.0\.0\.1:\d+/a/demo/)'", stream="out").group(1)
    assert page == f"{data}/a/demo/"  # served on the data plane
    deadline = time.monotonic() + 10
    while True:
        r = httpx.get(page)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200
    assert "It works" in r.text
    gw.signal(signal.SIGTERM)
    assert gw.wait() == 0


def test_agent_sigterm_lets_requests_in_flight_finish(procs: list[Proc]) -> None:
    upstream = start_upstream(procs)
    _, gateway, public = start_gateway(procs)
    agent = start_agent(procs, gateway, "leaving", "--upstream", upstream, dial=public)

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
            slow: list[httpx.Response] = []

            async def call() -> None:
                slow.append(await client.get(f"{public}/a/leaving/slow?s=1.5"))

            nursery.start_soon(call)
            await trio.sleep(0.4)
            agent.signal(signal.SIGTERM)
            await trio.sleep(0.3)
            late = await client.get(f"{public}/a/leaving/status/200")
        return slow[0], late

    slow, late = trio.run(run)
    assert slow.status_code == 200
    assert slow.text == "slow done"
    assert late.status_code == 503
    assert late.json()["error"] == "agent_offline"
    assert agent.wait() == 0


def test_agent_grace_period_bounds_the_wait_and_the_request_gets_an_explicit_error(
    procs: list[Proc],
) -> None:
    upstream = start_upstream(procs)
    _, gateway, public = start_gateway(procs)
    agent = start_agent(
        procs, gateway, "hasty", "--upstream", upstream, "--grace-period", "1", dial=public
    )

    async def run() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(timeout=15) as client, trio.open_nursery() as nursery:
            slow: list[httpx.Response] = []

            async def call() -> None:
                slow.append(await client.get(f"{public}/a/hasty/slow?s=8"))

            nursery.start_soon(call)
            await trio.sleep(0.4)
            agent.signal(signal.SIGTERM)
            signalled = time.monotonic()
        return slow[0], signalled

    slow, signalled = trio.run(run)
    assert slow.status_code == 502  # said, not silence
    assert slow.json()["error"] == "agent_disconnected"
    assert time.monotonic() - signalled < 5  # 1 s of grace, not the request's 8 s
    assert agent.wait() == 0
    assert "grace period (1 s) over: stopping now" in agent.stderr
    assert agent.stderr.rstrip().endswith("offline: stopped")
