"""Forwarding benchmark: wrk against nginx directly and through revconn, interleaved.

Needs Debian's `wrk`, `nginx` (nginx-light) and `curl` on PATH. Everything runs on
127.0.0.1 and stops by itself.

    python benchmarks/forwarding.py            # 3 x 10 s per configuration
    python benchmarks/forwarding.py --seconds 3 --reps 1
    python benchmarks/forwarding.py --compare a1a398c   # also an older revision, interleaved

Reports req/s and p50/p99 at c=1 and c=32 for a 1 KiB file, MB/s for a 10 MiB
file at c=4, MB/s for a 100 MiB upload, CPU ms per forwarded request for the
gateway and the agent (from /proc/PID/stat), and their peak RSS.

``--compare REV`` also runs the public listener of git revision REV (its
``src/`` extracted with ``git archive``, first on PYTHONPATH for a second
gateway + agent) in the same interleaved loop, and prints this tree against
it: on a machine whose speed drifts by +-15 % between runs, that is the
comparison to trust.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SECRET = "bench-secret-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_http(url: str, timeout: float = 15) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        time.sleep(0.1)


def start_nginx(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    workdir.chmod(0o755)  # nginx workers run as nobody
    www = workdir / "www"
    www.mkdir(mode=0o755)
    (www / "small.bin").write_bytes(os.urandom(1024))
    (www / "big.bin").write_bytes(os.urandom(10 * 1024 * 1024))
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {www};
    }}
}}
"""
    )
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf)], stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/small.bin")
    return proc, url


def extract_src(rev: str, into: Path) -> str:
    """``src/`` of git revision ``rev`` under ``into``; returns the path to put on PYTHONPATH."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        sys.exit(f"--compare {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return str(into / "src")


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full = {**os.environ, "REVCONN_SECRET": SECRET, "PYTHONUNBUFFERED": "1", **(env or {})}
    # A session of its own, so teardown can kill it with its children (hypercorn workers).
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=full,
        start_new_session=True,
    )


def wrk(url: str, conns: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "1" if conns < 4 else "2",
            "-c",
            str(conns),
            "-d",
            f"{seconds}s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    def transfer() -> float:
        m = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", out)
        assert m
        scale = {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1, "GB": 1024}[m.group(2)]
        return float(m.group(1)) * scale * 1.048576  # MiB/s -> MB/s

    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": ms("50"),
        "p99": ms("99"),
        "mbs": transfer(),
        "requests": requests,
        "errors": int(errors.group(1)) if errors else 0,
    }


def curl_upload(url: str, path: Path) -> float:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{speed_upload} %{http_code}",
            "--data-binary",
            f"@{path}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[1] == "200", out
    return float(out[0]) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compare", metavar="REV", help="also measure revision REV's public path")
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install wrk nginx-light curl")

    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="revconn-bench-") as tmp:
        workdir = Path(tmp)
        procs: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = []
        try:
            nginx, nginx_url = start_nginx(workdir)
            procs.append(nginx)
            up_port = free_port()
            upload_app = start(
                [
                    sys.executable,
                    "-m",
                    "hypercorn",
                    "--worker-class",
                    "trio",
                    "--bind",
                    f"127.0.0.1:{up_port}",
                    "tests.upstream_app:app",
                ],
                {"PYTHONPATH": str(ROOT)},
            )
            procs.append(upload_app)
            upload_url = f"http://127.0.0.1:{up_port}"

            def start_gateway(
                env: dict[str, str] | None = None,
            ) -> tuple[subprocess.Popen[str], str, str]:
                """A gateway with its admin (--bind) and public URLs, ready."""
                port, public = free_port(), free_port()
                proc = start(
                    [
                        str(bindir / "revconn-gateway"),
                        "--bind",
                        f"127.0.0.1:{port}",
                        "--public-bind",
                        f"127.0.0.1:{public}",
                        "--log-level",
                        "warning",
                    ],
                    env,
                )
                procs.append(proc)
                wait_http(f"http://127.0.0.1:{port}/healthz")
                return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{public}"

            gateway, gw_url, pub_url = start_gateway()

            def agent(
                name: str, dial: str, upstream: str, env: dict[str, str] | None = None
            ) -> subprocess.Popen[str]:
                cmd = [str(bindir / "revconn-agent"), "serve", "--gateway", dial, "--name", name]
                proc = start([*cmd, "--upstream", upstream, "--log-level", "warning"], env)
                procs.append(proc)
                return proc

            # "public": the dedicated listener (--public-bind) for requests and the
            # agent's tunnel; "hypercorn": /a/ and /ws/connect on --bind.
            agents = {
                "public": agent("bench", pub_url, nginx_url),
                "hypercorn": agent("benchh", gw_url, nginx_url),
            }
            agent("upload", pub_url, upload_url)
            targets = {
                "direct": nginx_url,
                "public": pub_url + "/a/bench",
                "hypercorn": gw_url + "/a/benchh",
            }
            gateways = {"public": gateway, "hypercorn": gateway}
            if args.compare:
                old_env = {"PYTHONPATH": extract_src(args.compare, workdir / "compare")}
                old_gateway, _, old_url = start_gateway(old_env)
                agents["compare"] = agent("bench", old_url, nginx_url, old_env)
                gateways["compare"] = old_gateway
                targets["compare"] = old_url + "/a/bench"
            for base in targets.values():
                wait_http(base + "/small.bin")
            wait_http(upload_url + "/status/200")
            wait_http(pub_url + "/a/upload/status/200")

            results: dict[tuple[str, str], list[dict[str, float]]] = {}
            cpu: dict[tuple[str, str, str], list[float]] = {}
            plan = [("c1", "/small.bin", 1), ("c32", "/small.bin", 32), ("dl10m", "/big.bin", 4)]
            for _ in range(args.reps):
                for label, path, conns in plan:
                    for kind, base in targets.items():
                        pids = [] if kind == "direct" else [gateways[kind].pid, agents[kind].pid]
                        before = [cpu_seconds(pid) for pid in pids]
                        r = wrk(base + path, conns, args.seconds)
                        after = [cpu_seconds(pid) for pid in pids]
                        results.setdefault((label, kind), []).append(r)
                        if pids and label != "dl10m":
                            for role, b, a in zip(("gateway", "agent"), before, after, strict=True):
                                per_request = (a - b) / r["requests"] * 1000
                                cpu.setdefault((kind, role, label), []).append(per_request)
            upload_file = workdir / "upload.bin"
            upload_file.write_bytes(os.urandom(100 * 1024 * 1024))
            uploads: dict[str, list[float]] = {"direct": [], "public": []}
            for _ in range(args.reps):
                uploads["direct"].append(curl_upload(upload_url + "/upload", upload_file))
                uploads["public"].append(curl_upload(pub_url + "/a/upload/upload", upload_file))

            def med(label: str, kind: str, key: str) -> float:
                return statistics.median(r[key] for r in results[(label, kind)])

            print(
                f"# forwarding: python benchmarks/forwarding.py --seconds {args.seconds} --reps {args.reps}"
            )
            print(
                "| measure | direct (nginx) | revconn, public listener | ratio | "
                "revconn, hypercorn front | ratio |"
            )
            print("|---|---|---|---|---|---|")

            def row(name: str, label: str, key: str, fmt: str) -> None:
                d = med(label, "direct", key)
                p, h = med(label, "public", key), med(label, "hypercorn", key)
                print(f"| {name} | {d:{fmt}} | {p:{fmt}} | {p / d:.3f} | {h:{fmt}} | {h / d:.3f} |")

            for label, name in (("c1", "1 KiB, c=1"), ("c32", "1 KiB, c=32")):
                row(f"{name}: req/s", label, "rps", ",.0f")
                row(f"{name}: p50 latency (ms)", label, "p50", ".2f")
                row(f"{name}: p99 latency (ms)", label, "p99", ".2f")
            row("10 MiB download, c=4: MB/s", "dl10m", "mbs", ",.0f")
            d, v = statistics.median(uploads["direct"]), statistics.median(uploads["public"])
            print(
                f"| 100 MiB upload (hypercorn upstream): MB/s | {d:,.0f} | {v:,.0f} | {v / d:.3f} | | |"
            )
            for kind in ("public", "hypercorn"):
                errors = sum(r["errors"] for (_, k), rs in results.items() if k == kind for r in rs)
                print(f"| {kind}: non-2xx responses in all wrk runs | | {errors} | | | |")
                for label in ("c1", "c32"):
                    g = statistics.median(cpu[(kind, "gateway", label)])
                    a = statistics.median(cpu[(kind, "agent", label)])
                    print(
                        f"| {kind}: CPU ms per small request at {label.replace('c', 'c=')}, "
                        f"gateway / agent | | {g:.3f} / {a:.3f} | | | |"
                    )
            rss = f"{peak_rss_mib(gateway.pid):.0f} / {peak_rss_mib(agents['public'].pid):.0f}"
            print(f"| peak RSS gateway / agent (MiB) | | {rss} | | | |")
            if args.compare:
                print(f"\n# public listener: this tree against {args.compare}, same run")
                print(f"| measure | {args.compare} | this tree | ratio |")
                print("|---|---|---|---|")
                for label, name, key, fmt in (
                    ("c1", "1 KiB, c=1: req/s", "rps", ",.0f"),
                    ("c1", "1 KiB, c=1: p50 latency (ms)", "p50", ".2f"),
                    ("c32", "1 KiB, c=32: req/s", "rps", ",.0f"),
                    ("c32", "1 KiB, c=32: p99 latency (ms)", "p99", ".2f"),
                    ("dl10m", "10 MiB download, c=4: MB/s", "mbs", ",.0f"),
                ):
                    o, n = med(label, "compare", key), med(label, "public", key)
                    print(f"| {name} | {o:{fmt}} | {n:{fmt}} | {n / o:.3f} |")
                errs = {
                    kind: sum(
                        r["errors"] for (_, k), rs in results.items() if k == kind for r in rs
                    )
                    for kind in ("compare", "public")
                }
                print(
                    f"| non-2xx responses in all wrk runs | {errs['compare']} | {errs['public']} | |"
                )
                for label in ("c1", "c32"):
                    for role in ("gateway", "agent"):
                        o = statistics.median(cpu[("compare", role, label)])
                        n = statistics.median(cpu[("public", role, label)])
                        print(
                            f"| CPU ms per small request at {label.replace('c', 'c=')}, {role} "
                            f"| {o:.3f} | {n:.3f} | {n / o:.3f} |"
                        )
        finally:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # and the children (hypercorn workers)
                except ProcessLookupError:
                    p.kill()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    print(f"warning: {p.args} did not exit", file=sys.stderr)


if __name__ == "__main__":
    main()
