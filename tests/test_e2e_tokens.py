"""End to end with tokens: `revconn-gateway token keygen/issue`, a gateway on
two keys (a rotation) without the shared secret, agents on their own tokens,
and a revocation that ends a live session while the other agent serves on."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from revconn._gateway.tokens import SigningKey

from ._procs import ROOT, Proc, executable
from .test_e2e import eventually

pytestmark = pytest.mark.e2e

APP = ("--app", "tests.upstream_app:app")
ENV = {"PYTHONPATH": str(ROOT)}


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVCONN_")}
    return subprocess.run(
        [*executable("revconn-gateway"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def keygen(path: Path) -> str:
    done = gateway_cli("token", "keygen", str(path))
    assert done.returncode == 0, done.stderr
    match = re.search(r"wrote token key ([0-9a-f]{16}) to", done.stderr)
    assert match, done.stderr
    return match.group(1)


def issue(key: Path, *args: str) -> dict[str, object]:
    done = gateway_cli("token", "issue", "--key-file", str(key), "--json", *args)
    assert done.returncode == 0, done.stderr
    payload: dict[str, object] = json.loads(done.stdout)
    return payload


def start_gateway(procs: list[Proc], *extra: str) -> tuple[Proc, str, str]:
    gw = Proc(
        [
            *executable("revconn-gateway"),
            "--bind",
            "127.0.0.1:0",
            "--admin-bind",
            "127.0.0.1:0",
            *extra,
        ]
    )
    procs.append(gw)
    url = gw.wait_for(r"listening on (http://127\.0\.0\.1:\d+)", stream="out").group(1)
    admin = gw.wait_for(r"admin API on (http://127\.0\.0\.1:\d+)", stream="out").group(1)
    return gw, url, admin


def start_agent(procs: list[Proc], url: str, name: str, token: object) -> Proc:
    agent = Proc(
        [*executable("revconn-agent"), "serve", "--gateway", url, "--name", name, *APP],
        {**ENV, "REVCONN_TOKEN": str(token)},
    )
    procs.append(agent)
    return agent


def test_keygen_writes_a_private_key_and_never_overwrites_it(tmp_path: Path) -> None:
    key = tmp_path / "token.key"
    key_id = keygen(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    again = gateway_cli("token", "keygen", str(key))
    assert again.returncode == 2
    assert f"error: {key} exists: a key is never overwritten" in again.stderr
    assert key.read_bytes() == before
    # The key id is printed (it is the tokens' kid), never the key itself.
    assert key_id == SigningKey.load(key).id
    assert before.decode().split(":", 1)[1].strip() not in again.stderr


def test_issue_prints_the_token_alone_or_as_json(tmp_path: Path) -> None:
    key = tmp_path / "k"
    keygen(key)
    plain = gateway_cli("token", "issue", "--key-file", str(key), "laptop")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.count("\n") == 1 and plain.stdout.count(".") == 2
    assert "no expiry" in plain.stderr
    before = time.time()
    payload = issue(key, "laptop", "--expires", "12h")
    assert set(payload) == {"token", "id", "name", "expires_at"}
    assert payload["name"] == "laptop"
    assert re.fullmatch(r"[0-9a-f]{32}", str(payload["id"]))
    expires = time.mktime(time.strptime(str(payload["expires_at"]), "%Y-%m-%dT%H:%M:%SZ"))
    expires -= time.timezone  # (strptime read UTC as local time)
    assert before + 12 * 3600 - 2 <= expires <= time.time() + 12 * 3600 + 2
    admin = issue(key, "--admin")
    assert (admin["name"], admin["expires_at"]) == (None, None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["laptop", "--expires", "soon"], "--expires 'soon': give a positive number"),
        (["laptop", "--expires", "0d"], "--expires '0d': give a positive number"),
        ([], "give the agent NAME the token is for, or --admin"),
        (["laptop", "--admin"], "--admin tokens are bound to no agent"),
        (["Not_A_Name"], "'Not_A_Name' is not a valid agent name"),
    ],
)
def test_bad_issue_arguments_exit_2_with_the_reason(
    tmp_path: Path, args: list[str], message: str
) -> None:
    key = tmp_path / "k"
    keygen(key)
    done = gateway_cli("token", "issue", "--key-file", str(key), *args)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k"
    keygen(key)
    key.chmod(0o640)
    done = gateway_cli("token", "issue", "--key-file", str(key), "laptop")
    assert done.returncode == 2
    assert f"is accessible to other users (mode 0640): run `chmod 600 {key}`" in done.stderr
    missing = gateway_cli("--token-key-file", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "does not exist: create one with `revconn-gateway token keygen" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-shared-secret"], "--no-shared-secret needs --token-key-file"),
        (["--revoked-file", "r"], "--revoked-file lists token ids: it needs --token-key-file"),
        (
            ["--token-key-file", "K", "--no-shared-secret", "--secret", "x"],
            "--no-shared-secret contradicts --secret",
        ),
        (["--token-key-file", "K", "--token-key-file", "K"], "the same key is given twice"),
    ],
)
def test_contradictory_credential_flags_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    key = tmp_path / "k"
    keygen(key)
    done = gateway_cli(*[str(key) if a == "K" else a for a in args])
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "listening on" not in done.stdout


def test_tokens_rotation_scopes_and_revocation(procs: list[Proc], tmp_path: Path) -> None:
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    old_id = keygen(old)
    new_id = keygen(new)
    revoked = tmp_path / "revoked"
    revoked.write_text("# revoked token ids\n")
    gw, url, admin = start_gateway(
        procs,
        "--token-key-file",
        str(new),
        "--token-key-file",
        str(old),
        "--no-shared-secret",
        "--revoked-file",
        str(revoked),
    )
    # An old-key token (issued before the rotation) and a new one both verify.
    laptop, server = issue(old, "laptop"), issue(new, "server")
    a = start_agent(procs, url, "laptop", laptop["token"])
    b = start_agent(procs, url, "server", server["token"])
    a.wait_for(rf"online: {url}/a/laptop/")
    b.wait_for(rf"online: {url}/a/server/")
    for name in ("laptop", "server"):
        assert httpx.get(f"{url}/a/{name}/echo/x").status_code == 200
    # The log says who is on which key (a rotation is done when none is on the old one).
    gw.wait_for(
        rf"agent 'laptop' online from \S+ \(epoch \d+, token {laptop['id']}, key {old_id}\)"
    )
    gw.wait_for(
        rf"agent 'server' online from \S+ \(epoch \d+, token {server['id']}, key {new_id}\)"
    )

    # Scopes: only an admin token opens the admin surface.
    admin_token = issue(new, "--admin")["token"]
    listed = httpx.get(f"{admin}/endpoints", headers={"Authorization": f"Bearer {admin_token}"})
    assert sorted(e["name"] for e in listed.json()["endpoints"]) == ["laptop", "server"]
    refused = httpx.get(
        f"{admin}/endpoints", headers={"Authorization": f"Bearer {laptop['token']}"}
    )
    assert (refused.status_code, refused.json()["error"]) == (403, "wrong_scope")

    # A token under another name: 403, and the holder of that name is untouched.
    thief = start_agent(procs, url, "server", laptop["token"])
    assert thief.wait(timeout=10) == 3
    assert "HTTP 403 wrong_agent" in thief.stderr and "connects only as 'laptop'" in thief.stderr
    assert httpx.get(f"{url}/a/server/echo/x").status_code == 200
    # No shared secret any more: a secret is just a wrong credential.
    secret_agent = Proc(
        [*executable("revconn-agent"), "serve", "--gateway", url, "--name", "x", *APP],
        {**ENV, "REVCONN_SECRET": "some-old-shared-secret"},
    )
    procs.append(secret_agent)
    assert secret_agent.wait(timeout=10) == 3

    # Revoke laptop's token: its live session closes, it exits 3 and says why.
    revoked.write_text(f"# revoked token ids\n{laptop['id']}\n")
    written = time.monotonic()
    assert a.wait(timeout=5) == 3
    assert time.monotonic() - written < 2.0  # (within 1 s of the reload, poll 0.5 s)
    assert "revoked this agent's credential" in a.stderr
    assert a.count("connecting to") == 1  # no retry
    gw.wait_for(r"agent 'laptop' offline \(epoch \d+\): revoked")
    gone = httpx.get(f"{url}/a/laptop/echo/x")
    assert (gone.status_code, gone.json()["error"]) == (503, "agent_offline")
    assert httpx.get(f"{url}/a/server/echo/x").status_code == 200
    again = start_agent(procs, url, "laptop", laptop["token"])
    assert again.wait(timeout=10) == 3
    assert "revoked" in again.stderr

    # SIGHUP with a broken file: logged, the list in force stays, nobody is cut off.
    revoked.write_text("not a token id!\n")
    gw.signal(signal.SIGHUP)
    gw.wait_for(r"revoked tokens not reloaded, the current list stays: .*revoked.*line 1")
    assert httpx.get(f"{url}/a/server/echo/x").status_code == 200
    assert gw.popen.poll() is None
    for secret in (laptop["token"], server["token"], admin_token):
        assert str(secret) not in gw.stdout + gw.stderr


def test_demo_without_a_shared_secret_uses_a_token(procs: list[Proc], tmp_path: Path) -> None:
    key = tmp_path / "k"
    keygen(key)
    gw, url, admin = start_gateway(
        procs, "--demo", "--token-key-file", str(key), "--no-shared-secret"
    )
    hint = gw.wait_for(r"Bearer \$\((revconn-gateway token issue --admin --key-file \S+)\)")
    assert "generated secret" not in gw.stdout
    eventually(lambda: httpx.get(f"{url}/a/demo/").status_code == 200)
    # The printed hint works as printed.
    done = gateway_cli(*hint.group(1).split()[1:])
    assert done.returncode == 0, done.stderr
    r = httpx.get(f"{admin}/endpoints", headers={"Authorization": f"Bearer {done.stdout.strip()}"})
    assert [e["name"] for e in r.json()["endpoints"]] == ["demo"]


def test_the_token_can_come_from_a_private_file(procs: list[Proc], tmp_path: Path) -> None:
    """--token-file: a secret volume or systemd's credentials directory; the
    file is checked as the gateway checks its key files."""
    key = tmp_path / "token.key"
    keygen(key)
    _, url, _ = start_gateway(procs, "--token-key-file", str(key), "--no-shared-secret")
    token = str(issue(key, "filed")["token"])
    token_file = tmp_path / "filed.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)

    def agent_with(*extra: str, env: dict[str, str] | None = None) -> Proc:
        agent = Proc(
            [
                *executable("revconn-agent"),
                "serve",
                "--gateway",
                url,
                "--name",
                "filed",
                *APP,
                *extra,
            ],
            {**ENV, **(env or {})},
        )
        procs.append(agent)
        return agent

    online = agent_with("--token-file", str(token_file))
    online.wait_for(rf"online: {url}/a/filed/")
    assert token not in online.stdout + online.stderr
    online.signal(signal.SIGTERM)
    assert online.wait() == 0

    token_file.chmod(0o644)
    refused = agent_with("--token-file", str(token_file))
    assert refused.wait() == 2
    assert f"chmod 600 {token_file}" in refused.stderr
    for extra, env, says in [
        (("--token-file", str(tmp_path / "missing")), None, "no such file"),
        (("--token-file", str(token_file), "--token", token), None, "not both"),
        (("--token-file", str(token_file)), {"REVCONN_SECRET": "s3cret"}, "not both"),
    ]:
        agent = agent_with(*extra, env=env)
        assert agent.wait() == 2, agent.stderr
        assert says in agent.stderr
        assert "Traceback" not in agent.stderr and "connecting to" not in agent.stderr
