"""The data plane's one routing decision, at the byte level (no sockets)."""

from __future__ import annotations

import json

import pytest

from revconn._gateway.replies import Reply
from revconn._gateway.routing import Route, Target, dispatch, forward
from revconn._proto.connect import UpstreamInfo


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/a/web/", Route("web", b"/", "/a/web")),
        (b"/a/web/x/y?q=1&r", Route("web", b"/x/y?q=1&r", "/a/web")),
        (b"/a/web/a%2Fb/%7E?x=%20", Route("web", b"/a%2Fb/%7E?x=%20", "/a/web")),  # byte-exact
        (b"/a/web//double", Route("web", b"//double", "/a/web")),
        (b"/a/0-9/", Route("0-9", b"/", "/a/0-9")),
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


DOMAINS = ("tunnel.example.com", "t.test")


@pytest.mark.parametrize(
    ("host", "target", "expected"),
    [
        # NAME.DOMAIN: the agent, the target unchanged (no prefix)
        (b"laptop.tunnel.example.com", b"/x?y=1", Route("laptop", b"/x?y=1")),
        (b"laptop.tunnel.example.com:8443", b"/", Route("laptop", b"/")),
        (b"LapTop.Tunnel.Example.COM", b"/", Route("laptop", b"/")),
        (b"laptop.tunnel.example.com.", b"/", Route("laptop", b"/")),
        (b"laptop.tunnel.example.com.:80", b"/", Route("laptop", b"/")),
        (b"web.t.test", b"/a/other/x", Route("web", b"/a/other/x")),  # the agent's own path
        (b"web.t.test", b"/ws/connect", Route("web", b"/ws/connect")),
        (b"web.t.test", b"/healthz", Route("web", b"/healthz")),
        (b"0-9.t.test:1", b"*", Route("0-9", b"*")),
        # the bare domain and any other host: the data plane's own routes
        (b"tunnel.example.com", b"/healthz", Target.HEALTH),
        (b"tunnel.example.com:8080", b"/ws/connect?name=x", Target.AGENT),
        (b"TUNNEL.example.com.", b"/a/web/z", Route("web", b"/z", "/a/web")),
        (b"other.test", b"/a/web/", Route("web", b"/", "/a/web")),
        (b"127.0.0.1:8080", b"/healthz", Target.HEALTH),
        (b"[::1]:8080", b"/a/web/", Route("web", b"/", "/a/web")),
        (b"example.com", b"/healthz", Target.HEALTH),  # a parent of no domain
        (b"xtunnel.example.com", b"/healthz", Target.HEALTH),  # not a subdomain
    ],
)
def test_host_routing_accepts(host: bytes, target: bytes, expected: object) -> None:
    assert dispatch(target, [host], DOMAINS) == expected


@pytest.mark.parametrize(
    ("hosts", "word"),
    [
        ([], "required"),
        ([b"a.t.test", b"a.t.test"], "exactly one"),
        ([b"a.b.t.test"], "more than one label"),
        ([b"Under_score.t.test"], "agent name"),
        ([b"-x.t.test"], "agent name"),
        ([b"x-.t.test"], "agent name"),
        ([b"a" * 64 + b".t.test"], "agent name"),
        ([b".t.test"], "agent name"),
        ([b"web.t.test:99999"], "port"),
        ([b"web.t.test:8o"], "malformed"),
        ([b"user@web.t.test"], "malformed"),
        ([b"web.t.test/x"], "malformed"),
        ([b"web.t.test "], "malformed"),
        ([b""], "malformed"),
        ([b"w\xc3\xa9b.t.test"], "malformed"),
        ([b"[::1"], "malformed"),
    ],
)
def test_host_routing_refuses_with_a_400(hosts: list[bytes], word: str) -> None:
    reply = dispatch(b"/", hosts, DOMAINS)
    assert isinstance(reply, Reply), reply
    assert reply.status == 400
    body = json.loads(reply.body)
    assert body["error"] == "bad_request"
    assert word in body["detail"]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # Absolute form: the authority is the host, the path the target
        # (RFC 9112 3.2.2), whatever the Host header says.
        (b"http://web.t.test/x?y", Route("web", b"/x?y", authority=b"web.t.test")),
        (b"HTTPS://Web.T.Test:8443", Route("web", b"/", authority=b"Web.T.Test:8443")),
        (b"http://web.t.test?x=1", Route("web", b"/?x=1", authority=b"web.t.test")),
        (b"http://t.test/a/web/z", Route("web", b"/z", "/a/web", authority=b"t.test")),
        (b"http://other.test/healthz", Target.HEALTH),
    ],
)
def test_absolute_form_targets(target: bytes, expected: object) -> None:
    assert dispatch(target, [b"evil.t.test"], DOMAINS) == expected


@pytest.mark.parametrize(
    "target",
    [b"ftp://web.t.test/", b"http://user@web.t.test/", b"web.t.test:80", b"x", b"*junk", b"**"],
)
def test_other_target_forms_are_a_400(target: bytes) -> None:
    reply = dispatch(target, [b"web.t.test"], DOMAINS)
    assert isinstance(reply, Reply) and reply.status == 400, reply


def test_nested_domains_route_to_the_most_specific() -> None:
    """--domain example.com --domain t.example.com: t.example.com is a bare
    domain (not agent "t"), alice.t.example.com is agent alice."""
    nested = ("example.com", "t.example.com")
    assert dispatch(b"/healthz", [b"t.example.com"], nested) == Target.HEALTH
    assert dispatch(b"/", [b"alice.t.example.com"], nested) == Route("alice", b"/")
    assert dispatch(b"/", [b"bob.example.com"], nested) == Route("bob", b"/")


def test_an_absolute_form_authority_is_the_public_host() -> None:
    """Not the Host header (RFC 9112 3.2.2): the upstream sees the authority."""
    found = dispatch(b"http://web.t.test/x", [b"evil.t.test"], DOMAINS)
    assert isinstance(found, Route)
    registry = _Registry({"web": _Session(True)})
    out = forward(registry, found, b"GET", [(b"host", b"evil.t.test")], client=None, proto="http")  # type: ignore[arg-type]
    assert not isinstance(out, Reply)
    assert out.host == b"web.t.test"
    assert (b"x-forwarded-host", b"web.t.test") in out.headers
    head = out.head(UpstreamInfo(None, b"", None), framing=[])
    assert head.startswith(b"GET /x HTTP/1.1\r\nhost: web.t.test\r\n")


def test_options_star_goes_to_the_upstreams_prefix() -> None:
    found = dispatch(b"*", [b"web.t.test"], DOMAINS)
    assert found == Route("web", b"*")
    registry = _Registry({"web": _Session(True)})
    out = forward(
        registry, found, b"OPTIONS", [(b"host", b"web.t.test")], client=None, proto="http"
    )  # type: ignore[arg-type]
    assert not isinstance(out, Reply)
    assert out.head(UpstreamInfo(None, b"/base", None), framing=[]).startswith(b"OPTIONS /base ")
    assert out.head(UpstreamInfo(None, b"", None), framing=[]).startswith(b"OPTIONS * ")


def test_without_domains_hosts_do_not_route() -> None:
    assert dispatch(b"/a/web/", [b"laptop.tunnel.example.com"]) == Route("web", b"/", "/a/web")
    assert dispatch(b"/healthz", []) == Target.HEALTH  # (HTTP/1.0 may omit Host)
    reply = dispatch(b"/healthz", [b"a", b"b"])
    assert isinstance(reply, Reply) and reply.status == 400


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

    async def acquire(self, *, fresh: bool = False) -> object:
        raise AssertionError

    def release(self, stream: object, *, reusable: bool) -> None:
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
    route = Route("web", b"/x?y=1", "/a/web")
    headers = [(b"host", b"gw.example"), (b"accept", b"*/*")]
    out = forward(registry, route, b"GET", headers, client="192.0.2.1", proto="http")  # type: ignore[arg-type]
    assert not isinstance(out, Reply)
    assert out.session is registry.sessions["web"]
    assert (out.method, out.target, out.host) == (b"GET", b"/x?y=1", b"gw.example")
    assert (b"accept", b"*/*") in out.headers
    assert (b"x-forwarded-for", b"192.0.2.1") in out.headers
    assert (b"x-forwarded-prefix", b"/a/web") in out.headers
    assert all(n != b"host" for n, _ in out.headers)
    for name in ("leaving", "nobody"):
        offline = forward(registry, Route(name, b"/"), b"GET", [], client=None, proto="http")  # type: ignore[arg-type]
        assert isinstance(offline, Reply)
        assert (offline.status, json.loads(offline.body)["error"]) == (503, "agent_offline")


def test_the_forwarded_head_addresses_the_agents_upstream() -> None:
    """The agent's 200 names its upstream's Host and path prefix; the head the
    stream carries uses them (the public Host goes to X-Forwarded-Host)."""
    registry = _Registry({"web": _Session(True)})
    headers = [(b"host", b"gw.example"), (b"expect", b"100-continue"), (b"content-length", b"3")]
    out = forward(
        registry, Route("web", b"/x", "/a/web"), b"POST", headers, client=None, proto="https"
    )  # type: ignore[arg-type]
    assert not isinstance(out, Reply)
    upstream = UpstreamInfo(b"127.0.0.1:8080", b"/base", 5.0)
    head = out.head(upstream, framing=[(b"content-length", b"3")])
    assert head.startswith(b"POST /base/x HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n")
    assert head.endswith(b"content-length: 3\r\n\r\n")
    assert b"x-forwarded-host: gw.example\r\n" in head
    assert b"x-forwarded-proto: https\r\n" in head
    assert b"expect" not in head  # the gateway answers 100-continue itself
    assert head.count(b"content-length") == 1
    plain = out.head(UpstreamInfo(None, b"", None), framing=[])
    assert plain.startswith(b"POST /x HTTP/1.1\r\nhost: gw.example\r\n")
