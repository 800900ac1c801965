"""docs/caddy/Caddyfile, tested: Caddy in front of the real gateway, TLS
certificates issued on demand (Caddy's internal CA in place of ACME: this
machine reaches no ACME server) only for names the gateway's /tls-ask allows,
X-Forwarded-* believed from Caddy alone (--trusted-proxy), and a WebSocket
through Caddy, the gateway and the tunnel."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import wrap_client_stream

from ._procs import ROOT, Proc, free_port
from .test_e2e import start_agent, start_gateway
from .test_e2e_web import start_upstream

pytestmark = pytest.mark.e2e

CADDY = shutil.which("caddy")
DOMAIN = "revconn.test"


def caddyfile(tmp_path: Path) -> Path:
    """The documented Caddyfile with two test-only changes: Caddy's internal
    CA instead of ACME, and no attempt to install its root anywhere."""
    text = (ROOT / "docs" / "caddy" / "Caddyfile").read_text()
    assert "\ttls {\n\t\ton_demand\n\t}" in text
    text = text.replace("\ttls {\n\t\ton_demand\n\t}", "\ttls internal {\n\t\ton_demand\n\t}")
    text = text.replace("{\n\thttp_port", "{\n\tskip_install_trust\n\tadmin off\n\thttp_port", 1)
    path = tmp_path / "Caddyfile"
    path.write_text(text)
    return path


def curl(url: str, port: int, ca: Path, host: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(ca),
            "--resolve",
            f"{host}:{port}:127.0.0.1",
            url,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.skipif(CADDY is None, reason="caddy not installed: apt-get install caddy")
def test_the_documented_caddyfile(procs: list[Proc], tmp_path: Path) -> None:
    upstream = start_upstream(procs)
    admin_port = free_port()
    _, url, admin = start_gateway(
        procs, "--domain", DOMAIN, "--trusted-proxy", "127.0.0.1", admin_port=admin_port
    )
    api = start_agent(procs, url, "api", "--upstream", upstream)
    web = start_agent(procs, url, "web", "--app", "tests.browser_app:app")
    api.wait_for("online")
    web.wait_for("online")
    https_port, http_port = free_port(), free_port()
    env = {
        "CADDY_HTTPS_PORT": str(https_port),
        "CADDY_HTTP_PORT": str(http_port),
        "REVCONN_ADMIN": admin.removeprefix("http://"),
        "REVCONN_BIND": url.removeprefix("http://"),
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    caddy = Proc(
        [CADDY or "caddy", "run", "--config", str(caddyfile(tmp_path)), "--adapter", "caddyfile"],
        env,
    )
    procs.append(caddy)
    caddy.wait_listening(https_port, "caddy")
    ca = tmp_path / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    # The gateway's "ask": the domain and online agents only.
    ask = f"{admin}/tls-ask?domain="
    assert httpx.get(ask + f"api.{DOMAIN}").status_code == 200
    assert httpx.get(ask + DOMAIN).status_code == 200
    assert httpx.get(ask + f"nobody.{DOMAIN}").status_code == 404
    assert httpx.get(ask + "example.com").status_code == 404
    assert httpx.get(ask + f"a.api.{DOMAIN}").status_code == 404

    # A certificate on demand for api.revconn.test; the upstream sees https
    # and the public host (Caddy is trusted), and its own path (host routing).
    host = f"api.{DOMAIN}"
    deadline = time.monotonic() + 20
    while True:
        done = curl(f"https://{host}:{https_port}/echo/through?caddy=1", https_port, ca, host)
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # (the root is written as Caddy starts)
    assert done.returncode == 0, done.stderr + caddy.stderr
    echo = json.loads(done.stdout)
    assert (echo["raw_path"], echo["query"]) == ("/echo/through", "caddy=1")
    headers = {n.lower(): v for n, v in echo["headers"]}
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == f"{host}:{https_port}"
    assert "x-forwarded-prefix" not in headers

    # No certificate for a name no agent holds: the TLS handshake fails.
    stranger = f"nobody.{DOMAIN}"
    refused = curl(f"https://{stranger}:{https_port}/", https_port, ca, stranger)
    assert refused.returncode == 35, refused  # curl: SSL connect error (no certificate)

    # A WebSocket through Caddy (wss), the gateway and the tunnel to the app.
    async def talk() -> str:
        context = ssl.create_default_context(cafile=str(ca))
        tcp = await trio.open_tcp_stream("127.0.0.1", https_port)
        stream = trio.SSLStream(tcp, context, server_hostname=f"web.{DOMAIN}")
        async with stream, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, f"web.{DOMAIN}:{https_port}", "/ws")
            await ws.send_message("over wss")
            answer = str(await ws.get_message())
            await ws.aclose()
            return answer

    async def bounded() -> str:
        with trio.fail_after(20):
            return await talk()

    assert trio.run(bounded) == "pong: over wss"
