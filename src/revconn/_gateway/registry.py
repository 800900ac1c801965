"""The socket registry: agent name -> live tunnel session.

``Registry`` is the interface (a shared backend such as Redis implements it
later); ``InMemoryRegistry`` is the default. Nothing outside this module may
assume every agent lives in this process: callers go through ``lookup`` (which
answers only for sessions held here) and ``snapshot`` (which lists them all).
"""

from __future__ import annotations

import collections
import datetime
import enum
import itertools
import logging
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
    "InMemoryRegistry",
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

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": "online",
            "transport": "websocket",
            "connected_at": self.connected_at_iso or _iso(self.connected_at),
            "remote": self.remote,
            "epoch": self.epoch,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "flapping": self.flapping,
            "recent_replacements": self.replacements,
        }


def _iso(moment: datetime.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class RegistryEventKind(enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"
    REPLACED = "replaced"


@attrs.frozen
class RegistryEvent:
    kind: RegistryEventKind
    name: str
    epoch: int


class Subscription:
    """A bounded stream of registry events.

    A subscriber that falls more than ``capacity`` events behind is cut off:
    its iteration ends and ``overflowed`` is True (resubscribe and take a
    snapshot). The registry never waits for a subscriber.
    """

    def __init__(self, capacity: int) -> None:
        self._send, self._receive = trio.open_memory_channel[RegistryEvent](capacity)
        self.overflowed = False

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

    async def register(self, name: str, session: AgentSession, *, remote: str) -> Registration:
        """Register ``session`` under ``name``; a session already there is asked
        to close with 4409 "replaced"."""
        ...

    async def unregister(self, registration: Registration) -> bool:
        """Remove the registration if it is still the current one for its name."""
        ...

    async def snapshot(self) -> list[AgentInfo]:
        """All online agents, sorted by name."""
        ...

    def lookup(self, name: str) -> AgentSession | None:
        """The session for ``name`` if it is held by this process."""
        ...

    def subscribe(self, capacity: int = 100) -> AbstractAsyncContextManager[Subscription]:
        """Change events, from now on."""
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


class InMemoryRegistry:
    """The registry of this process's agents."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self._entries: dict[str, _Entry] = {}
        self._epochs = itertools.count(1)
        self._clock = clock
        self._wall_clock = wall_clock or (lambda: datetime.datetime.now(datetime.UTC))
        self._subscribers: set[Subscription] = set()

    def __len__(self) -> int:
        return len(self._entries)

    # The in-memory implementation never blocks; the async signatures are for
    # shared backends.
    async def register(self, name: str, session: AgentSession, *, remote: str) -> Registration:
        return self.register_nowait(name, session, remote=remote)

    def register_nowait(self, name: str, session: AgentSession, *, remote: str) -> Registration:
        epoch = next(self._epochs)
        old = self._entries.get(name)
        history: collections.deque[float] | None = None
        if old is not None:
            now = self._clock()
            history = old.replaced_at or collections.deque(maxlen=FLAP_THRESHOLD * 4)
            history.append(now)
            while history and now - history[0] > FLAP_WINDOW:
                history.popleft()
            self._publish(RegistryEvent(RegistryEventKind.REPLACED, name, old.epoch))
            if len(history) >= FLAP_THRESHOLD:
                log.warning(
                    "agent %r is flapping: replaced %d times in %.0f s "
                    "(two processes with one name?)",
                    name,
                    len(history),
                    FLAP_WINDOW,
                )
            log.info("agent %r epoch %d replaced by epoch %d", name, old.epoch, epoch)
            old.session.request_close(_codes.WS_REPLACED, _codes.REASON_REPLACED)
        now_wall = self._wall_clock()
        self._entries[name] = _Entry(session, epoch, remote, now_wall, _iso(now_wall), history)
        self._publish(RegistryEvent(RegistryEventKind.ONLINE, name, epoch))
        return Registration(name, epoch)

    async def unregister(self, registration: Registration) -> bool:
        return self.unregister_nowait(registration)

    def unregister_nowait(self, registration: Registration) -> bool:
        entry = self._entries.get(registration.name)
        if entry is None or entry.epoch != registration.epoch:
            return False
        del self._entries[registration.name]
        self._publish(RegistryEvent(RegistryEventKind.OFFLINE, registration.name, entry.epoch))
        return True

    async def snapshot(self) -> list[AgentInfo]:
        return self.snapshot_nowait()

    def snapshot_nowait(self) -> list[AgentInfo]:
        now = self._clock()
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
                )
            )
        return rows

    def lookup(self, name: str) -> AgentSession | None:
        entry = self._entries.get(name)
        return None if entry is None else entry.session

    @asynccontextmanager
    async def subscribe(self, capacity: int = 100) -> AsyncIterator[Subscription]:
        with self._subscription(capacity) as sub:
            yield sub

    @contextmanager
    def _subscription(self, capacity: int) -> Iterator[Subscription]:
        sub = Subscription(capacity)
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
            sub._close()

    def _publish(self, event: RegistryEvent) -> None:
        for sub in list(self._subscribers):
            if not sub._publish(event):
                self._subscribers.discard(sub)
