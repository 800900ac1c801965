"""Serve an in-process ASGI app on one tunnelled HTTP/1.1 byte stream, with hypercorn.

A thin adapter, as hypercorn's ``trio/tcp_server.py`` (``TCPServer``) is around
its sans-I/O ``ProtocolWrapper``/``H11Protocol``: a reader loop feeds the
gateway's bytes in as ``RawData``; the protocol's ``RawData`` go out under one
lock, its ``Closed`` ends the connection, its ``Updated`` (re)starts the
keep-alive timer. The socket is replaced by a ``ByteChannel``, so ASGI apps get
hypercorn's HTTP/1.1 (keep-alive, pipelining, chunked bodies, 100-continue,
HEAD) and WebSockets, with hypercorn's flow control: the app's receive queue
is bounded (``max_app_queue_size``) and the reader waits on it, so an app that
does not read its body stops the reading from the channel.

Where this departs from ``TCPServer``, and why:

* no shielded sends: the channel applies backpressure, and a cancelled
  ``serve_http1`` must stop at once; a send that does not complete (cancelled,
  or the gateway gone) ends the connection, since h11 has already counted the
  bytes as sent and the framing that follows could not be trusted;
* the app's receive queue (``_AppQueue``) never blocks on the final
  ``http.disconnect``/``websocket.disconnect``: with hypercorn's own queue an
  app that answers without reading a large body deadlocks the connection
  (the reader waits for room in the queue, and the app's last ``send`` waits
  there too, to put the disconnect; ``hypercorn/protocol/http_stream.py`` line
  132 and ``ws_stream.py`` line 251, into the queue of ``trio/task_group.py``
  line 57);
* after the connection is over, apps still running (a response's background
  work) get ``config.graceful_timeout`` seconds, then are cancelled, so
  ``serve_http1`` always returns.

What the app's scope gets (hypercorn's scope, then):

* ``client``: ``(last X-Forwarded-For address, 0)``, else the ``client`` argument;
* ``scheme``: from ``X-Forwarded-Proto`` (``http``/``https``; ``ws``/``wss`` for a
  WebSocket scope), else ``http``/``ws``;
* the ``host`` header: replaced by ``X-Forwarded-Host`` when that is present;
* ``root_path``: ``""``: the gateway strips its public prefix (``/a/NAME``, sent
  as ``X-Forwarded-Prefix``, which stays in the headers) from the path;
* ``server``: the ``server`` argument (None by default).

hypercorn's ``ProxyFixMiddleware`` is not used: it sets ``https`` as a
WebSocket scope's scheme (``middleware/proxy_fix.py`` line 52) and deep-copies
every scope, lifespan ``state`` included (line 24).

App errors: an app that raises before it started its response, or returns
without one, is answered with a JSON 500 (``{"error": "app_error", ...}``; a
WebSocket handshake gets it as a denial response) instead of hypercorn's empty
500; the exception is logged on ``revconn.upstream``. An app that fails after
its response started is logged the same way; hypercorn then finds the
response incomplete and closes the connection (the gateway sees a truncated
response; a WebSocket gets close code 1011).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol, cast

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import TrioSingleTask, WorkerContext
from hypercorn.typing import (
    AppWrapper,
    ASGIFramework,
    ASGIReceiveEvent,
    ASGISendEvent,
    ConnectionState,
    Scope,
)

from .._errors import StreamError
from .upstream import ASGIApp, error_body

__all__ = ["ASGIApp", "ByteChannel", "asgi_config", "serve_http1"]

log = logging.getLogger("revconn.upstream")

Message = MutableMapping[str, Any]
GONE = (trio.BrokenResourceError, trio.ClosedResourceError, StreamError)
"""What a ByteChannel raises when the gateway's side is gone."""

APP_RAISED = "the application raised an exception"
APP_SILENT = "the application returned no response"

_STARTS = frozenset(
    {"http.response.start", "websocket.accept", "websocket.close", "websocket.http.response.start"}
)
"""Messages after which an error can no longer be answered with a 500."""
_DISCONNECTS = frozenset({"http.disconnect", "websocket.disconnect"})


class ByteChannel(Protocol):
    """One tunnelled byte stream, seen from the agent."""

    async def receive(self) -> bytes | None:
        """The next bytes from the gateway; None when the gateway ended its side."""
        ...

    async def send(self, data: bytes) -> None:
        """Bytes to the gateway (waits while the gateway is not reading)."""
        ...

    async def send_eof(self) -> None:
        """We are done sending: the connection is over from our side."""
        ...


def asgi_config(*, keep_alive_timeout: float = 60.0) -> Config:
    """A hypercorn Config for serving over the tunnel.

    No access log (the gateway logs requests); errors on ``revconn.hypercorn``
    (not configured here); no ``server`` header (the public would see it); h11
    header block limit 64 KiB; WebSocket messages up to 16 MiB (hypercorn's
    default: what a passthrough WebSocket carries); no WebSocket pings from
    the app's side; the given keep-alive timeout.
    """
    config = Config()
    config.accesslog = None
    config.errorlog = logging.getLogger("revconn.hypercorn")
    config.include_server_header = False
    config.keep_alive_timeout = keep_alive_timeout
    config.h11_max_incomplete_size = (
        96 * 1024
    )  # the gateway accepts 64 KiB heads, then adds X-Forwarded-*
    config.websocket_max_message_size = 16 * 1024 * 1024
    config.websocket_ping_interval = None
    config.read_timeout = None
    return config


async def serve_http1(
    app: ASGIApp,
    channel: ByteChannel,
    *,
    config: Config,
    agent: str,
    client: tuple[str, int] = ("127.0.0.1", 0),
    server: tuple[str, int] | None = None,
) -> None:
    """Serve the HTTP/1.1 requests and WebSocket upgrades arriving on ``channel``
    with ``app``, until the connection ends from either side.

    The gateway's EOF (or its side being gone) ends the connection: responses
    still in progress are dropped, as hypercorn does on a socket. When hypercorn
    ends it (``Connection: close``, an unread body, a protocol error, a closed
    WebSocket, the keep-alive timeout), ``channel.send_eof()`` is called. Returns
    once every task it started is done. ``agent`` names the agent in JSON errors.
    """
    await _Connection(_GuardedApp(app, agent), channel, config, client, server).run()


class _Connection:
    """TCPServer's job, on a ByteChannel."""

    def __init__(
        self,
        app: _GuardedApp,
        channel: ByteChannel,
        config: Config,
        client: tuple[str, int],
        server: tuple[str, int] | None,
    ) -> None:
        self._app = ASGIWrapper(cast(ASGIFramework, app))
        self._channel = channel
        self._config = config
        self._client = client
        self._server = server
        self._context = WorkerContext(None)
        self._send_lock = trio.Lock()
        self._idle_task = TrioSingleTask()
        self._reader = trio.CancelScope()
        self._writable = True
        """False once the connection is over or a send did not complete."""
        self._task_group: _TaskGroup
        self._protocol: ProtocolWrapper

    async def run(self) -> None:
        task_group = self._task_group = _TaskGroup()
        async with task_group:
            self._protocol = ProtocolWrapper(
                self._app,
                self._config,
                self._context,
                task_group,
                ConnectionState({}),
                False,
                self._client,
                self._server,
                self._protocol_send,
                "http/1.1",
            )
            await self._protocol.initiate()
            await self._idle_task.restart(task_group, self._idle_timeout)
            with self._reader:
                await self._read_data()
            # The connection is over, from either side.
            self._writable = False
            await self._idle_task.stop()
            await self._protocol.handle(Closed())  # the app hears http/websocket.disconnect
            await self._send_eof()
            task_group.nursery.cancel_scope.deadline = (
                trio.current_time() + self._config.graceful_timeout
            )

    def _end(self) -> None:
        """End the connection: the reader stops, and ``run`` closes."""
        self._writable = False
        self._reader.cancel()

    async def _read_data(self) -> None:
        timeout = self._config.read_timeout or math.inf
        while True:
            try:
                with trio.fail_after(timeout):
                    data = await self._channel.receive()
            except (*GONE, trio.TooSlowError):
                return
            if data is None:
                await self._protocol.handle(RawData(b""))  # h11 learns of the EOF
                return
            if data:
                await self._protocol.handle(RawData(data))

    async def _protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if not event.data:  # h11's end of a Content-Length body: nothing to send
                await trio.lowlevel.checkpoint()
                return
            done = False
            try:
                async with self._send_lock:
                    if self._writable:
                        await self._channel.send(event.data)
                done = True
            except GONE:
                pass
            finally:
                if not done:
                    # h11 has counted these bytes as sent: nothing after them can
                    # be framed right, so the connection ends here.
                    self._end()
        elif isinstance(event, Closed):
            self._end()
            await trio.lowlevel.checkpoint()
        elif isinstance(event, Updated):
            if not self._writable:
                await trio.lowlevel.checkpoint()
            elif event.idle:
                await self._idle_task.restart(self._task_group, self._idle_timeout)
            else:
                await self._idle_task.stop()

    async def _send_eof(self) -> None:
        async with self._send_lock:
            try:
                await self._channel.send_eof()
            except GONE:
                pass

    async def _idle_timeout(self) -> None:
        with trio.move_on_after(self._config.keep_alive_timeout):
            await self._context.terminated.wait()
        self._end()


class _TaskGroup(TaskGroup):
    """hypercorn's trio TaskGroup, with a receive queue that cannot deadlock (_AppQueue).

    ``TrioSingleTask`` (the keep-alive timer) reaches into ``_nursery``, so this
    subclasses hypercorn's rather than implementing its TaskGroup protocol anew.
    """

    @property
    def nursery(self) -> trio.Nursery:
        nursery = self._nursery
        assert nursery is not None
        return nursery

    async def spawn_app(
        self,
        app: AppWrapper,
        config: Config,
        scope: Scope,
        send: Callable[[ASGISendEvent | None], Awaitable[None]],
    ) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
        queue = _AppQueue(config.max_app_queue_size)
        self.nursery.start_soon(_run_app, app, scope, queue, send)
        return queue.put


async def _run_app(
    app: AppWrapper,
    scope: Scope,
    queue: _AppQueue,
    send: Callable[[ASGISendEvent | None], Awaitable[None]],
) -> None:
    # _GuardedApp catches the app's errors; anything escaping (trio.Cancelled,
    # KeyboardInterrupt) propagates, and hypercorn's end-of-app cleanup
    # (send(None)) is moot then: the connection is going down.
    try:
        await app(scope, queue.receive, send, trio.to_thread.run_sync, trio.from_thread.run)
    finally:
        queue.close()
    await send(None)


class _AppQueue:
    """The messages hypercorn puts for one app: bounded (the reader waits for
    room), except the final disconnect, which never waits.

    After the disconnect, ``receive`` returns what was queued before it, then
    the disconnect, again and again. Once the app has returned, puts are dropped.
    """

    def __init__(self, size: int) -> None:
        self._send, self._receive = trio.open_memory_channel[ASGIReceiveEvent](size)
        self._disconnect: ASGIReceiveEvent | None = None

    async def put(self, message: ASGIReceiveEvent) -> None:
        if message["type"] in _DISCONNECTS:
            self._disconnect = message
            try:
                self._send.send_nowait(message)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # receive() hands it out once the queue is drained
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._send.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.lowlevel.checkpoint()  # the app is done: nobody will read it

    async def receive(self) -> ASGIReceiveEvent:
        if self._disconnect is None:
            return await self._receive.receive()
        await trio.lowlevel.checkpoint()
        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            return self._disconnect

    def close(self) -> None:
        self._receive.close()


class _GuardedApp:
    """The app with its scope completed from X-Forwarded-* and its errors answered."""

    def __init__(self, app: ASGIApp, agent: str) -> None:
        self.app = app
        self.agent = agent

    async def __call__(
        self,
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        scope = forwarded_scope(scope)
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            await send(message)
            if message["type"] in _STARTS:
                started = True

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            log.exception("%s: the ASGI app raised on %s", self.agent, _describe(scope))
        except BaseExceptionGroup as group:
            errors, rest = group.split(Exception)
            if errors is not None:
                log.error(  # noqa: TRY400 (the traceback is that of errors, not of the group)
                    "%s: the ASGI app raised on %s",
                    self.agent,
                    _describe(scope),
                    exc_info=errors,
                )
            if rest is not None:
                raise rest from None  # trio.Cancelled (or KeyboardInterrupt) goes on
        else:
            if started:
                return
            log.error("%s: the ASGI app returned no response to %s", self.agent, _describe(scope))
            await self._answer_500(scope, send, APP_SILENT)
            return
        if not started:
            await self._answer_500(scope, send, APP_RAISED)
        # else: hypercorn finds the response unfinished and closes the connection.

    async def _answer_500(
        self, scope: Message, send: Callable[[Message], Awaitable[None]], detail: str
    ) -> None:
        body = error_body("app_error", self.agent, detail)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        prefix = "websocket.http" if scope["type"] == "websocket" else "http"
        try:
            await send({"type": f"{prefix}.response.start", "status": 500, "headers": headers})
            await send({"type": f"{prefix}.response.body", "body": body, "more_body": False})
        except Exception:  # the connection ended meanwhile: nobody to answer
            log.debug("%s: could not send the 500", self.agent, exc_info=True)


def _describe(scope: Message) -> str:
    return f"{scope.get('method', 'GET')} {scope.get('path', '')}"


def forwarded_scope(scope: Message) -> Message:
    """A copy of an http/websocket ``scope`` with ``client``, ``scheme`` and the
    ``host`` header taken from the gateway's X-Forwarded-For/-Proto/-Host (the
    last value of each: the gateway's own)."""
    forwarded_for = forwarded_proto = forwarded_host = None
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            forwarded_for = value
        elif name == b"x-forwarded-proto":
            forwarded_proto = value
        elif name == b"x-forwarded-host":
            forwarded_host = value
    out = dict(scope)
    if forwarded_for is not None:
        address = forwarded_for.rpartition(b",")[2].strip()
        if address:
            out["client"] = (address.decode("latin-1"), 0)
    if forwarded_proto is not None:
        proto = forwarded_proto.rpartition(b",")[2].strip().lower()
        if proto in (b"http", b"https"):
            secure = proto == b"https"
            if scope["type"] == "websocket":
                out["scheme"] = "wss" if secure else "ws"
            else:
                out["scheme"] = "https" if secure else "http"
    if forwarded_host is not None:
        host = forwarded_host.rpartition(b",")[2].strip()
        if host:
            out["headers"] = [(n, v) for n, v in scope["headers"] if n != b"host"]
            out["headers"].append((b"host", host))
    return out
