"""The operator surface: one QuartTrio app (``/endpoints``, ``/events``,
``/healthz``; later metrics and the dashboard), served by hypercorn on ``--admin-bind``
(over TLS with the gateway's own context, when it has one).

Agents and public traffic never reach it: they are served by the data plane
(``listener.py``). Keep it on a private address.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers

from .._proto.rules import valid_agent_name
from .auth import AuthPolicy, Grant, Scope, bearer_credential, count_failure, refuse_limited
from .events import EventStreams, sse_stream
from .ratelimit import FailureLimiter
from .registry import Registry
from .replies import Reply, json_reply

__all__ = ["AdminHost", "make_admin_app", "serve_admin"]

log = logging.getLogger("revconn.gateway")


class AdminHost(Protocol):
    """What the admin app reads from the gateway."""

    @property
    def auth(self) -> AuthPolicy: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def auth_limiter(self) -> FailureLimiter: ...

    @property
    def shutting_down(self) -> bool: ...

    @property
    def domains(self) -> tuple[str, ...]: ...

    async def metrics_text(self) -> bytes:
        """The Prometheus text exposition."""
        ...

    async def stats(self) -> dict[str, object]:
        """The online agents and their counters."""
        ...

    @property
    def event_streams(self) -> EventStreams:
        """The ``/events`` responses, ended at shutdown."""
        ...


def make_admin_app(host: AdminHost) -> QuartTrio:
    """The operator surface as an ASGI app (``Gateway.admin_app``)."""
    app = QuartTrio("revconn.gateway")

    @app.get("/healthz")
    async def healthz() -> Response:
        if host.shutting_down:
            return _quart(json_reply(503, {"status": "shutting_down"}))
        return _quart(json_reply(200, {"status": "ok"}))

    def refuse_operator() -> Response | None:
        """The refusal for a request to an admin-only route (429 locked out,
        401 bad credential, 403 an agent token), or None: go ahead."""
        source = request.remote_addr or _scope_client(request.scope) or "unknown"
        refused = refuse_limited(host.auth_limiter, source)
        if refused is not None:
            return _quart(refused)
        credential = bearer_credential(
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()
        )
        verdict = host.auth.authenticate(credential, agent=None, scope=Scope.ADMIN)
        if isinstance(verdict, Grant):
            return None
        if verdict.status == 401:
            count_failure(host.auth_limiter, source, request.path)
        log.info("%s from %s refused: %s", request.path, source, verdict.error)
        host.auth_limiter.refused(verdict.error)
        return _quart(verdict.reply())

    @app.get("/endpoints")
    async def endpoints() -> Response:
        refused = refuse_operator()
        if refused is not None:
            return refused
        rows = await host.registry.snapshot()
        return _quart(json_reply(200, {"endpoints": [row.to_json() for row in rows]}))

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format (``metrics.py``); an admin credential, as
        for every operator route (Prometheus: ``authorization`` in the scrape)."""
        refused = refuse_operator()
        if refused is not None:
            return refused
        body = await host.metrics_text()
        return Response(body, content_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats() -> Response:
        refused = refuse_operator()
        if refused is not None:
            return refused
        return _quart(json_reply(200, await host.stats()))

    @app.get("/events")
    async def events() -> Response:
        """Presence as server-sent events (``events.py``)."""
        refused = refuse_operator()
        if refused is not None:
            return refused
        if host.event_streams.closed:
            return _quart(json_reply(503, {"error": "shutting_down"}))
        response = Response(
            sse_stream(host.registry, host.event_streams),
            mimetype="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )
        response.timeout = None  # (Quart's 60 s response timeout: a stream has none)
        return response

    @app.get("/tls-ask")
    async def tls_ask() -> Response:
        """Caddy's on-demand TLS "ask" (docs/caddy/Caddyfile): may a
        certificate be issued for ``?domain=``? Yes for a ``--domain`` and for
        ``NAME.DOMAIN`` of an agent online now; no otherwise, so strangers
        cannot make the TLS proxy request certificates for random names."""
        name = request.args.get("domain", "")
        if not name.isascii():  # (before lower(): "K" (U+212A) lowercases to "k")
            return _quart(json_reply(404, {"domain": name, "allowed": False}))
        name = name.lower().removesuffix(".")
        for domain in host.domains:
            label = name.removesuffix("." + domain)
            if name == domain or (
                label != name
                and valid_agent_name(label)
                and host.registry.lookup(label) is not None
            ):
                return _quart(json_reply(200, {"domain": name, "allowed": True}))
        return _quart(json_reply(404, {"domain": name, "allowed": False}))

    @app.errorhandler(404)
    async def not_found(_: Exception) -> Response:
        return _quart(json_reply(404, {"error": "not_found"}))

    @app.errorhandler(405)
    async def not_allowed(_: Exception) -> Response:
        return _quart(json_reply(405, {"error": "method_not_allowed"}))

    return app


async def serve_admin(
    app: QuartTrio,
    sockets: Sequence[socket.socket],
    *,
    graceful_timeout: float,
    shutdown_trigger: Callable[[], Awaitable[None]],
    tls: ssl.SSLContext | None = None,
    handshake_timeout: float = 10.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``app`` on hypercorn's trio worker over ``sockets`` until
    ``shutdown_trigger``; HTTPS with ``tls``."""
    hc = _Config(tls)
    hc.graceful_timeout = graceful_timeout
    hc.accesslog = None
    hc.errorlog = logging.getLogger("revconn.hypercorn")
    hc.include_server_header = False
    hc.ssl_handshake_timeout = handshake_timeout
    if tls is None:
        bound = Sockets(secure_sockets=[], insecure_sockets=list(sockets), quic_sockets=[])
    else:
        bound = Sockets(secure_sockets=list(sockets), insecure_sockets=[], quic_sockets=[])

    await worker_serve(
        wrap_app(app, hc.wsgi_max_body_size, "asgi"),
        hc,
        sockets=bound,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )


class _Config(HypercornConfig):
    """hypercorn's settings, with the gateway's own TLS context: hypercorn
    calls ``create_ssl_context()`` once and wraps every connection with what
    it returns, so the context a certificate reload updates (``tls.py``) is
    the one the admin surface uses too."""

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        super().__init__()
        self._tls = tls

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._tls


def _scope_client(scope: Mapping[str, Any]) -> str | None:
    """The ASGI scope's client host (Quart's ``remote_addr`` may be empty)."""
    client = scope.get("client")
    return str(client[0]) if client else None


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
