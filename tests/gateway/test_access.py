"""Access control on the public side, per agent: an IP allow-list (403) and
basic auth (401 + WWW-Authenticate), checked by the gateway before anything
reaches the agent — plain requests and WebSocket handshakes alike — with the
gateway's Authorization header never forwarded."""

from __future__ import annotations

import base64

import pytest

from revconn._errors import ConfigError
from revconn._gateway.access import AccessPolicy, parse_access

from .test_announce import Echo, announced

pytestmark = pytest.mark.e2e


def basic(pair: str) -> bytes:
    return b"Basic " + base64.b64encode(pair.encode())


def test_policy_decisions() -> None:
    policy = AccessPolicy(
        parse_access(["web=alice:s3cret", "web=bob:hunter2"], ["web=10.0.0.0/8", "lan=::1"])
    )
    assert policy.check("open", "1.2.3.4", []) is None
    ok = [(b"authorization", basic("alice:s3cret"))]
    assert policy.check("web", "10.1.2.3", ok) is None
    assert policy.check("web", "10.1.2.3", [(b"authorization", basic("bob:hunter2"))]) is None
    refused = policy.check("web", "192.168.1.1", ok)
    assert refused is not None and refused.status == 403
    for headers in (
        [],
        [(b"authorization", basic("alice:wrong"))],
        [(b"authorization", basic("alice:s3cret")), (b"authorization", basic("x:y"))],
        [(b"authorization", b"Bearer " + base64.b64encode(b"alice:s3cret"))],
        [(b"authorization", b"Basic not-base64!!")],
    ):
        refused = policy.check("web", "10.0.0.1", headers)
        assert refused is not None and refused.status == 401, headers
        assert (b"www-authenticate", b'Basic realm="web", charset="UTF-8"') in refused.headers
    assert policy.check("lan", "::1", []) is None
    assert policy.check("lan", "::ffff:127.0.0.1", []) is not None
    assert policy.guards_credentials("web") and not policy.guards_credentials("lan")


@pytest.mark.parametrize(
    ("auth", "allow"),
    [(["web"], []), (["web=alice"], []), (["Bad=a:b"], []), ([], ["web"]), ([], ["web=nonsense"])],
)
def test_bad_rules_are_config_errors(auth: list[str], allow: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_access(auth, allow)


async def test_basic_auth_in_front_of_an_agent() -> None:
    async with announced(Echo(), agent_basic_auth=("svc=alice:s3cret",)) as (_, client, _port):
        r = await client.get("/a/svc/x", headers={"Authorization": ""})
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith('Basic realm="svc"')
        assert r.json()["error"] == "unauthorized"
        r = await client.get("/a/svc/x", auth=("alice", "wrong"))
        assert r.status_code == 401
        r = await client.get("/a/svc/x", auth=("alice", "s3cret"))
        assert r.status_code == 200
        headers = {n.lower() for n, _ in r.json()["headers"]}
        assert "authorization" not in headers  # the gateway's credential stays there
        # A WebSocket handshake is checked the same way, before the agent.
        r = await client.get(
            "/a/svc/ws",
            headers={
                "Authorization": "",
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        assert r.status_code == 401


async def test_an_ip_allow_list_in_front_of_an_agent() -> None:
    echo = Echo()
    async with announced(echo, agent_allow=("svc=10.0.0.0/8",)) as (_, client, _port):
        r = await client.get("/a/svc/x")
        assert (r.status_code, r.json()["error"]) == (403, "forbidden")
        assert echo.connections == 0  # nothing reached the agent's service
    async with announced(agent_allow=("svc=127.0.0.0/8",)) as (_, client, _port):
        assert (await client.get("/a/svc/x")).status_code == 200
