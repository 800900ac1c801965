"""docs/nginx/revconn.conf, tested: the real nginx in front of the real
gateway (--trusted-proxy 127.0.0.1/32), terminating TLS for an agent that
dials the gateway through it over wss and for the public: host routing,
X-Forwarded-* the gateway believes from nginx alone, streamed and large
bodies both ways, a public WebSocket, and the HTTP to HTTPS redirect."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import wrap_client_stream

from ._certs import CertFiles, issue
from ._procs import ROOT, Proc, free_port
from .test_e2e import start_agent, start_gateway
from .test_e2e_web import start_upstream
from .upstream_app import pattern

pytestmark = pytest.mark.e2e

NGINX = "/usr/sbin/nginx"
# The documented tunnel.example.com becomes localhost: the agent dials the
# bare domain by name (SNI and Host as in production) and only localhost
# resolves here; curl resolves NAME.localhost itself.
DOMAIN = "localhost"


def render(tmp_path: Path, certs: CertFiles, https_port: int, http_port: int, gateway: str) -> Path:
    """The documented file with its placeholders filled in (each must be
    there: every other directive is the documented one), included in a
    minimal nginx.conf that keeps nginx's own files in ``tmp_path``."""
    text = (ROOT / "docs" / "nginx" / "revconn.conf").read_text()
    placeholders = {
        "/etc/letsencrypt/live/tunnel.example.com/fullchain.pem": certs.certfile,
        "/etc/letsencrypt/live/tunnel.example.com/privkey.pem": certs.keyfile,
        "\n    listen 443 ": f"\n    listen 127.0.0.1:{https_port} ",
        "\n    listen 80;": f"\n    listen 127.0.0.1:{http_port};",
        "server 127.0.0.1:8080;": f"server {gateway};",
        "tunnel.example.com": DOMAIN,
    }
    for token, value in placeholders.items():
        assert token in text, f"docs/nginx/revconn.conf lost {token!r}"
        text = text.replace(token, value)
    (tmp_path / "revconn.conf").write_text(text)
    temp = "\n".join(
        f"    {kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        "worker_processes 1;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {tmp_path / 'access.log'};\n"
        f"{temp}\n"
        f"    include {tmp_path / 'revconn.conf'};\n"
        "}\n"
    )
    return conf


def nginx_args(tmp_path: Path, conf: Path) -> list[str]:
    # (as root, nginx would switch its workers to nobody, who cannot read
    # pytest's private tmp_path: stay root, this is a throwaway instance)
    user = "user root;" if os.geteuid() == 0 else ""
    directives = f"daemon off; pid {tmp_path / 'nginx.pid'}; error_log stderr; {user}"
    return [NGINX, "-e", "stderr", "-p", str(tmp_path), "-c", str(conf), "-g", directives]


def curl(url: str, ca: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "15", "--cacert", ca, *extra, url],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.skipif(
    not Path(NGINX).exists(), reason="nginx not installed: apt-get install nginx-light"
)
def test_the_documented_nginx_conf(procs: list[Proc], tmp_path: Path) -> None:
    upstream = start_upstream(procs)
    _, url, _ = start_gateway(procs, "--domain", DOMAIN, "--trusted-proxy", "127.0.0.1/32")
    # (no wildcard: OpenSSL matches no *.localhost, a wildcard a label from the top)
    names = (DOMAIN, f"api.{DOMAIN}", f"web.{DOMAIN}")
    certs = issue(tmp_path, *names)
    https_port, http_port = free_port(), free_port()
    conf = render(tmp_path, certs, https_port, http_port, url.removeprefix("http://"))
    checked = subprocess.run(
        [*nginx_args(tmp_path, conf), "-t"], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    nginx = Proc(nginx_args(tmp_path, conf))
    procs.append(nginx)
    nginx.wait_listening(https_port, "nginx")
    nginx.wait_listening(http_port, "nginx")

    # The agents dial the gateway through nginx (wss, nginx's certificate);
    # the gateway tells them the public URLs nginx's clients use.
    public = f"https://{DOMAIN}:{https_port}"
    api = start_agent(procs, public, "api", "--upstream", upstream, "--ca-file", certs.ca_file)
    web = start_agent(
        procs, public, "web", "--app", "tests.browser_app:app", "--ca-file", certs.ca_file
    )
    api.wait_for(
        rf"online: https://api\.{DOMAIN}:{https_port}/ and https://{DOMAIN}:{https_port}/a/api/",
        timeout=15,
    )
    web.wait_for("online: https://web", timeout=15)

    host = f"api.{DOMAIN}:{https_port}"
    # By host (HTTP/2 from curl to nginx): the upstream sees its own path,
    # https, the public host, and the client's address, not what the client
    # claims about forwarding.
    spoofed = [
        "X-Forwarded-For: 203.0.113.7",
        "X-Forwarded-Proto: http",
        "X-Forwarded-Host: evil.example",
        "Forwarded: for=203.0.113.7;proto=http",
        "X-Real-IP: 203.0.113.7",
    ]
    args = [arg for header in spoofed for arg in ("-H", header)]
    done = curl(
        f"https://{host}/echo/through?nginx=1", certs.ca_file, *args, "-w", "\n%{http_version}"
    )
    assert done.returncode == 0, done.stderr + nginx.stderr
    body, version = done.stdout.rsplit("\n", 1)
    assert version == "2"
    echo = json.loads(body)
    assert (echo["raw_path"], echo["query"]) == ("/echo/through", "nginx=1")
    headers = {n.lower(): v for n, v in echo["headers"]}
    assert headers["x-forwarded-for"] == "127.0.0.1, 127.0.0.1"  # the client, then nginx
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == host
    for claim in ("forwarded", "x-real-ip", "x-forwarded-prefix"):
        assert claim not in headers
    assert "203.0.113.7" not in body

    # A large response and a large upload (no limit in nginx, no spooling).
    n = 8 * 1024 * 1024
    got = tmp_path / "got.bin"
    done = curl(f"https://{host}/bytes?n={n}&seed=7", certs.ca_file, "-o", str(got))
    assert done.returncode == 0, done.stderr
    assert got.read_bytes() == pattern(n, 7)
    sent = tmp_path / "sent.bin"
    sent.write_bytes(pattern(3 * 1024 * 1024, 8))
    done = curl(f"https://{host}/upload", certs.ca_file, "--data-binary", f"@{sent}")
    assert done.returncode == 0, done.stderr
    expected = {
        "length": sent.stat().st_size,
        "sha256": hashlib.sha256(sent.read_bytes()).hexdigest(),
    }
    assert json.loads(done.stdout) == expected

    # A streamed response (the path form, HTTP/1.1) arrives event by event:
    # the first event long before the last (buffered, all come at the end).
    context = certs.client_context()
    with httpx.Client(verify=context, timeout=15) as client:
        start = time.monotonic()
        with client.stream(
            "GET",
            f"https://127.0.0.1:{https_port}/a/api/stream?n=5&interval=0.4",
            headers={"Host": f"{DOMAIN}:{https_port}"},
            extensions={"sni_hostname": DOMAIN},
        ) as r:
            assert r.status_code == 200
            chunks = r.iter_text()
            assert next(chunks).startswith("data: 0")
            first = time.monotonic() - start
            rest = "".join(chunks)
        total = time.monotonic() - start
    assert "data: 4" in rest
    assert total - first > 1.0, (first, total)

    # An upload streams too: the upstream refuses it (401) from its head
    # while the client has sent a fraction of it (buffered, nginx would wait
    # for the whole body first).
    async def early_answer() -> bytes:
        tcp = await trio.open_tcp_stream("127.0.0.1", https_port)
        stream = trio.SSLStream(tcp, context, server_hostname=f"api.{DOMAIN}")
        async with stream:
            head = f"PUT /private HTTP/1.1\r\nHost: {host}\r\nContent-Length: 50000000\r\n\r\n"
            await stream.send_all(head.encode() + bytes(256 * 1024))
            answer = b""
            while b"\r\n" not in answer:
                data = await stream.receive_some()
                if not data:
                    break
                answer += data
            return answer

    async def bounded_answer() -> bytes:
        with trio.fail_after(10):
            return await early_answer()

    assert trio.run(bounded_answer).startswith(b"HTTP/1.1 401 ")

    # A public WebSocket through nginx (wss), the gateway and the tunnel.
    async def talk() -> str:
        tcp = await trio.open_tcp_stream("127.0.0.1", https_port)
        stream = trio.SSLStream(tcp, context, server_hostname=f"web.{DOMAIN}")
        async with stream, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, f"web.{DOMAIN}:{https_port}", "/ws")
            await ws.send_message("over wss")
            answer = str(await ws.get_message())
            await ws.aclose()
            return answer

    async def bounded() -> str:
        with trio.fail_after(15):
            return await talk()

    assert trio.run(bounded) == "pong: over wss"

    # Plain HTTP is redirected to HTTPS, the same host and target.
    done = curl(
        f"http://api.{DOMAIN}:{http_port}/echo/x?y=1",
        certs.ca_file,
        "-o",
        os.devnull,
        "-w",
        "%{http_code} %{redirect_url}",
    )
    assert done.stdout == f"301 https://api.{DOMAIN}/echo/x?y=1", done.stderr
