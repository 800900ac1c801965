"""Forwarding benchmark: wrk against nginx directly, through revconn and optionally localtunnel.

Needs Debian's `wrk`, `nginx` (nginx-light) and `curl` on PATH (and `node` and
`npm` for ``--peer-localtunnel``). Everything runs on 127.0.0.1 (the gateways'
listeners on port 0) and stops by itself.

    python benchmarks/forwarding.py                     # 3 x 10 s per configuration
    python benchmarks/forwarding.py --seconds 3 --reps 1
    python benchmarks/forwarding.py --compare 524843f   # and that revision, interleaved
    python benchmarks/forwarding.py --peer-localtunnel ../shared/peers   # and localtunnel
    python benchmarks/forwarding.py --peer-localtunnel ../shared/peers --only-peer --seconds 3
    python benchmarks/forwarding.py --announced         # and agents in announce mode
    python benchmarks/forwarding.py --tls               # and the data plane over TLS

This tree is measured on its one data plane (``revconn-gateway --bind``: agents on
/ws/connect and /a/NAME/... on one lean trio listener; ``--admin-bind`` on port 0).
Reports req/s and p50/p99 at c=1 and c=32 for a 1 KiB file, MB/s for a 10 MiB
file at c=4, MB/s for a 100 MiB upload (curl, to a hypercorn upstream), CPU ms
per forwarded request for the gateway and the agent (from /proc/PID/stat), and
their peak RSS over the wrk runs, each against nginx direct.

``--compare REV`` also runs git revision REV (its ``src/`` extracted with
``git archive``, first on PYTHONPATH; its own gateway and agent entry points from
its pyproject.toml) in the same interleaved loop, one gateway process per front
end so CPU and RSS are per front. REV's CLI is read from its source:

* old layout (``src/revconn/_cli.py`` or ``_cli/gateway.py`` with ``--public-bind``):
  REV's lean listener (``--public-bind``, the agent dialing it too) and REV's
  hypercorn front (``--bind`` alone, "old --bind": /a/ and /ws/connect on
  hypercorn), no upload through the latter;
* new layout (``src/revconn/_cli/gateway.py`` with ``--admin-bind``): REV's data plane.

It then prints this tree's data plane against REV's lean listener (the issue's
targets: >= 1.0x for c=1 req/s, c=32 req/s and 10 MiB MB/s, <= 1.0x for CPU per
request), with REV's old --bind figures beside them. On a machine whose speed
drifts by +-15 % between runs, that same-run comparison is the one to trust.
Each round rotates the order of the configurations.

``--peer-localtunnel DIR`` adds localtunnel 2.0.2 (Node) as one more front in the
same interleaved rounds and every scenario. DIR holds ``localtunnel.sh`` (here
``../shared/peers/``; elsewhere, the server comes from a git clone of
localtunnel/server at commit 78c06f8 (see ../shared/peers/README.md)), which
npm-installs server and client into ``--localtunnel-cache`` (default
``~/.cache/revconn-bench/localtunnel``, idempotent) and starts them on loopback:
one server + ``lt`` client for nginx (its CPU and peak RSS measured like a
gateway's and an agent's: server / client) and a second pair for the hypercorn
upload upstream. localtunnel routes by Host, so every request through it carries
``Host: SUBDOMAIN.localhost:PORT`` (wrk ``-H``, curl ``-H``), with the upstream's
own paths. Each table then gets a "vs localtunnel" ratio (this front / localtunnel,
same run); a scenario localtunnel cannot do is reported as n/a with the reason.
Its processes are stopped by PID at the end and on every error path.
``--only-peer`` measures nginx direct and localtunnel alone (no revconn), to check
the peer set-up.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import _localtunnel

SECRET = "bench-secret-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
NAN = float("nan")
RUNNING: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = []  # killed by main() at exit

# CLI layouts: the lean listener is --public-bind next to hypercorn's --bind (old),
# or --bind itself with the operator API on --admin-bind (new).
PUBLIC_BIND, DATA_PLANE = "public-bind", "data-plane"


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
    return NAN


def wait_http(url: str, timeout: float = 15) -> None:
    import ssl
    import urllib.request

    # (the --tls front's certificate is the benchmark's own: not verified here)
    unverified = ssl._create_unverified_context()
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2, context=unverified) as r:
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
    RUNNING.append(proc)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/small.bin")
    return proc, url


# ---------------------------------------------------------------- which revconn to run
@dataclass
class Code:
    """One revconn to run: this tree (the venv's scripts) or a git revision's ``src/``."""

    label: str
    layout: str
    gateway: list[str]
    agent: list[str]
    env: dict[str, str] = field(default_factory=dict)


def this_tree() -> Code:
    bindir = Path(sys.executable).parent
    return Code(
        "this tree",
        DATA_PLANE,
        [str(bindir / "revconn-gateway")],
        [str(bindir / "revconn-agent")],
    )


def git_show(rev: str, path: str) -> str | None:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, check=False
    )
    return out.stdout.decode() if out.returncode == 0 else None


def cli_layout(rev: str) -> str:
    """REV's gateway CLI, read from its source (see the module docstring)."""
    for path in ("src/revconn/_cli/gateway.py", "src/revconn/_cli.py"):
        text = git_show(rev, path)
        if text is None:
            continue
        if "--admin-bind" in text:
            return DATA_PLANE
        if "--public-bind" in text:
            return PUBLIC_BIND
    sys.exit(f"--compare {rev}: no gateway CLI with --public-bind or --admin-bind in its src/")


def entry_point(target: str, prog: str) -> list[str]:
    """``python -c`` running the console script ``module:function`` as ``prog``."""
    module, _, func = target.partition(":")
    code = f"import sys; from {module} import {func} as m; sys.argv[0] = {prog!r}; sys.exit(m())"
    return [sys.executable, "-c", code]


def revision(rev: str, into: Path) -> Code:
    """REV's ``src/`` extracted under ``into``, run with REV's own entry points.

    The venv's console scripts import this tree's module paths, which an older
    revision may not have (``revconn._cli`` was one module before the layout work).
    """
    layout = cli_layout(rev)
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        sys.exit(f"--compare {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    src = into / "src"
    scripts = tomllib.loads(git_show(rev, "pyproject.toml") or "")
    scripts = scripts.get("project", {}).get("scripts", {})
    default = {
        PUBLIC_BIND: ("revconn._cli:gateway_main", "revconn._cli:agent_main"),
        DATA_PLANE: ("revconn._cli.gateway:main", "revconn._cli.agent:main"),
    }[layout]
    gateway = scripts.get("revconn-gateway", default[0])
    agent = scripts.get("revconn-agent", default[1])
    env = {"PYTHONPATH": str(src)}
    where = subprocess.run(
        [sys.executable, "-c", "import revconn; print(revconn.__file__)"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=into,
        check=False,
    ).stdout.strip()
    if not where.startswith(str(src)):
        sys.exit(f"--compare {rev}: revconn imports from {where or '?'}, not {src}")
    return Code(
        rev,
        layout,
        entry_point(gateway, "revconn-gateway"),
        entry_point(agent, "revconn-agent"),
        env,
    )


# ---------------------------------------------------------------- processes
def start(
    args: list[str], env: dict[str, str] | None = None, *, capture: bool = False
) -> subprocess.Popen[str]:
    full = {**os.environ, "REVCONN_SECRET": SECRET, "PYTHONUNBUFFERED": "1", **(env or {})}
    # A session of its own, so teardown can kill it with its children (hypercorn workers).
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=full,
        start_new_session=True,
    )
    RUNNING.append(proc)
    return proc


class Lines:
    """A process's stdout read by a thread (so the pipe never fills), line by line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                self._lines.put(line)
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def url_after(self, marker: str, timeout: float = 30) -> str:
        """The first URL on the next line containing ``marker`` (``... on URL, URL``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(marker) from None
            if line is None:
                raise RuntimeError(f"the gateway exited before printing {marker!r}")
            if marker in line:
                return line.split(marker, 1)[1].strip().split(", ")[0]


def start_gateway(
    code: Code, front: str, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[str], str]:
    """``code``'s gateway, ready, and the URL of ``front``: agents dial it and /a/ is
    served on it. ``front`` is "lean" (the data plane, or --public-bind in the old
    layout) or "bind" (the old layout's hypercorn --bind alone)."""
    any_port = "127.0.0.1:0"
    args = [*code.gateway, "--bind", any_port, "--log-level", "warning", *extra]
    if code.layout == DATA_PLANE:
        assert front == "lean", front
        args += ["--admin-bind", any_port]
    elif front == "lean":
        args += ["--public-bind", any_port]
    proc = start(args, code.env, capture=True)
    lines = Lines(proc)
    url = lines.url_after("listening on ")  # --bind
    wait_http(url + "/healthz")
    if code.layout == DATA_PLANE:
        wait_http(lines.url_after("admin API on ") + "/healthz")
    elif front == "lean":
        url = lines.url_after("public traffic on ")  # ready once /a/ answers, checked later
    return proc, url


def certificates(workdir: Path) -> tuple[Path, Path, Path]:
    """A trustme CA and a certificate for 127.0.0.1 in ``workdir`` (once)."""
    cert, key, ca = workdir / "cert.pem", workdir / "key.pem", workdir / "ca.pem"
    if not cert.exists():
        import trustme

        authority = trustme.CA()
        issued = authority.issue_cert("127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(str(cert))
        for extra in issued.cert_chain_pems[1:]:
            extra.write_to_path(str(cert), append=True)
        issued.private_key_pem.write_to_path(str(key))
        authority.cert_pem.write_to_path(str(ca))
    return cert, key, ca


def wrk(url: str, conns: int, seconds: int, host: str | None = None) -> dict[str, float]:
    """One wrk run; ``host``, if given, is sent as the Host header (localtunnel)."""
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
            *(["-H", f"Host: {host}"] if host else []),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return NAN
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    def transfer() -> float:
        m = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", out)
        assert m
        scale = {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1, "GB": 1024}[m.group(2)]
        return float(m.group(1)) * scale * 1.048576  # MiB/s -> MB/s

    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": ms("50"),
        "p99": ms("99"),
        "mbs": transfer(),
        "requests": requests,
        "errors": int(errors.group(1)) if errors else 0,
        "socket_errors": sum(int(n) for n in sockets.groups()) if sockets else 0,
    }


def curl_upload(
    url: str, path: Path, host: str | None = None, max_time: int | None = None
) -> float:
    """MB/s of one POST of ``path``; ``host``, if given, is sent as the Host header."""
    run = subprocess.run(
        [
            "curl",
            "-s",
            "-S",
            "-o",
            "/dev/null",
            "-w",
            "%{speed_upload} %{http_code}",
            "-k",  # (the --tls front's own certificate)
            *(["-H", f"Host: {host}"] if host else []),
            *(["--max-time", str(max_time)] if max_time else []),
            "--data-binary",
            f"@{path}",
            url,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    out = run.stdout.split()
    if run.returncode != 0 or len(out) != 2 or out[1] != "200":
        code = out[1] if len(out) == 2 else "?"
        raise RuntimeError(f"curl exit {run.returncode}, HTTP {code}: {run.stderr.strip()}")
    return float(out[0]) / 1e6


@dataclass
class Front:
    """One way to nginx through a tunnel: its two processes (a revconn gateway and its
    agent for nginx, or localtunnel's server and client), the base URL (revconn's
    /a/NAME, localtunnel's server root) and the Host header it needs, if any."""

    title: str
    pids: tuple[int, int]  # (gateway, agent) or (server, client): CPU and RSS
    base: str
    upload: str | None  # the upload URL, if this front also gets the upload test
    host: str | None = None  # Host header for every request to base (localtunnel)
    upload_host: str | None = None  # Host header for the upload URL
    peer: bool = False  # not revconn: a failure is reported as n/a, not fatal


def ratio(new: float, old: float) -> float:
    return new / old if old else NAN


# ---------------------------------------------------------------- main
LT = "lt"  # the localtunnel front's key


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="localtunnel: DIR holds localtunnel.sh (here ../shared/peers/); elsewhere, "
        "the server comes from a git clone of localtunnel/server at commit "
        f"{_localtunnel.SERVER_COMMIT} (see ../shared/peers/README.md).",
    )
    parser.add_argument("--seconds", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--compare", metavar="REV", help="also measure git revision REV, same interleaved loop"
    )
    parser.add_argument(
        "--peer-localtunnel",
        metavar="DIR",
        type=Path,
        help=f"also measure localtunnel {_localtunnel.VERSION} (Node) in the same interleaved "
        "loop, every scenario, with a 'vs localtunnel' ratio in each table; DIR holds "
        "localtunnel.sh (here ../shared/peers/)",
    )
    parser.add_argument(
        "--localtunnel-cache",
        metavar="CACHE_DIR",
        type=Path,
        default=_localtunnel.DEFAULT_CACHE,
        help="where localtunnel.sh setup npm-installs server and client "
        "(idempotent; default: %(default)s)",
    )
    parser.add_argument(
        "--only-peer",
        action="store_true",
        help="measure only nginx direct and the peer (no revconn front): checks the peer set-up",
    )
    parser.add_argument(
        "--announced",
        action="store_true",
        help="also measure this tree with agents in announce mode (--tunnel-url: the "
        "gateway connects to the upstream itself, no tunnel), same interleaved loop",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also measure this tree with the gateway serving HTTPS/WSS (--certfile/--keyfile, "
        "a trustme certificate) and agents dialing wss://, same interleaved loop",
    )
    args = parser.parse_args()
    if args.only_peer and args.peer_localtunnel is None:
        parser.error("--only-peer needs --peer-localtunnel DIR")
    if args.only_peer and args.compare:
        parser.error("--only-peer measures no revconn: drop --compare")
    tools = ["wrk", "nginx", "curl"] + (["node", "npm"] if args.peer_localtunnel else [])
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install wrk nginx-light curl nodejs npm")

    # SIGTERM/SIGHUP end the run through the finally below, which stops every process.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="revconn-bench-") as tmp:
        workdir = Path(tmp)
        try:
            run(args, workdir)
        finally:
            for warning in _localtunnel.stop_all():  # not our children: by PID
                print(f"warning: {warning}", file=sys.stderr)
            for p in RUNNING:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # and the children (hypercorn workers)
                except ProcessLookupError:
                    p.kill()
            for p in RUNNING:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    print(f"warning: {p.args} did not exit", file=sys.stderr)


def run(args: argparse.Namespace, workdir: Path) -> None:
    old = revision(args.compare, workdir / "compare") if args.compare else None
    peer = None
    lt_setup = ""
    if args.peer_localtunnel is not None:
        peer = _localtunnel.LocalTunnel(args.peer_localtunnel, args.localtunnel_cache)
        lt_setup = peer.setup()  # before anything runs: fails fast, a no-op when warm
    _nginx, nginx_url = start_nginx(workdir)
    up_port = free_port()
    hypercorn = [sys.executable, "-m", "hypercorn", "--worker-class", "trio"]
    start(
        [*hypercorn, "--bind", f"127.0.0.1:{up_port}", "tests.upstream_app:app"],
        {"PYTHONPATH": str(ROOT)},
    )
    upload_url = f"http://127.0.0.1:{up_port}"
    wait_http(upload_url + "/status/200")
    # (kind, scenario) -> why that front has no figure for it; scenarios: c1, c32, dl10m, upload
    na: dict[tuple[str, str], str] = {}

    def open_front(
        code: Code,
        front: str,
        title: str,
        with_upload: bool,
        *,
        announced: bool = False,
        tls: bool = False,
    ) -> Front:
        """A gateway and its agents "bench" (nginx) and "upload" (hypercorn):
        tunnel agents, or with ``announced`` agents that announce the upstream's
        URL (--tunnel-url; the gateway then connects to it itself); with
        ``tls`` the gateway serves HTTPS/WSS and agents dial wss://."""
        extra: tuple[str, ...] = ("--announce-allow", "127.0.0.0/8") if announced else ()
        agent_tls: list[str] = []
        if tls:
            cert, key, ca = certificates(workdir)
            extra = (*extra, "--certfile", str(cert), "--keyfile", str(key))
            agent_tls = ["--ca-file", str(ca)]
        gateway, url = start_gateway(code, front, extra)

        def agent(name: str, upstream: str) -> subprocess.Popen[str]:
            mode = ["--tunnel-url", upstream] if announced else ["--upstream", upstream]
            cmd = [*code.agent, "serve", "--gateway", url, "--name", name, *mode, *agent_tls]
            return start([*cmd, "--log-level", "warning"], code.env)

        bench = agent("bench", nginx_url)
        wait_http(url + "/a/bench/small.bin")
        upload = None
        if with_upload:
            agent("upload", upload_url)
            wait_http(url + "/a/upload/status/200")
            upload = url + "/a/upload/upload"
        return Front(title, (gateway.pid, bench.pid), url + "/a/bench", upload)

    def open_localtunnel(peer: _localtunnel.LocalTunnel) -> Front:
        """A server + client for nginx, and a second pair for the upload upstream
        (localtunnel.sh starts one server per client). nginx's / answers 403 (no
        index), so the script's readiness probe (LT_READY_PATH) is /small.bin."""
        nginx_port = int(nginx_url.rsplit(":", 1)[1])
        bench = peer.start(free_port(), nginx_port, "revconn-bench", "/small.bin")
        upload, upload_host = None, None
        try:
            t = peer.start(free_port(), up_port, "revconn-upload", "/status/200")
            upload, upload_host = t.url + "/upload", t.host
        except RuntimeError as e:
            na[(LT, "upload")] = f"its tunnel to the upload upstream did not start: {e}"
        title = f"localtunnel {_localtunnel.VERSION}"
        pids = (bench.server_pid, bench.client_pid)
        return Front(title, pids, bench.url, upload, bench.host, upload_host, peer=True)

    # Keys: "new" = this tree's data plane; "old" = REV's lean listener (--public-bind,
    # or its data plane in the new layout); "bind" = REV's hypercorn --bind front;
    # "lt" = localtunnel (server + client).
    fronts: dict[str, Front] = {}
    if not args.only_peer:
        fronts["new"] = open_front(this_tree(), "lean", "this tree, data plane", True)
    if args.announced:
        title = "this tree, announced URL (--tunnel-url)"
        fronts["url"] = open_front(this_tree(), "lean", title, True, announced=True)
    if args.tls:
        title = "this tree, data plane over TLS"
        fronts["tls"] = open_front(this_tree(), "lean", title, True, tls=True)
    if old is not None:
        lean = "public listener" if old.layout == PUBLIC_BIND else "data plane"
        fronts["old"] = open_front(old, "lean", f"{old.label}, {lean}", True)
        if old.layout == PUBLIC_BIND:
            fronts["bind"] = open_front(old, "bind", f"{old.label}, old --bind (hypercorn)", False)
    if peer is not None:
        fronts[LT] = open_localtunnel(peer)
    has_lt = LT in fronts
    revconn = [k for k in fronts if k != LT]

    kinds = ["direct", *fronts]
    targets = {"direct": nginx_url, **{k: f.base for k, f in fronts.items()}}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    cpu: dict[tuple[str, str, str], list[float]] = {}
    plan = [("c1", "/small.bin", 1), ("c32", "/small.bin", 32), ("dl10m", "/big.bin", 4)]
    for rep in range(args.reps):
        order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
        for label, path, conns in plan:
            for kind in order:
                f = fronts.get(kind)
                pids = list(f.pids) if f else []
                try:
                    before = [cpu_seconds(pid) for pid in pids]
                    r = wrk(targets[kind] + path, conns, args.seconds, f.host if f else None)
                    after = [cpu_seconds(pid) for pid in pids]
                except (subprocess.SubprocessError, OSError, AttributeError) as e:
                    if not (f and f.peer):
                        raise
                    na.setdefault((kind, label), f"wrk failed: {describe(e)}")
                    continue
                results.setdefault((label, kind), []).append(r)
                if pids and label != "dl10m" and r["requests"]:
                    g, a = (
                        (y - x) / r["requests"] * 1000 for x, y in zip(before, after, strict=True)
                    )
                    for role, ms in (("gateway", g), ("agent", a), ("total", g + a)):
                        cpu.setdefault((kind, role, label), []).append(ms)
    rss = {k: (peak_rss_mib(f.pids[0]), peak_rss_mib(f.pids[1])) for k, f in fronts.items()}

    upload_file = workdir / "upload.bin"
    upload_file.write_bytes(os.urandom(100 * 1024 * 1024))
    up_kinds = ["direct", *(k for k, f in fronts.items() if f.upload)]
    uploads: dict[str, list[float]] = {k: [] for k in up_kinds}
    for _ in range(args.reps):
        for kind in up_kinds:
            f = fronts.get(kind)
            url = f.upload if f and f.upload else upload_url + "/upload"
            host = f.upload_host if f else None
            try:
                # A peer gets a time limit: a stalled upload is n/a, not a hung run.
                uploads[kind].append(curl_upload(url, upload_file, host, 300 if host else None))
            except RuntimeError as e:
                if not (f and f.peer):
                    raise
                na.setdefault((kind, "upload"), f"upload failed: {e}")

    def wrk_med(label: str, key: str) -> Callable[[str], float]:
        def get(kind: str) -> float:
            rs = results.get((label, kind))
            return statistics.median(r[key] for r in rs) if rs else NAN

        return get

    def upload_med(kind: str) -> float:
        return statistics.median(uploads[kind]) if uploads.get(kind) else NAN

    def cpu_med(role: str, label: str) -> Callable[[str], float]:
        def get(kind: str) -> float:
            ms = cpu.get((kind, role, label))
            return statistics.median(ms) if ms else NAN

        return get

    def errors(kind: str, key: str = "errors") -> float:
        return sum(r[key] for (_, k), rs in results.items() if k == kind for r in rs)

    def cell(value: float, fmt: str) -> str:
        return "" if value != value else f"{value:{fmt}}"  # NaN: not measured

    scenario = {
        "c1": "1 KiB, c=1",
        "c32": "1 KiB, c=32",
        "dl10m": "10 MiB download, c=4",
        "upload": "100 MiB upload",
    }

    def value_cell(kind: str, label: str | None, value: float, fmt: str) -> str:
        if value != value and label and (kind, label) in na:
            return "n/a"
        return cell(value, fmt)

    compare = f" --compare {args.compare}" if args.compare else ""
    compare += " --announced" if args.announced else ""
    compare += " --tls" if args.tls else ""
    if has_lt:
        compare += f" --peer-localtunnel {args.peer_localtunnel}"
        compare += " --only-peer" if args.only_peer else ""
    print(
        f"# forwarding: python benchmarks/forwarding.py --seconds {args.seconds} "
        f"--reps {args.reps}{compare}"
    )
    if old is not None:
        cli = "--bind (hypercorn) + --public-bind" if old.layout == PUBLIC_BIND else "data plane"
        print(f"# {old.label}: its CLI layout is {cli}; one gateway process per front")
    if has_lt:
        print(
            f"# localtunnel: {lt_setup.removeprefix('localtunnel: ')}; server localtunnel/server"
            f"@{_localtunnel.SERVER_COMMIT}, Host: {fronts[LT].host}; its two processes are the "
            "server and the lt client (the gateway / agent figures below)"
        )
    head = "| measure | direct (nginx) |"
    for k in revconn:
        head += f" revconn, {fronts[k].title} | ratio |" + (" vs localtunnel |" if has_lt else "")
    if has_lt:
        head += f" {fronts[LT].title} | ratio |"
    ncols = head.count("|") - 1
    print(head)
    print("|" + "---|" * ncols)
    speed: list[tuple[str, str | None, Callable[[str], float], str]] = []
    for label, name in (("c1", "1 KiB, c=1"), ("c32", "1 KiB, c=32")):
        speed.append((f"{name}: req/s", label, wrk_med(label, "rps"), ",.0f"))
        speed.append((f"{name}: p50 latency (ms)", label, wrk_med(label, "p50"), ".2f"))
        speed.append((f"{name}: p99 latency (ms)", label, wrk_med(label, "p99"), ".2f"))
    speed.append(("10 MiB download, c=4: MB/s", "dl10m", wrk_med("dl10m", "mbs"), ",.0f"))
    speed.append(("100 MiB upload (hypercorn upstream): MB/s", "upload", upload_med, ",.0f"))
    for name, label, get, fmt in speed:
        d = get("direct")
        lt = get(LT) if has_lt else NAN
        cells = []
        for kind in revconn:
            v = get(kind)
            c = f"{value_cell(kind, label, v, fmt)} | {cell(ratio(v, d), '.3f')}"
            cells.append(c + (f" | {cell(ratio(v, lt), '.3f')}" if has_lt else ""))
        if has_lt:
            cells.append(f"{value_cell(LT, label, lt, fmt)} | {cell(ratio(lt, d), '.3f')}")
        print(f"| {name} | {d:{fmt}} | " + " | ".join(cells) + " |")
    roles = "gateway / agent" + (" (localtunnel: server / client)" if has_lt else "")
    # name, shown value of a front, number for its "vs localtunnel" ratio (or None)
    per_front: list[tuple[str, Callable[[str], str], Callable[[str], float] | None]] = [
        ("non-2xx responses in all wrk runs", lambda k: f"{errors(k):.0f}", None),
        (
            "socket errors (connect, read, write, timeout) in all wrk runs",
            lambda k: f"{errors(k, 'socket_errors'):.0f}",
            None,
        ),
    ]
    for label in ("c1", "c32"):
        per_front.append(
            (
                f"CPU ms per small request at {label.replace('c', 'c=')}, {roles}",
                lambda k, lb=label: (
                    f"{cell(cpu_med('gateway', lb)(k), '.3f')} / "
                    f"{cell(cpu_med('agent', lb)(k), '.3f')}"
                ),
                lambda k, lb=label: cpu_med("total", lb)(k),
            )
        )
    per_front.append(
        (
            f"peak RSS over the wrk runs, {roles} (MiB)",
            lambda k: f"{cell(rss[k][0], '.0f')} / {cell(rss[k][1], '.0f')}",
            lambda k: rss[k][0] + rss[k][1],
        )
    )
    for name, show, num in per_front:
        line = f"| {name} | |"
        for k in revconn:
            line += f" {show(k)} | |"
            if has_lt:
                line += f" {cell(ratio(num(k), num(LT)), '.3f') if num else ''} |"
        if has_lt:
            line += f" {show(LT)} | |"
        print(line)
    if has_lt and revconn:
        print(
            "\n# ratio: against direct (nginx); vs localtunnel: that revconn front / localtunnel,"
            " same run (CPU and RSS rows: of the two processes' sum)"
        )
    notes = [f"n/a: {fronts[k].title}, {scenario[s]}: {why}" for (k, s), why in na.items()]
    for (label, kind), rs in results.items():
        bad, total = sum(r["errors"] for r in rs), sum(r["requests"] for r in rs)
        if bad and kind != "direct":
            title = fronts[kind].title
            notes.append(
                f"{title}, {scenario[label]}: {bad:.0f} of {total:.0f} responses non-2xx "
                "(its req/s counts them)"
            )
    for note in notes:
        print(f"# {note}")

    if old is None:
        return
    lean = "public listener" if old.layout == PUBLIC_BIND else "data plane"
    print(f"\n# this tree's data plane against {old.label}'s {lean}, same run")
    bind = "bind" in fronts
    head = f"| measure | {old.label}, {lean} | this tree, data plane | ratio | target |"
    if bind:
        head += f" {old.label}, old --bind | ratio, data plane / old --bind |"
    if has_lt:
        head += (
            f" {fronts[LT].title} (server / client) | vs localtunnel, data plane / localtunnel |"
        )
    print(head)
    print("|---|---|---|---|---|" + ("---|---|" if bind else "") + ("---|---|" if has_lt else ""))
    rows: list[tuple[str, Callable[[str], float], str, str, bool, str | None]] = [
        # name, value of a front, format, target (">=", "<=" or ""), print a ratio, scenario
        ("1 KiB, c=1: req/s", wrk_med("c1", "rps"), ",.0f", ">=", True, "c1"),
        ("1 KiB, c=1: p50 latency (ms)", wrk_med("c1", "p50"), ".2f", "", True, "c1"),
        ("1 KiB, c=1: p99 latency (ms)", wrk_med("c1", "p99"), ".2f", "", True, "c1"),
        ("1 KiB, c=32: req/s", wrk_med("c32", "rps"), ",.0f", ">=", True, "c32"),
        ("1 KiB, c=32: p50 latency (ms)", wrk_med("c32", "p50"), ".2f", "", True, "c32"),
        ("1 KiB, c=32: p99 latency (ms)", wrk_med("c32", "p99"), ".2f", "", True, "c32"),
        ("10 MiB download, c=4: MB/s", wrk_med("dl10m", "mbs"), ",.0f", ">=", True, "dl10m"),
        ("100 MiB upload: MB/s", upload_med, ",.0f", "", True, "upload"),
        ("non-2xx responses in all wrk runs", errors, ".0f", "", False, None),
    ]
    for label in ("c1", "c32"):
        at = label.replace("c", "c=")
        for role in ("gateway", "agent", "total"):
            who = "gateway + agent" if role == "total" else role
            rows.append(
                (
                    f"CPU ms per small request at {at}, {who}",
                    cpu_med(role, label),
                    ".3f",
                    "<=",
                    True,
                    label,
                )
            )
    rows.append(("peak RSS, gateway (MiB)", lambda k: rss[k][0], ".0f", "", True, None))
    rows.append(("peak RSS, agent (MiB)", lambda k: rss[k][1], ".0f", "", True, None))
    met: list[bool] = []
    for name, get, fmt, target, show_ratio, label in rows:
        o, n = get("old"), get("new")
        r = ratio(n, o)
        goal = ""
        if target:
            ok = r >= 1.0 if target == ">=" else r <= 1.0
            met.append(ok)
            goal = f"{target} 1.0: {'met' if ok else 'MISSED'}"
        shown = cell(r, ".3f") if show_ratio else ""
        line = f"| {name} | {cell(o, fmt)} | {cell(n, fmt)} | {shown} | {goal} |"
        if bind:
            b = get("bind")
            line += f" {cell(b, fmt)} | {cell(ratio(n, b), '.3f') if show_ratio else ''} |"
        if has_lt:
            lt = get(LT)
            line += f" {value_cell(LT, label, lt, fmt)} |"
            line += f" {cell(ratio(n, lt), '.3f') if show_ratio else ''} |"
        print(line)
    print(f"\ntargets met: {sum(met)} of {len(met)}")


def describe(e: BaseException) -> str:
    """A one-line reason for an n/a cell."""
    if isinstance(e, subprocess.CalledProcessError):
        err = (e.stderr or e.stdout or "").strip().splitlines()
        return f"exit {e.returncode}" + (f": {err[-1]}" if err else "")
    if isinstance(e, subprocess.TimeoutExpired):
        return f"no end after {e.timeout:.0f} s"
    return f"{type(e).__name__}: {e}"


if __name__ == "__main__":
    main()
