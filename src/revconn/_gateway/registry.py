"""The registry: agent name -> how to reach it, for both transports.

* ``websocket``: a live tunnel session (registered on connect, removed on
  disconnect);
* ``url``: an announced URL (``--tunnel-url``), renewed by heartbeat and
  dropped exactly when its TTL lapses or when it is withdrawn.

Names are single-owner: a newer WebSocket session replaces whatever held the
name; a newer announcement replaces an older announcement, but never a live
WebSocket session (``NameTaken``).

``Registry`` is the interface (a shared backend such as Redis implements it
later); ``InMemoryRegistry`` is the default. Nothing outside this module may
assume every agent lives in this process: callers go through ``lookup`` (which
answers only for sessions reachable from here: tunnels held here, announced
URLs) and ``snapshot`` (which lists them all).
"""

from __future__ import annotations

import collections
import datetime
import enum
import heapq
import itertools
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Protocol, runtime_checkable

import attrs
import trio

from .. import _codes
from .._proto.connect import UpstreamInfo

__all__ = [
    "AgentInfo",
    "AgentSession",
    "Announced",
    "InMemoryRegistry",
    "NameTaken",
    "PresenceSnapshot",
    "Registration",
    "Registry",
    "RegistryEvent",
    "RegistryEventKind",
    "RequestStream",
    "Subscription",
]

log = logging.getLogger("revconn.registry")

FLAP_WINDOW = 60.0
FLAP_THRESHOLD = 3
WEBSOCKET = "websocket"
URL = "url"
REASON_EXPIRED = "announcement expired"
REASON_WITHDRAWN = "withdrawn"
REASON_CLOSED = "closed"
MAX_VERSION = 64
"""Characters of an agent's self-reported version kept (the rest is cut)."""


def clean_version(value: str | None) -> str | None:
    """An agent's self-reported version, fit to list: printable ASCII, at
    most MAX_VERSION characters; None if nothing is left."""
    if not value:
        return None
    kept = "".join(c for c in value[:MAX_VERSION] if " " <= c <= "~")
    return kept or None


class RequestStream(Protocol):
    """One lent tunnel stream (raw HTTP/1.1 both ways), as the exchange drives it."""

    @property
    def upstream(self) -> UpstreamInfo | None:
        """How the agent's upstream is addressed (from the agent's ``200``)."""
        ...

    @property
    def remote_ended(self) -> bool:
        """The agent ended its side (its upstream connection closed)."""
        ...

    async def send_body(
        self,
        data: bytes,
        *,
        end_stream: bool = False,
        queued: Callable[[], None] | None = None,
    ) -> None:
        """Send bytes (waits for flow-control credit); ``queued()`` is called
        once they are all queued. StreamError if the agent reset the stream
        or the session ended."""
        ...

    async def read(self) -> bytes | None:
        """Bytes received so far, or None once the agent ended its side;
        StreamError if the stream failed."""
        ...

    def reset(self, error_code: int = ...) -> None:
        """Abandon the stream (the agent closes its upstream connection); idempotent."""
        ...


@runtime_checkable
class AgentSession(Protocol):
    """What the gateway needs from an agent's live session: the registry asks
    it to close, the exchange borrows streams from it. A session held by
    another process (a shared registry) is reached through such an object too;
    nothing outside the registry tests for a concrete class."""

    @property
    def rtt(self) -> float | None: ...

    @property
    def accepting(self) -> bool:
        """False once the session takes no new requests (draining, closing)."""
        ...

    def request_close(self, close_code: int, reason: str) -> None:
        """Ask the session to end (GOAWAY, then close the WebSocket). Must not block."""

    async def acquire(self, *, fresh: bool = False) -> tuple[RequestStream, bool]:
        """Lend a stream for one request (an idle pooled one, else a new one;
        with ``fresh`` always a new one), and whether it is new. AgentBusy at
        the agent's stream limit, StreamError if closing, StreamRefused if the
        agent cannot reach its upstream."""
        ...

    def release(self, stream: RequestStream, *, reusable: bool) -> None:
        """Take a lent stream back once its response has ended."""
        ...


@attrs.frozen
class Registration:
    """Proof of one registration; ``unregister`` needs it, so a stale session
    can never remove a newer one."""

    name: str
    epoch: int


@attrs.frozen
class AgentInfo:
    """One row of the registry listing."""

    name: str
    epoch: int
    remote: str
    connected_at: datetime.datetime
    rtt_ms: float | None
    flapping: bool
    replacements: int
    """Replacements of this name seen in the last ``FLAP_WINDOW`` seconds."""
    connected_at_iso: str = attrs.field(default="", eq=False, repr=False)
    """``connected_at`` as ISO 8601 UTC ("...Z"), formatted once at registration."""
    transport: str = WEBSOCKET
    """``websocket`` (a live tunnel) or ``url`` (an announced URL)."""
    url: str | None = None
    """The announced URL (``url`` transport only)."""
    expires_at: datetime.datetime | None = None
    """When the announcement lapses unless renewed (``url`` transport only)."""
    version: str | None = None
    """What the agent says it runs (its ``User-Agent``), if it said."""

    def to_json(self) -> dict[str, object]:
        """This row as ``GET /endpoints`` lists it (JSON-ready)."""
        return {
            "name": self.name,
            "status": "online",
            "transport": self.transport,
            "version": self.version,
            "url": self.url,
            "connected_at": self.connected_at_iso or _iso(self.connected_at),
            "expires_at": None if self.expires_at is None else _iso(self.expires_at),
            "remote": self.remote,
            "epoch": self.epoch,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "flapping": self.flapping,
            "recent_replacements": self.replacements,
        }


@attrs.frozen
class Announced:
    """An accepted announcement: its registration (withdraw with it) and expiry."""

    registration: Registration
    url: str
    ttl: float
    expires_at: datetime.datetime

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.registration.name,
            "transport": URL,
            "url": self.url,
            "epoch": self.registration.epoch,
            "ttl": self.ttl,
            "expires_at": _iso(self.expires_at),
        }


class NameTaken(Exception):
    """An announcement refused: ``holder`` (its transport) has the name.
    ``replaced``: the announcement being renewed was replaced by it."""

    def __init__(self, name: str, holder: str, *, replaced: bool) -> None:
        what = "replaced by" if replaced else "held by"
        super().__init__(f"agent name {name!r} is {what} a {holder} agent")
        self.name = name
        self.holder = holder
        self.replaced = replaced


def _iso(moment: datetime.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class RegistryEventKind(enum.Enum):
    """What a :class:`RegistryEvent` reports."""

    ONLINE = "online"
    """``name`` is held by ``epoch`` now."""
    OFFLINE = "offline"
    """``epoch`` let go of ``name``, for ``reason``."""
    REPLACED = "replaced"
    """``epoch`` was replaced by ``new_epoch``: between the old epoch's
    ``offline`` (reason ``replaced``) and the new one's ``online``."""


@attrs.frozen
class RegistryEvent:
    """A presence change. Every ``online`` is followed, sooner or later, by
    exactly one ``offline`` of the same name and epoch."""

    kind: RegistryEventKind
    name: str
    epoch: int
    reason: str | None = None
    """(offline) closed, heartbeat timeout, replaced, revoked, shutdown,
    credential expired, protocol error, announcement expired, withdrawn."""
    new_epoch: int | None = None
    """(replaced) The epoch that took the name over."""
    remote: str = attrs.field(default="", eq=False)
    transport: str = attrs.field(default=WEBSOCKET, eq=False)
    version: str | None = attrs.field(default=None, eq=False)
    rtt_ms: float | None = attrs.field(default=None, eq=False)
    url: str | None = attrs.field(default=None, eq=False)
    at: datetime.datetime | None = attrs.field(default=None, eq=False)
    """When it happened (UTC)."""
    seq: int = attrs.field(default=0, eq=False)
    """This registry's count of events, 1 for the first: increasing by one
    from event to event, so a gap or a duplicate shows."""

    def to_json(self) -> dict[str, object]:
        """This event as ``GET /events`` sends it (JSON-ready): ``reason`` only
        for ``offline``, ``new_epoch`` only for ``replaced``."""
        data: dict[str, object] = {
            "event": self.kind.value,
            "seq": self.seq,
            "at": None if self.at is None else _iso(self.at),
            "name": self.name,
            "epoch": self.epoch,
            "transport": self.transport,
            "remote": self.remote,
            "version": self.version,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "url": self.url,
        }
        if self.kind is RegistryEventKind.OFFLINE:
            data["reason"] = self.reason
        if self.kind is RegistryEventKind.REPLACED:
            data["new_epoch"] = self.new_epoch
        return data


@attrs.frozen
class PresenceSnapshot:
    """Every online agent at one instant: what a late subscriber starts
    from; the changes after it follow, numbered from ``seq + 1``."""

    agents: tuple[AgentInfo, ...]
    seq: int
    """The number of the last event before this listing."""

    def to_json(self) -> dict[str, object]:
        """This listing as ``GET /events`` sends it first (JSON-ready)."""
        return {
            "event": "snapshot",
            "seq": self.seq,
            "agents": [agent.to_json() for agent in self.agents],
        }


class Subscription:
    """A bounded stream of registry events, and the listing they follow.

    ``snapshot`` is every online agent at the instant of subscribing and
    ``seq`` the number of the last event before it: the events received
    next are exactly the changes after it (no gap, no duplicate).

    A subscriber that falls more than ``capacity`` events behind is cut off:
    its iteration ends and ``overflowed`` is True (resubscribe for a fresh
    snapshot). The registry never waits for a subscriber.
    """

    def __init__(self, capacity: int) -> None:
        self._send, self._receive = trio.open_memory_channel[RegistryEvent](capacity)
        self.overflowed = False
        self.snapshot: tuple[AgentInfo, ...] = ()
        self.seq = 0

    def _publish(self, event: RegistryEvent) -> bool:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.overflowed = True
            self._send.close()
            return False
        except trio.ClosedResourceError:
            return False
        return True

    def _close(self) -> None:
        self._send.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> RegistryEvent:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


class Registry(Protocol):
    """Where agents are registered. All methods may be called concurrently."""

    async def register(
        self, name: str, session: AgentSession, *, remote: str, version: str | None = None
    ) -> Registration:
        """Register ``session`` under ``name``; a session already there is asked
        to close with 4409 "replaced" (an announcement there is dropped)."""
        ...

    async def unregister(self, registration: Registration, reason: str = REASON_CLOSED) -> bool:
        """Remove the registration if it is still the current one for its
        name (its ``offline`` event says ``reason``)."""
        ...

    async def announce(
        self,
        name: str,
        url: str,
        *,
        ttl: float,
        remote: str,
        renewing: int | None,
        connect: Callable[[], AgentSession],
        version: str | None = None,
    ) -> Announced:
        """Announce (or, with the epoch it got, renew) ``url`` for ``name``
        for ``ttl`` seconds; ``connect()`` makes the session that forwards to
        it when one is needed. NameTaken if a WebSocket session holds the
        name, or if the announcement being renewed was replaced."""
        ...

    async def withdraw(self, name: str, epoch: int | None) -> bool:
        """Drop the announcement for ``name`` (only epoch ``epoch`` if given);
        False if there was none. NameTaken if a WebSocket session holds it."""
        ...

    async def expire_announcements(self) -> None:
        """Run for the gateway's lifetime: drops each announcement the moment
        its TTL lapses."""
        ...

    async def snapshot(self) -> list[AgentInfo]:
        """All online agents, sorted by name."""
        ...

    def lookup(self, name: str) -> AgentSession | None:
        """The session for ``name`` if it is held by this process."""
        ...

    def subscribe(self, capacity: int = 100) -> AbstractAsyncContextManager[Subscription]:
        """Change events from now on, after the listing at this instant
        (``Subscription.snapshot``)."""
        ...


@attrs.define
class _Entry:
    session: AgentSession
    epoch: int
    remote: str
    connected_at: datetime.datetime
    connected_at_iso: str
    replaced_at: collections.deque[float] | None
    """Recent replacement times; None until the name is first replaced (saves
    an idle deque per agent)."""
    transport: str = WEBSOCKET
    url: str | None = None
    expires: float = math.inf
    """(``url``) When the announcement lapses, on ``clock``."""
    expires_wall: datetime.datetime | None = None
    version: str | None = None


class InMemoryRegistry:
    """The registry of this process's agents."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self._entries: dict[str, _Entry] = {}
        # Epochs start at a random point: a renewal carrying an epoch from
        # before a restart must not match another agent's new one.
        self._epochs = itertools.count(1 + secrets.randbelow(1 << 40))
        self._clock = clock
        self._wall_clock = wall_clock or (lambda: datetime.datetime.now(datetime.UTC))
        self._subscribers: set[Subscription] = set()
        self._expiries: list[tuple[float, int, str]] = []
        """A heap of (time, epoch, name): at most one item per announcement
        (a renewal pushes none: its item, when it comes up early, is pushed
        again at the new expiry) and per replacement record."""
        self._replaced: dict[str, tuple[int, str, float]] = {}
        """name -> (epoch, holder transport, forget at): the last announcement
        replaced under each name, so its next renewal is told (one per name,
        forgotten when it would have lapsed)."""
        self._expiry_wait: trio.CancelScope | None = None
        self._seq = 0
        """Events published so far."""

    def __len__(self) -> int:
        return len(self._entries)

    # The in-memory implementation never blocks; the async signatures are for
    # shared backends.
    async def register(
        self, name: str, session: AgentSession, *, remote: str, version: str | None = None
    ) -> Registration:
        """See :class:`Registry`; never blocks (it calls ``register_nowait``)."""
        return self.register_nowait(name, session, remote=remote, version=version)

    def register_nowait(
        self, name: str, session: AgentSession, *, remote: str, version: str | None = None
    ) -> Registration:
        """``register()`` for synchronous callers: the same, done at once."""
        epoch = next(self._epochs)
        history = self._replace(name, epoch, WEBSOCKET)
        now_wall = self._wall_clock()
        entry = _Entry(session, epoch, remote, now_wall, _iso(now_wall), history)
        entry.version = clean_version(version)
        self._entries[name] = entry
        self._publish_about(RegistryEventKind.ONLINE, name, entry)
        return Registration(name, epoch)

    def _replace(self, name: str, epoch: int, by: str) -> collections.deque[float] | None:
        """Retire whatever holds ``name`` for the newcomer ``epoch`` (of
        transport ``by``); the name's replacement history."""
        old = self._entries.get(name)
        if old is None:
            return None
        now = self._clock()
        history = old.replaced_at or collections.deque(maxlen=FLAP_THRESHOLD * 4)
        history.append(now)
        while history and now - history[0] > FLAP_WINDOW:
            history.popleft()
        self._publish_about(RegistryEventKind.OFFLINE, name, old, reason=_codes.REASON_REPLACED)
        self._publish_about(RegistryEventKind.REPLACED, name, old, new_epoch=epoch)
        if len(history) >= FLAP_THRESHOLD:
            log.warning(
                "agent %r is flapping: replaced %d times in %.0f s (two processes with one name?)",
                name,
                len(history),
                FLAP_WINDOW,
            )
        log.info(
            "agent %r epoch %d (%s) replaced by epoch %d (%s)",
            name,
            old.epoch,
            old.transport,
            epoch,
            by,
        )
        if old.transport == URL:
            self._replaced[name] = (old.epoch, by, old.expires)
        old.session.request_close(_codes.WS_REPLACED, _codes.REASON_REPLACED)
        return history

    async def unregister(self, registration: Registration, reason: str = REASON_CLOSED) -> bool:
        """See :class:`Registry`; never blocks (it calls ``unregister_nowait``)."""
        return self.unregister_nowait(registration, reason)

    def unregister_nowait(self, registration: Registration, reason: str = REASON_CLOSED) -> bool:
        """``unregister()`` for synchronous callers: the same, done at once."""
        entry = self._entries.get(registration.name)
        if entry is None or entry.epoch != registration.epoch:
            return False
        self._drop(registration.name, entry, reason)
        return True

    def _drop(self, name: str, entry: _Entry, reason: str) -> None:
        del self._entries[name]
        if entry.transport == URL:
            # The registry made this session: it closes it (idle connections).
            entry.session.request_close(_codes.WS_GOING_AWAY, reason)
            log.info("agent %r (url, epoch %d) offline: %s", name, entry.epoch, reason)
        self._publish_about(RegistryEventKind.OFFLINE, name, entry, reason=reason)

    # -- announced URLs -----------------------------------------------------------
    async def announce(
        self,
        name: str,
        url: str,
        *,
        ttl: float,
        remote: str,
        renewing: int | None,
        connect: Callable[[], AgentSession],
        version: str | None = None,
    ) -> Announced:
        """See :class:`Registry`; never blocks (it calls ``announce_nowait``)."""
        return self.announce_nowait(
            name, url, ttl=ttl, remote=remote, renewing=renewing, connect=connect, version=version
        )

    def announce_nowait(
        self,
        name: str,
        url: str,
        *,
        ttl: float,
        remote: str,
        renewing: int | None,
        connect: Callable[[], AgentSession],
        version: str | None = None,
    ) -> Announced:
        """``announce()`` for synchronous callers: the same, done at once."""
        now = self._clock()
        self._expire_due(now)
        replaced = self._replaced.get(name)
        if renewing is not None and replaced is not None and replaced[0] == renewing:
            del self._replaced[name]
            raise NameTaken(name, replaced[1], replaced=True)
        entry = self._entries.get(name)
        if entry is not None and entry.transport == WEBSOCKET:
            raise NameTaken(name, WEBSOCKET, replaced=False)
        expires = now + ttl
        expires_wall = self._wall_clock() + datetime.timedelta(seconds=ttl)
        if entry is not None and renewing == entry.epoch:
            if entry.url != url:
                log.info("agent %r (url) now announces %s", name, url)
                entry.session.request_close(_codes.WS_GOING_AWAY, "url changed")
                entry.session = connect()
                entry.url = url
            entry.remote = remote
        else:
            epoch = next(self._epochs)
            history = self._replace(name, epoch, URL)
            now_wall = self._wall_clock()
            entry = _Entry(connect(), epoch, remote, now_wall, _iso(now_wall), history, URL, url)
            entry.version = clean_version(version)
            self._entries[name] = entry
            log.info("agent %r announced %s from %s (epoch %d)", name, url, remote, epoch)
            self._publish_about(RegistryEventKind.ONLINE, name, entry)
        renewal = entry.expires != math.inf
        entry.expires = expires
        entry.expires_wall = expires_wall
        if not renewal:
            self._schedule(expires, entry.epoch, name)
        return Announced(Registration(name, entry.epoch), url, ttl, expires_wall)

    def _schedule(self, at: float, epoch: int, name: str) -> None:
        heapq.heappush(self._expiries, (at, epoch, name))
        scope = self._expiry_wait
        if scope is not None and at < scope.deadline:
            scope.deadline = at

    async def withdraw(self, name: str, epoch: int | None) -> bool:
        """See :class:`Registry`; never blocks (it calls ``withdraw_nowait``)."""
        return self.withdraw_nowait(name, epoch)

    def withdraw_nowait(self, name: str, epoch: int | None) -> bool:
        """``withdraw()`` for synchronous callers: the same, done at once."""
        self._expire_due(self._clock())
        entry = self._entries.get(name)
        if entry is None or (epoch is not None and entry.epoch != epoch):
            return False
        if entry.transport == WEBSOCKET:
            raise NameTaken(name, WEBSOCKET, replaced=False)
        self._drop(name, entry, REASON_WITHDRAWN)
        return True

    async def expire_announcements(self) -> None:
        """See :class:`Registry`: runs until cancelled, dropping each
        announcement the moment its TTL lapses."""
        while True:
            try:
                with trio.CancelScope() as self._expiry_wait:
                    if self._expiries:
                        self._expiry_wait.deadline = self._expiries[0][0]
                    await trio.sleep_forever()
            finally:
                self._expiry_wait = None
            self._expire_due(self._clock())

    def _expire_due(self, now: float) -> None:
        heap = self._expiries
        later: list[tuple[float, int, str]] = []
        while heap and heap[0][0] <= now:
            _, epoch, name = heapq.heappop(heap)
            entry = self._entries.get(name)
            if entry is not None and entry.epoch == epoch:
                if entry.expires <= now:
                    self._drop(name, entry, REASON_EXPIRED)
                else:
                    later.append((entry.expires, epoch, name))  # renewed since
                continue
            replaced = self._replaced.get(name)
            if replaced is not None and replaced[0] == epoch:
                if replaced[2] <= now:
                    del self._replaced[name]
                else:
                    later.append((replaced[2], epoch, name))
        for item in later:
            heapq.heappush(heap, item)

    async def snapshot(self) -> list[AgentInfo]:
        """See :class:`Registry`; never blocks (it calls ``snapshot_nowait``)."""
        return self.snapshot_nowait()

    def snapshot_nowait(self) -> list[AgentInfo]:
        """``snapshot()`` for synchronous callers: all online agents, sorted by name."""
        now = self._clock()
        self._expire_due(now)
        rows = []
        for name in sorted(self._entries):
            e = self._entries[name]
            recent = sum(1 for t in e.replaced_at or () if now - t <= FLAP_WINDOW)
            rtt = e.session.rtt
            rows.append(
                AgentInfo(
                    name=name,
                    epoch=e.epoch,
                    remote=e.remote,
                    connected_at=e.connected_at,
                    rtt_ms=None if rtt is None else rtt * 1000.0,
                    flapping=recent >= FLAP_THRESHOLD,
                    replacements=recent,
                    connected_at_iso=e.connected_at_iso,
                    transport=e.transport,
                    url=e.url,
                    expires_at=e.expires_wall,
                    version=e.version,
                )
            )
        return rows

    def lookup(self, name: str) -> AgentSession | None:
        """The session for ``name``, or None (also for an announcement that
        lapsed this instant)."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        if entry.expires != math.inf and entry.expires <= self._clock():
            self._expire_due(self._clock())  # lapsed this instant: gone now, not at the sweep
            return None
        return entry.session

    @asynccontextmanager
    async def subscribe(self, capacity: int = 100) -> AsyncIterator[Subscription]:
        """See :class:`Registry`: an async context manager giving a
        ``Subscription`` that holds at most ``capacity`` unread events."""
        with self._subscription(capacity) as sub:
            yield sub

    @contextmanager
    def _subscription(self, capacity: int) -> Iterator[Subscription]:
        sub = Subscription(capacity)
        # (no checkpoint between the listing and joining: nothing can change in between)
        sub.snapshot = tuple(self.snapshot_nowait())
        sub.seq = self._seq
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
            sub._close()

    def _publish_about(
        self,
        kind: RegistryEventKind,
        name: str,
        entry: _Entry,
        *,
        reason: str | None = None,
        new_epoch: int | None = None,
    ) -> None:
        self._seq += 1
        rtt = entry.session.rtt
        event = RegistryEvent(
            kind,
            name,
            entry.epoch,
            reason=reason,
            new_epoch=new_epoch,
            remote=entry.remote,
            transport=entry.transport,
            version=entry.version,
            rtt_ms=None if rtt is None else rtt * 1000.0,
            url=entry.url,
            at=self._wall_clock(),
            seq=self._seq,
        )
        self._publish(event)

    def _publish(self, event: RegistryEvent) -> None:
        for sub in list(self._subscribers):
            if not sub._publish(event):
                self._subscribers.discard(sub)
