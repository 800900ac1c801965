"""Announce mode: tell the gateway, every interval, the URL it reaches this
agent's service at, and withdraw it on stop (``--tunnel-url``).

No WebSocket: each announcement is one HTTP/1.1 request on the gateway's
data plane (``PUT {prefix}/announce?name=NAME``, body from
``revconn._proto.announce``), answered with JSON. The gateway keeps the entry
for TTL_INTERVALS intervals; a renewal carries the epoch of the last accepted
announcement, so the gateway can tell ours from one that replaced it.

Fatal answers end ``run()`` (401/403 AuthError, 409 ReplacedError or
FatalError, 400/404 ConfigError); everything else (no connection, a timeout,
5xx, a malformed answer) is logged and retried on the regular schedule: the
schedule *is* the retry, and a retry any sooner would not help an entry that
lives three intervals.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio

from .._errors import (
    ConfigError,
    ConnectError,
    FatalError,
    ReplacedError,
    RevconnError,
)
from .._proto.announce import (
    ANNOUNCE_PATH,
    TTL_INTERVALS,
    announce_target,
    announcement_body,
    parse_url,
)
from .._proto.http1 import END, Body, ParseError, ResponseHead, ResponseParser, request_head
from .dial import USER_AGENT, open_stream, rejection_error, tunnel_url
from .monitor import AgentMonitor

if TYPE_CHECKING:
    from .agent import AgentConfig

__all__ = ["MAX_ANSWER", "WITHDRAW_TIMEOUT", "Announcer", "Exchange", "HttpExchange"]

log = logging.getLogger("revconn.agent")

Exchange = Callable[[bytes, str, bytes], Awaitable[tuple[int, dict[str, object]]]]
"""(method, target, body) -> (status, the answer's JSON object, or {})."""

MAX_ANSWER = 64 * 1024
"""Most bytes read of the gateway's answer (head and body)."""
WITHDRAW_TIMEOUT = 5.0
"""How long stopping waits for the withdrawal (the entry lapses anyway)."""
_DETAIL_CHARS = 300


def _gateway_prefix(config: AgentConfig) -> str:
    """The path prefix of the gateway's data plane (``""`` for none), as the
    tunnel URL has it (``/ws/connect`` dropped)."""
    path = urlsplit(tunnel_url(config.gateway, config.name)).path
    if not path.isascii():
        raise ConfigError(f"gateway URL {config.gateway!r}: percent-encode the path")
    return path.removesuffix("/ws/connect")


class HttpExchange:
    """The default Exchange: one HTTP/1.1 request per connection (``Connection:
    close``), over TCP or TLS as ``--gateway`` says, bounded by the handshake
    timeout to connect (the caller bounds the whole exchange).

    Raises ConnectError (including an answer that is not HTTP, or larger than
    MAX_ANSWER) or HandshakeTimeout; never logs or shows the secret.
    """

    def __init__(self, config: AgentConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        self._url = tunnel_url(config.gateway, config.name)  # only dialed: scheme, host, port
        netloc = urlsplit(self._url).netloc
        if not netloc.isascii():
            raise ConfigError(f"gateway URL {config.gateway!r}: punycode the host name")
        self._host = netloc.encode("ascii")
        self._authorization = b"Bearer " + config.secret.encode("utf-8")
        self._timeout = config.handshake_timeout
        self._ssl_context = ssl_context

    async def __call__(
        self, method: bytes, target: str, body: bytes
    ) -> tuple[int, dict[str, object]]:
        headers = [
            (b"host", self._host),
            (b"authorization", self._authorization),
            (b"user-agent", USER_AGENT.encode("ascii")),
        ]
        if body:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
        headers.append((b"connection", b"close"))
        request = request_head(method, target.encode("ascii"), headers) + body
        stream = await open_stream(self._url, self._timeout, self._ssl_context)
        async with stream:
            try:
                await stream.send_all(request)
                status, answer = await _read_answer(stream, method)
            except (trio.BrokenResourceError, OSError) as exc:
                cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
                raise ConnectError(f"the connection to the gateway broke ({cause})") from None
            except ParseError as exc:
                raise ConnectError(
                    f"the gateway's answer is not valid HTTP/1.1 ({exc.detail})"
                ) from None
        return status, _json_object(answer)


async def _read_answer(stream: trio.abc.ReceiveStream, method: bytes) -> tuple[int, bytes]:
    """The answer's status and body, read to its end (at most MAX_ANSWER bytes)."""
    parser = ResponseParser()
    parser.expect(method)
    status: int | None = None
    body = bytearray()
    received = 0
    while True:
        event = parser.next_event()
        if event is None:
            data = await stream.receive_some(16 * 1024)
            if not data:
                if status is None:
                    raise ConnectError("the gateway closed the connection without an answer")
                try:
                    parser.feed_eof()  # ends a body delimited by the close
                except ParseError:
                    raise ConnectError("the gateway closed the connection mid-answer") from None
                continue
            received += len(data)
            if received > MAX_ANSWER:
                raise ConnectError(f"the gateway's answer is larger than {MAX_ANSWER} bytes")
            parser.feed(bytes(data))
        elif isinstance(event, ResponseHead):
            status = event.status
        elif isinstance(event, Body):
            body += event.data
        elif event is END and status is not None:
            return status, bytes(body)
        # else an Informational (1xx) answer: the final one follows


def _json_object(data: bytes) -> dict[str, object]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


class Announcer:
    """Announces ``config.tunnel_url`` for ``config.name`` every
    ``config.announce_interval`` seconds until ``stop()``.

    ``exchange`` performs one request (default: HttpExchange over the
    network); ``on_announced`` is called once, at the first accepted
    announcement.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        exchange: Exchange | None = None,
        ssl_context: ssl.SSLContext | None = None,
        on_announced: Callable[[], None] | None = None,
        monitor: AgentMonitor | None = None,
    ) -> None:
        if config.tunnel_url is None:
            raise ConfigError("the announcer needs a URL to announce: pass --tunnel-url")
        self.config = config
        self.url = parse_url(config.tunnel_url).text
        self.interval = config.announce_interval
        ttl = TTL_INTERVALS * self.interval
        self.ttl: float = int(ttl) if ttl.is_integer() else ttl
        self.epoch: int | None = None
        """The epoch of our announcement, from the gateway's last 200 answer."""
        self._exchange = exchange if exchange is not None else HttpExchange(config, ssl_context)
        self._on_announced = on_announced
        self.monitor = monitor if monitor is not None else AgentMonitor()
        self._prefix = _gateway_prefix(config)
        self._scope = trio.CancelScope()
        self._announced = False
        self._failing = False

    def stop(self) -> None:
        """Make ``run()`` stop announcing, withdraw, and return."""
        self._scope.cancel()

    async def run(self) -> None:
        """Announce on schedule until ``stop()``, then withdraw and return
        (call it once).

        Raises AuthError, ReplacedError, FatalError or ConfigError when the
        gateway's answer means retrying cannot help.
        """
        with self._scope:
            await trio.lowlevel.checkpoint()  # stopped before it ran: announce nothing
            await self._announce_forever()
        if self._scope.cancelled_caught:
            await self._withdraw()

    async def _announce_forever(self) -> None:
        while True:
            started = trio.current_time()
            next_at = started + self.interval
            failure = await self._announce_once()
            if failure is not None:
                self._failing = True
                wait = max(0.0, next_at - trio.current_time())
                if self.monitor.state == "online":  # it was accepted until now
                    self.monitor.lost("announce failed", failure)
                else:
                    self.monitor.failed(failure)
                self.monitor.enter("retrying", retry_in=wait)
                log.warning("announce failed: %s; next try in %.3g s", failure, wait)
            await trio.sleep_until(next_at)

    async def _announce_once(self) -> str | None:
        """One announcement; None when accepted, else why it failed (transient)."""
        self.monitor.attempts += 1
        timeout = self.config.handshake_timeout
        body = announcement_body(self.url, self.ttl, self.epoch)
        target = announce_target(self._prefix, self.config.name)
        # Shielded: a stop() while the gateway may be accepting this one waits
        # for its answer (bounded), so the epoch it returns can be withdrawn.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + timeout
            try:
                status, answer = await self._exchange(b"PUT", target, body)
            except FatalError:
                raise
            except RevconnError as exc:
                return str(exc)
        if scope.cancelled_caught:
            return f"no answer from the gateway within {timeout:g} s"
        return self._accepted(status, answer)

    def _accepted(self, status: int, answer: dict[str, object]) -> str | None:
        name = self.config.name
        error = answer.get("error")
        detail = _text(answer.get("detail"))
        if status == 200:
            epoch = answer.get("epoch")
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
                return "the gateway's answer (HTTP 200) carries no valid epoch"
            ttl = answer.get("ttl")
            if isinstance(ttl, bool) or not isinstance(ttl, int | float):
                ttl = self.ttl
            renewed = epoch == self.epoch and not self._failing
            if not renewed:
                self.monitor.online([])
            self.epoch = epoch
            self._failing = False
            if renewed:
                log.debug("renewed %s as %r (ttl %g s, epoch %d)", self.url, name, ttl, epoch)
            else:
                log.info("announced %s as %r (ttl %g s)", self.url, name, ttl)
            if not self._announced:
                self._announced = True
                if self._on_announced is not None:
                    self._on_announced()
            return None
        if status in (401, 403):
            raise rejection_error(status, answer)
        if status == 409 and error == "replaced":
            holder = _holder(answer)
            if holder == "websocket":
                raise ReplacedError(f"replaced: a websocket agent connected as {name!r}")
            if holder == "url":
                raise ReplacedError(f"replaced: another agent announced a URL as {name!r}")
            raise ReplacedError(f"replaced: another agent took the name {name!r}")
        if status == 409 and error == "name_in_use":
            raise FatalError(
                f"name {name!r} is held by a websocket agent: stop it, or pick another --name"
            )
        if status == 400 and error == "url_unresolvable":
            # The gateway's DNS (or ours) may be having a bad minute: retry.
            return f"the gateway cannot resolve the URL's host ({detail or 'no detail'})"
        if status == 400:
            raise ConfigError(
                f"the gateway refused the announcement of {self.url} as {name!r} "
                f"(HTTP 400 {_text(error) or 'bad request'}): {detail or 'no detail given'}"
            )
        if status == 404:
            raise ConfigError(
                f"the gateway does not serve {self._prefix}{ANNOUNCE_PATH} (HTTP 404): "
                "it is an older revconn gateway (upgrade it, or use tunnel mode: drop "
                "--tunnel-url), or --gateway is not a revconn gateway's data plane"
            )
        why = ", ".join(part for part in (_text(error), detail) if part)
        return f"the gateway answered HTTP {status}" + (f" ({why})" if why else "")

    async def _withdraw(self) -> None:
        epoch = self.epoch
        if epoch is None:
            log.debug("nothing to withdraw: %s was never announced", self.url)
            return
        target = announce_target(self._prefix, self.config.name, epoch)
        lapse = f"the gateway drops {self.url} within {self.ttl:g} s"
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + WITHDRAW_TIMEOUT
            try:
                status, answer = await self._exchange(b"DELETE", target, b"")
            except RevconnError as exc:
                log.warning("withdraw failed: %s; %s", exc, lapse)
                return
        if scope.cancelled_caught:
            log.warning("withdraw failed: no answer within %g s; %s", WITHDRAW_TIMEOUT, lapse)
        elif status != 200:
            log.warning("withdraw failed: the gateway answered HTTP %d; %s", status, lapse)
        elif answer.get("withdrawn") is True:
            log.info("withdrew %s", self.url)
        else:
            log.info(
                "nothing to withdraw: the gateway no longer held %s as %r",
                self.url,
                self.config.name,
            )


def _holder(answer: dict[str, object]) -> str | None:
    holder = answer.get("holder")
    if isinstance(holder, dict):
        transport = holder.get("transport")
        if isinstance(transport, str):
            return transport
    return None


def _text(value: object) -> str:
    """A string from the gateway's answer, shortened, for a message."""
    if not isinstance(value, str):
        return ""
    value = value.strip()
    return value if len(value) <= _DETAIL_CHARS else value[: _DETAIL_CHARS - 3] + "..."
