"""The atheris harnesses under fuzz/ (issue 12).

Their ``TestOneInput`` always runs here, over the seed corpus and over
deterministic mutations of it, so the harness code is tested even where
atheris is not installed. Where it is, each harness also runs as libFuzzer
does in a campaign, for a bounded time (REVCONN_FUZZ_SECONDS, default 6),
and must exit 0: a property violation is a crash, with the input saved.
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
HARNESSES = [("fuzz_session", "session"), ("fuzz_http1", "http1")]
SECONDS = int(os.environ.get("REVCONN_FUZZ_SECONDS", "6"))

try:
    import atheris  # noqa: F401
except ImportError:
    HAVE_ATHERIS = False
else:
    HAVE_ATHERIS = True


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"revconn_{name}", FUZZ / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeds(corpus: str) -> list[bytes]:
    files = sorted((FUZZ / "corpus" / corpus).iterdir())
    assert len(files) >= 5, "seed corpus missing: python fuzz/make_corpus.py"
    return [f.read_bytes() for f in files]


def mutants(corpus: list[bytes], count: int, seed: int = 12) -> list[bytes]:
    """Seeds with a few bytes overwritten, inserted or deleted, and spliced."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.4 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.6:
                data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
            elif op < 0.8 and data:
                del data[rng.randrange(len(data))]
            else:
                other = rng.choice(corpus)
                data[rng.randrange(len(data) + 1) :] = other[rng.randrange(len(other) + 1) :]
        out.append(bytes(data))
    out += [bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))) for _ in range(count // 4)]
    return out


@pytest.mark.parametrize(("name", "corpus"), HARNESSES)
def test_harness_accepts_its_seed_corpus(name: str, corpus: str) -> None:
    harness = load(name)
    for data in seeds(corpus):
        harness.TestOneInput(data)


@pytest.mark.parametrize(("name", "corpus"), HARNESSES)
def test_harness_over_mutated_inputs(name: str, corpus: str) -> None:
    harness = load(name)
    for data in mutants(seeds(corpus), 1500):
        try:
            harness.TestOneInput(data)
        except Exception as exc:
            raise AssertionError(f"{name} failed on {data!r}") from exc


def test_session_harness_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its checks are not vacuous: a stray exception, a lost GOAWAY and a
    dropped stream end each make TestOneInput raise."""
    harness = load("fuzz_session")
    from revconn._proto import session

    agent_requests = next(s for s in seeds("session") if s[:2] == bytes([3, 0]))
    harness.TestOneInput(agent_requests)
    with monkeypatch.context() as mp:
        mp.setattr(session._FrameScanner, "feed", lambda self, data: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            harness.TestOneInput(agent_requests)
    oversized = bytes([3, 0]) + (1 << 20).to_bytes(3, "big") + bytes(6)
    harness.TestOneInput(oversized)
    with monkeypatch.context() as mp:
        mp.setattr(session.TunnelSession, "close", lambda self, *a: setattr(self, "closed", True))
        with pytest.raises(harness.Violation, match="no GOAWAY"):
            harness.TestOneInput(oversized)
    real = session.TunnelSession._translate

    def no_ends(self: session.TunnelSession, events: list[object]) -> list[object]:
        out = real(self, events)  # type: ignore[arg-type]
        return [
            session.DataReceived(e.stream_id, e.data, e.flow_length, False)
            if isinstance(e, session.DataReceived)
            else e
            for e in out
        ]

    # HEADERS (GET / from the static table) and DATA with END_STREAM, the end dropped:
    ended = bytes([7, 0, 0x1, 0x4, 1, 3]) + b"\x82\x84\x86" + bytes([0x0, 0x1, 1, 1]) + b"x"
    harness.TestOneInput(ended)
    with monkeypatch.context() as mp:
        mp.setattr(session.TunnelSession, "_translate", no_ends)
        with pytest.raises(harness.Violation, match="end of stream 1 was not reported"):
            harness.TestOneInput(ended)


def test_session_harness_compares_cuttings(monkeypatch: pytest.MonkeyPatch) -> None:
    """GOAWAY then a PING, fed byte by byte and whole: with the session's cut
    after a GOAWAY undone, the whole feed ends in a protocol error (h2 takes
    any frame after GOAWAY for one) and the harness notices the difference."""
    harness = load("fuzz_session")
    from revconn._proto import session

    goaway = bytes([0x7, 0, 0, 8]) + bytes(8)  # frame-mode records
    ping = bytes([0x6, 0, 0, 8]) + b"12345678"
    data = bytes([6, 1]) + goaway + ping  # a handshaken gateway, pieces of 1 byte
    harness.TestOneInput(data)
    real = session._FrameScanner.feed
    with monkeypatch.context() as mp:
        mp.setattr(session._FrameScanner, "feed", lambda self, d: real(self, d) and None)
        with pytest.raises(harness.Violation, match="cut in 1"):
            harness.TestOneInput(data)


def test_http1_harness_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parser that depends on how its input is cut, or that raises another
    status than documented, makes TestOneInput raise."""
    harness = load("fuzz_http1")
    from revconn._proto import http1

    request = next(s for s in seeds("http1") if s[:2] == bytes([0, 0]))
    harness.TestOneInput(request)
    real_feed = http1._Parser.feed
    calls: list[int] = []

    def forgetful(self: http1._Parser, data: bytes) -> None:
        calls.append(len(data))
        if len(calls) == 2:  # the second piece of the cut run goes missing
            return
        real_feed(self, data)

    with monkeypatch.context() as mp:
        mp.setattr(http1._Parser, "feed", forgetful)
        with pytest.raises(harness.Violation, match="changed the outcome"):
            harness.TestOneInput(bytes([0, 3]) + request[2:])
    with monkeypatch.context() as mp:
        mp.setattr(http1.RequestParser, "_BAD", 418)
        with pytest.raises(harness.Violation, match="status 418"):
            harness.TestOneInput(bytes([0, 0]) + b"G@T / HTTP/1.1\r\n\r\n")


@pytest.mark.skipif(
    not HAVE_ATHERIS,
    reason="atheris is not installed (pip install '.[fuzz]'; wheels exist for Linux x86_64): "
    "the harnesses' TestOneInput was still run above, only the libFuzzer run is skipped",
)
@pytest.mark.parametrize(("name", "corpus"), HARNESSES)
def test_libfuzzer_run(name: str, corpus: str, tmp_path: Path) -> None:
    """The harness under libFuzzer for SECONDS, from the seed corpus: exit 0."""
    work = tmp_path / "corpus"  # new inputs land here, not in fuzz/corpus/
    work.mkdir()
    cmd = [
        sys.executable,
        str(FUZZ / f"{name}.py"),
        str(work),
        str(FUZZ / "corpus" / corpus),
        f"-max_total_time={SECONDS}",
        "-timeout=20",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    log = proc.stderr + proc.stdout
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-"))]
    assert proc.returncode == 0 and not crashes, f"{crashes}\n{log[-4000:]}"
    runs = [
        int(line.split()[-1])
        for line in log.splitlines()
        if "stat::number_of_executed_units" in line
    ]
    assert runs and runs[0] > 100, log[-2000:]
