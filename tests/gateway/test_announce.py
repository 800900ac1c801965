"""``PUT``/``DELETE /announce`` and forwarding to announced URLs, in-process:
the gateway's answers (credentials, names, SSRF, 409s), and requests to
``/a/NAME/`` reaching the announced service with the semantics of a
tunnelled request over kept-alive TCP (and TLS) connections."""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import httpx
import pytest
import trio

from revconn._gateway.addresses import AddressPolicy, parse_networks

from .._gateway_helpers import SECRET, RunningGateway, raw_agent, running_gateway, wait_for
from .._raw_upstream import CHUNK, read_body, read_head, respond, serving
from .test_exchange import connect, get

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {SECRET}"}
LOOPBACK = ("127.0.0.0/8",)


class Echo:
    """An upstream that answers every request with what it saw, as JSON,
    keeping connections alive; counts the connections it accepted."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.connections = 0
        self.ids = itertools.count(1)
        self.tls = tls

    async def __call__(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if self.tls is not None:
            stream = trio.SSLStream(tcp, self.tls, server_side=True)
        self.connections += 1
        conn_id = next(self.ids)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request: h11.Request | None = None
                digest = hashlib.sha256()
                length = 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(CHUNK)
                        conn.receive_data(data)
                        if not data and conn.their_state is h11.IDLE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        digest.update(event.data)
                        length += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                target = request.target.decode()
                if target.endswith("/big"):
                    n = 8 * 1024 * 1024
                    head = h11.Response(status_code=200, headers=[("content-length", str(n))])
                    await stream.send_all(conn.send(head) or b"")
                    piece = b"z" * CHUNK
                    for _ in range(n // CHUNK):
                        await stream.send_all(conn.send(h11.Data(data=piece)) or b"")
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                else:
                    seen = {
                        "method": request.method.decode(),
                        "target": target,
                        "headers": [[n.decode(), v.decode()] for n, v in request.headers],
                        "connection": conn_id,
                        "length": length,
                        "sha256": digest.hexdigest(),
                    }
                    body = json.dumps(seen).encode()
                    headers = [("content-length", str(len(body))), ("connection", "keep-alive")]
                    headers.append(("keep-alive", "timeout=5"))  # hop-by-hop: dropped
                    data = conn.send(h11.Response(status_code=200, headers=headers)) or b""
                    data += conn.send(h11.Data(data=body)) or b""
                    await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.ProtocolError):
            return


@asynccontextmanager
async def announced(
    echo: Echo | None = None, *, prefix: str = "/base", **gateway: Any
) -> AsyncIterator[tuple[RunningGateway, httpx.AsyncClient, int]]:
    """A gateway (loopback allowed unless told otherwise) with agent "svc"
    announced at the echo upstream; yields the gateway, a client of its data
    plane and the upstream's port."""
    gateway.setdefault("announce_allow", LOOPBACK)
    echo = echo or Echo()
    async with (
        serving(echo) as port,
        running_gateway(**gateway) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
    ):
        scheme = "https" if echo.tls is not None else "http"
        r = await client.put(
            "/announce?name=svc", json={"url": f"{scheme}://127.0.0.1:{port}{prefix}", "ttl": 30}
        )
        assert r.status_code == 200, r.text
        yield gw, client, port


async def listing(gw: RunningGateway) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as admin:
        r = await admin.get(f"{gw.admin_url}/endpoints", headers=AUTH)
    rows: list[dict[str, Any]] = r.json()["endpoints"]
    return rows


async def test_announce_renew_list_withdraw() -> None:
    async with (
        serving(Echo()) as port,
        running_gateway(announce_allow=LOOPBACK) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
        raw_agent(gw, "tunnelled"),
    ):
        await wait_for(lambda: gw.gateway.registry.lookup("tunnelled") is not None)
        url = f"http://127.0.0.1:{port}/base/"
        r = await client.put("/announce?name=svc", json={"url": url, "ttl": 30})
        assert r.status_code == 200
        first = r.json()
        assert first["name"] == "svc"
        assert first["transport"] == "url"
        assert first["url"] == url
        assert first["ttl"] == 30
        assert first["expires_at"].endswith("Z")
        epoch = first["epoch"]
        rows = await listing(gw)
        assert [(row["name"], row["transport"]) for row in rows] == [
            ("svc", "url"),
            ("tunnelled", "websocket"),
        ]
        assert rows[0]["url"] == url
        assert rows[0]["status"] == "online"
        assert rows[0]["expires_at"] == first["expires_at"]
        assert rows[0]["remote"] == "127.0.0.1"
        r = await client.put("/announce?name=svc", json={"url": url, "ttl": 30, "epoch": epoch})
        assert (r.status_code, r.json()["epoch"]) == (200, epoch)
        r = await client.delete(f"/announce?name=svc&epoch={epoch + 100}")
        assert r.json() == {"name": "svc", "withdrawn": False}
        r = await client.delete(f"/announce?name=svc&epoch={epoch}")
        assert (r.status_code, r.json()) == (200, {"name": "svc", "withdrawn": True})
        assert [row["name"] for row in await listing(gw)] == ["tunnelled"]
        r = await client.get("/a/svc/x")
        assert (r.status_code, r.json()["error"]) == (503, "agent_offline")


async def test_bad_announcements_get_clear_errors() -> None:
    async with (
        running_gateway(announce_allow=LOOPBACK) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
    ):
        good = {"url": "http://127.0.0.1:9/", "ttl": 30}
        r = await client.put("/announce?name=svc", json=good, headers={"Authorization": "x"})
        assert (r.status_code, r.json()["error"]) == (401, "unauthorized")
        for target in ("/announce", "/announce?name=Bad_Name", "/announce?name=a&name=b"):
            r = await client.put(target, json=good)
            assert (r.status_code, r.json()["error"]) == (400, "invalid_name"), target
        r = await client.get("/announce?name=svc")
        assert (r.status_code, r.headers["allow"]) == (405, "PUT, DELETE")
        cases = [
            (b"not json", "JSON"),
            (b"[1]", "object"),
            (json.dumps({"ttl": 30}).encode(), '"url"'),
            (json.dumps({"url": "ftp://x/"}).encode(), "http"),
            (json.dumps({"url": "http://u:p@127.0.0.1/"}).encode(), "credentials"),
            (json.dumps({"url": "http://127.0.0.1/?q=1"}).encode(), "query"),
            (json.dumps({"url": "http://127.0.0.1/", "ttl": 0}).encode(), '"ttl"'),
            (json.dumps({"url": "http://127.0.0.1/", "ttl": 1e9}).encode(), '"ttl"'),
            (json.dumps({"url": "http://127.0.0.1/", "epoch": "x"}).encode(), '"epoch"'),
            (json.dumps({"url": "http://127.0.0.1/", "color": 1}).encode(), "color"),
        ]
        for body, word in cases:
            r = await client.put("/announce?name=svc", content=body)
            assert r.status_code == 400, body
            assert r.json()["error"] == "invalid_announcement"
            assert word in r.json()["detail"], (body, r.json())
        r = await client.put("/announce?name=svc", content=b"x" * 9000)
        assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")
        for epoch in ("abc", "%C2%B2", "-1"):  # (a Unicode digit too: never a traceback)
            r = await client.delete(f"/announce?name=svc&epoch={epoch}")
            assert (r.status_code, r.json()["error"]) == (400, "invalid_announcement"), epoch
        # A refused announcement leaves the connection usable (keep-alive): two
        # requests on one raw connection.
        port = int(gw.url.rsplit(":", 1)[1])
        body = json.dumps(good).encode()
        put = (
            f"PUT /announce?name=svc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\n"
            f"Content-Length: {{}}\r\n\r\n"
        )
        async with connect(port) as raw:
            await raw.send_raw(put.format(3).encode() + b"bad")
            head, answer = await raw.response("PUT")
            assert head.status_code == 400
            await raw.send_raw(put.format(len(body)).encode() + body)
            head, answer = await raw.response("PUT")
            assert head.status_code == 200, answer
        assert [row["name"] for row in await listing(gw)] == ["svc"]


@pytest.mark.parametrize(
    ("url", "word"),
    [
        ("http://127.0.0.1:8000/", "loopback"),
        ("http://localhost:8000/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.0.0.5/", "private"),
        ("http://[fd00::1]/", "unique-local"),
        ("http://0.0.0.0:8000/", "unspecified"),
    ],
)
async def test_ssrf_refusals_without_announce_allow(url: str, word: str) -> None:
    async with (
        running_gateway() as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
    ):
        r = await client.put("/announce?name=svc", json={"url": url})
        assert r.status_code == 400
        error = r.json()
        assert error["error"] == "url_forbidden"
        assert word in error["detail"]
        assert "--announce-allow" in error["detail"]
        assert await listing(gw) == []


async def test_unresolvable_host_is_refused() -> None:
    async with (
        running_gateway() as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
    ):
        r = await client.put("/announce?name=svc", json={"url": "http://no-such-host.invalid/"})
        assert (r.status_code, r.json()["error"]) == (400, "url_unresolvable")


async def test_name_held_by_a_websocket_is_refused_with_409() -> None:
    async with (
        running_gateway(announce_allow=LOOPBACK) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
        raw_agent(gw, "svc"),
    ):
        await wait_for(lambda: gw.gateway.registry.lookup("svc") is not None)
        holder = gw.gateway.registry.lookup("svc")
        r = await client.put("/announce?name=svc", json={"url": "http://127.0.0.1:9/"})
        assert r.status_code == 409
        assert r.json()["error"] == "name_in_use"
        assert r.json()["holder"] == {"transport": "websocket"}
        r = await client.delete("/announce?name=svc")
        assert (r.status_code, r.json()["error"]) == (409, "name_in_use")
        assert gw.gateway.registry.lookup("svc") is holder  # untouched


async def test_websocket_replaces_announcement_and_renewal_learns_it() -> None:
    async with announced() as (gw, client, port):
        (row,) = await listing(gw)
        epoch = row["epoch"]
        async with raw_agent(gw, "svc"):
            await wait_for(lambda: gw.gateway.registry.lookup("svc") is not None)
            (row,) = await listing(gw)
            assert row["transport"] == "websocket"
            body = {"url": f"http://127.0.0.1:{port}/base", "ttl": 30, "epoch": epoch}
            r = await client.put("/announce?name=svc", json=body)
            assert r.status_code == 409
            assert r.json()["error"] == "replaced"
            assert r.json()["holder"] == {"transport": "websocket"}


async def test_forwarded_like_a_tunnelled_request() -> None:
    async with announced() as (gw, _, port):
        gport = int(gw.url.rsplit(":", 1)[1])
        async with connect(gport) as client:
            await client.send_raw(
                get(
                    "/a/svc/x%2Fy/../z?q=a%20b&q=2",
                    "Connection: keep-alive, x-hop",
                    "X-Hop: secret",
                    "TE: trailers",
                    "X-Forwarded-For: 6.6.6.6",
                    "Cookie: a=b",
                )
            )
            head, body = await client.response()
        assert head.status_code == 200
        seen = json.loads(body)
        assert seen["method"] == "GET"
        assert seen["target"] == "/base/x%2Fy/../z?q=a%20b&q=2"  # byte-exact, prefixed
        headers = dict((n.lower(), v) for n, v in seen["headers"])
        assert headers["host"] == f"127.0.0.1:{port}"
        assert headers["x-forwarded-for"] == "127.0.0.1"  # an untrusted client's chain is replaced
        assert headers["x-forwarded-proto"] == "http"
        assert headers["x-forwarded-host"] == "example.test"
        assert headers["x-forwarded-prefix"] == "/a/svc"
        assert "via" in headers
        assert headers["cookie"] == "a=b"
        for hop in ("x-hop", "te", "keep-alive", "connection"):
            assert hop not in headers
        # The upstream's hop-by-hop headers do not reach the client either.
        assert b"keep-alive" not in dict(head.headers)


async def test_connections_are_kept_alive_and_reused() -> None:
    echo = Echo()
    async with announced(echo) as (_gw, client, _):
        ids = set()
        for i in range(5):
            r = await client.get(f"/a/svc/n{i}")
            assert r.status_code == 200
            ids.add(r.json()["connection"])
        assert ids == {1}
        assert echo.connections == 1


async def test_streaming_upload_and_download() -> None:
    data = bytes(range(256)) * (24 * 1024)  # 6 MiB
    async with announced() as (_gw, client, _):
        r = await client.post("/a/svc/up", content=data)
        assert r.status_code == 200
        assert r.json()["length"] == len(data)
        assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()
        async with client.stream("GET", "/a/svc/big") as response:
            total = 0
            async for piece in response.aiter_bytes():
                total += len(piece)
        assert total == 8 * 1024 * 1024


async def test_unreachable_and_silent_services() -> None:
    async with serving(Echo()) as port:
        pass  # now nothing listens on the port
    async with (
        running_gateway(announce_allow=LOOPBACK, announce_timeout=0.5) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
    ):
        r = await client.put("/announce?name=gone", json={"url": f"http://127.0.0.1:{port}/"})
        assert r.status_code == 200
        r = await client.get("/a/gone/")
        assert r.status_code == 502
        assert r.json()["error"] == "upstream_unreachable"
        assert r.json()["agent"] == "gone"
        assert str(port) not in r.text  # no internal address in a public answer

        async def silent(stream: trio.SocketStream) -> None:
            await stream.receive_some(CHUNK)
            await trio.sleep_forever()

        async with serving(silent) as quiet:
            url = f"http://127.0.0.1:{quiet}/"
            r = await client.put("/announce?name=quiet", json={"url": url})
            assert r.status_code == 200
            r = await client.get("/a/quiet/")
            assert r.status_code == 504
            assert r.json()["error"] == "upstream_timeout"


async def test_address_is_checked_again_when_connecting() -> None:
    """DNS can change after the announcement: each new connection resolves
    again and is refused if the name now points somewhere internal."""
    answers: dict[str, list[tuple[int, tuple[Any, ...]]]] = {}

    async def resolver(host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
        return answers[host]

    async with (
        serving(Echo()) as port,
        running_gateway(address_policy=AddressPolicy((), resolver=resolver)) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
    ):
        answers["svc.example"] = [(socket.AF_INET, ("93.184.216.34", port))]
        r = await client.put("/announce?name=svc", json={"url": f"http://svc.example:{port}/"})
        assert r.status_code == 200
        answers["svc.example"] = [(socket.AF_INET, ("10.0.0.5", port))]
        r = await client.get("/a/svc/")
        # The same answer as a tunnel agent that cannot reach its upstream: the
        # reason (and the address) is in the gateway's log only.
        assert r.status_code == 502
        assert r.json() == {
            "error": "upstream_unreachable",
            "agent": "svc",
            "detail": "the agent could not reach its upstream service",
        }


async def test_connects_to_the_addresses_it_checked(caplog: pytest.LogCaptureFixture) -> None:
    """A name only the policy's resolver knows: the connection goes to what
    it returned (never a second lookup); a DNS failure later is unreachable."""
    answers: dict[str, list[tuple[int, tuple[Any, ...]]]] = {}

    async def resolver(host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]

    policy = AddressPolicy(parse_networks(LOOPBACK), resolver=resolver)
    async with (
        serving(Echo()) as port,
        running_gateway(address_policy=policy) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
    ):
        answers["svc.internal"] = [(socket.AF_INET, ("127.0.0.1", port))]
        r = await client.put("/announce?name=svc", json={"url": f"http://svc.internal:{port}/"})
        assert r.status_code == 200
        r = await client.get("/a/svc/hello", headers={"Connection": "close"})
        assert r.status_code == 200
        assert dict(r.json()["headers"])["host"] == f"svc.internal:{port}"
        del answers["svc.internal"]
        session = gw.gateway.registry.lookup("svc")
        session.prune(trio.current_time() + 3600)  # type: ignore[union-attr]  (no kept-alive one)
        r = await client.get("/a/svc/again")
        assert (r.status_code, r.json()["error"]) == (502, "upstream_unreachable")
        assert any("does not resolve" in rec.getMessage() for rec in caplog.records)


class Permissive(AddressPolicy):
    """Judges every address public (as a public IP of the gateway's host would be)."""

    def _judge(self, ip: Any) -> str | None:
        return None


async def test_the_gateways_own_host_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """A public address of the gateway's host passes the policy but reaches
    everything listening there: a connection whose two ends share an address
    is refused unless --announce-allow names it."""
    async with (
        serving(Echo()) as port,
        running_gateway(address_policy=Permissive()) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
    ):
        r = await client.put("/announce?name=svc", json={"url": f"http://127.0.0.1:{port}/"})
        assert r.status_code == 200
        r = await client.get("/a/svc/")
        assert (r.status_code, r.json()["error"]) == (502, "upstream_unreachable")
        assert any("own host" in rec.getMessage() for rec in caplog.records)


async def test_connection_accounting_survives_a_failed_retry() -> None:
    """The service answers once, then (restarting) closes the kept-alive
    connection as the next request arrives and accepts no new one: the
    gateway's retry on a fresh connection fails, the client gets 502, and the
    session's count of lent connections (which bounds requests in flight)
    returns to 0."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]

    async def service() -> None:
        stream = await listener.accept()
        conn, _ = await read_head(stream)
        await read_body(conn, stream)
        await respond(conn, stream, 200, b"one")
        await stream.receive_some(CHUNK)  # the next request: go away instead
        await listener.aclose()
        await stream.aclose()

    async with (
        running_gateway(announce_allow=LOOPBACK) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(service)
        url = f"http://127.0.0.1:{port}/"
        assert (await client.put("/announce?name=svc", json={"url": url})).status_code == 200
        assert (await client.get("/a/svc/one")).text == "one"
        session = gw.gateway.registry.lookup("svc")
        assert session is not None
        r = await client.get("/a/svc/two")
        assert (r.status_code, r.json()["error"]) == (502, "upstream_unreachable")
        assert session.lent_connections == 0  # type: ignore[attr-defined]
        assert session.idle_connections == 0  # type: ignore[attr-defined]


async def test_requests_beyond_the_connection_limit_are_busy() -> None:
    async def slow(stream: trio.SocketStream) -> None:
        await stream.receive_some(CHUNK)
        await trio.sleep(2)

    async with (
        serving(slow) as port,
        running_gateway(announce_allow=LOOPBACK) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH, timeout=10) as client,
    ):
        r = await client.put("/announce?name=svc", json={"url": f"http://127.0.0.1:{port}/"})
        assert r.status_code == 200
        session = gw.gateway.registry.lookup("svc")
        session._max_connections = 2  # type: ignore[union-attr]
        statuses: list[int] = []

        async def one() -> None:
            async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
                statuses.append((await c.get("/a/svc/")).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
            await wait_for(lambda: 503 in statuses)
            assert session.lent_connections == 2  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()
        # The two clients left: their connections are given back (and closed).
        await wait_for(lambda: session.lent_connections == 0)  # type: ignore[union-attr]


async def test_idle_connections_closed_by_the_service_are_pruned() -> None:
    """A kept-alive connection the service closes while idle is dropped by the
    periodic prune (no request needed), and never lent again."""
    closed = trio.Event()

    async def answer_then_close(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await read_body(conn, stream)
        await respond(conn, stream, 200, b"ok")  # keep-alive (HTTP/1.1 default)
        await trio.sleep(0.05)
        await stream.aclose()
        closed.set()

    async with (
        serving(answer_then_close) as port,
        running_gateway(announce_allow=LOOPBACK) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client,
    ):
        r = await client.put("/announce?name=svc", json={"url": f"http://127.0.0.1:{port}/"})
        assert r.status_code == 200
        assert (await client.get("/a/svc/")).status_code == 200
        session = gw.gateway.registry.lookup("svc")
        assert session is not None
        assert session.idle_connections == 1  # type: ignore[attr-defined]
        await closed.wait()
        await wait_for(lambda: session._idle[0].looks_alive() is False)  # type: ignore[attr-defined]
        session.prune(trio.current_time())  # type: ignore[attr-defined]
        assert session.idle_connections == 0  # type: ignore[attr-defined]
        assert (await client.get("/a/svc/")).status_code == 200  # a fresh connection


async def test_https_announced_url(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, client_context = tls
    echo = Echo(tls=server)
    async with announced(echo, url_ssl_context=client_context) as (_gw, client, _port):
        for i in range(3):
            r = await client.get(f"/a/svc/tls{i}")
            assert r.status_code == 200
            assert r.json()["target"] == f"/base/tls{i}"
        assert echo.connections == 1
        r = await client.post("/a/svc/up", content=b"q" * 300_000)
        assert r.json()["length"] == 300_000


async def test_https_with_an_untrusted_certificate_is_unreachable(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server, _ = tls
    async with announced(Echo(tls=server)) as (_gw, client, _port):  # system CAs only
        r = await client.get("/a/svc/")
        assert r.status_code == 502
        assert r.json()["error"] == "upstream_unreachable"


async def test_withdrawn_session_closes_idle_connections() -> None:
    async with announced() as (gw, client, _):
        assert (await client.get("/a/svc/")).status_code == 200
        session = gw.gateway.registry.lookup("svc")
        assert session is not None
        assert session.idle_connections == 1  # type: ignore[attr-defined]
        r = await client.delete("/announce?name=svc")
        assert r.json()["withdrawn"] is True
        assert session.idle_connections == 0  # type: ignore[attr-defined]
        assert not session.accepting
