"""The systemd units of docs/systemd/ (and docs/operations.md, "Running under
systemd", which reproduces them): systemd accepts them, the documented files
start a real gateway and connect a real agent, the flags and keys they use
exist, their stop timeouts outlast the executables' grace periods, and the
copies in operations.md equal the files."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from revconn._cli.agent import STOP_GRACE
from revconn._cli.common import EXIT_AUTH, EXIT_CONFIG, EXIT_REPLACED
from revconn._cli.gateway import main as gateway_main

from .._certs import issue
from .._procs import ROOT, Proc

SYSTEMD = ROOT / "docs" / "systemd"
OPERATIONS = ROOT / "docs" / "operations.md"
GATEWAY_UNIT = "revconn-gateway.service"
AGENT_UNIT = "revconn-agent.service"
UNITS = (GATEWAY_UNIT, AGENT_UNIT)
CONFIGS = {GATEWAY_UNIT: "gateway.toml", AGENT_UNIT: "agent.toml"}
CONFIG_TABLE = {GATEWAY_UNIT: "gateway", AGENT_UNIT: "agent"}
EXECUTABLE = {GATEWAY_UNIT: "revconn-gateway", AGENT_UNIT: "revconn-agent"}

GATEWAY_TUNNEL_CLOSE = 5.0
"""What the gateway allows after --grace-period before it stops regardless
(src/revconn/_cli/gateway.py: ``config.graceful_timeout + 5.0``)."""

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
}


# -- reading the files ----------------------------------------------------------


def unit_text(unit: str) -> str:
    return (SYSTEMD / unit).read_text(encoding="utf-8")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values, in order]}}``; the units use no line continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {number}: a continuation line"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {number}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: {line!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(unit: str) -> dict[str, list[str]]:
    return parse_unit(unit_text(unit))["Service"]


def one(unit: str, key: str) -> str:
    values = service(unit).get(key, [])
    assert len(values) == 1, f"{unit}: {key}= given {len(values)} times: {values}"
    return values[0]


def exec_start(unit: str) -> list[str]:
    return shlex.split(one(unit, "ExecStart"))


def seconds(value: str) -> float:
    """A systemd time span as the units write it: ``45``, ``45s``, ``2min``."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return float(match[1]) * (60 if match[2] == "min" else 1)


def config(unit: str) -> dict[str, object]:
    """The options the unit's documented TOML file sets (its table over the top level)."""
    data = tomllib.loads((SYSTEMD / CONFIGS[unit]).read_text(encoding="utf-8"))
    table = CONFIG_TABLE[unit]
    chosen = data.get(table, {})
    assert isinstance(chosen, dict)
    merged = {k.replace("_", "-"): v for k, v in data.items() if k != table}
    merged.update({k.replace("_", "-"): v for k, v in chosen.items()})
    return merged


def installed(name: str) -> str:
    """The console script installed with this Python (what systemd will execute)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install .): the units need the executable")
    return found


def command(unit: str, config_file: Path) -> list[str]:
    """The unit's ExecStart as it would run: the installed executable, and
    ``config_file`` in place of the documented /etc/revconn path."""
    argv = exec_start(unit)
    documented = f"/etc/revconn/{CONFIGS[unit]}"
    assert documented in argv, f"{unit}: ExecStart does not read {documented}"
    return [
        installed(EXECUTABLE[unit]),
        *(str(config_file) if a == documented else a for a in argv[1:]),
    ]


# -- systemd-analyze verify -----------------------------------------------------


def verify_problems(text: str, unit: str, directory: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about ``text`` as unit ``unit``:
    the lines naming it (other lines are about the host's own units) and a
    non-zero exit."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd; .ci/run does)")
    path = directory / unit
    path.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    output = done.stdout + done.stderr
    problems = [line for line in output.splitlines() if unit in line]
    if done.returncode != 0:
        problems.append(f"exit {done.returncode}:\n{output}")
    return problems


def runnable(unit: str) -> str:
    """The unit with ExecStart's /opt/revconn path replaced by the installed
    executable (verify checks that the binary exists)."""
    text = unit_text(unit)
    documented = exec_start(unit)[0]
    assert documented == f"/opt/revconn/bin/{EXECUTABLE[unit]}"
    assert text.count(documented) == 1
    return text.replace(documented, installed(EXECUTABLE[unit]))


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_accepts_the_unit(unit: str, tmp_path: Path) -> None:
    assert verify_problems(runnable(unit), unit, tmp_path) == []


@pytest.mark.parametrize(
    "mistake",
    ["unknown directive", "bad value", "missing binary", "unknown section"],
)
def test_systemd_analyze_verify_catches_a_mistake(mistake: str, tmp_path: Path) -> None:
    """The check above can fail: each mistake is reported, naming the unit."""
    text = runnable(GATEWAY_UNIT)
    if mistake == "unknown directive":
        text = text.replace("TimeoutStopSec=", "TimeoutStopSecs=")
    elif mistake == "bad value":
        text = text.replace("Restart=on-failure", "Restart=on-failures")
    elif mistake == "missing binary":
        text = text.replace(installed("revconn-gateway"), str(tmp_path / "missing" / "gateway"))
    else:
        text = text.replace("[Install]", "[Instal]")
    assert text != runnable(GATEWAY_UNIT)
    assert verify_problems(text, GATEWAY_UNIT, tmp_path) != []


# -- operations.md reproduces the files -----------------------------------------


def systemd_section() -> str:
    text = OPERATIONS.read_text(encoding="utf-8")
    start = text.index("\n## Running under systemd\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def fenced_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```$", markdown, flags=re.M | re.S)


def test_operations_md_reproduces_every_file_verbatim() -> None:
    blocks = fenced_blocks(systemd_section())
    files = sorted(p.name for p in SYSTEMD.iterdir())
    assert files == sorted([*UNITS, *CONFIGS.values()])
    for name in files:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        first = text.splitlines()[0]
        # Each file's first line names where it is installed, which finds its copy.
        assert first == f"# /etc/systemd/system/{name}" or first.startswith(
            f"# /etc/revconn/{name}:"
        )
        copies = [b for b in blocks if b.splitlines()[:1] == [first]]
        assert len(copies) == 1, f"{name}: {len(copies)} copies in operations.md"
        assert copies[0] == text, (
            f"docs/operations.md's copy of {name} differs from docs/systemd/{name}"
        )


# -- the flags and keys exist ---------------------------------------------------


def help_text(unit: str) -> str:
    subcommands = ["serve"] if unit == AGENT_UNIT else []
    assert exec_start(unit)[1 : 1 + len(subcommands)] == subcommands
    done = subprocess.run(
        [installed(EXECUTABLE[unit]), *subcommands, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return done.stdout


def documented_keys(unit: str) -> set[str]:
    """Keys the TOML file sets, and those it shows commented out."""
    text = (SYSTEMD / CONFIGS[unit]).read_text(encoding="utf-8")
    return {m[1] for m in re.finditer(r"^#?\s*([a-z][a-z0-9_-]*)\s*=", text, flags=re.M)}


@pytest.mark.parametrize("unit", UNITS)
def test_every_flag_and_key_is_an_option_of_the_executable(unit: str) -> None:
    usage = help_text(unit)

    def is_option(flag: str) -> bool:
        return re.search(rf"^\s+(?:-\w, )?{re.escape(flag)}(?:\s|$)", usage, flags=re.M) is not None

    flags = [a.split("=")[0] for a in exec_start(unit) if a.startswith("--")]
    assert flags, f"{unit}: no flags in ExecStart"
    keys = documented_keys(unit)
    assert keys >= config(unit).keys()
    missing = [f for f in flags if not is_option(f)]
    missing += [k for k in sorted(keys) if not is_option("--" + k.replace("_", "-"))]
    assert missing == []
    assert not is_option("--no-such-option")  # (the check can fail)


# -- what the units promise -----------------------------------------------------


@pytest.mark.parametrize("unit", UNITS)
def test_the_unit_restarts_on_failure_only_when_it_can_help(unit: str) -> None:
    assert one(unit, "Restart") == "on-failure"
    final = set(one(unit, "RestartPreventExitStatus").split())
    assert str(EXIT_CONFIG) in final
    if unit == AGENT_UNIT:
        assert {str(EXIT_AUTH), str(EXIT_REPLACED)} <= final


@pytest.mark.parametrize("unit", UNITS)
def test_the_stop_timeout_outlasts_the_drain(unit: str) -> None:
    assert one(unit, "KillSignal") == "SIGTERM"
    timeout = seconds(one(unit, "TimeoutStopSec"))
    if unit == GATEWAY_UNIT:
        default = next(p.default for p in gateway_main.params if p.name == "grace_period")
        grace = float(str(config(unit).get("grace-period", default)))
        assert timeout > grace + GATEWAY_TUNNEL_CLOSE
    else:
        assert timeout > STOP_GRACE


@pytest.mark.parametrize("unit", UNITS)
def test_the_unit_is_hardened(unit: str) -> None:
    settings = service(unit)
    for key, value in HARDENING.items():
        assert settings.get(key) == [value], f"{unit}: {key}={value} expected"
    assert (settings.get("User") == ["revconn"]) != (settings.get("DynamicUser") == ["yes"])
    binds = [b for key in ("bind", "admin-bind") for b in list(config(unit).get(key, []))]
    low = [b for b in binds if int(str(b).rsplit(":", 1)[1]) < 1024]
    if low:
        assert settings.get("AmbientCapabilities") == ["CAP_NET_BIND_SERVICE"]
        assert settings.get("CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]
    else:
        assert settings.get("CapabilityBoundingSet") == [""]
        assert "AmbientCapabilities" not in settings


def test_the_gateway_unit_reloads_what_sighup_reloads() -> None:
    # Without revoked-file or certfile SIGHUP would end the gateway.
    assert one(GATEWAY_UNIT, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert {"revoked-file", "certfile"} & config(GATEWAY_UNIT).keys()
    assert one(GATEWAY_UNIT, "StateDirectory") == "revconn"
    assert config(GATEWAY_UNIT).get("state-dir") == "/var/lib/revconn"


def test_the_agent_waits_for_the_network_and_keeps_its_token_off_the_command_line() -> None:
    unit = parse_unit(unit_text(AGENT_UNIT))["Unit"]
    assert "network-online.target" in unit["Wants"]
    assert "network-online.target" in unit["After"]
    assert one(AGENT_UNIT, "EnvironmentFile") == "/etc/revconn/agent.env"
    for name in UNITS:
        credentials = {"--token", "--secret", "--agent-basic-auth"}
        assert not credentials & {a.split("=")[0] for a in exec_start(name)}
        assert not {"token", "secret", "agent-basic-auth"} & config(name).keys()


# -- the documented files run ---------------------------------------------------


class Layout(NamedTuple):
    """gateway.toml and what it names, under a test's tmp_path."""

    config: Path
    state: Path
    ca_file: str
    token_key: str


def gateway_layout(tmp_path: Path, *, drop: tuple[str, ...] = ()) -> Layout:
    """gateway.toml with /etc/revconn and /var/lib/revconn moved under
    ``tmp_path`` (the files it names made as the docs say), its addresses on
    127.0.0.1 port 0, and the keys in ``drop`` deleted."""
    etc, state = tmp_path / "etc", tmp_path / "state"
    etc.mkdir()
    text = (SYSTEMD / "gateway.toml").read_text(encoding="utf-8")
    for documented, here in (("/etc/revconn/", f"{etc}/"), ("/var/lib/revconn", str(state))):
        assert documented in text
        text = text.replace(documented, here)
    text, bound = re.subn(r"^((?:admin-)?bind = )\[.*?\]", r'\1["127.0.0.1:0"]', text, flags=re.M)
    assert bound == 2
    for key in drop:
        text, dropped = re.subn(rf"^{key} = .*\n", "", text, flags=re.M)
        assert dropped == 1, key
    options = tomllib.loads(text)["gateway"]
    certs = issue(tmp_path, "127.0.0.1")
    os.chmod(certs.keyfile, 0o600)
    shutil.move(certs.certfile, options["certfile"])
    shutil.move(certs.keyfile, options["keyfile"])
    token_key = str(tmp_path / "token.key")
    for key_file in options.get("token-key-file", [token_key]):
        subprocess.run(
            [installed("revconn-gateway"), "token", "keygen", key_file],
            capture_output=True,
            timeout=30,
            check=True,
        )
    if "revoked-file" in options:
        Path(options["revoked-file"]).touch()
    path = etc / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    first_key = options.get("token-key-file", [token_key])[0]
    return Layout(path, state, certs.ca_file, first_key)


class Gateway(NamedTuple):
    proc: Proc
    url: str
    admin_url: str
    layout: Layout

    def get(self, url: str, credential: str = "") -> httpx.Response:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        context = ssl.create_default_context(cafile=self.layout.ca_file)
        return httpx.get(url, headers=headers, verify=context, timeout=5)


def token(layout: Layout, *args: str) -> str:
    return subprocess.run(
        [installed("revconn-gateway"), "token", "issue", "--key-file", layout.token_key, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()


def stop(proc: Proc, unit: str) -> int:
    """SIGTERM, as systemctl stop sends; the exit status within TimeoutStopSec."""
    proc.signal(signal.SIGTERM)
    return proc.wait(timeout=seconds(one(unit, "TimeoutStopSec")))


@contextlib.contextmanager
def started_gateway(layout: Layout) -> Iterator[Gateway]:
    """The gateway started as its unit does (with systemd's $STATE_DIRECTORY);
    stopped as systemctl stop does, which must end it with exit 0."""
    proc = Proc(command(GATEWAY_UNIT, layout.config), env={"STATE_DIRECTORY": str(layout.state)})
    try:
        url = proc.wait_for(r"revconn-gateway listening on (https://127\.0\.0\.1:\d+)")[1]
        admin_url = proc.wait_for(r"admin API on (https://127\.0\.0\.1:\d+)")[1]
        yield Gateway(proc, url, admin_url, layout)
        assert stop(proc, GATEWAY_UNIT) == 0, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    finally:
        proc.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    with started_gateway(gateway_layout(tmp_path)) as running:
        yield running


def test_the_documented_gateway_starts_with_tls_and_tokens_only(gateway: Gateway) -> None:
    assert gateway.get(f"{gateway.url}/healthz").status_code == 200
    endpoints = f"{gateway.admin_url}/endpoints"
    assert gateway.get(endpoints, token(gateway.layout, "--admin")).status_code == 200
    # no-shared-secret: nothing else opens it, and no secret was made up.
    assert gateway.get(endpoints, "a-made-up-secret-0123456789").status_code == 401
    assert not (gateway.layout.state / "secret").exists()


def test_without_tokens_the_secret_is_kept_in_the_state_directory(tmp_path: Path) -> None:
    """The documented shared-secret variant: token-key-file, revoked-file and
    no-shared-secret deleted; the secret generated goes to state-dir."""
    layout = gateway_layout(tmp_path, drop=("token-key-file", "revoked-file", "no-shared-secret"))
    with started_gateway(layout) as running:
        secret_file = layout.state / "secret"
        assert secret_file.stat().st_mode & 0o077 == 0
        secret = secret_file.read_text().strip()
        assert secret not in running.proc.stdout + running.proc.stderr
        assert running.get(f"{running.admin_url}/endpoints", secret).status_code == 200


def test_a_mistake_in_the_gateway_toml_is_exit_2_naming_the_key(tmp_path: Path) -> None:
    """The runs above really read the file: a misspelt key stops the gateway."""
    layout = gateway_layout(tmp_path)
    layout.config.write_text(layout.config.read_text().replace("grace-period", "grace-periods"))
    done = subprocess.run(
        command(GATEWAY_UNIT, layout.config),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "STATE_DIRECTORY": str(layout.state)},
    )
    assert done.returncode == EXIT_CONFIG
    assert "'grace-periods' (did you mean 'grace-period'?)" in done.stderr


def test_the_documented_agent_connects_with_its_env_file(gateway: Gateway, tmp_path: Path) -> None:
    options = config(AGENT_UNIT)
    name = str(options["name"])
    credential = token(gateway.layout, name)
    # agent.env as operations.md writes it, read as systemd's EnvironmentFile= does.
    env_file = tmp_path / "agent.env"
    env_file.write_text(f"REVCONN_TOKEN={credential}\n")
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    env["REVCONN_CA_FILE"] = gateway.layout.ca_file  # (the test's CA; the file sets none)
    text = (SYSTEMD / "agent.toml").read_text(encoding="utf-8")
    documented = f'gateway = "{options["gateway"]}"'
    assert documented in text
    path = tmp_path / "agent.toml"
    path.write_text(text.replace(documented, f'gateway = "{gateway.url}"'))
    agent = Proc(command(AGENT_UNIT, path), env=env)
    try:
        agent.wait_for(rf"online: https://\S+ \(agent '{name}'\)")
        assert credential not in agent.stdout + agent.stderr
        assert stop(agent, AGENT_UNIT) == 0, agent.stderr
    finally:
        agent.stop()
