"""``revconn-agent serve``: start-up errors are clear exit-2 messages, and the
help text gives every timing flag its unit."""

from __future__ import annotations

import os
import subprocess
from functools import partial

import click
import pytest
import trio
from click.testing import CliRunner

from revconn._cli.agent import agent_serve, main

from .._procs import executable

TIMING_FLAGS = {
    "--backoff-min",
    "--backoff-max",
    "--heartbeat-interval",
    "--heartbeat-timeout",
    "--handshake-timeout",
    "--upstream-timeout",
}
SECRET = "cli-secret-abcdefghijklmnop"
UPSTREAM = "http://127.0.0.1:9"


def test_help_gives_every_timing_flag_its_unit() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    floats = {
        param.opts[0]: param.help or ""
        for param in agent_serve.params
        if isinstance(param, click.Option) and isinstance(param.type, click.types.FloatParamType)
    }
    assert floats.keys() >= TIMING_FLAGS
    assert {flag for flag, text in floats.items() if "seconds" not in text} == set()
    help_text = " ".join(result.output.split())  # undo click's line wrapping
    for text in floats.values():
        assert " ".join(text.split()) in help_text


async def serve_agent(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``revconn-agent serve ARGS`` to its exit; (exit code, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REVCONN_")}
    full_env.update(env or {})
    with trio.fail_after(30):
        done = await trio.run_process(
            [*executable("revconn-agent"), "serve", "--name", "probe", *args],
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stderr.decode()


def assert_usage_error(code: int, stderr: str, message: str) -> None:
    assert code == 2, stderr
    assert message in stderr
    assert "Traceback" not in stderr
    assert "connecting to" not in stderr  # refused before dialing


@pytest.mark.e2e
async def test_neither_upstream_nor_app_is_a_usage_error() -> None:
    code, stderr = await serve_agent(
        "--gateway", "http://127.0.0.1:9", env={"REVCONN_SECRET": SECRET}
    )
    assert_usage_error(code, stderr, "nothing to serve: pass --upstream URL or --app")


@pytest.mark.e2e
async def test_missing_secret_names_flag_and_environment_variable() -> None:
    code, stderr = await serve_agent("--gateway", "http://127.0.0.1:9", "--upstream", UPSTREAM)
    assert_usage_error(code, stderr, "error: no secret: pass --secret or set REVCONN_SECRET")


@pytest.mark.e2e
async def test_empty_secret_variable_is_reported_as_empty() -> None:
    code, stderr = await serve_agent(
        "--gateway", "http://127.0.0.1:9", "--upstream", UPSTREAM, env={"REVCONN_SECRET": ""}
    )
    assert_usage_error(code, stderr, "error: REVCONN_SECRET is set but empty")


@pytest.mark.e2e
async def test_gateway_answering_404_exits_2_without_retrying() -> None:
    """A path typo in --gateway (or a server that is not a revconn gateway)."""

    async def not_found(stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                head += chunk
            await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found")
            try:
                while await stream.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, not_found, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        code, stderr = await serve_agent(
            "--gateway",
            f"http://127.0.0.1:{port}/revconn-typo",
            "--upstream",
            UPSTREAM,
            env={"REVCONN_SECRET": SECRET},
        )
        nursery.cancel_scope.cancel()
    assert code == 2, stderr
    assert (
        f"error: ws://127.0.0.1:{port}/revconn-typo/ws/connect answered HTTP 404 Not Found: "
        "is --gateway the URL of a revconn gateway's data plane (check the host, port and path)?"
    ) in stderr
    assert "retry" not in stderr
    assert "Traceback" not in stderr
    assert SECRET not in stderr
