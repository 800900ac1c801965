"""localtunnel 2.0.2 (Node) as a peer front for ``forwarding.py``.

Wraps ``DIR/localtunnel.sh`` (``../shared/peers/`` in this workplace; see its
README.md): ``setup CACHE_DIR`` npm-installs the server (localtunnel/server at
commit 78c06f8) and the client (npm localtunnel@2.0.2) into CACHE_DIR, and
``start CACHE_DIR SERVER_PORT UPSTREAM_PORT SUBDOMAIN`` leaves a server and an
``lt`` client running on 127.0.0.1 and prints
``READY <server_pid> <client_pid> <url> <host_header_value>``.

The two Node processes are not our children (the script starts them with
``setsid`` and exits), so every tunnel started here is recorded in ``STARTED``
and ``stop_all()`` ends them by PID: SIGTERM, then SIGKILL. If ``start`` fails
or is interrupted, the script is terminated (its EXIT trap kills what it had
started) and any process still carrying this tunnel's server port or
subdomain on its command line is killed too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

VERSION = "2.0.2"
SERVER_COMMIT = "78c06f8"
DEFAULT_CACHE = Path("~/.cache/revconn-bench/localtunnel")
# Per start phase (server up, client registered, 200 through the tunnel); the
# script has three phases and a short wait for the socket pool.
WAIT_S = 30
START_TIMEOUT = 3 * WAIT_S + 30
SETUP_TIMEOUT = 600


@dataclass
class Tunnel:
    """One running localtunnel: its server, its client, and how to reach it."""

    server_pid: int
    client_pid: int
    url: str  # http://127.0.0.1:SERVER_PORT, no trailing slash: append the upstream's path
    host: str  # send as the Host header: SUBDOMAIN.localhost:SERVER_PORT
    server_port: int
    subdomain: str


STARTED: list[Tunnel] = []


class LocalTunnel:
    def __init__(self, peer_dir: Path, cache: Path) -> None:
        self.script = peer_dir / "localtunnel.sh"
        if not self.script.is_file():
            raise FileNotFoundError(f"{self.script}: no such file (--peer-localtunnel DIR)")
        self.cache = cache.expanduser()

    def setup(self) -> str:
        """npm-install into the cache dir (idempotent); the script's one-line summary."""
        out = subprocess.run(
            ["bash", str(self.script), "setup", str(self.cache)],
            capture_output=True,
            text=True,
            timeout=SETUP_TIMEOUT,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"localtunnel.sh setup failed:\n{out.stderr.strip()}")
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""

    def start(
        self, server_port: int, upstream_port: int, subdomain: str, ready_path: str
    ) -> Tunnel:
        """A server on ``server_port`` and a client for ``upstream_port``, ready:
        ``ready_path`` answered 200 through the tunnel (the script's LT_READY_PATH)."""
        env = {**os.environ, "LT_READY_PATH": ready_path, "LT_WAIT_S": str(WAIT_S)}
        proc = subprocess.Popen(
            [
                "bash",
                *map(str, (self.script, "start", self.cache, server_port, upstream_port)),
                subdomain,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=START_TIMEOUT)
            fields = stdout.split()
            if proc.returncode != 0 or len(fields) != 5 or fields[0] != "READY":
                raise RuntimeError(
                    f"localtunnel.sh start failed (exit {proc.returncode}):\n{stderr.strip()}"
                )
        except BaseException:  # also a timeout, a KeyboardInterrupt, a SystemExit
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # its EXIT trap kills server and client
                    proc.wait(timeout=5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()
            for pid in leftovers(server_port, subdomain):
                stop_pid(pid)
            raise
        tunnel = Tunnel(
            int(fields[1]),
            int(fields[2]),
            fields[3].rstrip("/"),
            fields[4],
            server_port,
            subdomain,
        )
        STARTED.append(tunnel)
        if not (is_ours(tunnel.server_pid, tunnel) and is_ours(tunnel.client_pid, tunnel)):
            stop_all()
            raise RuntimeError(f"localtunnel.sh start: PIDs {fields[1:3]} are not its processes")
        return tunnel


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _after(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def is_ours(pid: int, tunnel: Tunnel) -> bool:
    """``pid`` is still this tunnel's server or client (and not a reused PID)."""
    argv = _cmdline(pid)
    if any(a.endswith("bin/server") for a in argv):
        return _after(argv, "--port") == str(tunnel.server_port)
    if any(a.endswith("lt.js") for a in argv):
        return (
            _after(argv, "--subdomain") == tunnel.subdomain
            and _after(argv, "--host") == f"http://localhost:{tunnel.server_port}"
        )
    return False


def leftovers(server_port: int, subdomain: str) -> list[int]:
    """PIDs of any server or client of this tunnel, found by their command lines."""
    probe = Tunnel(0, 0, "", "", server_port, subdomain)
    pids = []
    for entry in Path("/proc").iterdir():
        pid = int(entry.name) if entry.name.isdigit() else 0
        if pid and pid != os.getpid() and is_ours(pid, probe) and alive(pid):
            pids.append(pid)
    return pids


def alive(pid: int) -> bool:
    """Running (a zombie, left to whoever reaps it, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def stop_pid(pid: int, grace: float = 5) -> bool:
    """SIGTERM ``pid`` (its process group if it leads one), SIGKILL after ``grace``
    seconds; True once it is gone."""

    def send(sig: signal.Signals) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        if not alive(pid):
            return True
        send(sig)
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return not alive(pid)


def stop_all() -> list[str]:
    """Stop every tunnel started here; a warning for each process that stayed."""
    warnings = []
    while STARTED:
        tunnel = STARTED.pop()
        for pid in (tunnel.client_pid, tunnel.server_pid):
            if is_ours(pid, tunnel) and not stop_pid(pid):
                warnings.append(f"localtunnel pid {pid} did not exit")
        for pid in leftovers(tunnel.server_port, tunnel.subdomain):
            if not stop_pid(pid):
                warnings.append(f"localtunnel pid {pid} did not exit")
    return warnings
