"""``--log-format json`` and ``--access-log`` with the real executables: one
JSON object a line with the stable keys, one access line per request (no
query string, no header value), for both executables."""

from __future__ import annotations

import json

import httpx
import pytest

from ._procs import ROOT, Proc, executable
from .test_e2e import SECRET, start_gateway

pytestmark = pytest.mark.e2e

STABLE = {
    "ts",
    "level",
    "logger",
    "message",
    "event",
    "agent",
    "epoch",
    "remote",
    "reason",
    "duration_ms",
}


def json_lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # (every line is JSON, or this fails)


def test_json_logs_and_the_access_log(procs: list[Proc]) -> None:
    gw, url, _ = start_gateway(procs, "--log-format", "json", "--access-log")
    agent = Proc(
        [
            *executable("revconn-agent"),
            "serve",
            "--gateway",
            url,
            "--name",
            "web",
            "--app",
            "tests.upstream_app:app",
            "--log-format",
            "json",
        ],
        {"REVCONN_SECRET": SECRET, "PYTHONPATH": str(ROOT)},
    )
    procs.append(agent)
    agent.wait_for(r'"event":"online"')
    r = httpx.get(f"{url}/a/web/echo/x?token=hunter2", headers={"Cookie": "session=opensesame"})
    assert r.status_code == 200
    assert httpx.get(f"{url}/a/web/status/404").status_code == 404
    gw.wait_for(r'"path":"/a/web/status/404"')
    lines = json_lines(gw.stderr)
    assert all(set(line) >= STABLE for line in lines), lines
    (online,) = [line for line in lines if line["event"] == "online"]
    assert (online["agent"], online["logger"]) == ("web", "revconn.gateway")
    assert isinstance(online["epoch"], int) and str(online["remote"]).startswith("127.0.0.1:")
    access = [line for line in lines if line["event"] == "request"]
    assert [(a["path"], a["status"]) for a in access] == [
        ("/a/web/echo/x", 200),
        ("/a/web/status/404", 404),
    ]
    first = access[0]
    assert (
        first["agent"] == "web" and first["method"] == "GET" and first["logger"] == "revconn.access"
    )
    assert isinstance(first["duration_ms"], float) and int(str(first["bytes_out"])) > 0
    for secret in ("hunter2", "opensesame", SECRET):
        assert secret not in gw.stderr + gw.stdout
    agent_lines = json_lines(agent.stderr)
    assert all(set(line) >= STABLE for line in agent_lines)
    assert any(line["event"] == "online" and line["agent"] == "web" for line in agent_lines)


def test_without_access_log_requests_are_not_logged(procs: list[Proc]) -> None:
    gw, url, _ = start_gateway(procs, "--log-format", "json")
    agent = Proc(
        [
            *executable("revconn-agent"),
            "serve",
            "--gateway",
            url,
            "--name",
            "quiet",
            "--app",
            "tests.upstream_app:app",
        ],
        {"REVCONN_SECRET": SECRET, "PYTHONPATH": str(ROOT)},
    )
    procs.append(agent)
    agent.wait_for("online: ")
    assert httpx.get(f"{url}/a/quiet/echo/x").status_code == 200
    gw.wait_for(r'"event":"online"')
    assert not [line for line in json_lines(gw.stderr) if line["event"] == "request"]
