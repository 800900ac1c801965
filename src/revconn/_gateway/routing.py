"""Where a data-plane request goes, decided once from its ``Host`` and raw
request target (sans-I/O): an agent by host (``NAME.DOMAIN``, with
``--domain``), the data plane's own endpoints (agent WebSocket, announce,
health check), or an agent's ``/a/NAME/...`` — and, for an agent, the head
its tunnel stream opens with.

Dispatch reads the raw target bytes, never a percent-decoded path: ``/%61/x``
is not ``/a/x`` and reaches no agent.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence

import attrs

from .._errors import ConfigError
from .._proto.announce import ANNOUNCE_PATH as ANNOUNCE
from .._proto.connect import UpstreamInfo
from .._proto.headers import Headers, forwarded_request_headers
from .._proto.http1 import request_head
from .._proto.rules import NAME_RULE, valid_agent_name
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
    "check_domain",
    "dispatch",
    "forward",
    "public_urls",
    "public_view",
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
    """A request for agent ``name``: the target its upstream sees, and the
    path prefix the public URL had (``/a/NAME``; empty when routed by host)."""

    name: str
    target: bytes
    prefix: str = ""
    authority: bytes | None = None
    """The host of an absolute-form target: it, not the Host header, is the
    public host (RFC 9112 3.2.2)."""


_ABSOLUTE = re.compile(rb"(?i:https?)://([^/?#@]*)([/?][^#]*)?")
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{0,5})?")
_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def check_domain(domain: str) -> str:
    """A ``--domain`` value, as routing compares it; ConfigError if malformed."""
    if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
        raise ConfigError(
            f"--domain {domain!r}: expected a lowercase DNS name such as tunnel.example.com "
            "(no scheme, port, '*.' or trailing dot)"
        )
    return domain


def bad_host(detail: str) -> Reply:
    return json_reply(400, {"error": "bad_request", "detail": detail})


def dispatch(
    target: bytes, hosts: Sequence[bytes] = (), domains: Sequence[str] = ()
) -> Target | Route | Reply:
    """The one routing decision of the data plane, on the ``Host`` header
    values and the raw request target.

    With ``domains``, a Host ``NAME.DOMAIN`` (any port, any case, one trailing
    dot allowed) routes to agent NAME with the target unchanged; the bare
    DOMAIN and any other host get the path routes. There, a Host that is
    absent, malformed or more than one label under a domain is a 400; so is
    more than one Host anywhere.
    """
    if len(hosts) > 1:
        return bad_host("a request needs exactly one Host header (RFC 9112 3.2)")
    authority: bytes | None = None
    if target[:1] != b"/" and target != b"*":
        # Absolute form (RFC 9112 3.2.2): its authority is the host, its path the target.
        absolute = _ABSOLUTE.fullmatch(target)
        if absolute is None:
            return bad_host("the request target must be a path (/...) or an absolute http(s) URL")
        authority = absolute.group(1)
        hosts, target = [authority], absolute.group(2) or b"/"
        if target[:1] == b"?":
            target = b"/" + target
    if domains:
        if not hosts:
            return bad_host("a Host header is required (RFC 9112 3.2)")
        found = _by_host(hosts[0], domains)
        if isinstance(found, Reply):
            return found
        if found is not None:
            return Route(found, target, authority=authority)
    path, _, query = target.partition(b"?")
    if path.startswith(PREFIX):
        found_route = route(path, query)
        if isinstance(found_route, Route) and authority is not None:
            return attrs.evolve(found_route, authority=authority)
        return found_route
    if path == AGENT_PATH:
        return Target.AGENT
    if path == ANNOUNCE_PATH:
        return Target.ANNOUNCE
    if path == HEALTH_PATH:
        return Target.HEALTH
    return not_found("the data plane serves /a/NAME/..., /ws/connect, /announce and /healthz")


def _by_host(host: bytes, domains: Sequence[str]) -> str | Reply | None:
    """The agent NAME of a ``NAME.DOMAIN`` host, a 400, or None (another host)."""
    if not _HOST.fullmatch(host):
        return bad_host("the Host header is malformed")
    text = host.decode("ascii").lower()
    port = text.rpartition("]")[2].partition(":")[2]
    if port and int(port) > 65535:
        return bad_host("the Host header's port is out of range")
    if text.startswith("["):
        return None  # an IPv6 literal: not under any domain
    name = text.partition(":")[0].removesuffix(".")
    if name in domains:
        return None  # a bare domain, even one under another (a.example.com, example.com)
    for domain in sorted(domains, key=len, reverse=True):  # the most specific first
        if name.endswith("." + domain):
            label = name[: -len(domain) - 1]
            if "." in label:
                return bad_host(f"the Host names more than one label under {domain}")
            if not valid_agent_name(label):
                return bad_host(f"the Host's first label is not an agent name: {NAME_RULE}")
            return label
    return None


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
    return Route(name, b"/" + rest + (b"?" + query if query else b""), f"/a/{name}")


def public_view(
    headers: Iterable[tuple[bytes, bytes]], scheme: str, *, trusted: bool
) -> tuple[str, bytes | None]:
    """(scheme, host) the public used to reach the gateway: the connection's
    own, or what a trusted proxy says (X-Forwarded-Proto / -Host, the last)."""
    host: bytes | None = None
    said_proto: bytes | None = None
    said_host: bytes | None = None
    for name, value in headers:
        if name == b"host" and host is None:
            host = value
        elif name == b"x-forwarded-proto":
            said_proto = value.rpartition(b",")[2].strip().lower()  # the nearest proxy's
        elif name == b"x-forwarded-host":
            said_host = value.strip()
    if trusted:
        if said_proto in (b"http", b"https"):
            scheme = said_proto.decode("ascii")
        host = said_host or host
    return scheme, host


def public_urls(name: str, host: bytes | None, domains: Sequence[str], scheme: str) -> list[str]:
    """The URLs that reach agent ``name``, for a gateway reached at ``host``
    (the Host its agent dialed): ``NAME.DOMAIN`` per domain (the same port),
    then ``/a/NAME/`` on that host (on the bare domain if ``host`` is itself
    an agent's)."""
    authority, port = "", ""
    if host is not None and _HOST.fullmatch(host):
        authority = host.decode("ascii").lower()
        if not authority.startswith("["):
            hostname, _, port = authority.partition(":")
            for domain in domains:
                if hostname.removesuffix(".").endswith("." + domain):
                    authority = domain + (f":{port}" if port else "")
        else:
            port = authority.rpartition("]")[2].removeprefix(":")
    urls = [f"{scheme}://{name}.{domain}{':' + port if port else ''}/" for domain in domains]
    if authority:
        urls.append(f"{scheme}://{authority}/a/{name}/")
    return urls


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
            # (OPTIONS *: the server as a whole, that is its prefix)
            star = target == b"*"
            target = (upstream.prefix or target) if star else upstream.prefix + target
        return request_head(self.method, target, [(b"host", host), *self.headers, *framing])


def forward(
    registry: Registry,
    found: Route,
    method: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client: str | None,
    proto: str,
    trusted: bool = False,
    drop_authorization: bool = False,
) -> Forward | Reply:
    """Where a routed public request goes, or the reply that answers it
    instead (503 ``agent_offline``). The agent is looked up through the
    Registry interface only. ``headers`` are lower-cased; ``trusted``: they
    come from a ``--trusted-proxy`` (its X-Forwarded-* are believed)."""
    session = registry.lookup(found.name)
    if session is None or not session.accepting:
        return agent_offline(found.name)
    items = list(headers)
    host = found.authority or b""
    if not host:
        for name, value in items:
            if name == b"host":
                host = value
                break
    forwarded = forwarded_request_headers(
        items,
        client=client,
        proto=proto,
        host=host or None,
        prefix=found.prefix or None,
        trusted=trusted,
    )
    # The gateway answers Expect: 100-continue itself, and frames the body itself;
    # basic auth checked by the gateway is the gateway's, not the upstream's.
    dropped = _NOT_FORWARDED_AUTH if drop_authorization else _NOT_FORWARDED
    forwarded = [(n, v) for n, v in forwarded if n not in dropped]
    return Forward(found.name, session, method, found.target, host, forwarded)


_NOT_FORWARDED = frozenset({b"expect", b"content-length"})
_NOT_FORWARDED_AUTH = _NOT_FORWARDED | {b"authorization"}
