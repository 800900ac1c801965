"""Scheduler passes and syscalls per forwarded request, in the gateway process.

The gateway (this tree, and with ``--compare REV`` git revision REV) runs with
a trio Instrument counting task steps, tasks spawned and I/O waits (``epoll``
passes) between two signals, while wrk sends small GETs through it to nginx;
then ``strace -c`` counts its syscalls over a second wrk run. Everything is
divided by the requests wrk completed in that window, so the figures do not
depend on the machine's speed (batching does a little: run both trees in one
invocation and compare them there).

    python benchmarks/passes.py [--compare REV] [--conns 32] [--seconds 5]

Needs wrk, nginx and strace (apt-get install wrk nginx-light strace); 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import forwarding as fw

# Run inside the gateway: count while enabled (SIGUSR1 starts, SIGUSR2 stops and
# writes the counts to $PASSES_OUT), then run the gateway's own entry point.
PREAMBLE = """
import json, os, signal, trio
class _Count(trio.abc.Instrument):
    def __init__(self):
        self.on = False
        self.steps = self.spawned = self.io_waits = 0
    def before_task_step(self, task):
        if self.on: self.steps += 1
    def task_spawned(self, task):
        if self.on: self.spawned += 1
    def before_io_wait(self, timeout):
        if self.on: self.io_waits += 1
_count = _Count()
def _start(*_):
    _count.steps = _count.spawned = _count.io_waits = 0
    _count.on = True
def _stop(*_):
    _count.on = False
    with open(os.environ["PASSES_OUT"], "w") as f:
        json.dump({"steps": _count.steps, "spawned": _count.spawned, "io_waits": _count.io_waits}, f)
signal.signal(signal.SIGUSR1, _start)
signal.signal(signal.SIGUSR2, _stop)
_run = trio.run
trio.run = lambda *a, **k: _run(*a, instruments=[_count], **k)
"""


def gateway_command(code: fw.Code) -> list[str]:
    """``code``'s gateway command with the counting preamble before its entry point."""
    assert code.gateway[:2] == [sys.executable, "-c"] or len(code.gateway) == 1
    if len(code.gateway) == 1:  # this tree's console script
        entry = fw.entry_point("revconn._cli.gateway:main", "revconn-gateway")[2]
    else:
        entry = code.gateway[2]
    return [sys.executable, "-c", PREAMBLE + entry]


def measure(code: fw.Code, nginx_url: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    wrapped = fw.Code(code.label, code.layout, gateway_command(code), code.agent, code.env)
    env = {**code.env, "PASSES_OUT": str(out)}
    wrapped.env = env
    gateway, url = fw.start_gateway(wrapped, "lean")
    agent = fw.start(
        [
            *code.agent,
            "serve",
            "--gateway",
            url,
            "--name",
            "bench",
            "--upstream",
            nginx_url,
            "--log-level",
            "warning",
        ],
        code.env,
    )
    target = url + "/a/bench/small.bin"
    fw.wait_http(target)
    fw.wrk(target, args.conns, 2)  # warm-up
    os.kill(gateway.pid, signal.SIGUSR1)
    run = fw.wrk(target, args.conns, args.seconds)
    os.kill(gateway.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    counts = json.loads(out.read_text())
    out.unlink()
    # Syscalls: strace attached to every thread of the gateway over a second run.
    trace = out.with_suffix(".strace")
    strace = subprocess.Popen(
        ["strace", "-c", "-f", "-o", str(trace), "-p", str(gateway.pid)],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)
    traced = fw.wrk(target, args.conns, args.seconds)
    strace.send_signal(signal.SIGINT)
    strace.wait(timeout=30)
    calls: dict[str, int] = {}
    for line in trace.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    for proc in (gateway, agent):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    n = run["requests"]
    m = traced["requests"]
    result = {
        "task steps": counts["steps"] / n,
        "tasks spawned": counts["spawned"] / n,
        "I/O waits (epoll passes)": counts["io_waits"] / n,
        "syscalls": sum(calls.values()) / m,
    }
    for name in sorted(calls, key=calls.get, reverse=True)[:6]:  # type: ignore[arg-type]
        result[f"  {name}"] = calls[name] / m
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", metavar="REV")
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="revconn-passes-") as tmp:
        work = Path(tmp)
        try:
            _nginx, nginx_url = fw.start_nginx(work)
            codes = [fw.this_tree()]
            if args.compare:
                codes.append(fw.revision(args.compare, work / "compare"))
            results = [
                measure(code, nginx_url, args, work / f"counts{i}.json")
                for i, code in enumerate(codes)
            ]
        finally:
            for p in fw.RUNNING:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    line = f"python benchmarks/passes.py --conns {args.conns} --seconds {args.seconds}"
    print(f"# {line}" + (f" --compare {args.compare}" if args.compare else ""))
    labels = [c.label for c in codes]
    print(
        "| per request, gateway process | "
        + " | ".join(labels)
        + (" | ratio |" if args.compare else " |")
    )
    print("|---" * (len(labels) + 1 + bool(args.compare)) + "|")
    keys = list(dict.fromkeys(k for r in results for k in r))
    for key in keys:
        values = [r.get(key, 0.0) for r in results]
        cells = " | ".join(f"{v:.2f}" for v in values)
        ratio = (
            f" | {values[0] / values[1]:.2f}"
            if args.compare and values[1]
            else (" | " if args.compare else "")
        )
        print(f"| {key} | {cells}{ratio} |")


if __name__ == "__main__":
    main()
