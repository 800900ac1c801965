"""Heartbeats: the PING schedule of a tunnel, and one scheduler for many tunnels."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

from .._errors import ConfigError

if TYPE_CHECKING:
    from .tunnel import Tunnel

__all__ = ["Heartbeat", "HeartbeatScheduler"]


@attrs.frozen
class Heartbeat:
    """PING every ``interval`` seconds; the peer must answer within ``timeout``."""

    interval: float = 15.0
    timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        for label, value in (("interval", self.interval), ("timeout", self.timeout)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"heartbeat {label} must be > 0 seconds, got {value!r}")


class HeartbeatScheduler:
    """PINGs many tunnels on one schedule from a single task.

    All tunnels share ``heartbeat.interval`` and ``heartbeat.timeout``, so both
    the ping times and the ACK deadlines come due in insertion order: two
    ordered dicts are the whole timer queue (O(1) per event, no task and no
    cancel scope per tunnel). Sending a PING spawns a short flush task in the
    scheduler's nursery, so a socket that cannot be written never delays the
    timeout check of any tunnel; a tunnel whose ACK is late is ended at its
    deadline by ``Tunnel.heartbeat_expired`` (no I/O needed for that).
    """

    def __init__(self, heartbeat: Heartbeat, on_rtt: Callable[[float], None] | None = None) -> None:
        self.heartbeat = heartbeat
        self.on_rtt = on_rtt
        """Called with each RTT measured (the gateway's histogram)."""
        self._due: OrderedDict[Tunnel, float] = OrderedDict()
        # tunnel -> (ACK deadline, PING payload, sent at)
        self._waiting: OrderedDict[Tunnel, tuple[float, bytes, float]] = OrderedDict()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._seq = 0

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` in the scheduler's nursery (background flushes of its tunnels)."""
        if self._nursery is not None:
            self._nursery.start_soon(fn)

    def add(self, tunnel: Tunnel) -> None:
        self._due[tunnel] = trio.current_time() + self.heartbeat.interval
        self._changed.set()

    def remove(self, tunnel: Tunnel) -> None:
        self._due.pop(tunnel, None)
        self._waiting.pop(tunnel, None)

    def acknowledged(self, tunnel: Tunnel, payload: bytes) -> None:
        entry = self._waiting.get(tunnel)
        if entry is None or entry[1] != payload:
            return  # not ours, or already expired
        del self._waiting[tunnel]
        sent_at = entry[2]
        rtt = tunnel.rtt = trio.current_time() - sent_at
        if self.on_rtt is not None:
            self.on_rtt(rtt)
        self._due[tunnel] = sent_at + self.heartbeat.interval
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._loop(nursery)
            finally:
                self._nursery = None  # closed to new arrivals from here on

    async def _loop(self, nursery: trio.Nursery) -> None:
        while True:
            now = trio.current_time()
            while self._waiting:
                tunnel, (deadline, _, _) = next(iter(self._waiting.items()))
                if deadline > now:
                    break
                del self._waiting[tunnel]
                tunnel.heartbeat_expired()
            while self._due:
                tunnel, when = next(iter(self._due.items()))
                if when > now:
                    break
                del self._due[tunnel]
                self._seq += 1
                payload = self._seq.to_bytes(8, "big")
                if tunnel.queue_ping(payload):
                    self._waiting[tunnel] = (now + self.heartbeat.timeout, payload, now)
                    nursery.start_soon(tunnel.flush)
            wake = next(iter(self._due.values())) if self._due else math.inf
            if self._waiting:
                wake = min(wake, next(iter(self._waiting.values()))[0])
            self._changed = trio.Event()
            with trio.move_on_at(wake):
                await self._changed.wait()
