"""The gateway: accepts agent tunnels and lists who is online.

``Gateway`` is an ASGI application (embed it in any ASGI server that runs on
trio) plus ``serve()``, which runs it on hypercorn's trio worker with the
listening sockets revconn needs (TCP_USER_TIMEOUT, a large backlog).

Routing: ``/ws/connect`` (WebSocket) is a bare ASGI handler, kept off the
Quart request machinery because it is the per-agent hot path (memory and
accept cost); ``/healthz`` and ``/endpoints`` are served by a QuartTrio app.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart import Response
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers

from .. import _codes
from .._errors import (
    ConfigError,
    ConnectionLost,
    ProtocolError,
    RevconnTimeout,
    StreamError,
)
from .._proto.headers import clean_headers
from .._proto.rules import MAX_MESSAGE_SIZE, valid_agent_name
from .._proto.session import Role, TunnelSession
from .._runtime import wsmask
from .._runtime.heartbeat import Heartbeat, HeartbeatScheduler
from .._runtime.streams import TunnelStream
from .._runtime.transport import MessageTransport
from .._runtime.tunnel import Tunnel, TunnelEnd
from .auth import AuthPolicy, Scope, bearer_credential
from .forward import (
    Reply,
    bad_status,
    format_peer,
    forward,
    json_reply,
    stream_failure,
    unauthorized,
)
from .listener import PublicServer
from .registry import InMemoryRegistry, Registration, Registry

__all__ = ["Gateway", "GatewayConfig", "parse_bind"]

log = logging.getLogger("revconn.gateway")

ASGIScope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[ASGIMessage]]
ASGISend = Callable[[ASGIMessage], Awaitable[None]]

CLOSE_GRACE = 2.0  # after forcing tunnels closed, how long to let them say goodbye


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); ConfigError if malformed."""
    host, sep, port_text = bind.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--bind {bind!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--bind {bind!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--bind {bind!r}: port must be 0-65535")
    return host, port


@attrs.frozen
class GatewayConfig:
    """Gateway settings. ``binds`` use port 0 to pick a free port."""

    binds: tuple[str, ...] = ("127.0.0.1:8080",)
    public_binds: tuple[str, ...] = ()
    """Where the dedicated public listener (``/a/NAME/...`` only, trio + h11)
    listens. ``/a/`` on ``binds`` works too, through hypercorn (slower)."""
    public_idle_timeout: float = 60.0
    """Public connections: keep-alive idle time and time allowed for a request head."""
    heartbeat: Heartbeat = Heartbeat()
    handshake_timeout: float = 10.0
    max_message_size: int = MAX_MESSAGE_SIZE
    backlog: int = 4096
    graceful_timeout: float = 5.0
    tcp_user_timeout: float | None = None
    """Seconds unacknowledged data may sit before the kernel drops the socket;
    default: heartbeat interval + timeout. Frees sockets hypercorn would block on."""

    def __attrs_post_init__(self) -> None:
        if not self.binds:
            raise ConfigError("at least one --bind is needed")
        for bind in (*self.binds, *self.public_binds):
            parse_bind(bind)
        if not (math.isfinite(self.public_idle_timeout) and self.public_idle_timeout > 0):
            raise ConfigError("public idle timeout must be > 0 seconds")
        if not (math.isfinite(self.handshake_timeout) and self.handshake_timeout > 0):
            raise ConfigError("handshake timeout must be > 0 seconds")

    @property
    def effective_tcp_user_timeout(self) -> float:
        if self.tcp_user_timeout is not None:
            return self.tcp_user_timeout
        return self.heartbeat.interval + self.heartbeat.timeout


_TEARDOWN_RACE = (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError)


class _AsgiTransport:
    """An ASGI WebSocket connection as a MessageTransport."""

    __slots__ = ("_closed", "_receive", "_send")

    def __init__(self, receive: ASGIReceive, send: ASGISend) -> None:
        self._receive = receive
        self._send = send
        self._closed = False

    async def send_message(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionLost("websocket closed")
        # hypercorn drops sends after the peer closed; the reader notices the close.
        try:
            await self._send({"type": "websocket.send", "bytes": data})
        except _TEARDOWN_RACE as exc:
            # hypercorn's teardown writes outside its send lock: a send racing it
            # fails here; the connection is going away either way.
            self._closed = True
            raise ConnectionLost(f"websocket send failed: {exc!r}") from None

    async def receive_message(self) -> bytes:
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                data = message.get("bytes")
                if data is None:
                    if message.get("text") is not None:
                        raise ConnectionLost("text message on a binary tunnel")
                    continue  # an empty binary message arrives as None: nothing to feed
                return bytes(data)
            if kind == "websocket.disconnect":
                self._closed = True
                code = message.get("code")
                raise ConnectionLost(f"websocket closed (code {code})", close_code=code)

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except _TEARDOWN_RACE:
            # The agent closed at the same moment: hypercorn answered its close
            # frame and is tearing down (send_eof outside its send lock), so our
            # close frame lost the race. Nothing to tell the peer any more.
            pass
        # Stay until hypercorn reports the disconnect. Returning earlier lets
        # hypercorn's connection teardown (send_eof, not under its send lock)
        # race its reader task answering the agent's own close frame, which
        # raises BusyResourceError out of hypercorn's TCPServer and takes the
        # whole server down (seen when both sides closed at once on replacement).
        # The caller bounds this wait.
        while (await self._receive())["type"] != "websocket.disconnect":
            pass


class Gateway:
    """The revconn gateway as an ASGI application."""

    def __init__(
        self,
        config: GatewayConfig,
        auth: AuthPolicy,
        registry: Registry | None = None,
    ) -> None:
        self.config = config
        self.auth = auth
        self.registry: Registry = registry if registry is not None else InMemoryRegistry()
        self._tunnels: set[Tunnel] = set()
        self._service_nursery: trio.Nursery | None = None
        self._heartbeats: HeartbeatScheduler | None = None
        self._shutting_down = False
        self._drained = trio.Event()
        self.public_urls: list[str] = []
        """The dedicated public listener's URLs, once ``serve()`` has started."""
        self.admin_app = self._make_admin_app()

    # -- ASGI entry -------------------------------------------------------------
    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"].startswith("/a/"):
            await self._forward(scope, receive, send)
        elif kind == "websocket" and scope["path"] == "/ws/connect":
            await self._agent_connect(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.admin_app(scope, receive, send)  # type: ignore[arg-type]

    async def _lifespan(self, receive: ASGIReceive, send: ASGISend) -> None:
        """Owns the service nursery for the app's lifetime."""
        async with trio.open_nursery() as nursery:
            scheduler = HeartbeatScheduler(self.config.heartbeat)
            await nursery.start(scheduler.run)
            self._heartbeats = scheduler
            self._service_nursery = nursery
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.close_all_agents()
                    await send({"type": "lifespan.shutdown.complete"})
                    break
            self._service_nursery = None
            self._heartbeats = None

    # -- admin (Quart) ----------------------------------------------------------
    def _make_admin_app(self) -> QuartTrio:
        app = QuartTrio("revconn.gateway")
        gateway = self

        @app.get("/healthz")
        async def healthz() -> Response:
            return _quart(json_reply(200, {"status": "ok"}))

        @app.get("/endpoints")
        async def endpoints() -> Response:
            from quart import request

            credential = bearer_credential(
                (k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()
            )
            if not gateway.auth.allows(credential, agent=None, scope=Scope.ADMIN):
                return _quart(unauthorized())
            rows = await gateway.registry.snapshot()
            return _quart(json_reply(200, {"endpoints": [row.to_json() for row in rows]}))

        @app.errorhandler(404)
        async def not_found(_: Exception) -> Response:
            return _quart(json_reply(404, {"error": "not_found"}))

        @app.errorhandler(405)
        async def not_allowed(_: Exception) -> Response:
            return _quart(json_reply(405, {"error": "method_not_allowed"}))

        return app

    # -- agent tunnels ------------------------------------------------------------
    def admit_agent(
        self, query_string: bytes, headers: Iterable[tuple[bytes, bytes]]
    ) -> str | Reply:
        """Check a ``/ws/connect`` upgrade: the agent's name, or the refusal to answer
        with (400 invalid name, 401 bad credentials, 503 shutting down)."""
        query = parse_qs(query_string.decode("latin-1"))
        names = query.get("name", [])
        if len(names) != 1 or not valid_agent_name(names[0]):
            detail = "name must be one lowercase DNS label: [a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
            return json_reply(400, {"error": "invalid_name", "detail": detail})
        name = names[0]
        credential = bearer_credential(headers)
        if not self.auth.allows(credential, agent=name, scope=Scope.CONNECT):
            log.info("agent %r rejected: bad or missing credentials", name)
            return unauthorized()
        if self._shutting_down:
            return json_reply(503, {"error": "shutting_down", "detail": "gateway is shutting down"})
        return name

    async def _agent_connect(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        admitted = self.admit_agent(scope.get("query_string", b""), scope.get("headers", []))
        if isinstance(admitted, Reply):
            await _deny(send, admitted)
            return
        await send({"type": "websocket.accept"})
        remote = format_peer(scope.get("client"))
        await self.serve_agent(admitted, _AsgiTransport(receive, send), remote)

    async def serve_agent(self, name: str, transport: MessageTransport, remote: str) -> None:
        """Run an admitted agent's tunnel over ``transport`` (an accepted WebSocket)
        until it ends: handshake, register, serve, unregister."""
        registration: Registration | None = None

        def on_end(end: TunnelEnd) -> None:
            # Drop the agent from the registry now, even if the socket cannot be
            # written any more (hypercorn shields its writes from cancellation).
            if registration is not None and self._service_nursery is not None:
                self._service_nursery.start_soon(self.registry.unregister, registration)

        tunnel = Tunnel(
            TunnelSession(Role.GATEWAY),
            transport,
            heartbeat=self.config.heartbeat,
            handshake_timeout=self.config.handshake_timeout,
            on_end=on_end,
        )
        try:
            await tunnel.handshake()
        except (RevconnTimeout, ProtocolError, ConnectionLost) as exc:
            log.info("agent %r from %s: handshake failed: %s", name, remote, exc)
            return
        self._tunnels.add(tunnel)
        try:
            registration = await self.registry.register(name, tunnel, remote=remote)
            log.info("agent %r online from %s (epoch %d)", name, remote, registration.epoch)
            if self._shutting_down:
                tunnel.drain(_codes.WS_GOING_AWAY, _codes.REASON_SHUTDOWN)
            end = await tunnel.serve(self._heartbeats)
            log.info(
                "agent %r offline (epoch %d): %s%s",
                name,
                registration.epoch,
                end.reason or f"close {end.close_code}",
                f" ({end.error})" if isinstance(end.error, ProtocolError) else "",
            )
        finally:
            self._tunnels.discard(tunnel)
            if self._shutting_down and not self._tunnels:
                self._drained.set()
            if registration is not None:
                with trio.CancelScope(shield=True):
                    await self.registry.unregister(registration)

    # -- forwarding -----------------------------------------------------------------
    async def _forward(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        """``ANY /a/NAME/REST?QUERY`` -> one stream on NAME's tunnel -> its upstream."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        client = scope.get("client")
        outbound = forward(
            self.registry,
            raw_path,
            scope.get("query_string", b""),
            scope["method"].encode("ascii"),
            scope.get("headers", []),
            client=client[0] if client else None,
            proto=scope.get("scheme", "http"),
        )
        if isinstance(outbound, Reply):
            await _send_reply(send, outbound)
            return
        message = await receive()
        if message["type"] != "http.request":
            return  # the client is already gone
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        stream = outbound.open(end_stream=not (body or more))
        if isinstance(stream, Reply):
            await _send_reply(send, stream)
            return
        name, tunnel = outbound.name, outbound.tunnel
        try:
            async with trio.open_nursery() as nursery:
                if not (body or more):
                    await tunnel.flush()  # HEADERS with END_STREAM; else sent with the body
                nursery.start_soon(_pump_request, stream, receive, body, more, nursery.cancel_scope)
                await _relay_response(stream, send, name)
                nursery.cancel_scope.cancel()
        finally:
            if stream.local_ended and stream.remote_ended:
                stream.close()
            else:
                stream.reset(_codes.H2_CANCEL)

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
    def hypercorn_config(self) -> HypercornConfig:
        hc = HypercornConfig()
        hc.bind = list(self.config.binds)
        hc.backlog = self.config.backlog
        hc.websocket_max_message_size = self.config.max_message_size
        hc.graceful_timeout = self.config.graceful_timeout
        hc.accesslog = None
        hc.errorlog = logging.getLogger("revconn.hypercorn")
        hc.include_server_header = False
        return hc

    def create_sockets(self) -> Sockets:
        """Listening sockets with TCP_NODELAY, TCP_USER_TIMEOUT and the configured backlog."""
        user_timeout = self.config.effective_tcp_user_timeout
        socks = _listen_all(self.config.binds, self.config.backlog, user_timeout)
        return Sockets(secure_sockets=[], insecure_sockets=socks, quic_sockets=[])

    async def serve(
        self,
        *,
        shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until ``shutdown_trigger`` returns (or forever); reports the bound URLs."""
        wsmask.install()
        public_sockets = _listen_all(self.config.public_binds, self.config.backlog, None)
        try:
            sockets = self.create_sockets()
        except BaseException:
            for sock in public_sockets:
                sock.close()
            raise
        self.public_urls = [_url(sock) for sock in public_sockets]
        hc = self.hypercorn_config()
        trigger = shutdown_trigger or trio.sleep_forever

        async def shutdown() -> None:
            await trigger()
            # Let requests in flight finish (up to graceful_timeout), then force.
            self.begin_shutdown()
            with trio.move_on_after(self.config.graceful_timeout):
                await self._drained.wait()
            self.close_all_agents()
            with trio.move_on_after(CLOSE_GRACE):
                await self._drained.wait()

        async with trio.open_nursery() as nursery:
            if public_sockets:
                public = PublicServer(
                    self.registry,
                    agents=self,
                    idle_timeout=self.config.public_idle_timeout,
                    max_message_size=self.config.max_message_size,
                )
                await nursery.start(public.serve, public_sockets)
            await worker_serve(
                wrap_app(self, hc.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                hc,
                sockets=sockets,
                shutdown_trigger=shutdown,
                task_status=task_status,
            )
            nursery.cancel_scope.cancel()


def _listen_all(
    binds: tuple[str, ...], backlog: int, user_timeout: float | None
) -> list[socket.socket]:
    """Listening, non-blocking sockets for ``binds``; ConfigError names a bind that fails."""
    socks: list[socket.socket] = []
    try:
        for bind in binds:
            host, port = parse_bind(bind)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
                # Inherited by accepted sockets (Linux).
                ms = int(user_timeout * 1000)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ConfigError(f"cannot listen on {bind}: {exc.strerror}") from exc
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _pump_request(
    stream: TunnelStream,
    receive: ASGIReceive,
    body: bytes,
    more: bool,
    done: trio.CancelScope,
) -> None:
    """Upload the request body, then watch for the client going away.

    When the client disconnects, the stream is reset (the agent cancels its
    upstream call) and the whole forward is cancelled.
    """
    client_gone = False
    try:
        client_gone = await _upload(stream, receive, body, more)
    except StreamError:
        pass  # the agent stopped reading the body; the response side reports why
    if not client_gone:
        while (await receive())["type"] != "http.disconnect":
            pass
    stream.reset(_codes.H2_CANCEL)
    done.cancel()


async def _upload(stream: TunnelStream, receive: ASGIReceive, body: bytes, more: bool) -> bool:
    """Send the request body; True if the client disconnected before it ended."""
    if not (body or more):
        return False
    await stream.send_body(body, end_stream=not more)
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return True
        more = message.get("more_body", False)
        await stream.send_body(message.get("body", b""), end_stream=not more)
    return False


async def _relay_response(stream: TunnelStream, send: ASGISend, name: str) -> None:
    """Stream the agent's response to the client; abort the client connection if
    the agent is lost after the response started."""
    try:
        response = await stream.receive_response()
    except StreamError as exc:
        await _send_reply(send, stream_failure(exc, name))
        return
    invalid = bad_status(response.status, name)
    if invalid is not None:
        await _send_reply(send, invalid)
        return
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": clean_headers(response.headers),
        }
    )
    if response.end_stream:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    try:
        while True:
            chunk = await stream.read()
            if chunk is None:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except StreamError as exc:
        log.info("agent %r: response aborted mid-body: %s", name, exc)
        return  # no final body message: hypercorn closes the connection, visibly truncated
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_reply(send: ASGISend, reply: Reply) -> None:
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


def _quart(reply: Reply) -> Response:
    """A Reply as a Quart response (Quart sets Content-Length itself)."""
    headers = Headers(
        [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in reply.headers
            if n != b"content-length"
        ]
    )
    return Response(reply.body, status=reply.status, headers=headers)


async def _deny(send: ASGISend, reply: Reply) -> None:
    """Refuse a WebSocket upgrade with a plain HTTP response (Denial Response extension)."""
    start = {"type": "websocket.http.response.start", "status": reply.status}
    await send({**start, "headers": reply.headers})
    await send({"type": "websocket.http.response.body", "body": reply.body})
