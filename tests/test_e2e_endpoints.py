"""``revconn-gateway endpoints`` against a real gateway and agent."""

from __future__ import annotations

import datetime
import json
import os
import subprocess

import pytest

from revconn._cli.gateway import endpoints_table

from ._procs import Proc, executable, free_port
from .test_e2e import SECRET, start_agent, start_gateway

pytestmark = pytest.mark.e2e


def endpoints(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REVCONN_")}
    return subprocess.run(
        [*executable("revconn-gateway"), "endpoints", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, **(env or {})},
        check=False,
    )


def test_endpoints_lists_the_agents_as_a_table_and_as_json(procs: list[Proc]) -> None:
    _, url, admin = start_gateway(procs)
    start_agent(procs, url, "laptop").wait_for("online: ")
    table = endpoints("--admin", admin, "--token", SECRET)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "TRANSPORT", "SINCE", "REMOTE", "RTT", "EPOCH", "VERSION"]
    assert row.split()[:2] == ["laptop", "websocket"]
    assert "revconn-agent/" in row and "127.0.0.1:" in row
    as_json = endpoints("--admin", admin, "--json", env={"REVCONN_SECRET": SECRET})
    assert as_json.returncode == 0, as_json.stderr
    (entry,) = json.loads(as_json.stdout)["endpoints"]
    assert entry["name"] == "laptop" and str(entry["epoch"]) in row


def test_endpoints_says_what_is_wrong(procs: list[Proc]) -> None:
    _, _, admin = start_gateway(procs)
    bad = endpoints("--admin", admin, "--token", "wrong")
    assert bad.returncode == 3
    assert "answered HTTP 401 unauthorized" in bad.stderr and "check --token" in bad.stderr
    assert "wrong" not in bad.stderr.replace("wrong_", "")  # the credential is not echoed
    missing = endpoints("--admin", admin)
    assert missing.returncode == 2 and "no credential" in missing.stderr
    down = endpoints("--admin", f"http://127.0.0.1:{free_port()}", "--token", SECRET)
    assert down.returncode == 1
    assert "cannot reach" in down.stderr and "--admin-bind" in down.stderr
    for done in (bad, missing, down):
        assert "Traceback" not in done.stderr


def test_the_table_reads_well() -> None:
    now = datetime.datetime(2026, 12, 3, 12, 0, 0, tzinfo=datetime.UTC)
    rows: list[dict[str, object]] = [
        {
            "name": "laptop",
            "transport": "websocket",
            "connected_at": "2026-12-03T09:15:30.5Z",
            "remote": "203.0.113.7:50412",
            "rtt_ms": 12.345,
            "epoch": 8,
            "version": "revconn-agent/0.1.0",
            "flapping": True,
        },
        {
            "name": "svc",
            "transport": "url",
            "connected_at": "2026-12-03T11:59:58Z",
            "remote": "198.51.100.1",
            "rtt_ms": None,
            "epoch": 9,
            "version": None,
        },
    ]
    lines = endpoints_table(rows, now).splitlines()
    assert lines[1].split() == [
        "laptop",
        "(flapping)",
        "websocket",
        "2h44m",
        "203.0.113.7:50412",
        "12.3",
        "ms",
        "8",
        "revconn-agent/0.1.0",
    ]
    assert lines[2].split() == ["svc", "url", "2s", "198.51.100.1", "-", "9", "-"]
    assert endpoints_table([], now).endswith("(no agent online)")
