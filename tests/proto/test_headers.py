"""Header translation (sans-I/O), with property tests."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from revconn._proto import headers as _headers
from revconn._proto.headers import HOP_BY_HOP, clean_headers, forwarded_request_headers

token = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.",
    min_size=1,
    max_size=20,
)
names = st.one_of(
    token,
    st.sampled_from(
        [
            "Connection",
            "Keep-Alive",
            "TE",
            "Upgrade",
            "Proxy-Foo",
            "Host",
            "Transfer-Encoding",
            "Trailer",
            "Set-Cookie",
            ":path",
            "bad name",
            "x\x00y",
        ]
    ),
)
values = st.binary(max_size=40)
headers_st = st.lists(st.tuples(names.map(lambda s: s.encode("latin-1")), values), max_size=15)


@given(headers_st)
def test_clean_headers_invariants(headers: list[tuple[bytes, bytes]]) -> None:
    out = clean_headers(headers)
    named = {
        t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",")
    }
    for name, value in out:
        assert name == name.lower()
        assert name not in HOP_BY_HOP
        assert not name.startswith(b"proxy-")
        assert not name.startswith(b":")
        assert name not in named
        assert b"\r" not in value and b"\n" not in value and b"\x00" not in value
    # Order and multiplicity of what is kept are preserved.
    kept = [
        (n.lower(), v.strip(b" \t")) for n, v in headers if (n.lower(), v.strip(b" \t")) in set(out)
    ]
    assert out == kept


@given(headers_st)
def test_clean_headers_idempotent(headers: list[tuple[bytes, bytes]]) -> None:
    once = clean_headers(headers)
    assert clean_headers(once) == once


def test_repeated_headers_keep_order() -> None:
    h = [(b"Set-Cookie", b"a=1"), (b"X", b"1"), (b"Set-Cookie", b"b=2")]
    assert clean_headers(h) == [(b"set-cookie", b"a=1"), (b"x", b"1"), (b"set-cookie", b"b=2")]


def test_connection_named_headers_dropped() -> None:
    h = [(b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"), (b"X-Keep", b"2")]
    assert clean_headers(h) == [(b"x-keep", b"2")]


@given(headers_st, st.sampled_from(["http", "https"]))
def test_forwarded_headers(headers: list[tuple[bytes, bytes]], proto: str) -> None:
    out = forwarded_request_headers(
        headers, client="198.51.100.7", proto=proto, host=b"gw.example", prefix="/a/x"
    )
    d: dict[bytes, list[bytes]] = {}
    for n, v in out:
        d.setdefault(n, []).append(v)
    assert d[b"x-forwarded-prefix"] == [b"/a/x"]
    assert d[b"x-forwarded-proto"] == [proto.encode()]
    assert d[b"x-forwarded-host"] == [b"gw.example"]
    assert len(d[b"x-forwarded-for"]) == 1
    assert d[b"x-forwarded-for"][0].endswith(b"198.51.100.7")
    assert d[b"via"][0].endswith(b"1.1 revconn")


def test_an_untrusted_client_cannot_spoof_forwarded_headers() -> None:
    out = forwarded_request_headers(
        [
            (b"X-Forwarded-For", b"203.0.113.1"),
            (b"X-Forwarded-Prefix", b"/evil"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"evil.example"),
        ],
        client="10.0.0.2",
        proto="http",
        host=b"gw.example",
        prefix="/a/svc",
    )
    forwarded = [(n, v) for n, v in out if n.startswith(b"x-forwarded-")]
    assert forwarded == [
        (b"x-forwarded-for", b"10.0.0.2"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"gw.example"),
        (b"x-forwarded-prefix", b"/a/svc"),
    ]


def test_a_trusted_proxy_is_believed() -> None:
    """Behind Caddy or nginx terminating TLS: the app sees https, the public
    host and the real client chain."""
    out = forwarded_request_headers(
        [
            (b"X-Forwarded-For", b"198.51.100.9"),
            (b"X-Forwarded-For", b"203.0.113.1"),
            (b"X-Forwarded-Proto", b"HTTPS"),
            (b"X-Forwarded-Host", b"laptop.example.com"),
            (b"X-Forwarded-Prefix", b"/evil"),
        ],
        client="10.0.0.2",
        proto="http",
        host=b"gw.internal:8080",
        prefix=None,
        trusted=True,
    )
    forwarded = [(n, v) for n, v in out if n.startswith(b"x-forwarded-")]
    assert forwarded == [
        (b"x-forwarded-for", b"198.51.100.9, 203.0.113.1, 10.0.0.2"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"laptop.example.com"),
    ]


def test_other_forwarding_claims_are_dropped_even_from_a_trusted_proxy() -> None:
    """A trusted proxy may pass on what its client sent in them (Caddy does):
    apps get the gateway's X-Forwarded-* only."""
    claims = [
        (b"Forwarded", b"for=1.2.3.4;proto=https"),
        (b"X-Forwarded-Port", b"443"),
        (b"X-Forwarded-Ssl", b"on"),
        (b"X-Forwarded-Scheme", b"https"),
        (b"X-Real-IP", b"1.2.3.4"),
    ]
    out = forwarded_request_headers(claims, client="10.0.0.2", proto="http", host=None, prefix=None)
    assert not {n for n, _ in out} & {n.lower() for n, _ in claims}
    from_proxy = forwarded_request_headers(
        claims, client="10.0.0.2", proto="http", host=None, prefix=None, trusted=True
    )
    assert not {n for n, _ in from_proxy} & {n.lower() for n, _ in claims}


def test_a_chain_of_trusted_proxies_the_nearest_proto_wins() -> None:
    out = forwarded_request_headers(
        [(b"X-Forwarded-Proto", b"https, http")],
        client="10.0.0.2",
        proto="https",
        host=None,
        prefix=None,
        trusted=True,
    )
    assert (b"x-forwarded-proto", b"http") in out


def test_a_trusted_proxys_odd_proto_is_not_believed() -> None:
    out = forwarded_request_headers(
        [(b"X-Forwarded-Proto", b"gopher")],
        client="10.0.0.2",
        proto="https",
        host=None,
        prefix=None,
        trusted=True,
    )
    assert (b"x-forwarded-proto", b"https") in out


def _reference_clean(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """clean_headers as the plain definition (no caching, regexes throughout)."""
    token = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
    named = {
        t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",")
    }
    out = []
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name in HOP_BY_HOP or name in named or name.startswith(b"proxy-"):
            continue
        if not token.fullmatch(name):
            continue
        value = raw_value.strip(b" \t")
        if re.search(rb"[\x00\r\n]", value):
            continue
        out.append((name, value))
    return out


@given(headers_st)
def test_clean_headers_matches_its_definition(headers: list[tuple[bytes, bytes]]) -> None:
    assert clean_headers(headers) == _reference_clean(headers)
    assert clean_headers(headers) == _reference_clean(headers)  # again, names now cached


def test_name_cache_is_bounded() -> None:
    for i in range(_headers._NAMES_MAX + 100):
        clean_headers([(f"x-random-{i}".encode(), b"v")])
    assert len(_headers._NAMES) <= _headers._NAMES_MAX
    assert clean_headers([(b"X-Uncached-Name-Beyond-The-Bound", b" v ")]) == [
        (b"x-uncached-name-beyond-the-bound", b"v")
    ]
