"""Header translation between HTTP/1.1 and the tunnel's HTTP/2 streams (sans-I/O).

Both directions drop hop-by-hop headers (RFC 9110 section 7.6.1) and anything
HTTP/2 would treat as a *connection* error if it reached h2 (upper-case or
invalid names, CR/LF/NUL in values, pseudo-headers from outside), so one bad
upstream response can never kill the other streams of an agent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "HOP_BY_HOP",
    "Headers",
    "clean_headers",
    "forwarded_request_headers",
]

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",  # carried as :authority on the tunnel
        b"http2-settings",
    }
)

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def clean_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Lower-cased, valid, end-to-end headers, in order, repeats kept.

    Drops hop-by-hop headers, every header named in ``Connection``, any
    ``Proxy-*`` header, pseudo-headers, invalid names and values containing
    CR, LF or NUL. Values are stripped of surrounding whitespace.
    """
    items = list(headers)
    named = _connection_tokens(items)
    out: Headers = []
    for raw_name, raw_value in items:
        name = raw_name.lower()
        if (
            name in HOP_BY_HOP
            or name in named
            or name.startswith(b"proxy-")
            or not _TOKEN.fullmatch(name)
        ):
            continue
        value = raw_value.strip(b" \t")
        if _BAD_VALUE.search(value):
            continue
        out.append((name, value))
    return out


def forwarded_request_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client: str | None,
    proto: str,
    host: bytes | None,
    prefix: str,
    via: bytes = b"1.1 revconn",
) -> Headers:
    """The end-to-end request headers plus X-Forwarded-* and Via, as the gateway sends them.

    ``X-Forwarded-For`` gets the client appended to any existing chain;
    ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and ``X-Forwarded-Prefix`` are
    replaced with the gateway's view (a client cannot spoof them); ``Via`` is
    appended.
    """
    replaced = (
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
        b"via",
    )
    out = clean_headers(headers)
    chain = [v for n, v in out if n == b"x-forwarded-for"]
    existing_via = [v for n, v in out if n == b"via"]
    out = [(n, v) for n, v in out if n not in replaced]
    if client:
        chain.append(client.encode("latin-1"))
    if chain:
        out.append((b"x-forwarded-for", b", ".join(chain)))
    out.append((b"x-forwarded-proto", proto.encode("ascii")))
    if host:
        out.append((b"x-forwarded-host", host))
    out.append((b"x-forwarded-prefix", prefix.encode("latin-1")))
    out.append((b"via", b", ".join([*existing_via, via])))
    return out
