"""The agent: dials the gateway, keeps the tunnel up, redials with backoff."""

from __future__ import annotations

import logging
import math
import random
import ssl
from collections.abc import Callable
from urllib.parse import quote, urlsplit, urlunsplit

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from . import _codes
from ._errors import (
    AuthError,
    ConfigError,
    ConnectError,
    ConnectionLost,
    HandshakeTimeout,
    RemoteProtocolError,
    ReplacedError,
    RevconnError,
)
from ._gateway import MAX_MESSAGE_SIZE, valid_agent_name
from ._session import Role, TunnelSession
from ._supervisor import Backoff, Supervisor, SupervisorStatistics
from ._tunnel import Heartbeat, Tunnel

__all__ = ["Agent", "AgentConfig", "tunnel_url"]

log = logging.getLogger("revconn.agent")


def tunnel_url(gateway: str, name: str) -> str:
    """The WebSocket URL an agent dials: ``ws(s)://host[:port][/prefix]/ws/connect?name=NAME``.

    ``gateway`` may use http, https, ws or wss; a path is kept as a prefix.
    """
    try:
        parts = urlsplit(gateway)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"gateway URL {gateway!r} is malformed: {exc}") from None
    scheme = {"http": "ws", "ws": "ws", "https": "wss", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None:
        raise ConfigError(
            f"gateway URL {gateway!r} must start with http://, https://, ws:// or wss://"
        )
    if not parts.hostname:
        raise ConfigError(f"gateway URL {gateway!r} has no host")
    if parts.query or parts.fragment:
        raise ConfigError(f"gateway URL {gateway!r} must not carry a query or fragment")
    if parts.username or parts.password:
        raise ConfigError(
            f"gateway URL {gateway!r} must not carry credentials: use --secret or REVCONN_SECRET"
        )
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    path = parts.path.rstrip("/")
    if not path.endswith("/ws/connect"):
        path += "/ws/connect"
    return urlunsplit((scheme, netloc, path, f"name={quote(name)}", ""))


@attrs.frozen
class AgentConfig:
    """Agent settings; validated on construction (ConfigError names the problem)."""

    gateway: str
    name: str
    secret: str = attrs.field(repr=False)
    upstream: str | None = None
    backoff: Backoff = Backoff()
    heartbeat: Heartbeat = Heartbeat()
    handshake_timeout: float = 10.0
    stable_after: float = 10.0

    def __attrs_post_init__(self) -> None:
        if not valid_agent_name(self.name):
            raise ConfigError(
                f"agent name {self.name!r} is not a lowercase DNS label "
                "(letters a-z, digits and '-', 1-63 characters, no leading or trailing '-')"
            )
        if not self.secret:
            raise ConfigError("no secret: pass --secret or set REVCONN_SECRET")
        if not (math.isfinite(self.handshake_timeout) and self.handshake_timeout > 0):
            raise ConfigError("handshake timeout must be > 0 seconds")
        tunnel_url(self.gateway, self.name)  # validates

    @property
    def url(self) -> str:
        return tunnel_url(self.gateway, self.name)


class _WebSocketTransport:
    """A trio-websocket connection as a MessageTransport."""

    __slots__ = ("_ws",)

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws

    async def send_message(self, data: bytes) -> None:
        try:
            await self._ws.send_message(data)
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    async def receive_message(self) -> bytes:
        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise _lost(exc) from None
        if isinstance(message, str):
            raise RemoteProtocolError("gateway sent a text message on the binary tunnel")
        return message

    async def close(self, code: int, reason: str) -> None:
        await self._ws.aclose(code, reason)


def _lost(exc: ConnectionClosed) -> ConnectionLost:
    reason = exc.reason
    code = None if reason is None else reason.code
    text = "" if reason is None or not reason.reason else f": {reason.reason}"
    return ConnectionLost(f"websocket closed (code {code}{text})", close_code=code)


class Agent:
    """Keeps one tunnel to the gateway up.

    ``run()`` returns only when cancelled; it raises :class:`AuthError` when
    the gateway rejects the credentials and :class:`ReplacedError` when another
    agent took over the name; other failures are retried with backoff.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        uniform01: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self._ssl_context = ssl_context
        self.tunnel: Tunnel | None = None
        self.connected = trio.Event()
        self._attempt_scope: trio.CancelScope | None = None
        self._supervisor = Supervisor(
            self._connect_once,
            backoff=config.backoff,
            stable_after=config.stable_after,
            uniform01=uniform01,
            on_retry=self._on_retry,
        )

    def statistics(self) -> SupervisorStatistics:
        return self._supervisor.statistics()

    async def run(self) -> None:
        await self._supervisor.run()

    def stop(self) -> None:
        """Make ``run()`` return soon: a connected tunnel says goodbye (GOAWAY
        "shutdown", close 1001); a connection attempt or backoff wait is abandoned."""
        self._supervisor.stop()
        if self.tunnel is not None:
            self.tunnel.request_close(_codes.WS_GOING_AWAY, _codes.REASON_SHUTDOWN)
        elif self._attempt_scope is not None:
            self._attempt_scope.cancel()

    def _on_retry(self, delay: float, error: BaseException | None) -> None:
        log.info("retry in %.1f s", delay)

    async def _connect_once(self, connected: Callable[[], None]) -> None:
        cfg = self.config
        log.info("connecting to %s as %r", _redacted(cfg.url), cfg.name)
        try:
            with trio.CancelScope() as self._attempt_scope:
                await self._connect_in_scope(connected)
        finally:
            self._attempt_scope = None

    async def _connect_in_scope(self, connected: Callable[[], None]) -> None:
        cfg = self.config
        async with trio.open_nursery() as nursery:
            ws = await self._open_websocket(nursery)
            tunnel = Tunnel(
                TunnelSession(Role.AGENT),
                _WebSocketTransport(ws),
                heartbeat=cfg.heartbeat,
                handshake_timeout=cfg.handshake_timeout,
            )
            try:
                try:
                    await tunnel.handshake()
                except RevconnError as exc:
                    log.info("disconnected: handshake failed: %s", exc)
                    raise
                self.tunnel = tunnel
                connected()
                self.connected.set()
                log.info("connected as %r", cfg.name)
                end = await tunnel.serve()
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
            log.info("disconnected: %s", _describe(end.reason, end.close_code, error))
            if error is not None:
                raise error

    async def _open_websocket(self, nursery: trio.Nursery) -> WebSocketConnection:
        cfg = self.config
        headers = [(b"authorization", b"Bearer " + cfg.secret.encode("utf-8"))]
        try:
            # connect_websocket waits forever if the server closes mid-handshake.
            with trio.fail_after(cfg.handshake_timeout):
                return await connect_websocket_url(
                    nursery,
                    cfg.url,
                    ssl_context=self._ssl_context,
                    extra_headers=headers,
                    message_queue_size=4,
                    max_message_size=MAX_MESSAGE_SIZE,
                )
        except trio.TooSlowError:
            raise HandshakeTimeout(
                f"WebSocket handshake with the gateway did not complete within "
                f"{cfg.handshake_timeout:g} s"
            ) from None
        except ConnectionRejected as exc:
            if exc.status_code in (401, 403):
                raise AuthError(
                    f"the gateway rejected the credentials (HTTP {exc.status_code}): "
                    "check --secret / REVCONN_SECRET",
                    status=exc.status_code,
                ) from None
            if exc.status_code == 400:
                raise ConfigError(
                    f"the gateway refused the connection as malformed (HTTP 400): "
                    f"{(exc.body or b'').decode('utf-8', 'replace')[:200]}"
                ) from None
            raise ConnectError(
                f"the gateway refused the connection (HTTP {exc.status_code})"
            ) from None
        except (HandshakeError, trio.BrokenResourceError) as exc:
            raise ConnectError(f"WebSocket handshake failed: {exc!r}") from None
        except OSError as exc:
            raise ConnectError(
                f"cannot reach the gateway at {_redacted(cfg.url)}: {exc.strerror or exc}"
            ) from None


def _describe(reason: str, code: int, error: BaseException | None) -> str:
    if error is not None:
        return str(error)
    return reason or f"close code {code}"


def _redacted(url: str) -> str:
    """The URL without its query (the agent name is logged separately)."""
    return url.split("?", 1)[0]
