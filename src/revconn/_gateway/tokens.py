"""Per-agent and admin tokens: signing keys, issuing, verifying, revocation.

A token is a JWT (RFC 7519) signed with HMAC-SHA256 by PyJWT. The gateway
verifies it with the same key (``--token-key-file``), without a database:

* header ``{"alg": "HS256", "typ": "JWT", "kid": KEY_ID}`` — ``kid`` names
  the key that signed it, so that several keys can verify during a rotation;
* claims ``iss`` ``"revconn"``, ``jti`` (the token id: what ``--revoked-file``
  lists), ``iat``, ``scope`` (``"agent"`` or ``"admin"``), ``sub`` (the agent
  name, agent tokens only) and, optionally, ``exp``.

A key file holds one line, ``revconn-token-key-v1:`` and 32 random bytes in
URL-safe base64; it is written 0600 and refused when others can read it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import jwt

from .._errors import ConfigError, RevconnError
from .._files import read_private
from .._proto.rules import valid_agent_name

__all__ = [
    "InvalidToken",
    "RevocationList",
    "SigningKey",
    "TokenClaims",
    "TokenVerifier",
    "issue_token",
]

log = logging.getLogger("revconn.gateway")

KEY_PREFIX = "revconn-token-key-v1:"
KEY_BYTES = 32
ISSUER = "revconn"
ALGORITHM = "HS256"
MAX_TOKEN_LENGTH = 4096
"""Longer credentials are refused before any parsing."""
TOKEN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""What a token id (and a line of ``--revoked-file``) looks like."""
MAX_TIME = 253402300799
"""9999-12-31T23:59:59Z: a later ``iat`` or ``exp`` is refused (no timer
or date type goes beyond it)."""
LEEWAY = 30.0
"""Seconds of clock skew accepted on ``iat`` (a token from a machine whose
clock runs ahead); expiry is exact."""


@attrs.frozen(repr=False)
class SigningKey:
    """A token signing key (HMAC-SHA256); ``id`` is derived from it."""

    secret: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))

    @secret.validator
    def _check(self, _attribute: object, value: bytes) -> None:
        if len(value) < KEY_BYTES:
            raise ConfigError(f"a token key needs at least {KEY_BYTES} bytes, got {len(value)}")

    @property
    def id(self) -> str:
        """16 hex digits naming the key (the tokens' ``kid``), not the key itself."""
        return hashlib.sha256(b"revconn key id\0" + self.secret).hexdigest()[:16]

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key."""
        return cls(secrets.token_bytes(KEY_BYTES))

    def text(self) -> str:
        """The key file's content: one line, the prefix then the key in base64url."""
        encoded = base64.urlsafe_b64encode(self.secret).decode("ascii").rstrip("=")
        return f"{KEY_PREFIX}{encoded}\n"

    @classmethod
    def parse(cls, text: str, source: str = "the key") -> SigningKey:
        """The key in ``text`` (as ``text()`` writes it); ConfigError naming
        ``source`` if it is not one."""
        line = text.strip()
        if not line.startswith(KEY_PREFIX):
            raise ConfigError(
                f"{source} is not a revconn token key (it should hold one line starting "
                f"{KEY_PREFIX!r}, as `revconn-gateway token keygen FILE` writes)"
            )
        body = line.removeprefix(KEY_PREFIX)
        try:
            secret = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise ConfigError(f"{source}: the key is not valid base64") from None
        try:
            return cls(secret)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SigningKey:
        """Read a key file; ConfigError naming the file if it is missing,
        malformed or readable by others than its owner."""
        path = Path(path)
        try:
            text = read_private(path, "token key file")
        except FileNotFoundError:
            raise ConfigError(
                f"token key file {path} does not exist: create one with "
                f"`revconn-gateway token keygen {path}`"
            ) from None
        return cls.parse(text, f"token key file {path}")

    def write(self, path: str | os.PathLike[str]) -> None:
        """Create ``path`` (0600) holding this key; never overwrites a file."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(
                f"{path} exists: a key is never overwritten (tokens signed with it would "
                "stop working); choose another file name, or delete it first"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(self.text())

    def __repr__(self) -> str:  # never print the key
        return f"SigningKey(id={self.id})"


@attrs.frozen
class TokenClaims:
    """What a verified token says."""

    token_id: str
    name: str | None
    """The agent it is bound to; None for an admin token."""
    admin: bool
    issued_at: int
    expires_at: int | None
    """Unix time; None: never expires."""
    key_id: str | None = None
    """The key that signed it (set by ``verify``), to see who is still on an
    old key during a rotation."""

    def to_json(self) -> dict[str, object]:
        """These claims as JSON-ready data (Unix times; the key id left out)."""
        return {
            "id": self.token_id,
            "name": self.name,
            "admin": self.admin,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }


class InvalidToken(RevconnError):
    """A credential that is not a valid token; ``reason`` is ``"expired"`` or
    ``"invalid"``, ``detail`` says why (never echoing the token)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def issue_token(
    key: SigningKey,
    name: str | None,
    *,
    admin: bool = False,
    expires_in: float | None = None,
    now: float | None = None,
) -> tuple[str, TokenClaims]:
    """A token bound to agent ``name`` (or, with ``admin``, an admin token
    bound to no name), valid for ``expires_in`` seconds (None: no expiry)."""
    if admin == (name is not None):
        raise ConfigError("a token is either bound to an agent name or an admin token")
    if name is not None and not valid_agent_name(name):
        raise ConfigError(f"{name!r} is not a valid agent name (one lowercase DNS label)")
    if expires_in is not None and not (math.isfinite(expires_in) and expires_in > 0):
        raise ConfigError(f"a token's lifetime must be positive and finite, got {expires_in!r} s")
    issued = int(time.time() if now is None else now)
    claims = TokenClaims(
        token_id=secrets.token_hex(16),
        name=name,
        admin=admin,
        issued_at=issued,
        expires_at=None if expires_in is None else issued + max(1, round(expires_in)),
        key_id=key.id,
    )
    payload: dict[str, object] = {
        "iss": ISSUER,
        "jti": claims.token_id,
        "iat": claims.issued_at,
        "scope": "admin" if admin else "agent",
    }
    if name is not None:
        payload["sub"] = name
    if claims.expires_at is not None:
        payload["exp"] = claims.expires_at
    token = jwt.encode(payload, key.secret, algorithm=ALGORITHM, headers={"kid": key.id})
    return token, claims


class TokenVerifier:
    """Verifies tokens signed by any of ``keys`` (the first is the one that
    signs new tokens; the rest are still accepted during a rotation)."""

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        if not keys:
            raise ConfigError("token verification needs at least one key (--token-key-file)")
        self._keys = {key.id: key for key in keys}
        if len(self._keys) != len(keys):
            raise ConfigError("the same token key was given twice (--token-key-file)")

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of the accepted keys, the signing key's first."""
        return tuple(self._keys)

    def looks_like_token(self, credential: str) -> bool:
        """``credential`` has a JWT's shape (three dot-separated parts): unless
        it is the shared secret itself, it is verified as a token."""
        return credential.count(".") == 2

    def verify(self, credential: str, *, now: float | None = None) -> TokenClaims:
        """The claims of a valid token; InvalidToken otherwise (never another
        exception, whatever the input)."""
        if len(credential) > MAX_TOKEN_LENGTH:
            raise InvalidToken("invalid", "the token is too long")
        if not credential.isascii():  # (a JWT is ASCII; PyJWT raises UnicodeError on surrogates)
            raise InvalidToken("invalid", "not a token")
        try:
            header = jwt.get_unverified_header(credential)
        except jwt.PyJWTError:
            raise InvalidToken("invalid", "not a token") from None
        key = self._keys.get(str(header.get("kid")))
        if key is None:
            # Signed with a key this gateway does not hold (removed after a
            # rotation, or someone else's).
            raise InvalidToken("invalid", "signed with an unknown key")
        try:
            claims = jwt.decode(
                credential,
                key.secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                leeway=0,
                # iat and exp are checked by _claims, against ``now``
                options={
                    "require": ["iss", "jti", "iat", "scope"],
                    "verify_iat": False,
                    "verify_exp": False,
                },
            )
        except jwt.PyJWTError:
            raise InvalidToken("invalid", "the token's signature or claims are invalid") from None
        verified = _claims(claims, time.time() if now is None else now)
        return attrs.evolve(verified, key_id=key.id)


def _claims(claims: dict[str, object], now: float) -> TokenClaims:
    jti, scope, iat = claims.get("jti"), claims.get("scope"), claims.get("iat")
    sub, exp = claims.get("sub"), claims.get("exp")
    if not isinstance(jti, str) or not TOKEN_ID.fullmatch(jti):
        raise InvalidToken("invalid", "the token has no valid id")
    # (bool is an int to Python, not a time; beyond MAX_TIME no clock goes)
    if not isinstance(iat, int) or isinstance(iat, bool) or not 0 <= iat <= MAX_TIME:
        raise InvalidToken("invalid", "the token's issue time is not a time")
    if iat > now + LEEWAY:
        raise InvalidToken("invalid", "the token's issue time is in the future")
    if exp is not None and (
        not isinstance(exp, int) or isinstance(exp, bool) or not 0 <= exp <= MAX_TIME
    ):
        raise InvalidToken("invalid", "the token's expiry is not a time")
    if exp is not None and now >= exp:  # (exact: no leeway)
        raise InvalidToken("expired", "the token has expired")
    if scope == "admin" and sub is None:
        return TokenClaims(jti, None, True, iat, exp)
    if scope == "agent" and isinstance(sub, str) and valid_agent_name(sub):
        return TokenClaims(jti, sub, False, iat, exp)
    raise InvalidToken("invalid", "the token's scope is invalid")


def parse_revoked(lines: Iterable[str], source: str) -> frozenset[str]:
    """Token ids, one a line; blank lines and ``#`` comments are skipped."""
    revoked: set[str] = set()
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not TOKEN_ID.fullmatch(line):
            raise ConfigError(
                f"{source} line {number}: {line[:40]!r} is not a token id (one id a line, "
                "as `revconn-gateway token issue --json` prints it; # starts a comment)"
            )
        revoked.add(line)
    return frozenset(revoked)


class RevocationList:
    """The revoked token ids of ``--revoked-file``, reloaded on demand.

    ``reload()`` reads the file again; ``changed()`` says whether it looks
    different (modification time, size, inode) from when it was last read,
    so that a cheap poll can reload it. A read that failed counts as read: the
    same broken file is not reported again until it changes (or ``reload()``
    is called, as on SIGHUP).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self.ids = self._read()

    def _read(self) -> frozenset[str]:
        try:
            stamp = self._stat()
            self._stamp = stamp  # (even if what follows fails: one report per change)
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"revoked-tokens file {self.path} does not exist: create it (empty is fine), "
                "then list one token id a line"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"revoked-tokens file {self.path}: {reason}") from None
        return parse_revoked(text.splitlines(), f"revoked-tokens file {self.path}")

    def _stat(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def changed(self) -> bool:
        """The file looks different from when it was last read (False while
        it is missing or unreadable: the current list stays in force)."""
        try:
            return self._stat() != self._stamp
        except OSError:
            return False  # gone or unreadable for now: keep the list in force

    def reload(self) -> frozenset[str]:
        """Read the file again; returns the ids revoked since the last read.
        ConfigError (the current list stays in force) if it cannot be read."""
        before = self.ids
        self.ids = self._read()
        return self.ids - before

    def __contains__(self, token_id: object) -> bool:
        return token_id in self.ids
