"""The operator surface: one QuartTrio app (``/endpoints``, ``/events``,
``/metrics``, ``/stats``, ``/dashboard``, ``/healthz``), served by hypercorn on
``--admin-bind`` (over TLS with the gateway's own context, when it has one).

Agents and public traffic never reach it: they are served by the data plane
(``listener.py``). Keep it on a private address.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib.resources
import logging
import secrets
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

__all__ = ["AdminHost", "admin_credential", "basic_password", "make_admin_app", "serve_admin"]

log = logging.getLogger("revconn.gateway")

BASIC_CHALLENGE = 'Basic realm="revconn admin", charset="UTF-8"'
"""``/dashboard``'s 401 challenge: the browser asks for a user name (any)
and a password (the admin credential), then sends them with every request
to this origin, ``fetch()`` and ``EventSource`` included."""
NONCE = "__CSP_NONCE__"
"""Where ``dashboard.html`` wants this response's CSP nonce."""


def dashboard_csp(nonce: str) -> str:
    """The dashboard's Content-Security-Policy: its own inline script and
    style (by nonce), requests to its own origin, nothing else; no string
    ever becomes markup (Trusted Types: ``innerHTML = "..."`` throws)."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'"
    )


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

    def refuse_operator(*, browser: bool = False) -> Response | None:
        """The refusal for a request to an admin-only route (429 locked out,
        401 bad credential, 403 an agent token), or None: go ahead.
        ``browser``: a 401 challenges for Basic credentials (the page a
        person opens), not Bearer."""
        verdict = operator_grant(browser=browser)
        return None if isinstance(verdict, Grant) else verdict

    def operator_grant(*, browser: bool = False) -> Grant | Response:
        """The credential's grant, or the refusal (``refuse_operator``)."""
        source = request.remote_addr or _scope_client(request.scope) or "unknown"
        refused = refuse_limited(host.auth_limiter, source)
        if refused is not None:
            return _quart(refused)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        credential = admin_credential(headers)
        verdict = host.auth.authenticate(credential, agent=None, scope=Scope.ADMIN)
        if isinstance(verdict, Grant):
            return verdict
        # (A browser's first request carries no credential: it asks for the
        # challenge, and guesses nothing. Every credential it sends counts.)
        handshake = browser and not any(k.lower() == b"authorization" for k, _ in headers)
        if verdict.status == 401 and not handshake:
            count_failure(host.auth_limiter, source, request.path)
        log.info(
            "%s from %s refused: %s",
            request.path,
            source,
            verdict.error,
            extra={"event": "refused", "remote": source, "reason": verdict.error},
        )
        host.auth_limiter.refused(verdict.error)
        if browser and verdict.status == 401:
            detail = "sign in with any user name and the admin credential as the password"
            reply = json_reply(401, {"error": verdict.error, "detail": detail})
            response = _quart(reply)
            response.headers["WWW-Authenticate"] = BASIC_CHALLENGE
            return response
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
        """Presence as server-sent events (``events.py``); the stream ends
        when its credential is revoked or expires."""
        grant = operator_grant()
        if not isinstance(grant, Grant):
            return grant
        if host.event_streams.closed:
            return _quart(json_reply(503, {"error": "shutting_down"}))
        response = Response(
            sse_stream(host.registry, host.event_streams, grant=grant),
            mimetype="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )
        response.timeout = None  # (Quart's 60 s response timeout: a stream has none)
        return response

    @app.get("/dashboard")
    async def dashboard() -> Response:
        """The live dashboard (``dashboard.html``: one page, inline script and
        style, reading ``/events`` and ``/stats``)."""
        refused = refuse_operator(browser=True)
        if refused is not None:
            return refused
        nonce = secrets.token_urlsafe(18)
        return Response(
            dashboard_page().replace(NONCE, nonce),
            content_type="text/html; charset=utf-8",
            headers={
                "content-security-policy": dashboard_csp(nonce),
                "x-frame-options": "DENY",
                "x-content-type-options": "nosniff",
                "cache-control": "no-store",
                "referrer-policy": "no-referrer",
            },
        )

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


@functools.cache
def dashboard_page() -> str:
    """``dashboard.html`` (package data), read once, on first use."""
    resource = importlib.resources.files("revconn._gateway").joinpath("dashboard.html")
    return resource.read_text("utf-8")


def admin_credential(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The admin credential of the single ``Authorization`` header: its
    Bearer token, or the password of its Basic credentials (browsers: a
    navigation or an ``EventSource`` cannot send Bearer); else None."""
    bearer = bearer_credential(headers)
    if bearer is not None:
        return bearer
    values = [value for key, value in headers if key.lower() == b"authorization"]
    return basic_password(values[0]) if len(values) == 1 else None


def basic_password(value: bytes) -> str | None:
    """The password of ``Basic base64(user:password)`` (RFC 7617, UTF-8, any
    user name), or None: another scheme, bad base64, not UTF-8, no colon or
    an empty password. The policy compares it (in constant time)."""
    scheme, _, encoded = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        pair = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, colon, password = pair.partition(":")
    return password if colon and password else None


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
