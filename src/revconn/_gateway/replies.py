"""The answers the gateway gives by itself: JSON errors with a stable ``error``
field, and the peer formatting its log lines and replies share (sans-I/O)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from .. import _codes
from .._errors import StreamError
from .._proto.headers import Headers

__all__ = [
    "Reply",
    "agent_busy",
    "agent_offline",
    "format_peer",
    "json_reply",
    "not_found",
    "stream_failure",
    "too_many_failures",
    "unauthorized",
    "upstream_broken",
]


@attrs.frozen(slots=True)
class Reply:
    """A complete response the gateway answers by itself (errors, redirects)."""

    status: int
    headers: Headers
    body: bytes


def json_reply(status: int, payload: object, extra: Iterable[tuple[bytes, bytes]] = ()) -> Reply:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    return Reply(status, headers, body)


def unauthorized(
    error: str = "unauthorized", detail: str = "missing or invalid bearer credential"
) -> Reply:
    """401 for a missing, wrong, expired or revoked bearer credential (agents
    and operators)."""
    challenge = b'Bearer realm="revconn"'
    if error != "unauthorized":  # RFC 6750 section 3: the token was presented but is bad
        challenge += b', error="invalid_token"'
    return json_reply(401, {"error": error, "detail": detail}, [(b"www-authenticate", challenge)])


def too_many_failures(retry_after: float) -> Reply:
    """429 for a source locked out after too many failed authentications;
    ``Retry-After`` is ``retry_after`` rounded up to whole seconds."""
    seconds = max(1, math.ceil(retry_after))
    detail = f"too many failed authentications from this address; retry in {seconds} s"
    return json_reply(
        429,
        {"error": "too_many_auth_failures", "detail": detail},
        [(b"retry-after", str(seconds).encode())],
    )


def format_peer(peer: Sequence[Any] | None) -> str:
    """``host:port`` (``[v6]:port``) of a socket peer or ASGI client; "unknown" if absent."""
    if not peer:
        return "unknown"
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def agent_offline(name: str) -> Reply:
    payload = {"error": "agent_offline", "agent": name, "detail": "agent is not connected"}
    return json_reply(503, payload, [(b"retry-after", b"5")])


def agent_busy(name: str, detail: str = "too many concurrent requests") -> Reply:
    payload = {"error": "agent_busy", "agent": name, "detail": detail}
    return json_reply(503, payload, [(b"retry-after", b"1")])


def stream_failure(exc: StreamError, name: str) -> Reply:
    """The reply for a stream that failed before the response started."""
    if exc.error_code == _codes.H2_REFUSED_STREAM:
        return agent_busy(name, str(exc))
    error = "agent_disconnected" if exc.error_code is None else "agent_reset"
    return json_reply(502, {"error": error, "agent": name, "detail": str(exc)})


BROKEN = "the agent's upstream service did not send a valid response"


def upstream_broken(name: str) -> Reply:
    """502 for an upstream answer that is not valid HTTP/1.1, or a connection
    it reset before answering (the detail names no address)."""
    return json_reply(502, {"error": "upstream_unreachable", "agent": name, "detail": BROKEN})


def not_found(detail: str) -> Reply:
    return json_reply(404, {"error": "not_found", "detail": detail})
