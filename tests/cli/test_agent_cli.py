"""``revconn-agent serve``: start-up errors are clear exit-2 messages, the
help text gives every timing flag its unit and explains the three modes, and
the announce and no-tunnel modes run as real executables."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from functools import partial

import click
import httpx
import pytest
import trio
from click.testing import CliRunner

from revconn import ConfigError
from revconn._agent.local import parse_listen
from revconn._cli.agent import agent_serve, main

from .._procs import Proc, executable, free_port

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
    assert_usage_error(code, stderr, "error: no credential: pass --token (REVCONN_TOKEN)")


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


# -- the three modes -------------------------------------------------------------

NO_REVCONN_ENV = {k: None for k in os.environ if k.startswith("REVCONN_")}
GATEWAY_FLAGS = ["--gateway", "http://127.0.0.1:9", "--name", "probe", "--secret", SECRET]
APP = "tests.upstream_app:app"


def test_help_explains_the_three_modes() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    modes = [
        line.strip()
        for line in lines
        if line.strip().startswith(("tunnel:", "announce:", "no tunnel:"))
    ]
    assert len(modes) == 3, result.output
    tunnel, announce, no_tunnel = modes
    assert "--upstream URL" in tunnel and "--app" in tunnel and "WebSocket" in tunnel
    assert "--tunnel-url URL" in announce and "connects to URL itself" in announce
    assert (
        "--no-tunnel --app" in no_tunnel and "--listen" in no_tunnel and "no gateway" in no_tunnel
    )
    for flag in ("--tunnel-url", "--announce-interval", "--no-tunnel", "--listen"):
        assert flag in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--no-tunnel", "--app", APP, "--upstream", UPSTREAM],
            "--no-tunnel and --upstream do not go together",
            id="no-tunnel-upstream",
        ),
        pytest.param(
            ["--no-tunnel", "--app", APP, "--tunnel-url", "http://svc.example"],
            "--no-tunnel and --tunnel-url do not go together",
            id="no-tunnel-tunnel-url",
        ),
        pytest.param(
            ["--no-tunnel"], "--no-tunnel needs --app module:attribute", id="no-tunnel-no-app"
        ),
        pytest.param(
            ["--no-tunnel", "--listen", "127.0.0.1:0"],
            "--no-tunnel needs --app module:attribute",
            id="no-tunnel-listen-no-app",
        ),
        pytest.param(
            [*GATEWAY_FLAGS, "--tunnel-url", "http://svc.example", "--upstream", UPSTREAM],
            "--tunnel-url and --upstream do not go together: --upstream is for tunnel mode",
            id="tunnel-url-upstream",
        ),
        pytest.param(
            [*GATEWAY_FLAGS, "--tunnel-url", "http://svc.example", "--listen", "127.0.0.1:0"],
            "--listen goes with --app",
            id="listen-without-app",
        ),
        pytest.param(
            [*GATEWAY_FLAGS, "--upstream", UPSTREAM, "--listen", "127.0.0.1:0"],
            "--listen goes with --tunnel-url or --no-tunnel",
            id="listen-in-tunnel-mode",
        ),
        pytest.param(
            [*GATEWAY_FLAGS, "--app", APP, "--listen", "127.0.0.1:0"],
            "--listen goes with --tunnel-url or --no-tunnel",
            id="listen-with-app-in-tunnel-mode",
        ),
        pytest.param(
            ["--name", "probe", "--secret", SECRET, "--upstream", UPSTREAM],
            "Missing option '--gateway' (or env REVCONN_GATEWAY)",
            id="tunnel-mode-without-gateway",
        ),
        pytest.param(
            ["--gateway", "http://127.0.0.1:9", "--tunnel-url", "http://svc.example"],
            "Missing option '--name' (or env REVCONN_NAME)",
            id="announce-mode-without-name",
        ),
    ],
)
def test_flags_that_do_not_go_together_are_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["serve", *args], env=NO_REVCONN_ENV)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_an_upstream_from_the_environment_counts_too() -> None:
    env = {**NO_REVCONN_ENV, "REVCONN_UPSTREAM": UPSTREAM}
    result = CliRunner().invoke(main, ["serve", "--no-tunnel", "--app", APP], env=env)
    assert result.exit_code == 2, result.output
    assert "--no-tunnel and --upstream do not go together" in result.output


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:8000", ("::1", 8000)),
    ],
)
def test_parse_listen_accepts_host_and_port(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    "listen", ["8000", ":8000", "127.0.0.1", "127.0.0.1:", "::1:8000", "[127.0.0.1]:80",
               "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:http", "unix:/tmp/s", "a b:1"],
)  # fmt: skip
def test_parse_listen_names_the_flag(listen: str) -> None:
    with pytest.raises(ConfigError, match=rf"^--listen {re.escape(repr(listen))}: "):
        parse_listen(listen)


@pytest.mark.e2e
async def test_a_malformed_listen_address_exits_2() -> None:
    code, stderr = await serve_agent("--no-tunnel", "--app", APP, "--listen", "localhost")
    assert_usage_error(code, stderr, "error: --listen 'localhost': expected HOST:PORT")


@pytest.mark.e2e
async def test_a_taken_listen_port_exits_1_with_a_message() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code, stderr = await serve_agent(
            "--no-tunnel", "--app", APP, "--listen", f"127.0.0.1:{port}"
        )
    assert code == 1, stderr
    assert f"error: cannot listen on 127.0.0.1:{port} (--listen): " in stderr
    assert "Traceback" not in stderr


@pytest.mark.e2e
def test_no_tunnel_serves_the_app_until_sigterm(procs: list[Proc]) -> None:
    port = free_port()
    agent = Proc(
        [*executable("revconn-agent"), "serve", "--no-tunnel", "--app", APP,
         "--listen", f"127.0.0.1:{port}"],
    )  # fmt: skip
    procs.append(agent)
    agent.wait_for(
        rf"INFO revconn\.agent: serving {re.escape(APP)} on http://127\.0\.0\.1:{port} "
        r"\(no tunnel: not registered with any gateway\)"
    )
    response = httpx.get(f"http://127.0.0.1:{port}/echo/hello?x=1", timeout=10)
    assert response.status_code == 200
    assert response.json()["raw_path"] == "/echo/hello"
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0, agent.stderr
    assert "received SIGTERM, shutting down" in agent.stderr
    assert "Traceback" not in agent.stderr


# -- announce mode against a stand-in gateway ------------------------------------------


async def announce_gateway(nursery: trio.Nursery, put_answer: bytes, requests: list[bytes]) -> int:
    """A TCP server answering each PUT with ``put_answer`` and each DELETE with
    a withdrawal; it keeps each request's first line."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                data += chunk
            requests.append(data.split(b"\r\n", 1)[0])
            if data.startswith(b"PUT "):
                await stream.send_all(put_answer)
            else:
                await stream.send_all(_json(200, {"name": "probe", "withdrawn": True}))

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


def _json(status: int, payload: dict[str, object]) -> bytes:
    body = json.dumps(payload).encode()
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        status, len(body), body,
    )  # fmt: skip


@pytest.mark.e2e
async def test_announce_mode_announces_then_withdraws_on_sigterm(procs: list[Proc]) -> None:
    requests: list[bytes] = []
    async with trio.open_nursery() as nursery:
        port = await announce_gateway(
            nursery, _json(200, {"name": "probe", "epoch": 4, "ttl": 1.5}), requests
        )
        agent = Proc(
            [*executable("revconn-agent"), "serve", "--gateway", f"http://127.0.0.1:{port}",
             "--name", "probe", "--tunnel-url", "https://svc.example:8443/base/"],
            env={"REVCONN_SECRET": SECRET, "REVCONN_ANNOUNCE_INTERVAL": "0.5"},
        )  # fmt: skip
        procs.append(agent)
        with trio.fail_after(10):
            while len(requests) < 2:  # the first announcement and a renewal
                await trio.sleep(0.05)
        agent.signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(agent.wait)
        nursery.cancel_scope.cancel()
    assert code == 0, agent.stderr
    assert "announced https://svc.example:8443/base/ as 'probe' (ttl 1.5 s)" in agent.stderr
    assert "withdrew https://svc.example:8443/base/" in agent.stderr
    assert requests[-1] == b"DELETE /announce?name=probe&epoch=4 HTTP/1.1"
    assert SECRET not in agent.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("status", "payload", "exit_code", "message"),
    [
        (401, {"error": "unauthorized"}, 3, "the gateway rejected the credentials (HTTP 401)"),
        (409, {"error": "replaced", "holder": {"transport": "websocket"}}, 4,
         "replaced: a websocket agent connected as 'probe'; not reconnecting"),
        (409, {"error": "name_in_use", "holder": {"transport": "websocket"}}, 1,
         "name 'probe' is held by a websocket agent: stop it, or pick another --name"),
        (400, {"error": "url_forbidden", "detail": "10.0.0.5 is a private address"}, 2,
         "10.0.0.5 is a private address"),
        (404, {}, 2, "the gateway does not serve /announce (HTTP 404)"),
    ],
)  # fmt: skip
async def test_announce_mode_exit_codes(
    status: int, payload: dict[str, object], exit_code: int, message: str
) -> None:
    requests: list[bytes] = []
    async with trio.open_nursery() as nursery:
        port = await announce_gateway(nursery, _json(status, payload), requests)
        code, stderr = await serve_agent(
            "--gateway", f"http://127.0.0.1:{port}", "--tunnel-url", "http://svc.example",
            env={"REVCONN_SECRET": SECRET},
        )  # fmt: skip
        nursery.cancel_scope.cancel()
    assert code == exit_code, stderr
    assert stderr.startswith("error: ") or "\nerror: " in stderr, stderr
    assert message in stderr
    assert requests == [b"PUT /announce?name=probe HTTP/1.1"]  # not retried
    assert "Traceback" not in stderr
    assert SECRET not in stderr
