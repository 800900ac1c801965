"""Graceful drain with the real executables: a gateway's SIGTERM lets a
streaming response in flight run to its end through the grace period while
new requests get 503, and a gateway with nothing in flight exits at once."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
import trio

from ._procs import ROOT, Proc, executable
from .test_e2e import start_gateway

pytestmark = pytest.mark.e2e

SECRET = "drain-e2e-secret-abcdefghijklmnop"


def app_agent(procs: list[Proc], url: str, name: str) -> Proc:
    agent = Proc(
        [
            *executable("revconn-agent"),
            "serve",
            "--gateway",
            url,
            "--name",
            name,
            "--app",
            "tests.upstream_app:app",
        ],
        {"REVCONN_SECRET": SECRET, "PYTHONPATH": str(ROOT)},
    )
    procs.append(agent)
    agent.wait_for(rf"online: {url}/a/{name}/")
    return agent


def test_a_stream_in_flight_runs_through_the_grace_period(procs: list[Proc]) -> None:
    gw, url, _ = start_gateway(procs, "--grace-period", "20", secret=SECRET)
    app_agent(procs, url, "live")

    async def run() -> tuple[list[bytes], httpx.Response, float]:
        chunks: list[bytes] = []
        async with httpx.AsyncClient(timeout=10) as client:
            # 15 events, 0.2 s apart: 3 s of response, most of it after the SIGTERM.
            async with client.stream("GET", f"{url}/a/live/stream?n=15&interval=0.2") as r:
                assert r.status_code == 200
                signalled = False
                late: httpx.Response | None = None
                async for chunk in r.aiter_raw():
                    chunks.append(chunk)
                    if not signalled:
                        signalled = True
                        gw.signal(signal.SIGTERM)
                        await trio.sleep(0.3)
                        async with httpx.AsyncClient(timeout=5) as other:
                            late = await other.get(f"{url}/a/live/echo/x")
            ended = time.monotonic()
        assert late is not None
        return chunks, late, ended

    chunks, late, ended = trio.run(run)
    body = b"".join(chunks)
    assert body == b"".join(f"data: {i}\n\n".encode() for i in range(15))  # whole, in order
    assert late.status_code == 503  # new requests are refused while it drains
    assert gw.wait(timeout=10) == 0
    assert time.monotonic() - ended < 5  # it left once the stream was done, not at 20 s


def test_with_nothing_in_flight_sigterm_exits_at_once(procs: list[Proc]) -> None:
    gw, url, _ = start_gateway(procs, "--grace-period", "30", secret=SECRET)
    app_agent(procs, url, "idle")
    signalled = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert gw.wait(timeout=10) == 0
    assert time.monotonic() - signalled < 3


def test_a_second_signal_stops_at_once(procs: list[Proc]) -> None:
    gw, url, _ = start_gateway(procs, "--grace-period", "30", secret=SECRET)
    app_agent(procs, url, "slow")

    async def run() -> float:
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as nursery:
            failed: list[BaseException] = []

            async def call() -> None:
                try:
                    await client.get(f"{url}/a/slow/slow?s=20")
                except httpx.HTTPError as exc:
                    failed.append(exc)

            nursery.start_soon(call)
            await trio.sleep(0.5)
            gw.signal(signal.SIGTERM)
            await trio.sleep(0.5)
            second = time.monotonic()
            gw.signal(signal.SIGINT)
        assert failed, "the request in flight was cut off, not answered"
        return second

    second = trio.run(run)
    gw.wait(timeout=10)
    assert time.monotonic() - second < 5
