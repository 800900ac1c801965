"""Idle-agent benchmark: memory per agent, connect rate and /endpoints latency.

Runs, in one invocation and on 127.0.0.1 only (every listener on port 0):

* **baseline**: a bare ASGI WebSocket handler on hypercorn's trio worker (accept,
  then wait), the same clients doing only the WebSocket upgrade.
* **revconn**: this tree's `revconn-gateway` process; N lightweight agents (a
  WebSocket + the tunnel handshake, answering PINGs) from one or two client
  processes, dialing `/ws/connect` on its data plane (`--bind`: trio + h11 +
  wsproto); /endpoints is read from the operator surface (`--admin-bind`).
* with `--compare REV`, **REV**: git revision REV's gateway (its `src/` extracted
  with `git archive`, run as benchmarks/forwarding.py does), the same agents
  dialing its lean listener: `--public-bind` in the old CLI layout (/endpoints on
  its hypercorn `--bind`), its data plane in the new one (/endpoints on
  `--admin-bind`).

The agents' side is always this tree's code. Reports gateway RSS growth per agent,
connect rate and /endpoints latency, the memory ratios to the baseline (and to
REV), and revconn against the issue's target: at most 18 KiB per agent at
N=10,000.

    python benchmarks/idle_agents.py --n 1000 --n 10000
    python benchmarks/idle_agents.py --n 1000 --n 10000 --compare 524843f
    python benchmarks/idle_agents.py --n 1000 --tls     # and this tree over TLS (wss://)

Bounded: every phase has a deadline; all processes are killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SECRET = "bench-secret-0123456789abcdef"
HERE = Path(__file__).resolve()
TARGET_KIB = 18.0  # the target for revconn at N=10,000
# Server kinds; the last two are forwarding.py's names for the gateway CLI layouts.
BASELINE, DATA_PLANE, PUBLIC_BIND = "baseline", "data-plane", "public-bind"


# ---------------------------------------------------------------- subprocess roles
def run_baseline_server() -> None:
    """A bare ASGI WebSocket app on hypercorn (trio): the memory baseline."""
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while (await receive())["type"] != "websocket.disconnect":
                pass
        elif scope["type"] == "http":
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        elif scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return

    async def main() -> None:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.backlog = 4096
        config.accesslog = None
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(serve, app, config)
            print(f"listening on {urls[0]}", flush=True)

    trio.run(main)


def run_clients(url: str, prefix: str, count: int, tunnel: bool) -> None:
    """Open ``count`` agents and keep them idle (answering PINGs) until killed."""
    import trio
    from trio_websocket import ConnectionClosed, open_websocket_url

    from revconn._proto.session import Role, TunnelSession

    connected = 0
    ca = os.environ.get("REVCONN_BENCH_CA")
    context = ssl.create_default_context(cafile=ca) if ca else None

    async def one(i: int, sem: trio.Semaphore) -> None:
        nonlocal connected
        path = f"/ws/connect?name={prefix}-{i}"
        async with sem:
            ws_cm = open_websocket_url(
                url.replace("http", "ws", 1) + path,
                extra_headers=[(b"authorization", f"Bearer {SECRET}".encode())],
                connect_timeout=60,
                subprotocols=["revconn.v2"],  # (a gateway of protocol v1 ignores it)
                ssl_context=context,
            )
            ws = await ws_cm.__aenter__()
            session = TunnelSession(Role.AGENT)
            if tunnel:
                session.initiate()
                await ws.send_message(session.data_to_send())
                while not session.handshake_complete:
                    session.receive_data(await ws.get_message())
                    out = session.data_to_send()
                    if out:
                        await ws.send_message(out)
        connected += 1
        try:
            while True:
                data = await ws.get_message()
                if tunnel:
                    session.receive_data(data)
                    out = session.data_to_send()
                    if out:
                        await ws.send_message(out)
        except ConnectionClosed:
            pass

    async def report() -> None:
        last = -1
        while True:
            if connected != last:
                print(f"connected {connected}", flush=True)
                last = connected
            await trio.sleep(0.2)

    async def main() -> None:
        sem = trio.Semaphore(256)  # bounded concurrency of handshakes
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report)
            for i in range(count):
                nursery.start_soon(one, i, sem)

    trio.run(main)


# ---------------------------------------------------------------- orchestration
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before {prefix!r}")
        if line.startswith(prefix) or prefix in line:
            return line.strip()
    raise TimeoutError(prefix)


def endpoints_count(url: str) -> int:
    req = urllib.request.Request(url + "/endpoints", headers={"Authorization": f"Bearer {SECRET}"})
    unverified = ssl._create_unverified_context()  # (the --tls server's own certificate)
    with urllib.request.urlopen(req, timeout=30, context=unverified) as r:
        return len(json.load(r)["endpoints"])


def endpoints_latency(url: str, runs: int = 20) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        endpoints_count(url)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "REVCONN_SECRET": SECRET, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )


@dataclass
class Server:
    """What to measure: a command line and how its listeners are announced."""

    name: str
    cmd: list[str]
    layout: str  # BASELINE, DATA_PLANE or PUBLIC_BIND
    env: dict[str, str] = field(default_factory=dict)
    client_env: dict[str, str] = field(default_factory=dict)


def gateway_server(name: str, gateway: list[str], layout: str, env: dict[str, str]) -> Server:
    any_port = "127.0.0.1:0"
    lean = "--admin-bind" if layout == DATA_PLANE else "--public-bind"
    cmd = [*gateway, "--bind", any_port, lean, any_port, "--log-level", "warning"]
    return Server(name, cmd, layout, env)


def url_after(proc: subprocess.Popen[str], marker: str) -> str:
    return wait_line(proc, marker, 30).split(marker)[1].split(",")[0].strip()


def measure(spec: Server, n: int, client_procs: int) -> dict[str, float]:
    server = start(spec.cmd, spec.env)
    clients: list[subprocess.Popen[str]] = []
    try:
        url = url_after(server, "listening on ")
        dial, admin = url, None  # where the agents connect, where /endpoints is
        if spec.layout == DATA_PLANE:
            admin = url_after(server, "admin API on ")
        elif spec.layout == PUBLIC_BIND:
            dial, admin = url_after(server, "public traffic on "), url
        time.sleep(1.0)
        rss0 = rss_kib(server.pid)
        per = [n // client_procs + (1 if i < n % client_procs else 0) for i in range(client_procs)]
        mode = "ws" if spec.layout == BASELINE else "tunnel"
        t0 = time.perf_counter()
        for i, count in enumerate(per):
            clients.append(
                start(
                    [sys.executable, str(HERE), "_clients", dial, f"c{i}", str(count), mode],
                    spec.client_env,
                )
            )
        # Wait until every client reports all its agents connected.
        deadline = time.monotonic() + 600
        for c, count in zip(clients, per, strict=True):
            while wait_line(c, "connected", deadline - time.monotonic()) != f"connected {count}":
                pass
        connect_s = time.perf_counter() - t0
        if admin is not None:
            deadline = time.monotonic() + 60
            while endpoints_count(admin) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError("registry did not reach n")
                time.sleep(0.2)
        time.sleep(3.0)  # let allocations settle
        rss1 = rss_kib(server.pid)
        result = {
            "n": n,
            "rss_base_mib": rss0 / 1024,
            "rss_mib": rss1 / 1024,
            "kib_per_agent": (rss1 - rss0) / n,
            "connect_per_s": n / connect_s,
        }
        if admin is not None:
            p50, p95 = endpoints_latency(admin)
            result["endpoints_p50_ms"] = p50
            result["endpoints_p95_ms"] = p95
        return result
    finally:
        for p in [*clients, server]:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_baseline":
        run_baseline_server()
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_clients":
        url, prefix, count, mode = sys.argv[2:6]
        run_clients(url, prefix, int(count), tunnel=(mode == "tunnel"))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, action="append", help="agent counts (repeatable)")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument(
        "--compare", metavar="REV", help="also measure git revision REV's lean listener"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also measure this tree serving wss:// (--certfile/--keyfile, a trustme certificate)",
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counts = args.n or [1000]
    with tempfile.TemporaryDirectory(prefix="revconn-idle-") as tmp:
        gateway = str(Path(sys.executable).parent / "revconn-gateway")
        specs = [
            Server("baseline", [sys.executable, str(HERE), "_baseline"], BASELINE),
            gateway_server("revconn", [gateway], DATA_PLANE, {}),
        ]
        if args.tls:
            sys.path.insert(0, str(HERE.parent))
            from forwarding import certificates

            cert, key, ca = certificates(Path(tmp))
            tls = gateway_server("revconn over TLS", [gateway], DATA_PLANE, {})
            tls.cmd += ["--certfile", str(cert), "--keyfile", str(key)]
            tls.client_env = {"REVCONN_BENCH_CA": str(ca)}
            specs.append(tls)
        if args.compare:
            # One place reads a revision's CLI layout and entry points: forwarding.py.
            sys.path.insert(0, str(HERE.parent))
            from forwarding import revision

            old = revision(args.compare, Path(tmp) / "compare")
            lean = "public listener" if old.layout == PUBLIC_BIND else "data plane"
            specs.append(gateway_server(f"{old.label} {lean}", old.gateway, old.layout, old.env))
        report(specs, counts, args.client_procs, args.compare)


def report(specs: list[Server], counts: list[int], client_procs: int, compare: str | None) -> None:
    flags = " ".join(f"--n {n}" for n in counts) + (f" --compare {compare}" if compare else "")
    flags += " --tls" if any(s.name == "revconn over TLS" for s in specs) else ""
    print(f"# idle agents: python {Path(*HERE.parts[-2:])} {flags}")
    print(
        "| N | server | RSS before (MiB) | RSS after (MiB) | KiB/agent | connects/s | /endpoints p50 / p95 (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in counts:
        rows = {spec.name: measure(spec, n, client_procs) for spec in specs}
        for name, r in rows.items():
            lat = (
                f"{r['endpoints_p50_ms']:.1f} / {r['endpoints_p95_ms']:.1f}"
                if "endpoints_p50_ms" in r
                else "-"
            )
            print(
                f"| {n} | {name} | {r['rss_base_mib']:.1f} | {r['rss_mib']:.1f} | "
                f"{r['kib_per_agent']:.1f} | {r['connect_per_s']:.0f} | {lat} |",
                flush=True,
            )
        kib = {name: r["kib_per_agent"] for name, r in rows.items()}
        for name in list(rows)[1:]:
            ratio = kib[name] / kib["baseline"]
            print(f"| {n} | ratio {name}/baseline (memory) | | | {ratio:.2f} | | |", flush=True)
        if len(rows) > 2:
            old = list(rows)[2]
            ratio = kib["revconn"] / kib[old]
            print(f"| {n} | ratio revconn/{old} (memory) | | | {ratio:.2f} | | |", flush=True)
        verdict = "met" if kib["revconn"] <= TARGET_KIB else "MISSED"
        print(
            f"| {n} | revconn target <= {TARGET_KIB:.0f} KiB/agent (set for N=10,000) "
            f"| | | {verdict} | | |",
            flush=True,
        )


if __name__ == "__main__":
    main()
