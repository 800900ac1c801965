"""Where a data-plane request goes, decided once from its raw request target
(sans-I/O): the agent WebSocket endpoint, the health check, or an agent's
``/a/NAME/...`` — and, for the last, the head its tunnel stream opens with.

Dispatch reads the raw target bytes, never a percent-decoded path: ``/%61/x``
is not ``/a/x`` and reaches no agent.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

from .._proto.announce import ANNOUNCE_PATH as ANNOUNCE
from .._proto.connect import UpstreamInfo
from .._proto.headers import Headers, forwarded_request_headers
from .._proto.http1 import request_head
from .._proto.rules import valid_agent_name
from .registry import AgentSession, Registry
from .replies import Reply, agent_offline, json_reply, not_found

__all__ = [
    "AGENT_PATH",
    "ANNOUNCE_PATH",
    "HEALTH_PATH",
    "PREFIX",
    "Forward",
    "Route",
    "Target",
    "dispatch",
    "forward",
    "route",
]

PREFIX = b"/a/"
AGENT_PATH = b"/ws/connect"
ANNOUNCE_PATH = ANNOUNCE.encode()
HEALTH_PATH = b"/healthz"


class Target(enum.Enum):
    """The data plane's own endpoints."""

    AGENT = "agent"
    """``GET /ws/connect``: an agent dialing in."""
    ANNOUNCE = "announce"
    """``PUT``/``DELETE /announce``: an agent announcing (withdrawing) its URL."""
    HEALTH = "health"
    """``GET /healthz``."""


@attrs.frozen(slots=True)
class Route:
    """``/a/NAME/REST?QUERY``: the agent and the target its upstream sees."""

    name: str
    target: bytes


def dispatch(target: bytes) -> Target | Route | Reply:
    """The one routing decision of the data plane, on the raw request target."""
    path, _, query = target.partition(b"?")
    if path.startswith(PREFIX):
        return route(path, query)
    if path == AGENT_PATH:
        return Target.AGENT
    if path == ANNOUNCE_PATH:
        return Target.ANNOUNCE
    if path == HEALTH_PATH:
        return Target.HEALTH
    return not_found("the data plane serves /a/NAME/..., /ws/connect, /announce and /healthz")


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
        location = PREFIX + name_bytes + b"/" + (b"?" + query if query else b"")
        return json_reply(308, {"error": "redirect", "agent": name}, [(b"location", location)])
    return Route(name, b"/" + rest + (b"?" + query if query else b""))


@attrs.frozen(slots=True)
class Forward:
    """A public request bound for an online agent: its session, and the
    request head as its upstream will see it (built once the stream says how
    the upstream is addressed)."""

    name: str
    session: AgentSession
    method: bytes
    target: bytes
    host: bytes
    headers: Headers
    """End-to-end headers plus X-Forwarded-* and Via; no Host, no framing."""

    def head(self, upstream: UpstreamInfo | None, *, framing: Headers) -> bytes:
        """The HTTP/1.1 request head written into the stream: the upstream's
        own Host (or the public one) and path prefix, then ``framing``
        (Content-Length or Transfer-Encoding)."""
        host = self.host or b"localhost"
        target = self.target
        if upstream is not None:
            host = upstream.host or host
            target = upstream.prefix + target
        return request_head(self.method, target, [(b"host", host), *self.headers, *framing])


def forward(
    registry: Registry,
    found: Route,
    method: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client: str | None,
    proto: str,
) -> Forward | Reply:
    """Where a routed public request goes, or the reply that answers it
    instead (503 ``agent_offline``). The agent is looked up through the
    Registry interface only. ``headers`` are lower-cased."""
    session = registry.lookup(found.name)
    if session is None or not session.accepting:
        return agent_offline(found.name)
    items = list(headers)
    host = b""
    for name, value in items:
        if name == b"host":
            host = value
            break
    forwarded = forwarded_request_headers(
        items, client=client, proto=proto, host=host or None, prefix=f"/a/{found.name}"
    )
    # The gateway answers Expect: 100-continue itself, and frames the body itself.
    forwarded = [(n, v) for n, v in forwarded if n not in _NOT_FORWARDED]
    return Forward(found.name, session, method, found.target, host, forwarded)


_NOT_FORWARDED = frozenset({b"expect", b"content-length"})
