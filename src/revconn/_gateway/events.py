"""Presence as a stream of events: ``Gateway.events()`` for embedders and
``GET /events`` (server-sent events) on the operator surface.

Both start with a :class:`~.registry.PresenceSnapshot` (every online agent)
and go on with each :class:`~.registry.RegistryEvent` after it, numbered by
``seq`` without gap or duplicate. A subscriber that falls ``capacity``
events behind is dropped (``EventsOverflow``; on ``/events`` a final
``overflow`` event, then the end of the response): the registry never waits
for a consumer and nothing is buffered beyond ``capacity`` events.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager

import trio

from .. import _codes
from .._errors import EventsOverflow
from .auth import Grant
from .registry import PresenceSnapshot, Registry, RegistryEvent, Subscription

__all__ = ["EVENTS_CAPACITY", "KEEPALIVE", "EventStreams", "presence", "sse_stream"]

EVENTS_CAPACITY = 256
"""Events a subscriber may fall behind before it is dropped."""
KEEPALIVE = 15.0
"""Seconds between SSE comments on a quiet stream (proxies close idle
responses; a dead client shows as a failed write)."""
_NO_TOKEN = Grant()
RETRY_MS = 2000
"""The reconnection delay an EventSource is told to use."""


async def presence(
    registry: Registry, capacity: int = EVENTS_CAPACITY
) -> AsyncGenerator[PresenceSnapshot | RegistryEvent, None]:
    """A snapshot, then every change after it; EventsOverflow if the consumer
    falls ``capacity`` events behind."""
    async with registry.subscribe(capacity) as sub:
        yield PresenceSnapshot(sub.snapshot, sub.seq)
        async for event in sub:
            yield event
        if sub.overflowed:
            raise _overflow(capacity)


def _overflow(capacity: int) -> EventsOverflow:
    return EventsOverflow(
        f"this subscriber fell {capacity} events behind and was dropped: "
        "subscribe again for a fresh snapshot"
    )


class StreamWatch:
    """One ``/events`` response: the credential it was opened with, and why
    it ended (None while it runs)."""

    __slots__ = ("ended", "expires_at", "scope", "token_id")

    def __init__(self, grant: Grant) -> None:
        self.token_id = grant.token_id
        self.expires_at = grant.expires_at
        self.ended: str | None = None
        self.scope: trio.CancelScope | None = None
        """The wait in progress (cancelled to end the stream now)."""


class EventStreams:
    """The ``/events`` responses in progress, so that a shutdown can end them
    (hypercorn would otherwise wait its graceful timeout for each) and a
    revocation can end those opened with the revoked token; each also ends
    when its token expires (an open stream outlives no credential)."""

    def __init__(self) -> None:
        self._open: set[StreamWatch] = set()
        self.closed = False

    def close(self) -> None:
        """End every stream (after the events already published) and refuse new ones."""
        self.closed = True
        for watch in self._open:
            if watch.scope is not None:
                watch.scope.cancel()

    def revoke(self, token_ids: frozenset[str]) -> int:
        """End the streams opened with these tokens; how many."""
        ended = 0
        for watch in self._open:
            if watch.token_id is not None and watch.token_id in token_ids and not watch.ended:
                watch.ended = _codes.REASON_REVOKED
                ended += 1
                if watch.scope is not None:
                    watch.scope.cancel()
        return ended

    @contextmanager
    def watch(self, grant: Grant) -> Iterator[StreamWatch]:
        watch = StreamWatch(grant)
        self._open.add(watch)
        try:
            yield watch
        finally:
            self._open.discard(watch)

    def _expired(self, watch: StreamWatch) -> bool:
        if watch.expires_at is not None and time.time() >= watch.expires_at:
            watch.ended = _codes.REASON_EXPIRED
        return watch.ended is not None

    async def next(
        self, sub: Subscription, keepalive: float, watch: StreamWatch
    ) -> RegistryEvent | None:
        """The next event, or None after ``keepalive`` s without one; raises
        StopAsyncIteration when closed, revoked, expired, or when ``sub``
        ended (overflowed)."""
        if self.closed or self._expired(watch):
            raise StopAsyncIteration
        wait = keepalive
        if watch.expires_at is not None:
            wait = min(wait, max(0.0, watch.expires_at - time.time()))
        with trio.move_on_after(wait) as scope:
            watch.scope = scope
            try:
                return await sub.__anext__()
            finally:
                watch.scope = None
        if self.closed or self._expired(watch):
            raise StopAsyncIteration
        return None


def sse(kind: str, data: dict[str, object], seq: int | None = None) -> bytes:
    """One server-sent event (compact JSON has no newline: one ``data:`` line)."""
    head = f"id: {seq}\n" if seq is not None else ""
    body = json.dumps(data, separators=(",", ":"))
    return f"{head}event: {kind}\ndata: {body}\n\n".encode()


async def sse_stream(
    registry: Registry,
    streams: EventStreams,
    *,
    grant: Grant = _NO_TOKEN,
    capacity: int = EVENTS_CAPACITY,
    keepalive: float = KEEPALIVE,
) -> AsyncGenerator[bytes, None]:
    """The body of ``GET /events``: ``snapshot``, then ``online``, ``offline``
    and ``replaced`` events (``id:`` their ``seq``), a comment every
    ``keepalive`` s of quiet, and a last ``overflow``, ``shutdown`` or
    ``closed`` (its credential was revoked or expired) event when the
    gateway ends the stream."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    # (plain context managers: no cancel scope spans a yield)
    with streams.watch(grant) as watch:
        async with registry.subscribe(capacity) as sub:
            snapshot = PresenceSnapshot(sub.snapshot, sub.seq)
            yield sse("snapshot", snapshot.to_json(), snapshot.seq)
            while True:
                try:
                    event = await streams.next(sub, keepalive, watch)
                except StopAsyncIteration:
                    break
                if event is None:
                    yield b": keepalive\n\n"
                else:
                    yield sse(event.kind.value, event.to_json(), event.seq)
            if watch.ended is not None:
                yield sse("closed", {"event": "closed", "reason": watch.ended})
            elif sub.overflowed:
                detail = str(_overflow(capacity))
                yield sse(
                    "overflow", {"event": "overflow", "error": "slow_consumer", "detail": detail}
                )
            elif streams.closed:
                yield sse("shutdown", {"event": "shutdown", "detail": "the gateway is stopping"})
