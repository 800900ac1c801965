"""``--config FILE`` and ``REVCONN_*`` for both executables: precedence flag >
environment > file > default, and a clear exit 2 for a bad file. Each case
runs the real executable to a configuration error that prints the value in
effect, so nothing is started."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from revconn._cli.agent import main as agent_main
from revconn._cli.gateway import main as gateway_main

from .._procs import executable


def run(prog: list[str], *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REVCONN_")}
    done = subprocess.run(
        [*prog, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, **(env or {})},
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stderr


GATEWAY = executable("revconn-gateway")
AGENT = [*executable("revconn-agent"), "serve"]
LIMIT = "max-pending-connections"


def pending_error(value: int) -> str:
    return f"error: --max-pending-connections {value}: must be at least 1"


@pytest.mark.parametrize("key", ["max-pending-connections", "max_pending_connections"])
def test_gateway_precedence_flag_env_file(tmp_path: Path, key: str) -> None:
    config = tmp_path / "revconn.toml"
    config.write_text(f"[gateway]\n{key} = 0\n")
    env = {"REVCONN_MAX_PENDING_CONNECTIONS": "-5"}
    assert run(GATEWAY, "--config", str(config)) == (2, pending_error(0) + "\n")
    assert run(GATEWAY, "--config", str(config), env=env) == (2, pending_error(-5) + "\n")
    flag = ("--config", str(config), "--max-pending-connections", "-7")
    assert run(GATEWAY, *flag, env=env) == (2, pending_error(-7) + "\n")
    # REVCONN_CONFIG names the file too; top-level keys apply, the table wins.
    config.write_text(f"{LIMIT} = -1\n[gateway]\n{LIMIT} = -2\n")
    assert run(GATEWAY, env={"REVCONN_CONFIG": str(config)}) == (2, pending_error(-2) + "\n")


def test_agent_precedence_flag_env_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    # One file for both executables: shared keys on top, each its own table
    # (TOML has no top-level "gateway" key beside a [gateway] table).
    config.write_text(
        'heartbeat-interval = 15\nsecret = "shared-secret-0123456789"\n'
        '[agent]\ngateway = "ftp://file.example"\nname = "x"\nupstream = "http://127.0.0.1:9"\n'
        '[gateway]\nbind = ["127.0.0.1:0"]\nmax-pending-connections = 0\n'
    )
    assert run(GATEWAY, "--config", str(config)) == (2, pending_error(0) + "\n")
    message = "error: gateway URL '{}' must start with http://, https://, ws:// or wss://\n"
    assert run(AGENT, "--config", str(config)) == (2, message.format("ftp://file.example"))
    env = {"REVCONN_GATEWAY": "gopher://env.example"}
    assert run(AGENT, "--config", str(config), env=env) == (
        2,
        message.format("gopher://env.example"),
    )
    flag = ("--config", str(config), "--gateway", "wais://flag.example")
    assert run(AGENT, *flag, env=env) == (2, message.format("wais://flag.example"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "heartbeat-interval = 'abc'\n",
            "key 'heartbeat-interval' = 'abc': Invalid value for "
            "'--heartbeat-interval': 'abc' is not a valid float.",
        ),
        (
            "hearbeat-interval = 3\n",
            "unknown key 'hearbeat-interval' (did you mean 'heartbeat-interval'?)",
        ),
        (
            "bind = '0.0.0.0:8080'\n",
            "key 'bind' = '0.0.0.0:8080': --bind is repeatable: give a "
            "list, e.g. bind = ['0.0.0.0:8080']",
        ),
        ("demo = 'yes'\n", "key 'demo' = 'yes': expected true or false"),
        ("log-level = 'loud'\n", "key 'log-level' = 'loud': Invalid value for '--log-level'"),
        ("[gateway\n", "not valid TOML: Expected ']' at the end of a table declaration"),
        ("bind = [['x']]\n", "key 'bind' = [['x']]: expected a single value"),
    ],
)
def test_a_bad_file_names_the_key_the_value_and_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    code, stderr = run(GATEWAY, "--config", str(config))
    assert code == 2
    assert stderr.startswith(f"error: --config {config}: "), stderr
    assert message in stderr, stderr
    assert "listening on" not in stderr


def test_a_missing_file_is_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert run(GATEWAY, "--config", str(missing)) == (
        2,
        f"error: --config {missing}: no such file\n",
    )


@pytest.mark.parametrize("command", [gateway_main, agent_main.commands["serve"]])
def test_every_option_has_an_environment_variable(command: object) -> None:
    import click

    assert isinstance(command, click.Command)
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in ("config", "help", "version"):
            continue
        assert param.envvar, param.name
        assert str(param.envvar).startswith("REVCONN_"), (param.name, param.envvar)
