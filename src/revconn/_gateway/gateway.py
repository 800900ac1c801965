"""The gateway: accepts agent tunnels, forwards public requests, lists who is online.

``Gateway.serve()`` runs the two surfaces and owns everything they share:

* the **data plane** on ``binds`` (``--bind``): the lean trio listener
  (``listener.py`` + ``exchange.py``) serving agents (``GET /ws/connect``,
  and ``PUT/DELETE /announce`` for announced URLs), public traffic
  (``ANY /a/NAME/...``, through a tunnel or to an announced URL) and
  ``GET /healthz``;
* the **operator surface** on ``admin_binds`` (``--admin-bind``): one
  QuartTrio app on hypercorn (``admin.py``; ``Gateway.admin_app``).

With ``certfile``/``keyfile`` both serve HTTPS/WSS with one TLS context
(``tls.py``); ``reload_tls()`` reads the files again for new connections.

The gateway itself decides who may connect (``admit_agent``), runs each
admitted agent's tunnel (``serve_agent``) and drains them on shutdown.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from urllib.parse import parse_qs

import attrs
import trio
from prometheus_client import CollectorRegistry, generate_latest

from .. import _codes
from .._errors import ConfigError, ConnectionLost, ProtocolError, RevconnTimeout
from .._proto.rules import MAX_MESSAGE_SIZE
from .._proto.session import Role, TunnelSession
from .._runtime.heartbeat import Heartbeat, HeartbeatScheduler
from .._runtime.transport import MessageTransport
from .._runtime.tunnel import Tunnel, TunnelEnd
from .._stats import RTT_BUCKETS, Histogram
from .access import AccessPolicy, parse_access
from .addresses import AddressPolicy, parse_networks, peer_in
from .admin import make_admin_app, serve_admin
from .announcing import Announcements
from .auth import Admission, AuthPolicy, Grant, TokenPolicy, admit_agent_name
from .events import EVENTS_CAPACITY, EventStreams, presence
from .exchange import RequestLimits
from .listener import Listener, listen_all, parse_bind, socket_url
from .metrics import GatewayCollector, Presence, count_presence, stats_json
from .ratelimit import FailureLimiter
from .registry import (
    REASON_CLOSED,
    InMemoryRegistry,
    PresenceSnapshot,
    Registration,
    Registry,
    RegistryEvent,
)
from .replies import Reply, json_reply
from .routing import check_domain
from .tls import ServerTLS
from .tokens import RevocationList
from .traffic import Traffic

__all__ = ["Gateway", "GatewayConfig"]

log = logging.getLogger("revconn.gateway")

CLOSE_GRACE = 2.0  # after forcing tunnels closed, how long to let them say goodbye
REVOKED_POLL = 0.5  # how often --revoked-file is checked for a change (seconds)


OFFLINE_REASONS = frozenset(
    {
        _codes.REASON_REPLACED,
        _codes.REASON_SHUTDOWN,
        _codes.REASON_HEARTBEAT,
        _codes.REASON_PROTOCOL,
        _codes.REASON_REVOKED,
        _codes.REASON_EXPIRED,
    }
)
REASON_LOST = "connection lost"


def offline_reason(end: TunnelEnd) -> str:
    """The ``offline`` event's reason for a tunnel that ended so: the
    gateway's own reason (one of OFFLINE_REASONS: replaced, shutdown, ...),
    "closed" (the agent said goodbye, whatever its words) or "connection
    lost" (the socket broke without one)."""
    if end.by_peer:
        if end.error is None or end.reason == _codes.REASON_SHUTDOWN:
            return REASON_CLOSED  # (its GOAWAY: an agent stopping says "shutdown")
        if isinstance(end.error, ProtocolError):
            return _codes.REASON_PROTOCOL
        return REASON_LOST
    if end.reason in OFFLINE_REASONS:
        return end.reason
    if isinstance(end.error, ConnectionLost):
        return REASON_LOST
    return REASON_CLOSED


async def _close_at_expiry(tunnel: Tunnel, expires_at: int, name: str, remote: str) -> None:
    """Close ``tunnel`` (GOAWAY ``credential expired``, close 4401) when its
    token expires (``expires_at``: Unix time)."""
    await trio.sleep(max(0.0, expires_at - time.time()))
    log.info("agent %r from %s: its token expired, closing its tunnel", name, remote)
    tunnel.request_close(_codes.WS_CREDENTIAL_EXPIRED, _codes.REASON_EXPIRED)


@attrs.frozen
class GatewayConfig:
    """Gateway settings. Binds use port 0 to pick a free port."""

    binds: tuple[str, ...] = ("127.0.0.1:8080",)
    """The data plane: agents, public traffic, ``/healthz``."""
    admin_binds: tuple[str, ...] = ("127.0.0.1:8081",)
    """The operator surface (``/endpoints``, ``/healthz``); empty: not served."""
    idle_timeout: float = 60.0
    """Data-plane connections: keep-alive idle time and time allowed for a request head."""
    body_timeout: float = 60.0
    """Seconds a public request's body may stall (no byte from the client) before 408."""
    max_pending_connections: int | None = 1024
    """Data-plane connections waiting for a request head at once (new ones
    beyond are closed at once); None: no limit."""
    heartbeat: Heartbeat = Heartbeat()
    handshake_timeout: float = 10.0
    max_message_size: int = MAX_MESSAGE_SIZE
    access_log: bool = False
    """One INFO line per request for an agent (logger ``revconn.access``:
    agent, method, path without query, status, bytes, duration)."""
    metrics: bool = True
    """Count forwarded requests (``/metrics``, ``/stats``, the dashboard's
    counters); False: the data plane counts nothing (``--no-metrics``)."""
    metrics_per_agent: bool = False
    """Label request metrics with the agent's name (one series per agent:
    mind the cardinality; ``--metrics-per-agent``)."""
    max_streams_per_agent: int | None = 128
    """Requests in flight to one agent at once (503 ``agent_busy`` beyond;
    the agent's own ``--max-streams`` applies too); None: the agent's only."""
    backlog: int = 4096
    graceful_timeout: float = 5.0
    """On shutdown: how long requests in flight may take before tunnels are closed."""
    tcp_user_timeout: float | None = None
    """Seconds unacknowledged data may sit before the kernel drops a data-plane
    socket; default: heartbeat interval + timeout."""
    domains: tuple[str, ...] = ()
    """``--domain``: a request for ``NAME.DOMAIN`` goes to agent NAME (path unchanged)."""
    max_request_head: int = 16 * 1024
    """Request line + header fields of a public request, bytes (431 beyond)."""
    max_header_fields: int = 100
    max_request_target: int = 8 * 1024
    """Bytes (414 beyond)."""
    max_body_size: int | None = None
    """Public request bodies, bytes (413); None: no limit."""
    max_agents: int | None = None
    """Agent tunnels this gateway holds at once (503 ``too_many_agents`` for the next)."""
    agent_basic_auth: tuple[str, ...] = attrs.field(default=(), repr=False)
    """``--agent-basic-auth NAME=USER:PASSWORD``: the public side of NAME needs it."""
    agent_allow: tuple[str, ...] = ()
    """``--agent-allow NAME=CIDR``: only these clients reach NAME."""
    trusted_proxies: tuple[str, ...] = ()
    """``--trusted-proxy``: CIDRs whose X-Forwarded-For/-Proto/-Host are believed."""
    announce_allow: tuple[str, ...] = ()
    """CIDRs announced URLs may resolve to besides public addresses (``--announce-allow``)."""
    announce_timeout: float = 60.0
    """How long an announced URL's service may stay silent once a request is sent."""
    certfile: str | None = None
    """``--certfile``: PEM certificate (then its chain); with ``keyfile``, both
    surfaces serve HTTPS/WSS (TLS 1.2+)."""
    keyfile: str | None = None
    """``--keyfile``: the certificate's PEM private key, unencrypted."""
    auth_failures: int = 10
    """Failed authentications a source address (an IPv6 /64) may make per
    ``auth_failure_window`` before it is refused (429) until the window ends."""
    auth_failure_window: float = 60.0
    """Seconds: the window ``auth_failures`` are counted in, from the first."""

    def __attrs_post_init__(self) -> None:
        if not self.binds:
            raise ConfigError("at least one --bind is needed")
        if (self.certfile is None) != (self.keyfile is None):
            given, missing = "--certfile", "--keyfile"
            if self.certfile is None:
                given, missing = missing, given
            raise ConfigError(
                f"{given} without {missing}: give both for HTTPS, or neither for plain HTTP"
            )
        for bind in self.binds:
            parse_bind(bind, "--bind")
        for bind in self.admin_binds:
            parse_bind(bind, "--admin-bind")
        parse_networks(self.announce_allow)
        parse_networks(self.trusted_proxies, "--trusted-proxy")
        parse_access(self.agent_basic_auth, self.agent_allow)
        for flag, number, low in (
            ("--max-request-head", self.max_request_head, 1024),
            ("--max-header-fields", self.max_header_fields, 1),
            ("--max-request-target", self.max_request_target, 16),
            ("--max-body-size", self.max_body_size, 0),
            ("--max-agents", self.max_agents, 1),
            ("--max-pending-connections", self.max_pending_connections, 1),
            ("--max-streams-per-agent", self.max_streams_per_agent, 1),
            # (a tunnel's own messages are up to 256 KiB: _runtime/tunnel.MAX_MESSAGE)
            ("--max-message-size", self.max_message_size, 256 * 1024),
        ):
            if number is not None and number < low:
                raise ConfigError(f"{flag} {number}: must be at least {low}")
        for domain in self.domains:
            check_domain(domain)
        if self.auth_failures < 1:
            raise ConfigError(f"auth failures must be >= 1, got {self.auth_failures!r}")
        for label, value in (
            ("auth failure window", self.auth_failure_window),
            ("idle timeout", self.idle_timeout),
            ("body timeout", self.body_timeout),
            ("handshake timeout", self.handshake_timeout),
            ("announce timeout", self.announce_timeout),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{label} must be > 0 seconds, got {value!r}")
        if not (math.isfinite(self.graceful_timeout) and self.graceful_timeout >= 0):
            raise ConfigError(f"--grace-period must be >= 0 seconds, got {self.graceful_timeout!r}")

    @property
    def effective_tcp_user_timeout(self) -> float:
        """``tcp_user_timeout``, or if unset heartbeat interval + timeout (seconds)."""
        if self.tcp_user_timeout is not None:
            return self.tcp_user_timeout
        return self.heartbeat.interval + self.heartbeat.timeout


class Gateway:
    """The revconn gateway: ``serve()`` runs it; ``admin_app`` is its operator
    surface as an ASGI app."""

    def __init__(
        self,
        config: GatewayConfig,
        auth: AuthPolicy,
        registry: Registry | None = None,
        *,
        address_policy: AddressPolicy | None = None,
        url_ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``address_policy``: which addresses announced URLs may reach
        (default: public ones and ``config.announce_allow``);
        ``url_ssl_context``: verifies https announced URLs (default: the
        system's CAs).

        ConfigError if ``config.certfile``/``keyfile`` cannot be loaded (it
        names the file and OpenSSL's reason)."""
        self.config = config
        self._tls: ServerTLS | None = None
        if config.certfile is not None and config.keyfile is not None:
            self._tls = ServerTLS(config.certfile, config.keyfile)
        self.auth = auth
        self.auth_limiter = FailureLimiter(config.auth_failures, config.auth_failure_window)
        """Failed authentications per source address, on every surface."""
        self.registry: Registry = registry if registry is not None else InMemoryRegistry()
        policy = address_policy or AddressPolicy(parse_networks(config.announce_allow))
        self._trusted_proxies = parse_networks(config.trusted_proxies, "--trusted-proxy")
        self.access = AccessPolicy(parse_access(config.agent_basic_auth, config.agent_allow))
        self._limits = RequestLimits(
            max_head=config.max_request_head,
            max_fields=config.max_header_fields,
            max_target=config.max_request_target,
            max_body=config.max_body_size,
            body_timeout=config.body_timeout,
            upgrade_timeout=config.handshake_timeout,
        )
        self.announcements = Announcements(
            self.registry,
            auth,
            policy,
            timeout=config.announce_timeout,
            connect_timeout=config.handshake_timeout,
            ssl_context=url_ssl_context,
            limiter=self.auth_limiter,
        )
        self._tunnels: dict[Tunnel, Grant] = {}
        """Each tunnel held here and the grant it was admitted with."""
        self._service_nursery: trio.Nursery | None = None
        self._heartbeats: HeartbeatScheduler | None = None
        self._shutting_down = False
        self._drained = trio.Event()
        self.urls: list[str] = []
        """The data plane's URLs, once ``serve()`` has started (ports resolved)."""
        self.admin_urls: list[str] = []
        """The operator surface's URLs, once ``serve()`` has started."""
        self.traffic: Traffic | None = Traffic() if config.metrics else None
        """What the data plane counts (None with ``metrics=False``)."""
        self.presence = Presence()
        """Connects, disconnects and replacements (counted while ``serve()`` runs)."""
        self.rtt = Histogram(RTT_BUCKETS)
        """Heartbeat round trips."""
        self._collector = GatewayCollector(self)
        self.metrics_registry = CollectorRegistry(auto_describe=False)
        """The gateway's Prometheus registry (``GET /metrics``)."""
        self.metrics_registry.register(self._collector)
        self.listener: Listener | None = None
        """The data plane's listener while ``serve()`` runs (its ``pending`` line)."""
        self.event_streams = EventStreams()
        """The ``/events`` responses in progress (``serve()`` ends them at shutdown)."""
        self.admin_app = make_admin_app(self)

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``: what the data plane tells upstreams
        in X-Forwarded-Proto, and what its URLs start with."""
        return "http" if self._tls is None else "https"

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The one server context both surfaces wrap new connections with."""
        return None if self._tls is None else self._tls.context

    def reload_tls(self) -> None:
        """Read ``--certfile``/``--keyfile`` again (the CLI does on SIGHUP): new
        TLS connections on both surfaces get the new certificate, established
        ones (agent tunnels included) are untouched.

        Raises ConfigError if TLS is off, or if the files cannot be loaded:
        then the current certificate stays in use."""
        if self._tls is None:
            raise ConfigError("no certificate to reload: the gateway runs without --certfile")
        self._tls.reload()
        log.info("TLS certificate reloaded from %s", self._tls.certfile)

    @property
    def idle_timeout(self) -> float:
        """``config.idle_timeout``: keep-alive idle time of data-plane connections."""
        return self.config.idle_timeout

    @property
    def limits(self) -> RequestLimits:
        """The size and time limits of public requests, from the config."""
        return self._limits

    @property
    def max_message_size(self) -> int:
        """``config.max_message_size``: the largest agent WebSocket message, bytes."""
        return self.config.max_message_size

    @property
    def shutting_down(self) -> bool:
        """True once ``begin_shutdown()`` was called."""
        return self._shutting_down

    @property
    def domains(self) -> tuple[str, ...]:
        """``config.domains``: a request for ``NAME.DOMAIN`` goes to agent NAME."""
        return self.config.domains

    def trusts_proxy(self, client: str | None) -> bool:
        """``client`` (an IP address) is a ``--trusted-proxy``: its
        X-Forwarded-For/-Proto/-Host are believed."""
        return peer_in(client, self._trusted_proxies)

    def auth_source(self, remote: str | None, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The address failed authentications from a data-plane peer count
        against: the peer's, or, from a ``--trusted-proxy``, the client it
        names (the last ``X-Forwarded-For`` entry, which that proxy added), so
        that one client behind the proxy cannot lock out everyone else."""
        if self.trusts_proxy(remote):
            said = [v for n, v in headers if n.lower() == b"x-forwarded-for"]
            nearest = said[-1].rpartition(b",")[2].strip().decode("latin-1") if said else ""
            try:
                return str(ipaddress.ip_address(nearest))
            except ValueError:
                pass
        return remote or "unknown"

    def check_access(
        self, name: str, remote: str | None, headers: list[tuple[bytes, bytes]]
    ) -> Reply | None:
        """The refusal (403, or 401 for basic auth) for a public request to
        agent ``name`` under ``--agent-allow``/``--agent-basic-auth``, or
        None to let it through."""
        if not self.access:
            return None
        return self.access.check(name, self.auth_source(remote, headers), headers)

    def guards_credentials(self, name: str) -> bool:
        """Agent ``name`` uses basic auth (the Authorization header is then
        not forwarded to it)."""
        return self.access.guards_credentials(name)

    # -- agent tunnels ------------------------------------------------------------
    def admit_agent(
        self,
        query_string: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        remote: str | None = None,
    ) -> Admission | Reply:
        """Check a ``/ws/connect`` upgrade from ``remote`` (the peer's IP
        address): the agent's name and grant, or the refusal to answer with
        (429 too many failed authentications, 400 invalid name, 401 bad,
        expired or revoked credentials, 403 a token for another name or scope,
        503 shutting down or too many agents)."""
        headers = list(headers)
        source = self.auth_source(remote, headers)
        query = parse_qs(query_string.decode("latin-1"))
        admitted = admit_agent_name(
            self.auth,
            query,
            headers,
            shutting_down=self._shutting_down,
            limiter=self.auth_limiter,
            source=source,
            surface="/ws/connect",
        )
        limit = self.config.max_agents
        if (
            isinstance(admitted, Admission)
            and limit is not None
            and len(self._tunnels) >= limit
            # (a reconnecting agent replaces itself)
            and self.registry.lookup(admitted.name) is None
        ):
            log.warning(
                "agent %r from %s refused: %d agents online (--max-agents)",
                admitted.name,
                source,
                limit,
            )
            detail = f"this gateway holds at most {limit} agents"
            return json_reply(
                503, {"error": "too_many_agents", "detail": detail}, [(b"retry-after", b"30")]
            )
        if isinstance(admitted, Admission) and remote is not None and source != remote:
            admitted = attrs.evolve(admitted, via=source)  # a trusted proxy named the agent
        return admitted

    async def announce(
        self,
        method: bytes,
        query_string: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        remote: str,
    ) -> Reply:
        """Answer ``PUT``/``DELETE /announce`` (an agent in ``--tunnel-url`` mode)."""
        headers = list(headers)
        return await self.announcements.handle(
            method,
            query_string,
            headers,
            body,
            remote=remote,
            source=self.auth_source(remote, headers),
            shutting_down=self._shutting_down,
        )

    async def serve_agent(
        self, admission: Admission, transport: MessageTransport, remote: str
    ) -> None:
        """Run an admitted agent's tunnel over ``transport`` (an accepted WebSocket)
        until it ends: handshake, register, serve, unregister. A token's
        tunnel is closed when the token expires or is revoked."""
        name, grant = admission.name, admission.grant
        if admission.via is not None:  # behind a --trusted-proxy: the agent's own address
            remote = admission.via
        registration: Registration | None = None
        reason = REASON_CLOSED

        def on_end(end: TunnelEnd) -> None:
            # Drop the agent from the registry now, even if the socket cannot be
            # written any more (the goodbye is bounded by CLOSE_TIMEOUT).
            nonlocal reason
            reason = offline_reason(end)
            if registration is not None and self._service_nursery is not None:
                self._service_nursery.start_soon(self.registry.unregister, registration, reason)

        tunnel = Tunnel(
            TunnelSession(Role.GATEWAY),
            transport,
            heartbeat=self.config.heartbeat,
            handshake_timeout=self.config.handshake_timeout,
            on_end=on_end,
            max_streams=self.config.max_streams_per_agent,
        )
        try:
            await tunnel.handshake()
        except (RevconnTimeout, ProtocolError, ConnectionLost) as exc:
            log.info("agent %r from %s: handshake failed: %s", name, remote, exc)
            return
        self._tunnels[tunnel] = grant
        try:
            if isinstance(self.auth, TokenPolicy) and self.auth.is_revoked(grant.token_id):
                # (revoked between the upgrade and the end of the handshake)
                tunnel.request_close(_codes.WS_REVOKED, _codes.REASON_REVOKED)
            elif grant.expires_at is not None and grant.expires_at <= time.time():
                tunnel.request_close(_codes.WS_CREDENTIAL_EXPIRED, _codes.REASON_EXPIRED)
            if tunnel.end is not None:
                # Never registered: it must not replace the agent holding the name.
                await tunnel.serve(self._heartbeats)  # (says goodbye, closes)
                return
            registration = await self.registry.register(
                name, tunnel, remote=remote, version=admission.version
            )
            log.info(
                "agent %r online from %s (epoch %d, %s)",
                name,
                remote,
                registration.epoch,
                grant.describe(),
                extra={
                    "event": "online",
                    "agent": name,
                    "epoch": registration.epoch,
                    "remote": remote,
                },
            )
            if self._shutting_down:
                tunnel.drain(_codes.WS_GOING_AWAY, _codes.REASON_SHUTDOWN)
            if grant.expires_at is None:
                end = await tunnel.serve(self._heartbeats)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_close_at_expiry, tunnel, grant.expires_at, name, remote)
                    end = await tunnel.serve(self._heartbeats)
                    nursery.cancel_scope.cancel()
            log.info(
                "agent %r offline (epoch %d): %s%s",
                name,
                registration.epoch,
                end.reason or f"close {end.close_code}",
                f" ({end.error})" if isinstance(end.error, ProtocolError) else "",
                extra={
                    "event": "offline",
                    "agent": name,
                    "epoch": registration.epoch,
                    "remote": remote,
                    "reason": offline_reason(end),
                },
            )
        finally:
            self._tunnels.pop(tunnel, None)
            if registration is not None:
                with trio.CancelScope(shield=True):
                    await self.registry.unregister(registration, reason)
            # (drained: every tunnel ended and, in this registry, unregistered)
            if self._shutting_down and not self._tunnels:
                self._drained.set()

    # -- metrics ----------------------------------------------------------------------
    @property
    def auth_refusals(self) -> dict[str, int]:
        """Refused credentials by reason, since the start: for ``/metrics``."""
        return self.auth_limiter.refusals

    @property
    def evicted_connections(self) -> int:
        """Data-plane connections still waiting for a request head that were
        closed to make room for a newer one (``max_pending_connections``)."""
        return 0 if self.listener is None else self.listener.pending.evicted

    @property
    def access_log(self) -> bool:
        """``config.access_log``: one INFO line per request for an agent."""
        return self.config.access_log

    @property
    def per_agent_metrics(self) -> bool:
        """``config.metrics_per_agent``: request metrics are labelled by agent."""
        return self.config.metrics_per_agent

    async def metrics_text(self) -> bytes:
        """``GET /metrics``: the Prometheus text exposition of this gateway."""
        self._collector.agents = await self.registry.snapshot()
        return generate_latest(self.metrics_registry)

    async def stats(self) -> dict[str, object]:
        """``GET /stats``: the online agents with their counters (the dashboard's)."""
        return stats_json(self, await self.registry.snapshot())

    # -- presence ---------------------------------------------------------------------
    def events(
        self, capacity: int = EVENTS_CAPACITY
    ) -> AsyncGenerator[PresenceSnapshot | RegistryEvent, None]:
        """Presence changes, as ``GET /events`` streams them: first a
        ``PresenceSnapshot`` of every online agent, then each ``online``,
        ``offline`` (with its reason) and ``replaced`` event after it, without
        gap or duplicate (``seq``). ``EventsOverflow`` if the consumer falls
        ``capacity`` events behind (the registry never waits for it)::

            async with contextlib.aclosing(gateway.events()) as events:
                async for event in events:
                    ...
        """
        return presence(self.registry, capacity)

    # -- revocation -----------------------------------------------------------------
    async def revoke(self, token_ids: Iterable[str]) -> int:
        """Close every live session admitted with one of ``token_ids`` now:
        tunnels get GOAWAY ``revoked`` and close 4403 (requests in flight on
        them fail with 502), announced URLs are withdrawn. Returns how many
        sessions were closed."""
        ids = frozenset(token_ids)
        closed = 0
        for tunnel, grant in list(self._tunnels.items()):
            if grant.token_id in ids and tunnel.end is None:
                tunnel.request_close(_codes.WS_REVOKED, _codes.REASON_REVOKED)
                closed += 1
        closed += self.event_streams.revoke(ids)  # (admin tokens' /events streams)
        return closed + await self.announcements.revoke(ids)

    async def reload_revoked(self) -> None:
        """Read ``--revoked-file`` again (the CLI does on SIGHUP; ``serve()``
        when the file changes) and close the sessions of every token it lists.
        ConfigError (the current list stays in force) if it cannot be read."""
        auth = self.auth
        if not isinstance(auth, TokenPolicy) or auth.revoked is None:
            raise ConfigError("no revoked-tokens file to reload: the gateway runs without one")
        added = auth.revoked.reload()
        closed = await self.revoke(auth.revoked.ids)
        log.info(
            "revoked tokens reloaded from %s: %d listed (%d new), %d live sessions closed",
            auth.revoked.path,
            len(auth.revoked.ids),
            len(added),
            closed,
        )

    async def _watch_revoked(self, revoked: RevocationList) -> None:
        """Reload ``--revoked-file`` within REVOKED_POLL of a change."""
        while True:
            await trio.sleep(REVOKED_POLL)
            if revoked.changed():
                try:
                    await self.reload_revoked()
                except ConfigError as exc:
                    log.error("revoked-tokens file not reloaded, the current list stays: %s", exc)  # noqa: TRY400

    def begin_shutdown(self) -> None:
        """Refuse new agents (503) and new requests; each tunnel says goodbye
        (GOAWAY "shutdown", close 1001) once its in-flight requests are done."""
        self._shutting_down = True
        if not self._tunnels:
            self._drained.set()
        for tunnel in list(self._tunnels):
            tunnel.drain(_codes.WS_GOING_AWAY, _codes.REASON_SHUTDOWN)

    def close_all_agents(self) -> None:
        """Shut down now: every tunnel gets GOAWAY "shutdown" and close 1001,
        requests in flight fail with 502 agent_disconnected."""
        self.begin_shutdown()
        for tunnel in list(self._tunnels):
            tunnel.request_close(_codes.WS_GOING_AWAY, _codes.REASON_SHUTDOWN)

    # -- serving ------------------------------------------------------------------
    async def serve(
        self,
        *,
        shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until ``shutdown_trigger`` returns (or forever); reports the data
        plane's URLs (``admin_urls`` is set by then too).

        Shutdown: new agents and requests get 503 while the requests in flight
        finish (up to ``graceful_timeout``), then every tunnel is closed."""
        cfg = self.config
        data = listen_all(cfg.binds, cfg.backlog, cfg.effective_tcp_user_timeout, "--bind")
        try:
            admin = listen_all(cfg.admin_binds, cfg.backlog, None, "--admin-bind")
        except BaseException:
            for sock in data:
                sock.close()
            raise
        self.urls = [socket_url(sock, self.scheme) for sock in data]
        self.admin_urls = [socket_url(sock, self.scheme) for sock in admin]
        admin_stop = trio.Event()
        admin_done = trio.Event()

        async def run_admin(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve_admin(
                    self.admin_app,
                    admin,
                    graceful_timeout=cfg.graceful_timeout,
                    shutdown_trigger=admin_stop.wait,
                    tls=self.tls_context,
                    handshake_timeout=cfg.handshake_timeout,
                    task_status=task_status,
                )
            finally:
                admin_done.set()

        async with trio.open_nursery() as nursery:
            scheduler = HeartbeatScheduler(cfg.heartbeat, on_rtt=self.rtt.observe)
            await nursery.start(scheduler.run)
            await nursery.start(count_presence, self.registry, self.presence)
            nursery.start_soon(self.registry.expire_announcements)
            nursery.start_soon(self.announcements.prune_idle)
            if isinstance(self.auth, TokenPolicy) and self.auth.revoked is not None:
                nursery.start_soon(self._watch_revoked, self.auth.revoked)
            self._heartbeats = scheduler
            self._service_nursery = nursery
            listener = Listener(
                self,
                tls=self.tls_context,
                handshake_timeout=cfg.handshake_timeout,
                max_pending=cfg.max_pending_connections,
            )
            self.listener = listener
            await nursery.start(listener.serve, data)
            if admin:
                await nursery.start(run_admin)
            else:
                admin_done.set()
            task_status.started(self.urls)
            await (shutdown_trigger or trio.sleep_forever)()
            # Let requests in flight finish (up to graceful_timeout), then force.
            self.begin_shutdown()
            with trio.move_on_after(cfg.graceful_timeout):
                await self._drained.wait()
            self.close_all_agents()
            with trio.move_on_after(CLOSE_GRACE):
                await self._drained.wait()
            self.event_streams.close()  # (after the agents' offline events: drained)
            admin_stop.set()
            with trio.move_on_after(CLOSE_GRACE):
                await admin_done.wait()
            self.announcements.close_all()
            nursery.cancel_scope.cancel()
        self._service_nursery = None
        self._heartbeats = None
