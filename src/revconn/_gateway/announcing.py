"""The announce endpoint of the data plane (``PUT``/``DELETE /announce``):
an agent in ``--tunnel-url`` mode registers the URL its service is reached
at, by heartbeat, with the same credentials and name rules as
``/ws/connect`` (docs/protocol.md section 8).

The URL is a request the gateway will make on behalf of strangers, so it is
checked here (SSRF: ``AddressPolicy``) and again by every new connection.
"""

from __future__ import annotations

import logging
import ssl
import time
import weakref
from collections.abc import Iterable
from urllib.parse import parse_qs

import trio

from .. import _codes
from .._proto.announce import AnnouncedUrl, parse_announcement
from .addresses import AddressPolicy, AddressRefused
from .auth import Admission, AuthPolicy, Denial, TokenPolicy, admit_agent_name
from .direct import DirectSession
from .ratelimit import FailureLimiter
from .registry import NameTaken, Registry
from .replies import Reply, json_reply

__all__ = ["Announcements"]

log = logging.getLogger("revconn.gateway")

RESOLVE_TIMEOUT = 5.0
PRUNE_EVERY = 5.0
ALLOW_HINT = "the gateway forwards only to public addresses unless --announce-allow covers them"


def _capped_ttl(ttl: float, expires_at: int | None) -> float:
    """An announcement lasts no longer than the token that made it (it lapses
    then, as a tunnel is closed then; the renewal is refused ``expired``)."""
    if expires_at is None:
        return ttl
    return max(0.001, min(ttl, expires_at - time.time()))


class Announcements:
    """Accepts, renews and withdraws announcements for one gateway."""

    def __init__(
        self,
        registry: Registry,
        auth: AuthPolicy,
        policy: AddressPolicy,
        *,
        timeout: float | None,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        limiter: FailureLimiter | None = None,
    ) -> None:
        """``limiter``: counts failed authentications (the gateway shares one
        across its surfaces; default: a limiter of its own)."""
        self.registry = registry
        self.limiter = limiter if limiter is not None else FailureLimiter()
        self.auth = auth
        self.policy = policy
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._ssl_context = ssl_context
        self._sessions: weakref.WeakSet[DirectSession] = weakref.WeakSet()
        self._tokens: dict[str, tuple[int, str]] = {}
        """name -> (epoch, token id) of announcements made with a token."""

    def session(self, name: str, url: AnnouncedUrl) -> DirectSession:
        session = DirectSession(
            name,
            url,
            self.policy,
            timeout=self._timeout,
            connect_timeout=self._connect_timeout,
            ssl_context=self._ssl_context,
        )
        self._sessions.add(session)
        return session

    async def prune_idle(self) -> None:
        """Run for the gateway's lifetime: idle connections to announced URLs
        close after IDLE_TIMEOUT (or once their service closed them) even
        when no request comes."""
        while True:
            await trio.sleep(PRUNE_EVERY)
            now = trio.current_time()
            for session in list(self._sessions):
                session.prune(now)
            for name in [n for n in self._tokens if self.registry.lookup(n) is None]:
                del self._tokens[name]  # withdrawn or lapsed

    async def revoke(self, token_ids: frozenset[str]) -> int:
        """Withdraw the announcements made with these tokens; how many were."""
        withdrawn = 0
        for name, (epoch, token_id) in list(self._tokens.items()):
            if token_id not in token_ids:
                continue
            del self._tokens[name]
            try:
                if await self.registry.withdraw(name, epoch):
                    withdrawn += 1
                    log.info("agent %r (announced URL, epoch %d) offline: revoked", name, epoch)
            except NameTaken:
                pass  # a tunnel holds the name now: that session has its own grant
        return withdrawn

    def close_all(self) -> None:
        """Gateway shutdown: every announced URL's kept-alive connections close."""
        for session in list(self._sessions):
            session.request_close(_codes.WS_GOING_AWAY, _codes.REASON_SHUTDOWN)

    async def handle(
        self,
        method: bytes,
        query_string: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        *,
        remote: str,
        source: str | None = None,
        shutting_down: bool,
    ) -> Reply:
        """The answer to one announce request (never raises for bad input).

        ``source``: the address failed authentications count against
        (default: ``remote``); a locked-out one gets 429 before its
        credential is looked at."""
        source = remote if source is None else source
        if method not in (b"PUT", b"DELETE"):
            detail = "PUT announces or renews a URL, DELETE withdraws it"
            return json_reply(
                405,
                {"error": "method_not_allowed", "detail": detail},
                [(b"allow", b"PUT, DELETE")],
            )
        query = parse_qs(query_string.decode("latin-1"))
        admitted = admit_agent_name(
            self.auth,
            query,
            headers,
            shutting_down=shutting_down,
            limiter=self.limiter,
            source=source,
            surface="/announce",
        )
        if isinstance(admitted, Reply):
            return admitted
        name = admitted.name
        if method == b"DELETE":
            return await self._withdraw(name, query.get("epoch", []))
        return await self._announce(admitted, body, remote)

    async def _announce(self, admitted: Admission, body: bytes, remote: str) -> Reply:
        name = admitted.name
        try:
            wanted = parse_announcement(body)
        except ValueError as exc:
            return json_reply(400, {"error": "invalid_announcement", "detail": str(exc)})
        url = wanted.url
        with trio.move_on_after(RESOLVE_TIMEOUT):
            try:
                await self.policy.resolve(url.host, url.port)
            except AddressRefused as exc:
                error = "url_unresolvable" if exc.unresolvable else "url_forbidden"
                detail = f"{url.text}: {exc}" + ("" if exc.unresolvable else f"; {ALLOW_HINT}")
                log.info("announcement for %r from %s refused: %s", name, remote, detail)
                return json_reply(400, {"error": error, "agent": name, "detail": detail})
            try:
                announced = await self.registry.announce(
                    name,
                    url.text,
                    ttl=_capped_ttl(wanted.ttl, admitted.grant.expires_at),
                    remote=remote,
                    renewing=wanted.epoch,
                    connect=lambda: self.session(name, url),
                    version=admitted.version,
                )
            except NameTaken as exc:
                error = "replaced" if exc.replaced else "name_in_use"
                payload = {
                    "error": error,
                    "agent": name,
                    "holder": {"transport": exc.holder},
                    "detail": str(exc),
                }
                return json_reply(409, payload)
            token_id = admitted.grant.token_id
            if isinstance(self.auth, TokenPolicy) and self.auth.is_revoked(token_id):
                # Revoked while the URL was resolved (the reload saw no
                # announcement of it yet): withdrawn at once, refused.
                await self.registry.withdraw(name, announced.registration.epoch)
                detail = "this token was revoked: ask the operator for a new one"
                return Denial(401, "revoked", detail).reply()
            if token_id is not None:
                self._tokens[name] = (announced.registration.epoch, token_id)
            else:
                self._tokens.pop(name, None)
            return json_reply(200, announced.to_json())
        detail = f"{url.text}: {url.host} did not resolve within {RESOLVE_TIMEOUT:g} s"
        return json_reply(400, {"error": "url_unresolvable", "agent": name, "detail": detail})

    async def _withdraw(self, name: str, epochs: list[str]) -> Reply:
        epoch: int | None = None
        if epochs:
            if len(epochs) != 1 or not (epochs[0].isascii() and epochs[0].isdigit()):
                detail = "epoch must be the announcement's epoch (a positive integer)"
                return json_reply(400, {"error": "invalid_announcement", "detail": detail})
            epoch = int(epochs[0])
        try:
            withdrawn = await self.registry.withdraw(name, epoch)
        except NameTaken as exc:
            payload = {
                "error": "name_in_use",
                "agent": name,
                "holder": {"transport": exc.holder},
                "detail": f"{exc}: a withdrawal removes announcements only",
            }
            return json_reply(409, payload)
        return json_reply(200, {"name": name, "withdrawn": withdrawn})
