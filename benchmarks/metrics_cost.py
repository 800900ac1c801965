"""What counting costs the data plane: c=32 req/s (and gateway CPU per
request) through a gateway that counts (the default) and one started with
``--no-metrics``, interleaved in one run, both in front of the same nginx,
with a scrape of /metrics and /stats once a second on each (as a Prometheus
and an open dashboard would; the one that does not count answers with its
presence and auth series only).

    python benchmarks/metrics_cost.py [--seconds 10] [--reps 5] [--conns 32]
    python benchmarks/metrics_cost.py --per-agent    # the counting one with --metrics-per-agent
    python benchmarks/metrics_cost.py --no-scrape    # the data plane alone, nobody scrapes

Needs wrk and nginx (apt-get install wrk nginx-light); 127.0.0.1 only.
Prints each round and the ratio of the medians (counting / not counting).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import forwarding as fw


def scrape_every_second(admin: str, stop: threading.Event) -> None:
    headers = {"Authorization": f"Bearer {fw.SECRET}"}
    while not stop.wait(1.0):
        for path in ("/metrics", "/stats"):
            request = urllib.request.Request(admin + path, headers=headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                response.read()


def start(code: fw.Code, nginx_url: str, name: str, extra: tuple[str, ...]) -> dict[str, object]:
    any_port = "127.0.0.1:0"
    gateway = fw.start(
        [
            *code.gateway,
            "--bind",
            any_port,
            "--admin-bind",
            any_port,
            "--log-level",
            "warning",
            *extra,
        ],
        capture=True,
    )
    lines = fw.Lines(gateway)
    url = lines.url_after("listening on ")
    admin = lines.url_after("admin API on ")
    agent = fw.start(
        [
            *code.agent,
            "serve",
            "--gateway",
            url,
            "--name",
            name,
            "--upstream",
            nginx_url,
            "--log-level",
            "warning",
        ]
    )
    target = f"{url}/a/{name}/small.bin"
    fw.wait_http(target)
    return {"gateway": gateway, "agent": agent, "target": target, "admin": admin}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--per-agent", action="store_true")
    parser.add_argument(
        "--no-scrape",
        action="store_true",
        help="no /metrics and /stats scrapes (the data plane alone)",
    )
    args = parser.parse_args()
    code = fw.this_tree()
    counting_flags = ("--metrics-per-agent",) if args.per_agent else ()
    with tempfile.TemporaryDirectory(prefix="revconn-metrics-") as tmp:
        try:
            _nginx, nginx_url = fw.start_nginx(Path(tmp))
            fronts = {
                "counting": start(code, nginx_url, "on", counting_flags),
                "--no-metrics": start(code, nginx_url, "off", ("--no-metrics",)),
            }
            for front in fronts.values():
                fw.wrk(str(front["target"]), args.conns, 2)  # warm-up
            results: dict[str, list[float]] = {k: [] for k in fronts}
            cpu: dict[str, list[float]] = {k: [] for k in fronts}
            for rep in range(args.reps):
                order = list(fronts) if rep % 2 == 0 else list(reversed(fronts))
                for label in order:
                    front = fronts[label]
                    gateway = front["gateway"]
                    assert hasattr(gateway, "pid")
                    stop = threading.Event()
                    scraper = threading.Thread(
                        target=scrape_every_second, args=(front["admin"], stop), daemon=True
                    )
                    if not args.no_scrape:
                        scraper.start()
                    before = fw.cpu_seconds(gateway.pid)
                    run = fw.wrk(str(front["target"]), args.conns, args.seconds)
                    used = fw.cpu_seconds(gateway.pid) - before
                    stop.set()
                    if scraper.is_alive():
                        scraper.join()
                    requests = run["rps"] * args.seconds
                    results[label].append(run["rps"])
                    cpu[label].append(used / requests * 1e6)
                    print(
                        f"round {rep + 1} {label:>13}: {run['rps']:8.0f} req/s, "
                        f"gateway {used / requests * 1e6:6.1f} us CPU/request",
                        flush=True,
                    )
        finally:
            for proc in fw.RUNNING:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    on, off = statistics.median(results["counting"]), statistics.median(results["--no-metrics"])
    cpu_on, cpu_off = statistics.median(cpu["counting"]), statistics.median(cpu["--no-metrics"])
    flags = (" --per-agent" if args.per_agent else "") + (" --no-scrape" if args.no_scrape else "")
    print(
        f"\n# python benchmarks/metrics_cost.py --seconds {args.seconds} --reps {args.reps} "
        f"--conns {args.conns}{flags}"
    )
    print(f"| c={args.conns}, median of {args.reps} | counting | --no-metrics | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| req/s | {on:.0f} | {off:.0f} | {on / off:.3f} |")
    print(f"| gateway CPU us/request | {cpu_on:.1f} | {cpu_off:.1f} | {cpu_on / cpu_off:.3f} |")


if __name__ == "__main__":
    main()
