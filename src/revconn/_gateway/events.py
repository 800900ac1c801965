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
from collections.abc import AsyncGenerator

import trio

from .._errors import EventsOverflow
from .registry import PresenceSnapshot, Registry, RegistryEvent, Subscription

__all__ = ["EVENTS_CAPACITY", "KEEPALIVE", "EventStreams", "presence", "sse_stream"]

EVENTS_CAPACITY = 256
"""Events a subscriber may fall behind before it is dropped."""
KEEPALIVE = 15.0
"""Seconds between SSE comments on a quiet stream (proxies close idle
responses; a dead client shows as a failed write)."""
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


class EventStreams:
    """The ``/events`` responses in progress, so that a shutdown can end them
    (hypercorn would otherwise wait its graceful timeout for each)."""

    def __init__(self) -> None:
        self._waits: set[trio.CancelScope] = set()
        self.closed = False

    def close(self) -> None:
        """End every stream (after the events already published) and refuse new ones."""
        self.closed = True
        for scope in self._waits:
            scope.cancel()

    async def next(self, sub: Subscription, keepalive: float) -> RegistryEvent | None:
        """The next event, or None after ``keepalive`` s without one; raises
        StopAsyncIteration when closed, or when ``sub`` ended (overflowed)."""
        if self.closed:
            raise StopAsyncIteration
        with trio.move_on_after(keepalive) as scope:
            self._waits.add(scope)
            try:
                return await sub.__anext__()
            finally:
                self._waits.discard(scope)
        if self.closed:
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
    capacity: int = EVENTS_CAPACITY,
    keepalive: float = KEEPALIVE,
) -> AsyncGenerator[bytes, None]:
    """The body of ``GET /events``: ``snapshot``, then ``online``, ``offline``
    and ``replaced`` events (``id:`` their ``seq``), a comment every
    ``keepalive`` s of quiet, and a last ``overflow`` or ``shutdown`` event
    when the gateway ends the stream."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    # (Subscription is a plain context manager: no cancel scope spans a yield)
    async with registry.subscribe(capacity) as sub:
        snapshot = PresenceSnapshot(sub.snapshot, sub.seq)
        yield sse("snapshot", snapshot.to_json(), snapshot.seq)
        while True:
            try:
                event = await streams.next(sub, keepalive)
            except StopAsyncIteration:
                break
            if event is None:
                yield b": keepalive\n\n"
            else:
                yield sse(event.kind.value, event.to_json(), event.seq)
        if sub.overflowed:
            detail = str(_overflow(capacity))
            yield sse("overflow", {"event": "overflow", "error": "slow_consumer", "detail": detail})
        elif streams.closed:
            yield sse("shutdown", {"event": "shutdown", "detail": "the gateway is stopping"})
