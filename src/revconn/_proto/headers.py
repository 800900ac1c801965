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
_NAMES: dict[bytes, bytes | None] = {}
"""Header name as received -> its lower-cased form if it may be forwarded at
all (a valid token, not hop-by-hop, not ``Proxy-*``), else None. The same few
dozen names recur on every request, so the checks run once per name; bounded
(names beyond ``_NAMES_MAX`` are checked every time)."""
_NAMES_MAX = 4096


def _forwardable(raw_name: bytes) -> bytes | None:
    name = raw_name.lower()
    if name in HOP_BY_HOP or name.startswith(b"proxy-") or not _TOKEN.fullmatch(name):
        return None
    return name


def clean_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Lower-cased, valid, end-to-end headers, in order, repeats kept.

    Drops hop-by-hop headers, every header named in ``Connection``, any
    ``Proxy-*`` header, pseudo-headers, invalid names and values containing
    CR, LF or NUL. Values are stripped of surrounding whitespace.
    """
    names = _NAMES
    out: Headers = []
    named: set[bytes] = set()
    for raw_name, raw_value in headers:
        try:
            name = names[raw_name]
        except KeyError:
            name = _forwardable(raw_name)
            if len(names) < _NAMES_MAX:
                names[raw_name] = name
        if name is None:
            if raw_name.lower() == b"connection":
                named.update(t.strip().lower() for t in raw_value.split(b","))
            continue
        value = raw_value.strip(b" \t")
        # (int operands: a byte search, several times faster than b"\r" in value)
        if 13 in value or 10 in value or 0 in value:
            continue
        out.append((name, value))
    if named:
        out = [(n, v) for n, v in out if n not in named]
    return out


_CLAIMS = (
    b"forwarded",
    b"x-forwarded-port",
    b"x-forwarded-ssl",
    b"x-forwarded-scheme",
    b"x-real-ip",
)
"""Other headers frameworks read as the proxy's word (RFC 7239, Rails,
Spring, werkzeug's ProxyFix): always dropped. A trusted proxy may pass on
what a client sent in them (Caddy does), and the gateway reads none of them:
apps get its X-Forwarded-* only."""


def forwarded_request_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client: str | None,
    proto: str,
    host: bytes | None,
    prefix: str | None,
    via: bytes = b"1.1 revconn",
    trusted: bool = False,
) -> Headers:
    """The end-to-end request headers plus X-Forwarded-* and Via, as the gateway sends them.

    From an untrusted client, ``X-Forwarded-For`` is the client alone and
    ``X-Forwarded-Proto`` / ``-Host`` are the gateway's view (``proto``,
    ``host``): nothing the client says is believed. From a ``trusted`` proxy
    (``--trusted-proxy``), its ``X-Forwarded-For`` chain is kept with the
    proxy appended, and its ``X-Forwarded-Proto`` (``http``/``https``) and
    ``X-Forwarded-Host`` (the last of each) replace the gateway's view.
    ``X-Forwarded-Prefix`` is always the gateway's (none when ``prefix`` is
    empty); ``Via`` is appended. ``Forwarded``, ``X-Real-IP`` and the other
    ``_CLAIMS`` are dropped, from a trusted proxy too.
    """
    replaced = (
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
        b"via",
    )
    # Names with "_" are dropped, as nginx does by default: CGI-style
    # upstreams fold "x_forwarded_for" and "x-forwarded-for" into one
    # variable, which would let a client spoof the chain added here.
    out = [(n, v) for n, v in clean_headers(headers) if 95 not in n]
    chain: list[bytes] = []
    if trusted:
        chain = [v for n, v in out if n == b"x-forwarded-for"]
        said_proto = [v.lower() for n, v in out if n == b"x-forwarded-proto"]
        # (a chain of proxies may send a list: the nearest one's is last)
        nearest = said_proto[-1].rpartition(b",")[2].strip() if said_proto else b""
        if nearest in (b"http", b"https"):
            proto = nearest.decode("ascii")
        said_host = [v for n, v in out if n == b"x-forwarded-host"]
        if said_host and said_host[-1]:
            host = said_host[-1]
    existing_via = [v for n, v in out if n == b"via"]
    dropped = replaced + _CLAIMS
    out = [(n, v) for n, v in out if n not in dropped]
    if client:
        chain.append(client.encode("latin-1"))
    if chain:
        out.append((b"x-forwarded-for", b", ".join(chain)))
    out.append((b"x-forwarded-proto", proto.encode("ascii")))
    if host:
        out.append((b"x-forwarded-host", host))
    if prefix:
        out.append((b"x-forwarded-prefix", prefix.encode("latin-1")))
    out.append((b"via", b", ".join([*existing_via, via])))
    return out
