"""What both public front ends share (sans-I/O): routing ``/a/NAME/...`` to an
agent's tunnel, the request head that travels on it, and the gateway's JSON
errors.

The gateway has two front ends for public traffic with identical semantics:
the ASGI route in :class:`~revconn._gateway.Gateway` (embeddable, served by
hypercorn on ``--bind``) and the lean trio + h11 listener of ``_public.py``
(``--public-bind``). Everything they must agree on lives here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from .. import _codes
from .._errors import AgentBusy, StreamError
from .._proto.headers import Headers, forwarded_request_headers
from .._proto.rules import valid_agent_name
from .._runtime.streams import TunnelStream
from .._runtime.tunnel import Tunnel
from .registry import Registry

__all__ = [
    "Forward",
    "Reply",
    "Route",
    "agent_busy",
    "agent_offline",
    "bad_status",
    "format_peer",
    "forward",
    "header_list_too_large",
    "json_reply",
    "route",
    "stream_failure",
    "tunnel_request_headers",
    "unauthorized",
]

PREFIX = b"/a/"


@attrs.frozen(slots=True)
class Reply:
    """A complete response the gateway answers by itself (errors, redirects)."""

    status: int
    headers: Headers
    body: bytes


def json_reply(status: int, payload: object, extra: Iterable[tuple[bytes, bytes]] = ()) -> Reply:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    return Reply(status, headers, body)


def unauthorized() -> Reply:
    """401 for a missing or wrong bearer credential (agents and operators)."""
    return json_reply(
        401,
        {"error": "unauthorized", "detail": "missing or invalid bearer credential"},
        [(b"www-authenticate", b'Bearer realm="revconn"')],
    )


def format_peer(peer: Sequence[Any] | None) -> str:
    """``host:port`` (``[v6]:port``) of a socket peer or ASGI client; "unknown" if absent."""
    if not peer:
        return "unknown"
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def agent_offline(name: str) -> Reply:
    payload = {"error": "agent_offline", "agent": name, "detail": "agent is not connected"}
    return json_reply(503, payload, [(b"retry-after", b"5")])


def agent_busy(name: str, detail: str = "too many concurrent requests") -> Reply:
    payload = {"error": "agent_busy", "agent": name, "detail": detail}
    return json_reply(503, payload, [(b"retry-after", b"1")])


def stream_failure(exc: StreamError, name: str) -> Reply:
    """The reply for a stream that failed before the response started."""
    if exc.error_code == _codes.H2_REFUSED_STREAM:
        return agent_busy(name, str(exc))
    error = "agent_disconnected" if exc.error_code is None else "agent_reset"
    return json_reply(502, {"error": error, "agent": name, "detail": str(exc)})


def bad_status(status: int, name: str) -> Reply | None:
    """502 if the agent's final status is not a 3-digit code >= 200 (a missing or
    malformed ``:status`` arrives as 0)."""
    if 200 <= status <= 999:
        return None
    detail = f"agent answered with an invalid status ({status or 'none'})"
    return json_reply(502, {"error": "bad_response", "agent": name, "detail": detail})


@attrs.frozen(slots=True)
class Route:
    """``/a/NAME/REST?QUERY``: the agent and the target its upstream sees."""

    name: str
    target: bytes


def route(path: bytes, query: bytes) -> Route | Reply:
    """Split a raw public path (starting with ``/a/``) and query, byte-exact.

    Returns the Route, or the Reply for a malformed name (404) or a missing
    slash after the name (308 to ``/a/NAME/``).
    """
    name_bytes, slash, rest = path[len(PREFIX) :].partition(b"/")
    name = name_bytes.decode("latin-1")
    if not valid_agent_name(name):
        return json_reply(404, {"error": "not_found", "agent": name})
    if not slash:
        location = b"/a/" + name_bytes + b"/" + (b"?" + query if query else b"")
        return json_reply(308, {"error": "redirect", "agent": name}, [(b"location", location)])
    return Route(name, b"/" + rest + (b"?" + query if query else b""))


MAX_HEADER_LIST = 65_536
"""The agent's SETTINGS_MAX_HEADER_LIST_SIZE (h2's default): a larger request
head is answered 431 here rather than refused by the agent."""


def header_list_too_large(headers: Headers) -> Reply | None:
    """431 if ``headers`` exceed the tunnel's header list size (RFC 9113 6.5.2:
    name + value + 32 octets per field)."""
    if sum(len(n) + len(v) + 32 for n, v in headers) <= MAX_HEADER_LIST:
        return None
    detail = f"request headers exceed {MAX_HEADER_LIST} bytes"
    return json_reply(431, {"error": "request_header_too_large", "detail": detail})


def tunnel_request_headers(
    method: bytes,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    name: str,
    client: str | None,
    proto: str,
) -> Headers:
    """The request as it travels on the tunnel: pseudo-headers, then the
    end-to-end headers plus X-Forwarded-* and Via (``headers`` lower-cased)."""
    items = list(headers)
    host = next((v for n, v in items if n == b"host"), b"")
    return [
        (b":method", method),
        (b":scheme", b"http"),
        (b":authority", host or b"localhost"),
        (b":path", target),
        *forwarded_request_headers(
            items, client=client, proto=proto, host=host or None, prefix=f"/a/{name}"
        ),
    ]


@attrs.frozen(slots=True)
class Forward:
    """A public request bound for an online agent: its tunnel and the head to
    open a stream with."""

    name: str
    tunnel: Tunnel
    headers: Headers

    def open(self, *, end_stream: bool) -> TunnelStream | Reply:
        """Open the stream (flush it after), or the reply when the agent cannot
        take it: 503 ``agent_busy`` at its stream limit, 503 ``agent_offline``
        if the tunnel began to close since the lookup."""
        try:
            return self.tunnel.open_request(self.headers, end_stream=end_stream)
        except AgentBusy:
            return agent_busy(self.name)
        except StreamError:
            return agent_offline(self.name)


def forward(
    registry: Registry,
    path: bytes,
    query: bytes,
    method: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client: str | None,
    proto: str,
) -> Forward | Reply:
    """A public request for ``/a/NAME/...`` (raw ``path`` and ``query``): where it
    goes and with which head, or the reply that answers it instead (404/308
    from :func:`route`, 503 ``agent_offline``, 431 for a head too large for
    the tunnel)."""
    found = route(path, query)
    if isinstance(found, Reply):
        return found
    tunnel = registry.lookup(found.name)
    if not isinstance(tunnel, Tunnel) or not tunnel.accepting:
        return agent_offline(found.name)
    tunnel_headers = tunnel_request_headers(
        method, found.target, headers, name=found.name, client=client, proto=proto
    )
    too_large = header_list_too_large(tunnel_headers)
    if too_large is not None:
        return too_large
    return Forward(found.name, tunnel, tunnel_headers)
