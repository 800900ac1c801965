"""WebSocket passthrough benchmark: memory per idle WebSocket, and echo round trips.

Real executables on 127.0.0.1 (every listener on port 0), all started and
killed (by PID) by this script; every phase has a deadline.

* the upstream: a WebSocket echo server on the ``websockets`` library
  (asyncio; pings and compression off), in a subprocess of this script;
* this tree's ``revconn-gateway`` and one ``revconn-agent serve --name echo
  --upstream http://127.0.0.1:ECHO`` (``--max-streams`` raised above ``--n``:
  every WebSocket holds a tunnel stream);
* the clients: raw trio sockets + wsproto, in this process.

(a) **Idle memory.** In one run: N idle keep-alive HTTP connections to the
gateway (each did one ``GET /healthz``; answered by the gateway itself, no
agent), then, with those still open, N WebSockets through ``/a/echo/`` (one
echo each), each batch left idle for ``--idle`` seconds. The gateway's RSS
(VmRSS) is read before and after each batch: KiB per idle HTTP connection,
KiB per idle passthrough WebSocket, and their difference (what the
passthrough itself costs); the agent's and the echo server's growth per
WebSocket too. After the idle period every connection must still answer.
``--profile`` repeats (a) with the gateway under tracemalloc (a subprocess of
this script that runs the gateway's CLI and dumps a snapshot and a count of
gc-tracked objects by type on SIGUSR1) and prints where the bytes of each
batch went: by allocating line, by the revconn line that caused it, by type.

(b) **Echo round trips.** 64-byte binary messages, one at a time per
WebSocket, ``--messages`` per measurement over 1 WebSocket and over 32
concurrent ones, straight to the echo server ("direct") and through the
gateway and agent ("tunnel"), interleaved (the order alternates by round)
for ``--reps`` rounds: round trips/s, p50/p99 latency (pooled over the
rounds), the ratio tunnel/direct (and its spread over the rounds), and the CPU per round trip of every
process (from /proc/PID/stat; the clients' own from process_time).

    python benchmarks/websockets.py                      # N=1000, 5,000 messages, 5 rounds
    python benchmarks/websockets.py --profile            # and where the gateway's bytes go
    python benchmarks/websockets.py --n 200 --messages 1000 --reps 1 --idle 1   # a quick look

This file is named like the ``websockets`` package: its folder is taken off
``sys.path`` first, so ``import websockets`` (the echo server, and revconn's
masking in the traced gateway) finds the library.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

SECRET = "bench-secret-0123456789abcdef"
AGENT = "echo"
TICK = os.sysconf("SC_CLK_TCK")
TARGET_KIB = 4.0  # the "at most a few KiB each on the gateway", read as <= 4 KiB
PAYLOAD = bytes(range(64))
HANDSHAKES = 64  # concurrent connection set-ups
WARM = 20  # warm-up connections (a) and round trips per WebSocket (b)
READ = 64 * 1024


# ---------------------------------------------------------------- subprocess roles
def run_echo() -> None:
    """The upstream: a ``websockets`` echo server; prints its port."""
    import asyncio

    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    async def echo(ws: Any) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass

    async def main() -> None:
        async with serve(
            echo, "127.0.0.1", 0, ping_interval=None, compression=None, backlog=4096
        ) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            print(f"listening on {port}", flush=True)
            await asyncio.Future()

    asyncio.run(main())


def run_traced_gateway(snapdir: str, argv: list[str]) -> None:
    """revconn-gateway under tracemalloc: SIGUSR1 writes ``snapK.trace`` (the
    snapshot) and ``snapK.json`` (gc-tracked objects by type: count, and
    shallow size by ``sys.getsizeof``, a coroutine's including its frame)
    into snapdir."""
    import gc
    import tracemalloc

    tracemalloc.start(40)
    taken = 0

    def snap(_signum: int, _frame: object) -> None:
        nonlocal taken
        taken += 1
        gc.collect()
        base = Path(snapdir) / f"snap{taken}"
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for o in gc.get_objects():
            kind = type(o)
            name = f"{kind.__module__}.{kind.__qualname__}"
            if kind.__name__ in ("coroutine", "generator", "async_generator"):
                name = f"{kind.__name__} {getattr(o, '__qualname__', '?')}"  # (size: its frame)
            counts[name] += 1
            sizes[name] += sys.getsizeof(o)
        tracemalloc.take_snapshot().dump(str(base) + ".trace")
        Path(str(base) + ".tmp").write_text(json.dumps({"counts": counts, "sizes": sizes}))
        Path(str(base) + ".tmp").rename(str(base) + ".json")  # last: the "done" marker

    signal.signal(signal.SIGUSR1, snap)
    from revconn._cli.gateway import main

    sys.argv = ["revconn-gateway", *argv]
    main()


# ---------------------------------------------------------------- processes
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


class Proc:
    """A subprocess whose output goes to files (read back on failure)."""

    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.out = workdir / f"{name}.out"
        self.err = workdir / f"{name}.err"
        env = {**os.environ, "REVCONN_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.popen = subprocess.Popen(
                args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env
            )
        self.pid = self.popen.pid

    def wait_for(self, marker: str, timeout: float = 30) -> str:
        """The rest of the first output line containing ``marker``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.out.read_text(errors="replace").splitlines():
                if marker in line:
                    return line.split(marker, 1)[1].split(",")[0].strip()
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no {marker!r}\n{self.tail()}")

    def tail(self) -> str:
        text = self.out.read_text(errors="replace") + self.err.read_text(errors="replace")
        return "\n".join(text.splitlines()[-20:])

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)


@dataclass
class Stack:
    echo: Proc
    gateway: Proc
    agent: Proc
    echo_port: int
    gateway_port: int
    snapdir: Path | None = None
    procs: list[Proc] = field(default_factory=list)

    def pids(self) -> dict[str, int]:
        return {"gateway": self.gateway.pid, "agent": self.agent.pid, "echo": self.echo.pid}

    def kill(self) -> None:
        for p in reversed(self.procs):
            p.kill()


def endpoints(admin: str) -> list[str]:
    req = urllib.request.Request(
        admin + "/endpoints", headers={"Authorization": f"Bearer {SECRET}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return [row["name"] for row in json.load(r)["endpoints"]]


def start_stack(workdir: Path, n: int, *, traced: bool = False) -> Stack:
    procs: list[Proc] = []
    try:
        echo = Proc("echo", [sys.executable, str(HERE), "_echo"], workdir)
        procs.append(echo)
        echo_port = int(echo.wait_for("listening on "))
        gw_args = [
            "--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0",
            # Longer than the run: the idle keep-alive connections must stay.
            "--idle-timeout", "600", "--log-level", "warning",
        ]  # fmt: skip
        snapdir = None
        if traced:
            snapdir = workdir / "snapshots"
            snapdir.mkdir()
            cmd = [sys.executable, str(HERE), "_traced_gateway", str(snapdir), *gw_args]
        else:
            cmd = [str(Path(sys.executable).parent / "revconn-gateway"), *gw_args]
        gateway = Proc("gateway-traced" if traced else "gateway", cmd, workdir)
        procs.append(gateway)
        url = gateway.wait_for("listening on ")
        admin = gateway.wait_for("admin API on ")
        agent_cmd = [
            str(Path(sys.executable).parent / "revconn-agent"), "serve",
            "--gateway", url, "--name", AGENT,
            "--upstream", f"http://127.0.0.1:{echo_port}",
            "--max-streams", str(n + 2 * HANDSHAKES), "--log-level", "warning",
        ]  # fmt: skip
        agent = Proc("agent", agent_cmd, workdir)
        procs.append(agent)
        deadline = time.monotonic() + 30
        while AGENT not in endpoints(admin):
            if time.monotonic() > deadline or agent.popen.poll() is not None:
                raise RuntimeError(f"agent not online\n{agent.tail()}")
            time.sleep(0.1)
        port = int(url.rsplit(":", 1)[1])
        return Stack(echo, gateway, agent, echo_port, port, snapdir, procs)
    except BaseException:
        for p in reversed(procs):
            p.kill()
        raise


# ---------------------------------------------------------------- clients
class WebSocket:
    """A WebSocket client on a raw trio stream, with wsproto."""

    def __init__(self, stream: Any) -> None:
        from wsproto import ConnectionType, WSConnection

        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Any] = []
        self.frame = b""

    @classmethod
    async def open(cls, port: int, target: str) -> WebSocket:
        import trio
        from wsproto.events import AcceptConnection, BytesMessage, Request

        self = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await self.stream.send_all(self.ws.send(Request(host="127.0.0.1", target=target)))
        answer = await self.next()
        if not isinstance(answer, AcceptConnection):
            raise RuntimeError(f"handshake refused: {answer!r}")
        # One masked frame, sent again for every message (a fixed masking key
        # is valid, and keeps the client's cost per message small).
        self.frame = self.ws.send(BytesMessage(PAYLOAD))
        return self

    async def next(self) -> Any:
        while not self.events:
            data = await self.stream.receive_some(READ)
            if not data:
                raise EOFError("connection closed")
            self.ws.receive_data(data)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def echo(self) -> None:
        """One 64-byte round trip."""
        await self.stream.send_all(self.frame)
        got = b""
        while True:
            event = await self.next()
            got += event.data
            if event.message_finished:
                break
        if got != PAYLOAD:
            raise RuntimeError(f"echo mismatch: {got!r}")

    async def aclose(self) -> None:
        await self.stream.aclose()


async def http_get(stream: Any) -> None:
    """One keep-alive ``GET /healthz`` on ``stream``, answered 200."""
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(READ)
        if not data:
            raise EOFError("connection closed")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += await stream.receive_some(READ)


async def open_many(n: int, make: Callable[[], Awaitable[Any]]) -> list[Any]:
    import trio

    out: list[Any] = []
    sem = trio.Semaphore(HANDSHAKES)

    async def one() -> None:
        async with sem:
            out.append(await make())

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return out


async def each(items: list[Any], op: Callable[[Any], Awaitable[None]]) -> int:
    """Run ``op`` on every item (bounded concurrency); how many succeeded."""
    import trio

    ok = 0
    sem = trio.Semaphore(HANDSHAKES)

    async def one(item: Any) -> None:
        nonlocal ok
        async with sem:
            try:
                await op(item)
                ok += 1
            except (EOFError, RuntimeError, trio.BrokenResourceError):
                pass

    async with trio.open_nursery() as nursery:
        for item in items:
            nursery.start_soon(one, item)
    return ok


# ---------------------------------------------------------------- (a) idle memory
async def _snapshot(stack: Stack, label: str, marks: list[str]) -> None:
    """(traced gateway) Ask for a snapshot and wait until it is written."""
    import trio

    assert stack.snapdir is not None
    marks.append(label)
    done = stack.snapdir / f"snap{len(marks)}.json"
    os.kill(stack.gateway.pid, signal.SIGUSR1)
    with trio.fail_after(300):
        while not done.exists():
            await trio.sleep(0.1)


async def idle_memory(stack: Stack, n: int, idle: float) -> dict[str, Any]:
    import trio

    target = f"/a/{AGENT}/"
    port = stack.gateway_port
    rss: dict[str, dict[str, int]] = {}
    marks: list[str] = []

    async def http_conn() -> Any:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await http_get(stream)
        return stream

    async def ws_conn() -> WebSocket:
        ws = await WebSocket.open(port, target)
        await ws.echo()
        return ws

    async def checkpoint(label: str) -> None:
        await trio.sleep(idle)
        if stack.snapdir is not None:
            await _snapshot(stack, label, marks)
        rss[label] = {role: rss_kib(pid) for role, pid in stack.pids().items()}

    with trio.fail_after(300 + 3 * idle):
        # Warm-up: every code path once, then gone.
        for conn in await open_many(WARM, http_conn) + await open_many(WARM, ws_conn):
            await conn.aclose()
        await checkpoint("start")
        http = await open_many(n, http_conn)
        await checkpoint("http")
        sockets = await open_many(n, ws_conn)
        await checkpoint("websocket")
        # Still there after the idle period?
        http_ok = await each(http, http_get)
        ws_ok = await each(sockets, WebSocket.echo)
        for conn in [*http, *sockets]:
            await conn.aclose()
    return {"rss": rss, "http_ok": http_ok, "ws_ok": ws_ok, "marks": marks}


def report_memory(n: int, result: dict[str, Any]) -> bool:
    rss = result["rss"]

    def per(role: str, a: str, b: str) -> float:
        return float(rss[b][role] - rss[a][role]) / n

    gw_http = per("gateway", "start", "http")
    gw_ws = per("gateway", "http", "websocket")
    print(f"\n## (a) {n:,} idle connections, one run\n")
    print("| process | RSS at start (MiB) | + idle HTTP (MiB) | + idle WebSockets (MiB) "
          "| KiB per idle HTTP connection | KiB per idle WebSocket | WebSocket - HTTP (KiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for role in ("gateway", "agent", "echo"):
        mib = [rss[k][role] / 1024 for k in ("start", "http", "websocket")]
        http_cell = f"{per(role, 'start', 'http'):.1f}" if role == "gateway" else "-"
        diff = f"{gw_ws - gw_http:.1f}" if role == "gateway" else ""
        print(f"| {role} | {mib[0]:.1f} | {mib[1]:.1f} | {mib[2]:.1f} | {http_cell} "
              f"| {per(role, 'http', 'websocket'):.1f} | {diff} |")  # fmt: skip
    ratio = gw_ws / gw_http if gw_http > 0 else float("nan")
    print(f"| ratio WebSocket/HTTP on the gateway | | | | | {ratio:.2f} | |")
    print(f"| still answering after the idle period | | | | {result['http_ok']}/{n} "
          f"| {result['ws_ok']}/{n} | |")  # fmt: skip
    met = gw_ws <= TARGET_KIB
    verdict = "met" if met else "MISSED"
    print(f"| gateway target <= {TARGET_KIB:g} KiB per WebSocket | | | | | {verdict} | |")
    return met


# ---------------------------------------------------------------- (a') profile
def report_profile(stack: Stack, n: int, marks: list[str], top: int) -> None:
    import tracemalloc

    assert stack.snapdir is not None
    snaps = {
        label: (
            tracemalloc.Snapshot.load(str(stack.snapdir / f"snap{i}.trace")),
            json.loads((stack.snapdir / f"snap{i}.json").read_text()),
        )
        for i, label in enumerate(marks, 1)
    }
    for before, after, what in (
        ("start", "http", "idle HTTP connection"),
        ("http", "websocket", "idle WebSocket"),
    ):
        old, new = snaps[before][0], snaps[after][0]
        diffs = new.compare_to(old, "traceback")
        total = sum(d.size_diff for d in diffs)
        print(f"\n### gateway: bytes per {what}, traced: {total / n / 1024:.2f} KiB each\n")
        by_line: Counter[str] = Counter()
        by_cause: Counter[str] = Counter()
        by_function: Counter[str] = Counter()
        by_kind: Counter[str] = Counter()
        for d in diffs:
            frames = list(reversed(d.traceback))  # (stored oldest first)
            by_line[_where(frames[0])] += d.size_diff
            cause = next((f for f in frames if "/revconn/" in f.filename), None)
            by_cause[_where(cause) if cause else "(no revconn frame)"] += d.size_diff
            by_function[_function(cause) if cause else "(no revconn frame)"] += d.size_diff
            by_kind[_category(frames)] += d.size_diff
        for title, table in (
            ("kind of structure", by_kind),
            ("allocated at", by_line),
            ("on behalf of (innermost revconn line)", by_cause),
            ("on behalf of (innermost revconn function)", by_function),
        ):
            print(f"| {title} | bytes per {what} |")
            print("|---|---|")
            for where, size in table.most_common(top):
                print(f"| {where} | {size / n:.0f} |")
            print()
        counts = Counter(snaps[after][1]["counts"])
        counts.subtract(snaps[before][1]["counts"])
        sizes = Counter(snaps[after][1]["sizes"])
        sizes.subtract(snaps[before][1]["sizes"])
        tracked = sum(sizes.values())
        print(f"| gc-tracked objects by type (coroutines by function: their frames) "
              f"| objects per {what} | bytes per {what} |")  # fmt: skip
        print("|---|---|---|")
        coroutines = sum(v for k, v in sizes.items() if k.startswith("coroutine "))
        print(f"| all coroutines (frames included) | "
              f"{sum(v for k, v in counts.items() if k.startswith('coroutine ')) / n:.2f} "
              f"| {coroutines / n:.0f} |")  # fmt: skip
        for name, size in sizes.most_common(top):
            print(f"| `{name}` | {counts[name] / n:.2f} | {size / n:.0f} |")
        print(f"| all gc-tracked objects (shallow) | | {tracked / n:.0f} |")
        print(f"| the rest (bytes, str, numbers, C-level buffers, allocator slack) "
              f"| | {(total - tracked) / n:.0f} |")  # fmt: skip


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _function(frame: Any) -> str:
    """``module: Class.function`` around a source line (by indentation)."""
    import linecache
    import re

    lines = linecache.getlines(frame.filename)
    names: list[str] = []
    indent = len(lines[frame.lineno - 1]) - len(lines[frame.lineno - 1].lstrip())
    for text in reversed(lines[: frame.lineno - 1]):
        stripped = text.lstrip()
        here = len(text) - len(stripped)
        found = re.match(r"(?:async\s+)?(?:def|class)\s+(\w+)", stripped)
        if here < indent and found:
            names.append(found.group(1))
            indent = here
        if indent == 0:
            break
    return f"`{_short(frame.filename)}: {'.'.join(reversed(names)) or '(module)'}`"


def _category(frames: list[Any]) -> str:
    """What kind of structure an allocation is, from where it was made (a
    coroutine object is allocated by the line that calls it: ``await f()``)."""
    import linecache

    alloc = frames[0]
    text = linecache.getline(alloc.filename, alloc.lineno)
    if "trio" in alloc.filename or any(k in text for k in ("await ", "start_soon", "nursery")):
        return "trio: tasks, coroutine frames, cancel scopes, events, locks"
    if any(f"/{lib}/" in alloc.filename for lib in ("h2", "hpack", "hyperframe")):
        return "h2: the stream's state and frames"
    if "/httptools/" in alloc.filename or alloc.filename.endswith("_proto/http1.py"):
        return "HTTP/1.1: parsers, parsed heads and header lists"
    cause = next((f for f in frames if "/revconn/" in f.filename), None)
    return f"other: {_short(cause.filename) if cause else alloc.filename}"


def _where(frame: Any) -> str:
    path = _short(frame.filename)
    line = ""
    try:
        import linecache

        line = linecache.getline(frame.filename, frame.lineno).strip()
    except OSError:
        pass
    line = line.replace("|", "\\|")
    return f"`{path}:{frame.lineno}` `{line[:70]}`" if line else f"`{path}:{frame.lineno}`"


# ---------------------------------------------------------------- (b) round trips
@dataclass
class Cell:
    """One configuration's round trips, pooled over the rounds."""

    latencies: list[float] = field(default_factory=list)  # seconds
    rounds: list[float] = field(default_factory=list)  # round trips/s of each round
    seconds: float = 0.0
    messages: int = 0
    cpu: Counter[str] = field(default_factory=Counter)  # role -> CPU seconds

    def rate(self) -> float:
        return self.messages / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def echo_run(stack: Stack, tunnel: bool, conns: int, messages: int, cell: Cell) -> None:
    import trio

    port, target = (stack.gateway_port, f"/a/{AGENT}/") if tunnel else (stack.echo_port, "/")
    with trio.fail_after(120):
        sockets = await open_many(conns, lambda: WebSocket.open(port, target))
        for _ in range(WARM):
            await each(sockets, WebSocket.echo)
        shares = [messages // conns + (i < messages % conns) for i in range(conns)]
        latencies: list[float] = []
        clock = time.perf_counter

        async def loop(ws: WebSocket, count: int) -> None:
            for _ in range(count):
                t0 = clock()
                await ws.echo()
                latencies.append(clock() - t0)

        pids = stack.pids()
        cpu0 = {role: cpu_seconds(pid) for role, pid in pids.items()}
        own0 = time.process_time()
        t0 = clock()
        async with trio.open_nursery() as nursery:
            for ws, count in zip(sockets, shares, strict=True):
                nursery.start_soon(loop, ws, count)
        elapsed = clock() - t0
        cell.cpu["client"] += time.process_time() - own0
        for role, pid in pids.items():
            cell.cpu[role] += cpu_seconds(pid) - cpu0[role]
        for ws in sockets:
            await ws.aclose()
    cell.latencies += latencies
    cell.rounds.append(messages / elapsed)
    cell.seconds += elapsed
    cell.messages += messages


async def round_trips(
    stack: Stack, messages: int, reps: int, concurrency: list[int]
) -> dict[tuple[int, bool], Cell]:
    cells = {(c, t): Cell() for c in concurrency for t in (False, True)}
    for rep in range(reps):
        for c in concurrency:
            order = (False, True) if rep % 2 == 0 else (True, False)
            for tunnel in order:
                await echo_run(stack, tunnel, c, messages, cells[(c, tunnel)])
    return cells


def report_round_trips(
    cells: dict[tuple[int, bool], Cell], messages: int, reps: int, concurrency: list[int]
) -> None:
    print(f"\n## (b) 64-byte echo round trips, {messages:,} per measurement x {reps} "
          "rounds, interleaved\n")  # fmt: skip
    print("| measure | direct (echo server) | through the tunnel | ratio tunnel/direct |")
    print("|---|---|---|---|")
    for c in concurrency:
        direct, tunnel = cells[(c, False)], cells[(c, True)]
        for label, get, fmt in (
            ("round trips/s", Cell.rate, "{:,.0f}"),
            ("p50 latency (ms)", lambda x: x.pct(0.50), "{:.3f}"),
            ("p99 latency (ms)", lambda x: x.pct(0.99), "{:.3f}"),
        ):
            d, t = get(direct), get(tunnel)
            print(f"| c={c}: {label} | {fmt.format(d)} | {fmt.format(t)} | {t / d:.3f} |")
        ratios = [t / d for d, t in zip(direct.rounds, tunnel.rounds, strict=True)]
        spread = f"{min(ratios):.3f} - {max(ratios):.3f}"
        print(f"| c={c}: round trips/s, ratio of each round (min - max) | | | {spread} |")
    for c in concurrency:
        for tunnel in (False, True):
            cell = cells[(c, tunnel)]
            roles = ("client", "echo", "gateway", "agent") if tunnel else ("client", "echo")
            parts = " / ".join(f"{cell.cpu[r] / cell.messages * 1e6:.0f}" for r in roles)
            names = " / ".join(roles)
            where = "tunnel" if tunnel else "direct"
            print(f"| c={c}, {where}: CPU us per round trip, {names} | {parts} | | |")


# ---------------------------------------------------------------- main
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_echo":
        run_echo()
        return
    if len(sys.argv) > 2 and sys.argv[1] == "_traced_gateway":
        run_traced_gateway(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="idle connections of each kind")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds each batch idles")
    parser.add_argument("--messages", type=int, default=5000, help="round trips per measurement")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds of (b)")
    parser.add_argument("--concurrency", type=int, action="append", help="default: 1 and 32")
    parser.add_argument("--profile", action="store_true", help="also trace the gateway's memory")
    parser.add_argument("--top", type=int, default=12, help="rows per profile table")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-round-trips", action="store_true")
    args = parser.parse_args()
    concurrency = args.concurrency or [1, 32]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * args.n + 1024
    if hard < need:
        raise SystemExit(f"needs {need} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the processes

    import trio

    flags = " ".join(sys.argv[1:])
    print(f"# python benchmarks/{HERE.name} {flags}".rstrip())
    with tempfile.TemporaryDirectory(prefix="revconn-ws-bench-") as tmp:
        workdir = Path(tmp)
        stack = start_stack(workdir, args.n)
        try:
            if not args.skip_memory:
                memory = trio.run(idle_memory, stack, args.n, args.idle)
                report_memory(args.n, memory)
            if not args.skip_round_trips:
                cells = trio.run(round_trips, stack, args.messages, args.reps, concurrency)
                report_round_trips(cells, args.messages, args.reps, concurrency)
        except BaseException:
            for p in stack.procs:
                print(f"--- {p.name} ---\n{p.tail()}", file=sys.stderr)
            raise
        finally:
            stack.kill()
        if args.profile:
            traced = start_stack(workdir, args.n, traced=True)
            try:
                result = trio.run(idle_memory, traced, args.n, args.idle)
                print(f"\n## (a') the same {args.n:,} connections, gateway under tracemalloc")
                report_profile(traced, args.n, result["marks"], args.top)
            finally:
                traced.kill()


if __name__ == "__main__":
    main()
