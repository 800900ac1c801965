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

from .._errors import AgentBusy, StreamError
from .._proto.headers import Headers, forwarded_request_headers
from .._proto.rules import valid_agent_name
from .registry import AgentSession, Registry, RequestStream
from .replies import (
    Reply,
    agent_busy,
    agent_offline,
    header_list_too_large,
    json_reply,
    not_found,
)

__all__ = [
    "AGENT_PATH",
    "HEALTH_PATH",
    "PREFIX",
    "Forward",
    "Route",
    "Target",
    "dispatch",
    "forward",
    "route",
    "tunnel_request_headers",
]

PREFIX = b"/a/"
AGENT_PATH = b"/ws/connect"
HEALTH_PATH = b"/healthz"


class Target(enum.Enum):
    """The data plane's own endpoints."""

    AGENT = "agent"
    """``GET /ws/connect``: an agent dialing in."""
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
    if path == HEALTH_PATH:
        return Target.HEALTH
    return not_found("the data plane serves /a/NAME/..., /ws/connect and /healthz")


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
    """A public request bound for an online agent: its session and the head to
    open a stream with."""

    name: str
    session: AgentSession
    headers: Headers

    def open(self, *, end_stream: bool) -> RequestStream | Reply:
        """Open the stream (flush it after), or the reply when the agent cannot
        take it: 503 ``agent_busy`` at its stream limit, 503 ``agent_offline``
        if the session began to close since the lookup."""
        try:
            return self.session.open_request(self.headers, end_stream=end_stream)
        except AgentBusy:
            return agent_busy(self.name)
        except StreamError:
            return agent_offline(self.name)


def forward(
    registry: Registry,
    found: Route,
    method: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client: str | None,
    proto: str,
) -> Forward | Reply:
    """Where a routed public request goes and with which head, or the reply that
    answers it instead (503 ``agent_offline``, 431 for a head too large for the
    tunnel). The agent is looked up through the Registry interface only."""
    session = registry.lookup(found.name)
    if session is None or not session.accepting:
        return agent_offline(found.name)
    tunnel_headers = tunnel_request_headers(
        method, found.target, headers, name=found.name, client=client, proto=proto
    )
    too_large = header_list_too_large(tunnel_headers)
    if too_large is not None:
        return too_large
    return Forward(found.name, session, tunnel_headers)
