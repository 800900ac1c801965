"""The agent: dials the gateway, keeps the tunnel up, redials with backoff."""

from __future__ import annotations

import logging
import math
import random
import ssl
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from urllib.parse import quote, urlsplit, urlunsplit

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from .. import _codes
from .._errors import (
    AuthError,
    ConfigError,
    ConnectError,
    ConnectionLost,
    FatalError,
    HandshakeTimeout,
    RemoteProtocolError,
    ReplacedError,
    RevconnError,
)
from .._proto.rules import MAX_MESSAGE_SIZE, valid_agent_name
from .._proto.session import Role, TunnelSession
from .._runtime import wsmask
from .._runtime.fastpath import FastSendStream
from .._runtime.heartbeat import Heartbeat
from .._runtime.streams import TunnelStream
from .._runtime.supervisor import Backoff, Supervisor, SupervisorStatistics
from .._runtime.tunnel import Tunnel
from .upstream import ASGIApp, AsgiUpstream, HttpUpstream, Upstream, respond_error

__all__ = ["Agent", "AgentConfig", "tunnel_url"]

log = logging.getLogger("revconn.agent")

RECEIVE_BUFFER = 256 * 1024
_GatewayStream = FastSendStream | trio.SSLStream[trio.SocketStream]


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
    upstream_timeout: float = 60.0
    max_concurrent_streams: int = 100
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
        if not 1 <= self.max_concurrent_streams <= 10_000:
            raise ConfigError("max concurrent streams must be 1-10000")
        if self.upstream is not None:
            HttpUpstream(self.upstream, agent=self.name, timeout=self.upstream_timeout)

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
        app: ASGIApp | None = None,
        ssl_context: ssl.SSLContext | None = None,
        uniform01: Callable[[], float] = random.random,
    ) -> None:
        """Serve ``app`` (an ASGI application, in-process) or ``config.upstream``
        (an HTTP/1.1 URL) through the tunnel; with neither, requests get 502."""
        self.config = config
        self.upstream: Upstream
        if app is not None:
            self.upstream = AsgiUpstream(app, agent=config.name)
        elif config.upstream is not None:
            self.upstream = HttpUpstream(
                config.upstream, agent=config.name, timeout=config.upstream_timeout
            )
        else:
            self.upstream = _NoUpstream(config.name)
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
        wsmask.install()
        try:
            async with self.upstream.running():
                await self._supervisor.run()
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 2.0
                await self.upstream.aclose()

    def stop(self) -> None:
        """Make ``run()`` return soon: a connected tunnel takes no new requests,
        lets those in flight finish, then says goodbye (GOAWAY "shutdown", close
        1001); a connection attempt or backoff wait is abandoned. The caller
        bounds the wait (the CLI: 10 s, or a second signal)."""
        self._supervisor.stop()
        if self.tunnel is not None:
            self.tunnel.drain(_codes.WS_GOING_AWAY, _codes.REASON_SHUTDOWN)
        elif self._attempt_scope is not None:
            self._attempt_scope.cancel()

    def _on_retry(self, delay: float, error: BaseException | None) -> None:
        stats = self._supervisor.statistics()
        if error is not None and stats.connected_since is None and self.tunnel is None:
            log.info("retry in %.2f s (attempt %d failed: %s)", delay, stats.attempts, error)
        else:
            log.info("retry in %.2f s", delay)

    async def _connect_once(self, connected: Callable[[], None]) -> None:
        cfg = self.config
        log.info("connecting to %s as %r", _redacted(cfg.url), cfg.name)
        try:
            with trio.CancelScope() as self._attempt_scope:
                await self._connect_in_scope(connected)
        except BaseExceptionGroup as group:
            # trio-websocket's background reader re-raises what the handshake
            # already raised: report the one error that says most.
            error = _most_telling(group)
            if error is None:
                raise
            raise error from None
        finally:
            self._attempt_scope = None

    async def _connect_in_scope(self, connected: Callable[[], None]) -> None:
        cfg = self.config
        stream = await self._open_stream()
        async with stream, trio.open_nursery() as nursery:
            ws = await self._open_websocket(nursery, stream)
            tunnel = Tunnel(
                TunnelSession(Role.AGENT, max_concurrent_streams=cfg.max_concurrent_streams),
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
                end = await tunnel.serve(on_request=self.upstream.handle)
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

    async def _open_websocket(
        self, nursery: trio.Nursery, stream: _GatewayStream
    ) -> WebSocketConnection:
        cfg = self.config
        parts = urlsplit(cfg.url)
        host = parts.hostname or ""
        default_port = 443 if parts.scheme == "wss" else 80
        host_header = host if parts.port in (None, default_port) else f"{host}:{parts.port}"
        if ":" in host:
            host_header = host_header.replace(host, f"[{host}]", 1)
        headers = [(b"authorization", b"Bearer " + cfg.secret.encode("utf-8"))]
        try:
            # trio-websocket waits forever if the server closes mid-handshake.
            with trio.fail_after(cfg.handshake_timeout):
                return await wrap_client_stream(
                    nursery,
                    # "Wrap an arbitrary stream" (its docstring: trio.abc.Stream;
                    # the annotation is narrower than the code).
                    stream,  # type: ignore[arg-type]
                    host_header,
                    f"{parts.path}?{parts.query}",
                    extra_headers=headers,
                    message_queue_size=4,
                    max_message_size=MAX_MESSAGE_SIZE,
                    # trio-websocket reads 4 KiB at a time by default: a 100 MiB
                    # upload cost ~25,000 recv calls and scheduler passes.
                    receive_buffer_size=RECEIVE_BUFFER,
                )
        except trio.TooSlowError:
            raise HandshakeTimeout(
                f"WebSocket handshake with the gateway did not complete within "
                f"{cfg.handshake_timeout:g} s"
            ) from None
        except (HandshakeError, trio.BrokenResourceError, OSError) as exc:
            raise _map_connect_error(exc, cfg.url) from None

    async def _open_stream(self) -> _GatewayStream:
        """TCP (and TLS for wss) to the gateway; we own and close it, not trio-websocket."""
        cfg = self.config
        parts = urlsplit(cfg.url)
        host = parts.hostname or ""
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        try:
            with trio.fail_after(cfg.handshake_timeout):
                if secure:
                    context = self._ssl_context or ssl.create_default_context()
                    return await trio.open_ssl_over_tcp_stream(
                        host, port, ssl_context=context, https_compatible=True
                    )
                # Plain TCP: each tunnel message trio-websocket writes costs no
                # schedule point when the kernel takes it at once.
                return FastSendStream(await trio.open_tcp_stream(host, port))
        except trio.TooSlowError:
            raise HandshakeTimeout(
                f"could not connect to the gateway within {cfg.handshake_timeout:g} s"
            ) from None
        except OSError as exc:
            raise _map_connect_error(exc, cfg.url) from None


def _map_connect_error(exc: BaseException, url: str) -> RevconnError:
    """A trio-websocket / socket error while dialing, as the revconn error it means."""
    if isinstance(exc, ConnectionRejected):
        status = exc.status_code
        if status in (401, 403):
            return AuthError(
                f"the gateway rejected the credentials (HTTP {status}): "
                "check --secret / REVCONN_SECRET",
                status=status,
            )
        if status == 400:
            body = (exc.body or b"").decode("utf-8", "replace")[:200]
            return ConfigError(
                f"the gateway refused the connection as malformed (HTTP 400): {body}"
            )
        return ConnectError(f"the gateway refused the connection (HTTP {status})")
    if isinstance(exc, OSError):
        return ConnectError(f"cannot reach the gateway at {_redacted(url)}: {exc.strerror or exc}")
    return ConnectError(f"WebSocket handshake failed: {exc!r}")


def _most_telling(group: BaseExceptionGroup[BaseException]) -> RevconnError | None:
    """The revconn error to raise for a group of errors from one attempt.

    None if the group holds anything that must propagate as is (cancellation,
    KeyboardInterrupt, a bug).
    """
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    mapped: list[RevconnError] = []
    for leaf in leaves:
        if isinstance(leaf, RevconnError):
            mapped.append(leaf)
        elif isinstance(leaf, HandshakeError | trio.BrokenResourceError | OSError):
            mapped.append(_map_connect_error(leaf, ""))
        else:
            return None
    fatal = [e for e in mapped if isinstance(e, FatalError)]
    return (fatal or mapped or [None])[0]


class _NoUpstream:
    """Answers every request with 502: the agent was started without an upstream."""

    def __init__(self, agent: str) -> None:
        self.agent = agent

    async def handle(self, stream: TunnelStream) -> None:
        detail = "this agent has no upstream (--upstream URL or --app module:attr)"
        await respond_error(stream, 502, "upstream_unreachable", self.agent, detail)

    async def aclose(self) -> None:
        return None

    def running(self) -> AbstractAsyncContextManager[None]:
        return nullcontext()


def _describe(reason: str, code: int, error: BaseException | None) -> str:
    if error is not None:
        return str(error)
    return reason or f"close code {code}"


def _redacted(url: str) -> str:
    """The URL without its query (the agent name is logged separately)."""
    return url.split("?", 1)[0]
