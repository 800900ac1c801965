"""The data plane's one routing decision, at the byte level (no sockets)."""

from __future__ import annotations

import json

import pytest

from revconn._gateway.replies import Reply
from revconn._gateway.routing import Route, Target, dispatch, forward
from revconn._proto.headers import Headers


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/a/web/", Route("web", b"/")),
        (b"/a/web/x/y?q=1&r", Route("web", b"/x/y?q=1&r")),
        (b"/a/web/a%2Fb/%7E?x=%20", Route("web", b"/a%2Fb/%7E?x=%20")),  # byte-exact
        (b"/a/web//double", Route("web", b"//double")),
        (b"/a/0-9/", Route("0-9", b"/")),
        (b"/ws/connect", Target.AGENT),
        (b"/ws/connect?name=laptop", Target.AGENT),
        (b"/healthz", Target.HEALTH),
        (b"/healthz?probe=1", Target.HEALTH),
    ],
)
def test_dispatch_accepts(target: bytes, expected: object) -> None:
    assert dispatch(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        b"/endpoints",  # the operator surface is not on the data plane
        b"/",
        b"*",
        b"/%61/web/x",  # a percent-encoded prefix is not the prefix
        b"/A/web/x",
        b"/a%2Fweb/x",
        b"/ws/connect/",
        b"/ws/connectx",
        b"/healthz/",
        b"/wS/connect",
    ],
)
def test_dispatch_refuses_with_a_json_404(target: bytes) -> None:
    reply = dispatch(target)
    assert isinstance(reply, Reply)
    assert reply.status == 404
    assert json.loads(reply.body)["error"] == "not_found"


@pytest.mark.parametrize(
    "target",
    [
        *(b"/a/Web/x", b"/a/-x/", b"/a/x-/", b"/a/%77eb/x", b"/a/we%2Fb/x", b"/a//x"),
        *(b"/a/a..b/", b"/a/" + b"a" * 64 + b"/", b"/a/w\x00b/", b"/a/%2e%2e/x", b"/a/../x"),
    ],
)
def test_an_invalid_agent_name_is_a_404_naming_it(target: bytes) -> None:
    reply = dispatch(target)
    assert isinstance(reply, Reply)
    assert reply.status == 404
    assert json.loads(reply.body)["error"] == "not_found"


def test_missing_slash_after_the_name_redirects_keeping_the_query() -> None:
    reply = dispatch(b"/a/web?x=1")
    assert isinstance(reply, Reply)
    assert reply.status == 308
    assert (b"location", b"/a/web/?x=1") in reply.headers
    reply = dispatch(b"/a/web")
    assert isinstance(reply, Reply)
    assert (b"location", b"/a/web/") in reply.headers


class _Session:
    """A session held elsewhere: routing must need nothing but the protocol."""

    rtt = None

    def __init__(self, accepting: bool) -> None:
        self.accepting = accepting

    def request_close(self, close_code: int, reason: str) -> None:
        raise AssertionError

    def open_request(self, headers: Headers, *, end_stream: bool) -> object:
        raise AssertionError

    async def flush(self) -> None:
        raise AssertionError


class _Registry:
    def __init__(self, sessions: dict[str, _Session]) -> None:
        self.sessions = sessions

    def lookup(self, name: str) -> _Session | None:
        return self.sessions.get(name)


def test_forward_goes_through_the_registry_interface_only() -> None:
    """Any object satisfying AgentSession routes (no test for the Tunnel class):
    a registry whose sessions live in another process uses the same code."""
    registry = _Registry({"web": _Session(True), "leaving": _Session(False)})
    route = Route("web", b"/x?y=1")
    headers = [(b"host", b"gw.example"), (b"accept", b"*/*")]
    out = forward(registry, route, b"GET", headers, client="192.0.2.1", proto="http")  # type: ignore[arg-type]
    assert not isinstance(out, Reply)
    assert out.session is registry.sessions["web"]
    assert out.headers[:4] == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"gw.example"),
        (b":path", b"/x?y=1"),
    ]
    for name in ("leaving", "nobody"):
        offline = forward(registry, Route(name, b"/"), b"GET", [], client=None, proto="http")  # type: ignore[arg-type]
        assert isinstance(offline, Reply)
        assert (offline.status, json.loads(offline.body)["error"]) == (503, "agent_offline")


def test_a_head_too_large_for_the_tunnel_is_431_before_any_stream() -> None:
    registry = _Registry({"web": _Session(True)})
    headers = [(b"x-big", b"a" * 70_000)]
    out = forward(registry, Route("web", b"/"), b"GET", headers, client=None, proto="http")  # type: ignore[arg-type]
    assert isinstance(out, Reply)
    assert out.status == 431
