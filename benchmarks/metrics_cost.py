"""What counting costs the data plane: c=32 req/s (and gateway CPU per
request) through a gateway that counts (the default) and one started with
``--no-metrics``, interleaved in one run, both in front of the same nginx,
with a scrape of /metrics and /stats once a second on each (as a Prometheus
and an open dashboard would; the one that does not count answers with its
presence and auth series only).

    python benchmarks/metrics_cost.py [--seconds 10] [--reps 5] [--conns 32]
    python benchmarks/metrics_cost.py --per-agent    # the counting one with --metrics-per-agent
    python benchmarks/metrics_cost.py --no-scrape    # the data plane alone, nobody scrapes

Two gateways of each kind by default (``--processes``): the rounds of a
kind are pooled, and the ratio of a kind's two processes (A/A) says how much
two identical gateways differ in this run, the floor under the ratio.

Needs wrk and nginx (apt-get install wrk nginx-light); 127.0.0.1 only.
Prints each round and the ratio of the pooled medians (counting / not counting).
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


KINDS = ("counting", "--no-metrics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="gateways of each kind (their medians are pooled; two of a kind give the "
        "A/A ratio, the benchmark's own noise between processes)",
    )
    parser.add_argument("--per-agent", action="store_true")
    parser.add_argument(
        "--no-scrape",
        action="store_true",
        help="no /metrics and /stats scrapes (the data plane alone)",
    )
    args = parser.parse_args()
    code = fw.this_tree()
    flags_of = {
        "counting": ("--metrics-per-agent",) if args.per_agent else (),
        "--no-metrics": ("--no-metrics",),
    }
    with tempfile.TemporaryDirectory(prefix="revconn-metrics-") as tmp:
        try:
            _nginx, nginx_url = fw.start_nginx(Path(tmp))
            fronts: dict[tuple[str, int], dict[str, object]] = {}
            for n in range(args.processes):
                for kind in KINDS:
                    name = f"{'on' if kind == 'counting' else 'off'}{n}"
                    fronts[(kind, n)] = start(code, nginx_url, name, flags_of[kind])
            for front in fronts.values():
                fw.wrk(str(front["target"]), args.conns, 2)  # warm-up
            rps: dict[tuple[str, int], list[float]] = {k: [] for k in fronts}
            cpu: dict[tuple[str, int], list[float]] = {k: [] for k in fronts}
            slots = list(fronts)
            for rep in range(args.reps):
                # every front takes every position in turn (drift hits all alike)
                shift = rep % len(slots)
                for key in slots[shift:] + slots[:shift]:
                    rate, used = measure(fronts[key], args)
                    rps[key].append(rate)
                    cpu[key].append(used)
                    print(
                        f"round {rep + 1} {key[0]:>13} #{key[1] + 1}: {rate:8.0f} req/s, "
                        f"gateway {used:6.1f} us CPU/request",
                        flush=True,
                    )
        finally:
            for proc in fw.RUNNING:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    flags = (" --per-agent" if args.per_agent else "") + (" --no-scrape" if args.no_scrape else "")
    print(
        f"\n# python benchmarks/metrics_cost.py --seconds {args.seconds} --reps {args.reps} "
        f"--conns {args.conns} --processes {args.processes}{flags}"
    )
    report("req/s", rps, args, "{:.0f}")
    report("gateway CPU us/request", cpu, args, "{:.1f}")


def measure(front: dict[str, object], args: argparse.Namespace) -> tuple[float, float]:
    """One round on one front: its req/s and its gateway's CPU per request (us)."""
    gateway = front["gateway"]
    assert hasattr(gateway, "pid")
    stop = threading.Event()
    scraper = threading.Thread(target=scrape_every_second, args=(front["admin"], stop), daemon=True)
    if not args.no_scrape:
        scraper.start()
    before = fw.cpu_seconds(gateway.pid)
    run = fw.wrk(str(front["target"]), args.conns, args.seconds)
    used = fw.cpu_seconds(gateway.pid) - before
    stop.set()
    if scraper.is_alive():
        scraper.join()
    return run["rps"], used / (run["rps"] * args.seconds) * 1e6


def report(
    what: str,
    values: dict[tuple[str, int], list[float]],
    args: argparse.Namespace,
    fmt: str,
) -> None:
    """The pooled medians, their ratio, and each kind's A/A ratio (its first
    process over its second: what two identical gateways differ by)."""
    pooled = {
        kind: statistics.median(v for (k, _), vs in values.items() if k == kind for v in vs)
        for kind in KINDS
    }
    on, off = pooled["counting"], pooled["--no-metrics"]
    line = f"| {what} | {fmt.format(on)} | {fmt.format(off)} | {on / off:.3f} |"
    if args.processes > 1:
        for kind in KINDS:
            first = statistics.median(values[(kind, 0)])
            second = statistics.median(values[(kind, 1)])
            line += f" {first / second:.3f} |"
    if what == "req/s":
        head = f"| c={args.conns}, median of {args.reps} x {args.processes} | counting | "
        head += "--no-metrics | ratio |"
        rule = "|---|---:|---:|---:|"
        if args.processes > 1:
            head += " A/A counting | A/A --no-metrics |"
            rule += "---:|---:|"
        print(head)
        print(rule)
    print(line)


if __name__ == "__main__":
    main()
