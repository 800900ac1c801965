"""``revconn-gateway``'s helpers: the demo agent dials loopback even when the
data plane is bound to every address (a plain-HTTP gateway URL that is not
loopback would be refused by the agent)."""

from __future__ import annotations

import pytest

from revconn import AgentConfig, ConfigError
from revconn._cli.gateway import _loopback

SECRET = "demo-secret-abcdefghijklmnop"


@pytest.mark.parametrize(
    ("bound", "dialed"),
    [
        ("http://0.0.0.0:8080", "http://127.0.0.1:8080"),
        ("https://0.0.0.0:8443", "https://127.0.0.1:8443"),
        ("http://[::]:8080", "http://[::1]:8080"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://192.0.2.7:8080", "http://192.0.2.7:8080"),
    ],
)
def test_the_demo_agent_dials_loopback_for_an_unspecified_bind(bound: str, dialed: str) -> None:
    assert _loopback(bound) == dialed


def test_the_demo_agent_config_is_accepted_for_a_gateway_on_every_address() -> None:
    with pytest.raises(ConfigError, match=r"in clear text to 0\.0\.0\.0"):
        AgentConfig(gateway="http://0.0.0.0:8080", name="demo", secret=SECRET)
    AgentConfig(gateway=_loopback("http://0.0.0.0:8080"), name="demo", secret=SECRET)


@pytest.mark.parametrize("prog", ["revconn-gateway", "revconn-agent"])
def test_version_names_the_program_and_the_package(prog: str) -> None:
    import subprocess

    import revconn

    from .._procs import executable

    done = subprocess.run(
        [*executable(prog), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert (done.returncode, done.stdout) == (0, f"{prog}, version {revconn.__version__}\n")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90d", 90 * 86400),
        ("12h", 43200),
        ("30m", 1800),
        ("3600s", 3600),
        ("3600", 3600),
        ("1w", 604800),
        ("1.5h", 5400),
        (" 2D ", 172800),
    ],
)
def test_token_durations(text: str, seconds: float) -> None:
    from revconn._cli.gateway import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1d", "5x", "d", "1d2h", "1e400"])
def test_bad_token_durations_name_the_value(text: str) -> None:
    from revconn._cli.gateway import parse_duration

    with pytest.raises(ConfigError, match=f"--expires {text!r}: give a positive number"):
        parse_duration(text)


def test_a_kept_secret_is_written_whole_and_never_replaced(tmp_path: object) -> None:
    from pathlib import Path

    from revconn._cli.gateway import _keep_secret, stored_secret

    state = Path(str(tmp_path)) / "state"
    secret, generated, path = stored_secret(state)
    assert generated and path == state / "secret"
    assert path.read_text() == secret + "\n"
    assert sorted(p.name for p in state.iterdir()) == ["secret"]  # no temporary left
    # Another gateway that got there first: its secret stays, ours is dropped.
    assert _keep_secret(state, path, "another-secret-0123456789") is False
    assert stored_secret(state) == (secret, False, path)
    assert sorted(p.name for p in state.iterdir()) == ["secret"]
    path.write_text("")
    with pytest.raises(ConfigError, match="is empty: delete it"):
        stored_secret(state)
