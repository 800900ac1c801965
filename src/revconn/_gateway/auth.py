"""The auth policy: who may connect as which agent, and who may list them.

The gateway extracts the bearer credential from the ``Authorization`` header
only (never a query parameter or cookie) and asks an ``AuthPolicy``, which
answers with a ``Grant`` or a ``Denial``: ``SharedSecretPolicy`` (one secret
for everything) or ``TokenPolicy`` (per-agent and admin tokens, revocation,
optionally the shared secret beside them).
"""

from __future__ import annotations

import enum
import hmac
import logging
import secrets
from collections.abc import Iterable
from typing import Protocol

import attrs

from .._errors import ConfigError
from .._proto.rules import NAME_RULE, valid_agent_name
from .ratelimit import FailureLimiter
from .replies import Reply, json_reply, too_many_failures, unauthorized
from .tokens import InvalidToken, RevocationList, TokenVerifier

__all__ = [
    "Admission",
    "AuthPolicy",
    "Denial",
    "Grant",
    "Scope",
    "SharedSecretPolicy",
    "TokenPolicy",
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


@attrs.frozen
class Grant:
    """A credential accepted for one scope."""

    token_id: str | None = None
    """The token's id (what ``--revoked-file`` lists); None for the shared secret."""
    expires_at: int | None = None
    """When the credential stops being valid (Unix time); None: never."""
    key_id: str | None = None
    """The key that signed the token."""

    def describe(self) -> str:
        """For a log line: which credential (never the credential itself)."""
        if self.token_id is None:
            return "shared secret"
        return f"token {self.token_id}, key {self.key_id}"


@attrs.frozen
class Denial:
    """A credential refused: 401 (missing, invalid, expired, revoked) or 403
    (valid, but not for this agent or scope). ``error`` is the JSON error
    code, ``detail`` the sentence for humans (never the credential)."""

    status: int
    error: str
    detail: str

    def reply(self) -> Reply:
        """The HTTP answer: the JSON error (with a Bearer challenge for 401)."""
        if self.status == 401:
            return unauthorized(self.error, self.detail)
        return json_reply(self.status, {"error": self.error, "detail": self.detail})


DENIED = Denial(401, "unauthorized", "missing or invalid bearer credential")


@attrs.frozen
class Admission:
    """An agent admitted to connect (or announce) as ``name`` with ``grant``."""

    name: str
    grant: Grant = Grant()
    version: str | None = None
    """What the agent says it runs (its ``User-Agent``), as sent."""
    via: str | None = None
    """The agent's own address when a ``--trusted-proxy`` named it (the peer
    is then that proxy): what the registry lists as its remote."""


class AuthPolicy(Protocol):
    """How the gateway checks credentials: ``SharedSecretPolicy``,
    ``TokenPolicy``, or an object of your own with this method."""

    def authenticate(
        self, credential: str | None, *, agent: str | None, scope: Scope
    ) -> Grant | Denial:
        """May ``credential`` act on ``agent`` (None for gateway-wide scopes)
        in ``scope``? Must be cheap and never raise for bad input."""
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

    def authenticate(
        self, credential: str | None, *, agent: str | None, scope: Scope
    ) -> Grant | Denial:
        """A :class:`Grant` if ``credential`` is the secret (any agent, any
        scope), else a 401 :class:`Denial`."""
        return Grant() if self.matches(credential) else DENIED

    def matches(self, credential: str | None) -> bool:
        """``credential`` is the secret (compared in constant time)."""
        if credential is None:
            return False
        # (surrogatepass: any lone surrogate encodes, and never as the secret)
        return hmac.compare_digest(credential.encode("utf-8", "surrogatepass"), self._secret)

    def allows(self, credential: str | None, *, agent: str | None, scope: Scope) -> bool:
        """``authenticate()`` returns a :class:`Grant`."""
        return isinstance(self.authenticate(credential, agent=agent, scope=scope), Grant)

    def __repr__(self) -> str:  # never print the secret
        return "SharedSecretPolicy(<secret>)"


class TokenPolicy:
    """Per-agent and admin tokens (``tokens.py``), optionally beside a shared
    secret (``--no-shared-secret`` leaves it out).

    An agent token opens the tunnel of its own name only (another name: 403
    ``wrong_agent``) and never the admin surface; an admin token opens the
    admin surface only (403 ``wrong_scope``). Tokens listed in ``revoked``
    are refused (401 ``revoked``); so are expired ones (401 ``expired``).
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        revoked: RevocationList | None = None,
        shared_secret: SharedSecretPolicy | None = None,
    ) -> None:
        self.verifier = verifier
        self.revoked = revoked
        self.shared_secret = shared_secret

    def authenticate(
        self, credential: str | None, *, agent: str | None, scope: Scope
    ) -> Grant | Denial:
        """The shared secret (if kept) or a valid token for ``agent`` and
        ``scope``: a :class:`Grant`; else the :class:`Denial` the class describes."""
        if credential is None:
            return DENIED
        if self.shared_secret is not None and self.shared_secret.matches(credential):
            return Grant()  # (first: a shared secret may have a token's shape)
        if not self.verifier.looks_like_token(credential):
            return DENIED
        try:
            claims = self.verifier.verify(credential)
        except InvalidToken as exc:
            if exc.reason == "expired":
                return Denial(401, "expired", "this token has expired: issue a new one")
            return DENIED
        if self.revoked is not None and claims.token_id in self.revoked:
            return Denial(401, "revoked", "this token was revoked: ask the operator for a new one")
        grant = Grant(claims.token_id, claims.expires_at, claims.key_id)
        if scope is Scope.ADMIN:
            if not claims.admin:
                detail = "an agent token does not open the admin surface: use an admin token"
                return Denial(403, "wrong_scope", detail)
            return grant
        if claims.admin:
            return Denial(403, "wrong_scope", "an admin token cannot open a tunnel")
        if claims.name != agent:
            detail = f"this token connects only as {claims.name!r}"
            return Denial(403, "wrong_agent", detail)
        return grant

    def is_revoked(self, token_id: str | None) -> bool:
        """``token_id`` is on the revocation list (None, the shared secret's: never)."""
        return token_id is not None and self.revoked is not None and token_id in self.revoked

    def __repr__(self) -> str:
        keys = ", ".join(self.verifier.key_ids)
        shared = "" if self.shared_secret is None else ", shared secret"
        return f"TokenPolicy(keys=[{keys}]{shared})"


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
    limiter: FailureLimiter,
    source: str,
    surface: str,
) -> Admission | Reply:
    """An agent's request on ``surface`` (``/ws/connect``, ``/announce``) from
    ``source`` (the address failures count against): its ``name`` and grant,
    or the refusal to answer with (429 locked out, 400 invalid name, 401 bad
    credentials, 403 a token for another name or scope, 503 shutting down).
    ``query`` is the parsed query string. Each refusal of a credential is one
    log line naming the source and the reason, never the credential."""
    refused = refuse_limited(limiter, source)
    if refused is not None:
        return refused
    names = query.get("name", [])
    if len(names) != 1 or not valid_agent_name(names[0]):
        detail = f"name must be one lowercase DNS label: {NAME_RULE}"
        return json_reply(400, {"error": "invalid_name", "detail": detail})
    name = names[0]
    verdict = auth.authenticate(bearer_credential(headers), agent=name, scope=Scope.CONNECT)
    if isinstance(verdict, Denial):
        log.info(
            "%s: agent %r from %s refused: %s",
            surface,
            name,
            source,
            verdict.error,
            extra={"event": "refused", "agent": name, "remote": source, "reason": verdict.error},
        )
        limiter.refused(verdict.error)
        if verdict.status == 401:
            count_failure(limiter, source, surface)
        return verdict.reply()
    if shutting_down:
        return json_reply(503, {"error": "shutting_down", "detail": "gateway is shutting down"})
    agent = next((v for k, v in headers if k.lower() == b"user-agent"), None)
    version = None if agent is None else agent.decode("latin-1")
    return Admission(name, verdict, version)


def refuse_limited(limiter: FailureLimiter, source: str) -> Reply | None:
    """429 if ``source`` failed to authenticate too often lately, else None.
    Asked before any credential is compared, so a locked-out source learns
    nothing, not even from a correct one."""
    wait = limiter.retry_after(source)
    if wait is None:
        return None
    limiter.refused("too_many_auth_failures")
    return too_many_failures(wait)


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
