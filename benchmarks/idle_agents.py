"""Idle-agent benchmark: memory per agent, connect rate and /endpoints latency.

Runs, in one invocation and on 127.0.0.1 only:

* **revconn**: the real `revconn-gateway` process; N lightweight agents (a
  WebSocket + the tunnel handshake, answering PINGs) from one or two client
  processes, dialing `/ws/connect` on `--bind` (hypercorn).
* **revconn-public**: the same, the agents dialing the lean public listener
  (`--public-bind`, trio + h11 + wsproto).
* **baseline**: a bare ASGI WebSocket handler on hypercorn's trio worker (accept,
  then wait), the same clients doing only the WebSocket upgrade.

Reports gateway RSS growth per agent, connect rate and /endpoints latency, and
the revconn/baseline memory ratio.

    python benchmarks/idle_agents.py --n 1000 --n 10000

Bounded: every phase has a deadline; all processes are killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SECRET = "bench-secret-0123456789abcdef"
HERE = Path(__file__).resolve()


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

    async def one(i: int, sem: trio.Semaphore) -> None:
        nonlocal connected
        path = f"/ws/connect?name={prefix}-{i}"
        async with sem:
            ws_cm = open_websocket_url(
                url.replace("http", "ws", 1) + path,
                extra_headers=[(b"authorization", f"Bearer {SECRET}".encode())],
                connect_timeout=60,
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
    with urllib.request.urlopen(req, timeout=30) as r:
        return len(json.load(r)["endpoints"])


def endpoints_latency(url: str, runs: int = 20) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        endpoints_count(url)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def start(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "REVCONN_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )


def measure(kind: str, n: int, client_procs: int) -> dict[str, float]:
    if kind.startswith("revconn"):
        gw_exe = Path(sys.executable).parent / "revconn-gateway"
        public = ["--public-bind", "127.0.0.1:0"] if kind == "revconn-public" else []
        server = start([str(gw_exe), "--bind", "127.0.0.1:0", *public, "--log-level", "warning"])
    else:
        server = start([sys.executable, str(HERE), "_baseline"])
    clients: list[subprocess.Popen[str]] = []
    try:
        url = wait_line(server, "listening on", 30).split("listening on ")[1].split(",")[0]
        dial = url
        if kind == "revconn-public":
            dial = wait_line(server, "public traffic on", 30).split(" on ")[1].split(",")[0]
        time.sleep(1.0)
        rss0 = rss_kib(server.pid)
        per = [n // client_procs + (1 if i < n % client_procs else 0) for i in range(client_procs)]
        t0 = time.perf_counter()
        for i, count in enumerate(per):
            clients.append(
                start([sys.executable, str(HERE), "_clients", dial, f"c{i}", str(count), kind])
            )
        # Wait until every client reports all its agents connected.
        deadline = time.monotonic() + 600
        for c, count in zip(clients, per, strict=True):
            while wait_line(c, "connected", deadline - time.monotonic()) != f"connected {count}":
                pass
        connect_s = time.perf_counter() - t0
        if kind != "baseline":
            deadline = time.monotonic() + 60
            while endpoints_count(url) < n:
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
        if kind != "baseline":
            p50, p95 = endpoints_latency(url)
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
        url, prefix, count, kind = sys.argv[2:6]
        run_clients(url, prefix, int(count), tunnel=(kind != "baseline"))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, action="append", help="agent counts (repeatable)")
    parser.add_argument("--client-procs", type=int, default=2)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counts = args.n or [1000]
    print(f"# idle agents: python {Path(*HERE.parts[-2:])} " + " ".join(f"--n {n}" for n in counts))
    print(
        "| N | server | RSS before (MiB) | RSS after (MiB) | KiB/agent | connects/s | /endpoints p50 / p95 (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in counts:
        kinds = ("baseline", "revconn", "revconn-public")
        rows = {kind: measure(kind, n, args.client_procs) for kind in kinds}
        for kind, r in rows.items():
            lat = (
                f"{r['endpoints_p50_ms']:.1f} / {r['endpoints_p95_ms']:.1f}"
                if "endpoints_p50_ms" in r
                else "-"
            )
            print(
                f"| {n} | {kind} | {r['rss_base_mib']:.1f} | {r['rss_mib']:.1f} | "
                f"{r['kib_per_agent']:.1f} | {r['connect_per_s']:.0f} | {lat} |",
                flush=True,
            )
        for kind in kinds[1:]:
            ratio = rows[kind]["kib_per_agent"] / rows["baseline"]["kib_per_agent"]
            print(f"| {n} | ratio {kind}/baseline (memory) | | | {ratio:.2f} | | |", flush=True)


if __name__ == "__main__":
    main()
