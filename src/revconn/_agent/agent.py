"""The agent: dials the gateway, keeps the tunnel up, redials with backoff
(tunnel mode); or announces a URL the gateway connects to (announce mode,
``announcer.py``)."""

from __future__ import annotations

import logging
import math
import random
import ssl
from collections.abc import Callable
from functools import partial

import attrs
import trio

from .. import _codes
from .._errors import (
    AuthError,
    ConfigError,
    ConnectionLost,
    FatalError,
    ProtocolVersionError,
    ReplacedError,
    RevconnError,
    RevokedError,
    revconn_error_in,
)
from .._proto.announce import DEFAULT_INTERVAL, MAX_TTL, MIN_TTL, TTL_INTERVALS, parse_url
from .._proto.connect import PUBLIC_URL_HEADER, WS_SUBPROTOCOL
from .._proto.rules import valid_agent_name
from .._proto.session import Role, TunnelSession
from .._runtime import wsmask
from .._runtime.heartbeat import Heartbeat
from .._runtime.streams import TunnelStream
from .._runtime.supervisor import Backoff, Supervisor, SupervisorStatistics
from .._runtime.tunnel import EXPIRED_MESSAGE, REVOKED_MESSAGE, Tunnel, TunnelEnd
from .announcer import Announcer, Exchange
from .dial import (
    HandshakeWatch,
    WebSocketTransport,
    check_plaintext,
    client_context,
    most_telling,
    open_stream,
    open_websocket,
    redacted,
)
from .dial import tunnel_url as websocket_url
from .local import DEFAULT_LISTEN, parse_listen, serve_local
from .monitor import AgentMonitor, disconnect_reason
from .upstream import ASGIApp, AsgiUpstream, HttpUpstream, Upstream

__all__ = ["Agent", "AgentConfig"]

log = logging.getLogger("revconn.agent")


@attrs.frozen
class AgentConfig:
    """Agent settings; validated on construction (ConfigError names the problem).

    With ``tunnel_url`` the agent runs in announce mode: no tunnel, the
    gateway connects to that URL itself; ``listen`` is where an in-process
    app is served then (default 127.0.0.1:8000).

    An ``https``/``wss`` gateway's certificate is verified against the
    system's CAs, or those in ``ca_file``. An ``http``/``ws`` gateway that is
    not on loopback is refused (the secret would cross the network in clear
    text) unless ``insecure_plaintext``.
    """

    gateway: str
    name: str
    secret: str = attrs.field(repr=False)
    upstream: str | None = None
    upstream_timeout: float = 60.0
    max_concurrent_streams: int = 100
    backoff: Backoff = Backoff()
    heartbeat: Heartbeat = Heartbeat()
    handshake_timeout: float = 10.0
    stable_after: float = 10.0
    tunnel_url: str | None = None
    announce_interval: float = DEFAULT_INTERVAL
    listen: str | None = None
    ca_file: str | None = None
    insecure_plaintext: bool = False

    def __attrs_post_init__(self) -> None:
        if not valid_agent_name(self.name):
            raise ConfigError(
                f"agent name {self.name!r} is not a lowercase DNS label "
                "(letters a-z, digits and '-', 1-63 characters, no leading or trailing '-')"
            )
        if not self.secret:
            raise ConfigError("no credential: pass --token (REVCONN_TOKEN) or --secret")
        if not (math.isfinite(self.handshake_timeout) and self.handshake_timeout > 0):
            raise ConfigError("handshake timeout must be > 0 seconds")
        url = websocket_url(self.gateway, self.name)  # validates
        check_plaintext(self.gateway, insecure_plaintext=self.insecure_plaintext)
        if self.ca_file is not None and not url.startswith("wss:"):
            raise ConfigError(
                f"--ca-file is for an https:// (or wss://) gateway, not {self.gateway}"
            )
        if not 1 <= self.max_concurrent_streams <= 10_000:
            raise ConfigError("max concurrent streams must be 1-10000")
        if self.upstream is not None:
            HttpUpstream(self.upstream, agent=self.name, timeout=self.upstream_timeout)
        self._check_announce_mode()

    def _check_announce_mode(self) -> None:
        interval = self.announce_interval
        low, high = MIN_TTL / TTL_INTERVALS, MAX_TTL / TTL_INTERVALS
        if not (math.isfinite(interval) and interval > 0 and low <= interval <= high):
            raise ConfigError(
                f"--announce-interval {interval:g}: must be {low:.3g}-{high:g} seconds "
                f"(an announcement lives {TTL_INTERVALS} intervals, {MIN_TTL:g}-{MAX_TTL:g} s)"
            )
        if self.tunnel_url is not None:
            try:
                parse_url(self.tunnel_url)
            except ValueError as exc:
                raise ConfigError(f"--tunnel-url {self.tunnel_url!r}: {exc}") from None
            if self.upstream is not None:
                raise ConfigError(
                    "--upstream is for tunnel mode; with --tunnel-url the gateway connects "
                    "to URL itself: drop --upstream"
                )
        if self.listen is not None:
            if self.tunnel_url is None:
                raise ConfigError(
                    "--listen is for --tunnel-url (or --no-tunnel): in tunnel mode the app "
                    "is served through the tunnel, on no port"
                )
            parse_listen(self.listen)

    @property
    def url(self) -> str:
        """The WebSocket URL dialed in tunnel mode."""
        return websocket_url(self.gateway, self.name)


class Agent:
    """Keeps one tunnel to the gateway up, or (announce mode) the gateway's
    entry for ``config.tunnel_url``.

    ``run()`` returns after ``stop()`` (announce mode; tunnel mode: when
    cancelled); it raises :class:`AuthError` when the gateway rejects the
    credentials, :class:`ReplacedError` when another agent took over the name
    and :class:`ConfigError` when the URL is not a gateway's (HTTP 400 or 404);
    in announce mode also :class:`FatalError` when a WebSocket agent holds the
    name. Other failures are retried: with backoff, or on the announce schedule.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        app: ASGIApp | None = None,
        ssl_context: ssl.SSLContext | None = None,
        uniform01: Callable[[], float] = random.random,
        announce_exchange: Exchange | None = None,
    ) -> None:
        """Serve ``app`` (an ASGI application, in-process) or ``config.upstream``
        (an HTTP/1.1 URL) through the tunnel; ConfigError with neither.

        ``ssl_context`` verifies an https gateway instead of the system's CAs
        or ``config.ca_file`` (not both: ConfigError).

        In announce mode ``app``, if given, is served on ``config.listen``
        (hypercorn), and ``announce_exchange`` replaces the HTTP requests to
        the gateway (for tests).
        """
        self.config = config
        self.monitor = AgentMonitor()
        """The agent's state and counters (what ``--metrics-bind`` serves)."""
        if ssl_context is not None and config.ca_file is not None:
            raise ConfigError("give either ssl_context or AgentConfig.ca_file, not both")
        if ssl_context is None and config.url.startswith("wss:"):
            ssl_context = client_context(config.ca_file)  # once, not per attempt
        self.tunnel: Tunnel | None = None
        self.public_urls: list[str] = []
        """The URLs that reach this agent, as the gateway said when it last connected."""
        self.connected = trio.Event()
        """Set once connected (tunnel mode: reset at each disconnection) or
        first announced."""
        self._announcer: Announcer | None = None
        self._app = app
        self.upstream: Upstream | None = None
        if config.tunnel_url is not None:
            if app is None and config.listen is not None:
                raise ConfigError(
                    f"--listen {config.listen}: nothing to serve there: pass --app module:attribute"
                )
            self._announcer = Announcer(
                config,
                exchange=announce_exchange,
                ssl_context=ssl_context,
                on_announced=self.connected.set,
                monitor=self.monitor,
            )
        elif app is not None:
            self.upstream = AsgiUpstream(app, agent=config.name, monitor=self.monitor)
        elif config.upstream is not None:
            self.upstream = HttpUpstream(
                config.upstream,
                agent=config.name,
                timeout=config.upstream_timeout,
                monitor=self.monitor,
            )
        else:
            raise ConfigError(
                "the agent has nothing to serve: pass --upstream URL or --app module:attribute "
                "(from Python: AgentConfig(upstream=URL) or Agent(config, app=asgi_app))"
            )
        self._ssl_context = ssl_context
        self._attempt_scope: trio.CancelScope | None = None
        self._told_offline = False
        """The end of a session said "offline: ..." (run() need not say it again)."""
        self._lost: str | None = None
        """How the last session ended, while its retry is being scheduled."""
        self._supervisor = Supervisor(
            self._connect_once,
            backoff=config.backoff,
            stable_after=config.stable_after,
            uniform01=uniform01,
            on_retry=self._on_retry,
        )

    def statistics(self) -> SupervisorStatistics:
        """The connection supervisor's counters (attempts, failures, backoff)."""
        return self._supervisor.statistics()

    async def run(self) -> None:
        """Serve until ``stop()`` (tunnel mode: or cancelled); see the class."""
        stopped = True  # returned, or cancelled (the CLI's grace period ran out)
        try:
            await self._run()
        except BaseException as exc:
            stopped = isinstance(exc, trio.Cancelled)
            fatal = revconn_error_in(exc)
            if fatal is not None and not self._told_offline:
                self.monitor.last_error = str(fatal)
                log.warning(
                    "offline: %s",
                    fatal,
                    extra={"event": "offline", "agent": self.config.name, "reason": "fatal"},
                )
            raise
        finally:
            self.monitor.enter("stopped")
            if stopped:
                log.info("offline: stopped", extra={"event": "stopped", "agent": self.config.name})

    async def _run(self) -> None:
        if self._announcer is not None:
            await self._run_announcing(self._announcer)
            return
        upstream = self.upstream
        assert upstream is not None
        try:
            failed: RevconnError | None = None
            async with upstream.running():
                try:
                    await self._supervisor.run()
                except RevconnError as exc:
                    # Raised once the app's lifespan is over, as itself: not in
                    # an ExceptionGroup of the lifespan's nursery.
                    failed = exc
            if failed is not None:
                raise failed
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 2.0
                await upstream.aclose()

    async def _run_announcing(self, announcer: Announcer) -> None:
        """The announcer, after the app (if any) listens on ``config.listen``;
        after the withdrawal, the app gets its graceful shutdown."""
        if self._app is None:
            await announcer.run()
            return
        listen = self.config.listen or DEFAULT_LISTEN
        withdrawn = trio.Event()
        async with trio.open_nursery() as nursery:
            served = await nursery.start(
                partial(serve_local, self._app, listen, shutdown_trigger=withdrawn.wait)
            )
            log.info("serving the app on %s, to announce as %s", served, announcer.url)
            await announcer.run()
            withdrawn.set()  # on a fatal error the nursery cancels the server instead

    def stop(self) -> None:
        """Make ``run()`` return soon.

        Tunnel mode: a connected tunnel takes no new requests, lets those in
        flight finish, then says goodbye (GOAWAY "shutdown", close 1001); a
        connection attempt or backoff wait is abandoned. Announce mode: the
        announcements stop, the URL is withdrawn (at most 5 s), then a local
        app finishes its requests in flight (3 s). The caller bounds the wait
        (the CLI: 10 s, or a second signal)."""
        if self.monitor.state != "stopped":
            self.monitor.enter("stopping")
        if self._announcer is not None:
            self._announcer.stop()
            return
        self._supervisor.stop()
        if self.tunnel is not None:
            if self.monitor.streams_open:
                log.info(
                    "stopping: no new requests; the %d open stream(s) finish first",
                    self.monitor.streams_open,
                )
            self.tunnel.drain(_codes.WS_GOING_AWAY, _codes.REASON_SHUTDOWN)
        elif self._attempt_scope is not None:
            self._attempt_scope.cancel()

    def _on_retry(self, delay: float, error: BaseException | None) -> None:
        """One line per lost session or failed attempt: why, and when the next one is."""
        self.monitor.enter("retrying", retry_in=delay)
        lost, self._lost = self._lost, None
        level = logging.INFO if error is None else logging.WARNING
        if lost is not None:  # the session was up
            log.log(level, "lost: %s, retry in %s s", lost, _seconds(delay))
            return
        description = str(error) or type(error).__name__
        self.monitor.failed(description)
        log.log(
            level,
            "failed: %s, retry in %s s (attempt %d)",
            description,
            _seconds(delay),
            self.monitor.attempts,
        )

    async def _connect_once(self, connected: Callable[[], None]) -> None:
        cfg = self.config
        self.monitor.attempts += 1
        self.monitor.enter("connecting")
        log.info("connecting to %s as %r", redacted(cfg.url), cfg.name)
        stream: HandshakeWatch | None = None
        try:
            with trio.CancelScope() as self._attempt_scope:
                stream = HandshakeWatch(
                    await open_stream(cfg.url, cfg.handshake_timeout, self._ssl_context)
                )
                await self._connect_in_scope(stream, connected)
        except BaseExceptionGroup as group:
            # trio-websocket's background reader re-raises what the handshake
            # already raised: report the one error that says most.
            not_websocket = None
            if stream is not None and stream.handshaking:
                not_websocket = stream.not_websocket()
            error = most_telling(group, cfg.url, not_websocket=not_websocket)
            if error is None:
                raise
            raise error from None
        finally:
            self._attempt_scope = None

    async def _connect_in_scope(
        self, stream: HandshakeWatch, connected: Callable[[], None]
    ) -> None:
        cfg = self.config
        async with stream, trio.open_nursery() as nursery:
            ws = await open_websocket(nursery, stream, cfg.url, cfg.secret, cfg.handshake_timeout)
            stream.opened()
            if ws.subprotocol != WS_SUBPROTOCOL:
                detail = f"the gateway does not speak {WS_SUBPROTOCOL}"
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + 2.0
                    await ws.aclose(_codes.WS_VERSION_MISMATCH, detail)
                raise ProtocolVersionError(
                    f"{detail} (it runs an older revconn): upgrade the gateway"
                )
            wsmask.enable_trio_websocket(ws)
            tunnel = Tunnel(
                TunnelSession(Role.AGENT, max_concurrent_streams=cfg.max_concurrent_streams),
                WebSocketTransport(ws),
                heartbeat=cfg.heartbeat,
                handshake_timeout=cfg.handshake_timeout,
            )
            try:
                try:
                    await tunnel.handshake()
                except ConnectionLost as exc:
                    if exc.close_code == _codes.WS_VERSION_MISMATCH:
                        raise ProtocolVersionError(f"{exc}: upgrade this agent") from None
                    raise
                self.tunnel = tunnel
                self.public_urls = [
                    v.decode("ascii", "replace")
                    for n, v in ws.handshake_headers
                    if n == PUBLIC_URL_HEADER
                ]
                connected()
                self.connected.set()
                self.monitor.online(self.public_urls)
                # (a gateway that does not say its URLs: an older one)
                online = " and ".join(self.public_urls) or "(no public URL given)"
                log.info(
                    "online: %s (agent %r)",
                    online,
                    cfg.name,
                    extra={"event": "online", "agent": cfg.name},
                )
                end = await tunnel.serve(on_request=self._handle, on_rtt=self.monitor.rtt.observe)
            finally:
                self.tunnel = None
                self.connected = trio.Event()
                # trio-websocket: close before cancelling its reader, or the close
                # waits for its full timeout.
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + 2.0
                    await ws.aclose()
                nursery.cancel_scope.cancel()
            error = end.error
            if isinstance(error, ConnectionLost) and error.close_code == _codes.WS_REPLACED:
                error = ReplacedError("replaced: another agent connected with the same name")
            elif isinstance(error, ConnectionLost) and error.close_code == _codes.WS_REVOKED:
                error = RevokedError(REVOKED_MESSAGE)
            elif (
                isinstance(error, ConnectionLost)
                and error.close_code == _codes.WS_CREDENTIAL_EXPIRED
            ):
                error = AuthError(EXPIRED_MESSAGE)
            elif (
                isinstance(error, ConnectionLost) and error.close_code == _codes.WS_VERSION_MISMATCH
            ):
                error = ProtocolVersionError(f"{end.reason or error}: upgrade this agent")
            self._session_ended(end, error)
            if error is not None:
                raise error

    async def _handle(self, stream: TunnelStream) -> None:
        monitor = self.monitor
        monitor.streams += 1
        monitor.streams_open += 1
        try:
            assert self.upstream is not None
            await self.upstream.handle(stream)
        finally:
            monitor.streams_open -= 1

    def _session_ended(self, end: TunnelEnd, error: RevconnError | None) -> None:
        """Count and tell how the session ended: here when retrying cannot
        help or the agent is stopping, else with the retry (``_on_retry``)."""
        reason = disconnect_reason(end)
        text = str(error) if error is not None else (end.reason or f"close code {end.close_code}")
        if reason == "gateway shutdown":  # (its GOAWAY says only "shutdown")
            described = "the gateway is shutting down"
        else:
            described = text if text.startswith(reason) else f"{reason} ({text})"
        self.monitor.lost(reason, described)
        extra = {"event": "offline", "agent": self.config.name, "reason": reason}
        if reason == "stopped":  # run() says so once it has returned
            log.debug("tunnel closed: stopping", extra=extra)
        elif isinstance(error, FatalError):
            self._told_offline = True
            log.warning("offline: %s", described, extra=extra)
        else:
            self._lost = described
            log.debug("session ended: %s", described, extra=extra)


def _seconds(delay: float) -> str:
    """``2.1`` (tenths; hundredths under a second: backoffs that short are for tests)."""
    return f"{delay:.1f}" if delay >= 1 else f"{delay:.2f}"
