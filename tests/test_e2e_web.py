"""End to end with the real executables: host routing (``--domain``), the
agent's printed public URLs, ``--trusted-proxy``, and a WebSocket through the
tunnel to a real upstream."""

from __future__ import annotations

import httpx
import pytest
import trio
from trio_websocket import wrap_client_stream

from ._procs import Proc, executable, free_port
from .test_e2e import start_agent, start_gateway

pytestmark = pytest.mark.e2e


def start_upstream(procs: list[Proc]) -> str:
    port = free_port()
    args = [*executable("revconn-agent"), "serve", "--no-tunnel"]
    upstream = Proc([*args, "--app", "tests.upstream_app:app", "--listen", f"127.0.0.1:{port}"])
    procs.append(upstream)
    upstream.wait_for("serving")
    return f"http://127.0.0.1:{port}"


def test_host_routing_and_the_printed_public_urls(procs: list[Proc]) -> None:
    upstream = start_upstream(procs)
    _, url, _ = start_gateway(procs, "--domain", "revconn.test", "--trusted-proxy", "10.0.0.0/8")
    port = url.rsplit(":", 1)[1]
    agent = start_agent(procs, url, "web", "--upstream", upstream)
    agent.wait_for(
        rf"online: http://web\.revconn\.test:{port}/ and "
        rf"http://127\.0\.0\.1:{port}/a/web/"
    )
    # By host: the path is the upstream's own, no prefix.
    r = httpx.get(f"{url}/echo/x?y=1", headers={"Host": f"WEB.revconn.test:{port}"})
    assert r.status_code == 200
    echo = r.json()
    assert (echo["raw_path"], echo["query"]) == ("/echo/x", "y=1")
    headers = {n.lower(): v for n, v in echo["headers"]}
    assert "x-forwarded-prefix" not in headers
    assert headers["x-forwarded-host"] == f"WEB.revconn.test:{port}"
    # 127.0.0.1 is not a trusted proxy here: its X-Forwarded-Proto is replaced.
    r = httpx.get(f"{url}/a/web/echo/z", headers={"X-Forwarded-Proto": "https"})
    assert {n.lower(): v for n, v in r.json()["headers"]}["x-forwarded-proto"] == "http"
    # Refused host forms.
    for host in ("a.web.revconn.test", "we_b.revconn.test", "web.revconn.test:99999"):
        r = httpx.get(f"{url}/", headers={"Host": host})
        assert (r.status_code, r.json()["error"]) == (400, "bad_request"), host
    r = httpx.get(f"{url}/", headers={"Host": "nobody.revconn.test"})
    assert (r.status_code, r.json()["error"]) == (503, "agent_offline")
    r = httpx.get(f"{url}/healthz", headers={"Host": "revconn.test"})
    assert r.json() == {"status": "ok"}


def test_a_websocket_through_the_real_executables(procs: list[Proc]) -> None:
    """An --app agent whose app has a WebSocket route (hypercorn's protocol
    layer), by host name and by path."""
    _, url, _ = start_gateway(procs, "--domain", "revconn.test")
    agent = start_agent(procs, url, "ws", "--app", "tests.browser_app:app")
    agent.wait_for("online")

    port = int(url.rsplit(":", 1)[1])

    async def talk(host: str, resource: str) -> list[str]:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        async with tcp, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, tcp, host, resource)
            got = []
            for text in ("one", "two"):
                await ws.send_message(text)
                got.append(str(await ws.get_message()))
            await ws.aclose()
            return got

    async def both() -> list[list[str]]:
        with trio.fail_after(10):
            by_host = await talk(f"ws.revconn.test:{port}", "/ws")
            by_path = await talk(f"127.0.0.1:{port}", "/a/ws/ws")
        return [by_host, by_path]

    assert trio.run(both) == [["pong: one", "pong: two"]] * 2
