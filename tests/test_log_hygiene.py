"""Nothing secret in any log, at every level: the real executables at
``--log-level debug`` forward a request carrying a recognisable cookie,
``Authorization`` header and body (and a WebSocket message); neither log
shows them, nor the gateway secret. ``--trace-protocol`` is the one switch
that lets the protocol libraries' debug lines through."""

from __future__ import annotations

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from ._procs import Proc
from .test_e2e import SECRET, start_agent, start_gateway
from .test_e2e_web import start_upstream

pytestmark = pytest.mark.e2e

COOKIE = "session=cookie-value-5f2c91"
BEARER = "Bearer public-token-77a1e3"
BODY = b"body-bytes-9d04be"
MESSAGE = "ws-message-3c7f11"
SECRETS = ("cookie-value-5f2c91", "public-token-77a1e3", "body-bytes-9d04be", MESSAGE, SECRET)


def exercise(url: str) -> None:
    r = httpx.post(
        f"{url}/a/web/echo/x",
        headers={"Cookie": COOKIE, "Authorization": BEARER},
        content=BODY,
    )
    assert r.status_code == 200
    assert COOKIE in r.text  # (it did go through)


def test_debug_logs_carry_no_secret(procs: list[Proc]) -> None:
    upstream = start_upstream(procs)
    gw, url, _ = start_gateway(procs, "--log-level", "debug")
    agent = start_agent(procs, url, "web", "--upstream", upstream, "--log-level", "debug")
    apps = start_agent(procs, url, "app", "--app", "tests.browser_app:app", "--log-level", "debug")
    agent.wait_for("online")
    apps.wait_for("online")
    exercise(url)

    async def talk() -> None:
        with trio.fail_after(10):
            async with open_websocket_url(url.replace("http", "ws") + "/a/app/ws") as ws:
                await ws.send_message(MESSAGE)
                assert str(await ws.get_message()) == f"pong: {MESSAGE}"

    trio.run(talk)
    for proc in (gw, agent, apps):
        logs = proc.stdout + proc.stderr
        for secret in SECRETS:
            assert secret not in logs, (secret, logs[-3000:])


def test_trace_protocol_lets_the_libraries_speak(procs: list[Proc]) -> None:
    _, url, _ = start_gateway(procs)
    quiet = start_agent(procs, url, "quiet", "--log-level", "debug")
    loud = start_agent(procs, url, "loud", "--log-level", "debug", "--trace-protocol")
    quiet.wait_for("online")
    loud.wait_for("online")
    assert "trio-websocket" not in quiet.stderr
    assert "trio-websocket" in loud.stderr  # its debug lines, named by their logger
