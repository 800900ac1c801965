"""What the public sees of the gateway, and what upstreams and agents are
told about it: X-Forwarded-* from untrusted clients and from
``--trusted-proxy`` peers, and the public URLs in the agent's 101."""

from __future__ import annotations

import httpx
import pytest

from .._gateway_helpers import raw_agent, running_gateway, wait_for
from .test_announce import announced

pytestmark = pytest.mark.e2e

SPOOFED = {
    "X-Forwarded-For": "203.0.113.1",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "laptop.example.com",
}


def forwarded(seen: dict[str, object]) -> dict[str, str]:
    headers = seen["headers"]
    assert isinstance(headers, list)
    return {n.lower(): v for n, v in headers if n.lower().startswith("x-forwarded-")}


async def test_an_untrusted_client_cannot_spoof_forwarded_headers() -> None:
    async with announced() as (_, client, _port):
        r = await client.get("/a/svc/x", headers=SPOOFED)
        assert forwarded(r.json()) == {
            "x-forwarded-for": "127.0.0.1",
            "x-forwarded-proto": "http",
            "x-forwarded-host": client.base_url.netloc.decode(),
            "x-forwarded-prefix": "/a/svc",
        }


async def test_a_trusted_proxy_is_believed() -> None:
    async with announced(trusted_proxies=("127.0.0.0/8",)) as (_, client, _port):
        r = await client.get("/a/svc/x", headers=SPOOFED)
        assert forwarded(r.json()) == {
            "x-forwarded-for": "203.0.113.1, 127.0.0.1",
            "x-forwarded-proto": "https",
            "x-forwarded-host": "laptop.example.com",
            "x-forwarded-prefix": "/a/svc",
        }


async def test_a_proxy_outside_the_trusted_networks_is_not() -> None:
    async with announced(trusted_proxies=("10.0.0.0/8", "::1/128")) as (_, client, _port):
        r = await client.get("/a/svc/x", headers=SPOOFED)
        assert forwarded(r.json())["x-forwarded-proto"] == "http"


def urls_of(ws: object) -> list[str]:
    headers = ws.handshake_headers  # type: ignore[attr-defined]
    return [v.decode() for n, v in headers if n == b"revconn-public-url"]


async def test_the_agent_is_told_its_public_urls() -> None:
    async with running_gateway(domains=("t.test", "tunnel.example.com")) as gw:
        port = gw.url.rsplit(":", 1)[1]
        async with raw_agent(gw, "laptop") as (ws, _):
            assert urls_of(ws) == [
                f"http://laptop.t.test:{port}/",
                f"http://laptop.tunnel.example.com:{port}/",
                f"http://127.0.0.1:{port}/a/laptop/",
            ]
        # Behind a trusted TLS proxy: what the public uses.
    async with running_gateway(domains=("t.test",), trusted_proxies=("127.0.0.1",)) as gw:
        headers = [(b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"t.test")]
        async with raw_agent(gw, "laptop", extra_headers=headers) as (ws, _):
            assert urls_of(ws) == ["https://laptop.t.test/", "https://t.test/a/laptop/"]


async def test_without_domains_only_the_path_form() -> None:
    async with running_gateway() as gw, raw_agent(gw, "laptop") as (ws, _):
        await wait_for(lambda: gw.gateway.registry.lookup("laptop") is not None)
        assert urls_of(ws) == [f"{gw.url}/a/laptop/"]
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{gw.url}/healthz", headers={"Host": "laptop.t.test"})
            assert r.status_code == 200  # no --domain: hosts do not route


async def test_tls_ask_allows_the_domain_and_online_agents_only() -> None:
    async with (
        running_gateway(domains=("example.com", "t.example.com")) as gw,
        raw_agent(gw, "laptop"),
        httpx.AsyncClient(base_url=gw.admin_url) as admin,
    ):
        await wait_for(lambda: gw.gateway.registry.lookup("laptop") is not None)

        async def allowed(domain: str) -> bool:
            r = await admin.get("/tls-ask", params={"domain": domain})
            assert r.status_code in (200, 404)
            return r.status_code == 200

        assert await allowed("example.com")
        assert await allowed("t.example.com")
        assert await allowed("laptop.example.com")
        assert await allowed("LAPTOP.t.example.com.")
        assert not await allowed("nobody.example.com")  # not online
        assert not await allowed("a.laptop.example.com")
        assert not await allowed("laptop.example.org")
        assert not await allowed("\u212aaptop.example.com")  # (Kelvin sign: not ASCII)
        assert not await allowed("")
