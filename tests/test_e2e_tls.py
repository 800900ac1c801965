"""End to end over TLS: the real executables with trustme certificates on
disk. ``revconn-gateway --certfile --keyfile`` serves https on both surfaces,
``revconn-agent serve --ca-file`` verifies it, and SIGHUP swaps the
certificate for new connections while the agent's tunnel stays up."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from ._certs import CertFiles, issue, replace
from ._procs import ROOT, Proc, executable
from .test_e2e import eventually

pytestmark = pytest.mark.e2e

SECRET = "tls-e2e-secret-abcdefghijklmnop"
AUTH = {"Authorization": f"Bearer {SECRET}"}


def start_gateway(procs: list[Proc], certs: CertFiles, *extra: str) -> tuple[Proc, str, str]:
    """A TLS gateway; returns it, its data plane's URL and its admin URL."""
    gw = Proc(
        [
            *executable("revconn-gateway"),
            "--bind",
            "127.0.0.1:0",
            "--admin-bind",
            "127.0.0.1:0",
            "--certfile",
            certs.certfile,
            "--keyfile",
            certs.keyfile,
            *extra,
        ],
        {"REVCONN_SECRET": SECRET},
    )
    procs.append(gw)
    url = gw.wait_for(r"listening on (https://127\.0\.0\.1:\d+)", stream="out").group(1)
    admin = gw.wait_for(r"admin API on (https://127\.0\.0\.1:\d+)", stream="out").group(1)
    return gw, url, admin


def test_sighup_reloads_the_certificate_while_the_agent_stays_connected(
    procs: list[Proc], tmp_path: Path
) -> None:
    first = issue(tmp_path)
    gw, url, admin = start_gateway(procs, first)
    agent = Proc(
        [
            *executable("revconn-agent"),
            "serve",
            "--gateway",
            url,
            "--name",
            "web",
            "--ca-file",
            first.ca_file,
            "--app",
            "tests.upstream_app:app",
        ],
        {"REVCONN_SECRET": SECRET, "PYTHONPATH": str(ROOT)},
    )
    procs.append(agent)
    agent.wait_for(rf"online: {url}/a/web/ \(agent 'web'\)")
    r = httpx.get(f"{url}/a/web/echo/one", verify=first.client_context())
    assert r.status_code == 200
    assert ["x-forwarded-proto", "https"] in r.json()["headers"]
    (row,) = httpx.get(f"{admin}/endpoints", headers=AUTH, verify=first.client_context()).json()[
        "endpoints"
    ]

    second = issue(tmp_path)  # a renewal: new files at the same paths, here a new CA too
    gw.signal(signal.SIGHUP)
    gw.wait_for("TLS certificate reloaded from")
    r = httpx.get(f"{url}/a/web/echo/two", verify=second.client_context())
    assert r.status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/a/web/echo/old", verify=first.client_context())
    rows = httpx.get(f"{admin}/endpoints", headers=AUTH, verify=second.client_context()).json()
    assert rows["endpoints"] == [row]  # the same tunnel: same epoch, same connected_at

    replace(second.certfile, b"truncated by a failed renewal\n")
    gw.signal(signal.SIGHUP)
    gw.wait_for(
        r"ERROR revconn.cli: SIGHUP: TLS reload failed, the current certificate stays: "
        r"--certfile .*: no PEM certificate in it"
    )
    r = httpx.get(f"{url}/a/web/echo/three", verify=second.client_context())
    assert r.status_code == 200

    assert agent.count("connecting to") == 1
    assert agent.count("lost: ") == 0
    gw.signal(signal.SIGTERM)
    assert gw.wait() == 0


def test_demo_over_tls(procs: list[Proc], tmp_path: Path) -> None:
    """The demo agent dials the gateway's own loopback socket, whatever host
    the certificate names."""
    certs = issue(tmp_path, "gw.example.com")
    gw, url, admin = start_gateway(procs, certs, "--demo")
    gw.wait_for(rf"curl '{url}/a/demo/'", stream="out")
    client = certs.client_context()
    client.check_hostname = False  # (the certificate is for gw.example.com)

    def demo_online() -> bool:
        r = httpx.get(f"{admin}/endpoints", headers=AUTH, verify=client)
        return [row["name"] for row in r.json()["endpoints"]] == ["demo"]

    eventually(demo_online)
    r = httpx.get(f"{url}/a/demo/", verify=client)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize("case", ["certfile alone", "missing certfile", "mismatched key"])
def test_bad_tls_flags_exit_2_naming_the_file(procs: list[Proc], tmp_path: Path, case: str) -> None:
    certs = issue(tmp_path)
    if case == "certfile alone":
        flags = ["--certfile", certs.certfile]
        message = "error: --certfile without --keyfile: give both for HTTPS, or neither"
    elif case == "missing certfile":
        missing = str(tmp_path / "missing.crt")
        flags = ["--certfile", missing, "--keyfile", certs.keyfile]
        message = f"error: --certfile {missing}: cannot read it: No such file or directory"
    else:
        other = issue(tmp_path, stem="other")
        flags = ["--certfile", certs.certfile, "--keyfile", other.keyfile]
        message = (
            f"error: --keyfile {other.keyfile} is not the key of the certificate in --certfile "
            f"{certs.certfile} (OpenSSL: [X509: KEY_VALUES_MISMATCH] key values mismatch)"
        )
    gw = Proc([*executable("revconn-gateway"), "--bind", "127.0.0.1:0", *flags])
    procs.append(gw)
    assert gw.wait() == 2
    assert message in gw.stderr
    assert "Traceback" not in gw.stderr
