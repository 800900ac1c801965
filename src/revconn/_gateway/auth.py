"""The auth policy: who may connect as which agent, and who may list them.

The gateway extracts the bearer credential from the ``Authorization`` header
only (never a query parameter or cookie) and asks an ``AuthPolicy``. Per-agent
credentials plug in later as another policy; the gateway does not change.
"""

from __future__ import annotations

import enum
import hmac
import logging
import secrets
from collections.abc import Iterable
from typing import Protocol

from .._errors import ConfigError
from .._proto.rules import NAME_RULE, valid_agent_name
from .ratelimit import FailureLimiter
from .replies import Reply, json_reply, too_many_failures, unauthorized

__all__ = [
    "AuthPolicy",
    "Scope",
    "SharedSecretPolicy",
    "admit_agent_name",
    "bearer_credential",
    "count_failure",
    "generate_secret",
    "refuse_limited",
]

log = logging.getLogger("revconn.gateway")

MIN_SECRET_LENGTH = 16


class Scope(enum.Enum):
    """What a credential is being used for."""

    CONNECT = "connect"
    """An agent opening its tunnel (``/ws/connect``)."""
    ADMIN = "admin"
    """Listing agents (``/endpoints``) and other operator calls."""


class AuthPolicy(Protocol):
    def allows(self, credential: str | None, *, agent: str | None, scope: Scope) -> bool:
        """True if ``credential`` may act on ``agent`` (None for gateway-wide
        scopes) in ``scope``. Must be cheap and never raise for bad input."""
        ...


class SharedSecretPolicy:
    """One gateway-wide secret for every agent and every scope."""

    def __init__(self, secret: str) -> None:
        if not secret or not secret.strip():
            raise ConfigError(
                "the gateway secret is empty: pass --secret, set REVCONN_SECRET, "
                "or omit both to have one generated"
            )
        if len(secret) < MIN_SECRET_LENGTH:
            raise ConfigError(
                f"the gateway secret is too short ({len(secret)} characters): "
                f"use at least {MIN_SECRET_LENGTH}, e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`"
            )
        self._secret = secret.encode("utf-8")

    def allows(self, credential: str | None, *, agent: str | None, scope: Scope) -> bool:
        if credential is None:
            return False
        return hmac.compare_digest(credential.encode("utf-8", "surrogateescape"), self._secret)

    def __repr__(self) -> str:  # never print the secret
        return "SharedSecretPolicy(<secret>)"


def generate_secret() -> str:
    """A fresh 256-bit URL-safe secret."""
    return secrets.token_urlsafe(32)


def bearer_credential(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of the single ``Authorization: Bearer <token>`` header, or None.

    Several Authorization headers, another scheme or an empty token count as
    no credential.
    """
    found: bytes | None = None
    for key, value in headers:
        if key.lower() == b"authorization":
            if found is not None:
                return None
            found = value
    if found is None:
        return None
    scheme, _, token = found.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    try:
        return token.decode("ascii")
    except UnicodeDecodeError:
        return None


def admit_agent_name(
    auth: AuthPolicy,
    query: dict[str, list[str]],
    headers: Iterable[tuple[bytes, bytes]],
    *,
    shutting_down: bool,
) -> str | Reply:
    """An agent's request (``/ws/connect``, ``/announce``): its ``name``, or
    the refusal to answer with (400 invalid name, 401 bad credentials, 503
    shutting down). ``query`` is the parsed query string."""
    names = query.get("name", [])
    if len(names) != 1 or not valid_agent_name(names[0]):
        detail = f"name must be one lowercase DNS label: {NAME_RULE}"
        return json_reply(400, {"error": "invalid_name", "detail": detail})
    name = names[0]
    if not auth.allows(bearer_credential(headers), agent=name, scope=Scope.CONNECT):
        return unauthorized()
    if shutting_down:
        return json_reply(503, {"error": "shutting_down", "detail": "gateway is shutting down"})
    return name


def refuse_limited(limiter: FailureLimiter, source: str) -> Reply | None:
    """429 if ``source`` failed to authenticate too often lately, else None.
    Asked before any credential is compared, so a locked-out source learns
    nothing, not even from a correct one."""
    wait = limiter.retry_after(source)
    return None if wait is None else too_many_failures(wait)


def count_failure(limiter: FailureLimiter, source: str, surface: str) -> None:
    """Count a failed authentication from ``source`` on ``surface``; log, once
    per source and window, the moment it is locked out."""
    if limiter.failed(source):
        log.info(
            "%s: %s locked out for %g s after %d failed authentications",
            surface,
            source,
            limiter.window,
            limiter.max_failures,
        )
