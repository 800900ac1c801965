"""What the data plane counts: forwarded requests, their status classes,
durations and bytes, in total and per agent, and each agent's last requests.

Plain integers and lists updated in the request's own task, with no lock and
no label lookup: a forwarded request costs a few additions (``begin``,
``end``). ``/metrics``, ``/stats`` and the dashboard read them when asked
(``metrics.py``). Memory is bounded: per-agent entries for at most
``MAX_TRACKED`` names (the least recently used idle ones go), and
``RECENT`` requests per agent, without bodies or header values.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator

import attrs
import trio

from .._stats import DURATION_BUCKETS, Histogram

__all__ = [
    "AgentTraffic",
    "RequestRecord",
    "Traffic",
    "shown_path",
    "status_class",
]

RECENT = 20
"""Requests remembered per agent (the dashboard's "last requests")."""
MAX_TRACKED = 4096
"""Agent names with counters at most (idle ones beyond it are forgotten)."""
MAX_PATH = 200
"""Characters of a recorded path kept."""
CLIENT_GONE = 499
"""The status recorded for a request whose client left before any answer
(nginx's convention)."""


STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
"""The classes counted, in the order of every ``by_class`` list."""


def class_index(status: int) -> int:
    """The index in ``by_class`` of ``status``'s class (out of range: the nearest)."""
    index = status // 100 - 1
    return index if 0 <= index <= 4 else (0 if index < 0 else 4)


def status_class(status: int) -> str:
    """``2xx`` for 204; ``1xx`` for a 101 (a WebSocket); 499: ``4xx``."""
    return STATUS_CLASSES[class_index(status)]


def by_status(by_class: list[int]) -> dict[str, int]:
    """``{"1xx": n, ..., "5xx": n}`` for JSON."""
    return dict(zip(STATUS_CLASSES, by_class, strict=True))


@attrs.frozen
class RequestRecord:
    """One finished request: no query string, no header value, no body."""

    at: float
    """Unix time it ended."""
    method: str
    path: str
    status: int
    duration: float
    bytes_in: int
    bytes_out: int

    def to_json(self) -> dict[str, object]:
        return {
            "at": round(self.at, 3),
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_ms": round(self.duration * 1000.0, 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


_Raw = tuple[float, bytes, bytes, int, float, int, int]


def shown_path(target: bytes) -> str:
    """A request target as shown: no query string (it may hold secrets)."""
    return target.split(b"?", 1)[0][:MAX_PATH].decode("latin-1")


class AgentTraffic:
    """One agent's counters."""

    __slots__ = ("by_class", "bytes_in", "bytes_out", "in_flight", "recent", "requests")

    def __init__(self) -> None:
        self.in_flight = 0
        self.requests = 0
        self.bytes_in = 0
        """Request bytes from public clients (bodies, and WebSocket bytes)."""
        self.bytes_out = 0
        """Response bytes to public clients."""
        self.by_class = [0, 0, 0, 0, 0]
        """Finished requests by status class 1xx..5xx."""
        self.recent: collections.deque[_Raw] = collections.deque(maxlen=RECENT)
        """Raw tuples (cheap to make per request); ``records()`` decodes them."""

    def records(self) -> list[RequestRecord]:
        """The last requests, newest first (call it in trio: they carry trio
        times, turned into Unix times here, not per request)."""
        unix = time.time() - trio.current_time()
        return [
            RequestRecord(unix + at, m.decode("latin-1"), shown_path(t), status, took, b_in, b_out)
            for at, m, t, status, took, b_in, b_out in reversed(self.recent)
        ]

    def to_json(self) -> dict[str, object]:
        return {
            "in_flight": self.in_flight,
            "requests": self.requests,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "by_status": by_status(self.by_class),
            "recent": [r.to_json() for r in self.records()],
        }


class Traffic:
    """The gateway's request counters (one per gateway, in its process)."""

    def __init__(self) -> None:
        self._agents: collections.OrderedDict[str, AgentTraffic] = collections.OrderedDict()
        self.in_flight = 0
        self.by_class = [0, 0, 0, 0, 0]
        """Answered public requests for agents by status class, early answers
        (offline, busy, refused, timeouts) included."""
        self.bytes_in = 0
        self.bytes_out = 0
        self.durations = Histogram(DURATION_BUCKETS)

    def begin(self, name: str) -> AgentTraffic:
        """A request is being forwarded to ``name`` (its stream is open)."""
        agents = self._agents
        agent = agents.get(name)
        if agent is None:
            agent = agents[name] = AgentTraffic()
            if len(agents) > MAX_TRACKED:
                self._forget_idle()
        else:
            agents.move_to_end(name)
        agent.in_flight += 1
        self.in_flight += 1
        return agent

    def end(
        self,
        agent: AgentTraffic,
        method: bytes,
        target: bytes,
        status: int,
        started: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """The request ``begin`` counted has ended (``started``: trio time).
        (Runs once per forwarded request: kept to plain additions; py-spy
        puts ``begin`` and ``end`` together at 0.9 % of the gateway's CPU at
        c=32, benchmarks/metrics_cost.py.)"""
        now = trio.current_time()
        duration = now - started
        index = class_index(status)
        agent.in_flight -= 1
        agent.requests += 1
        agent.by_class[index] += 1
        agent.bytes_in += bytes_in
        agent.bytes_out += bytes_out
        # (the target as the exchange kept it, at most MAX_PATH bytes: its
        # query is cut off when it is shown)
        agent.recent.append((now, method, target, status, duration, bytes_in, bytes_out))
        self.in_flight -= 1
        self.by_class[index] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.durations.observe(duration)

    def early(self, status: int, started: float) -> None:
        """A request for an agent answered by the gateway itself (the agent
        is offline or busy, refused the stream, or did not accept it)."""
        self.by_class[class_index(status)] += 1
        self.durations.observe(trio.current_time() - started)

    def _forget_idle(self) -> None:
        """Drop the least recently used entries without requests in flight."""
        agents = self._agents
        for name in [n for n, a in agents.items() if a.in_flight == 0][: len(agents) - MAX_TRACKED]:
            del agents[name]

    def agent(self, name: str) -> AgentTraffic | None:
        return self._agents.get(name)

    def agents(self) -> Iterator[tuple[str, AgentTraffic]]:
        return iter(list(self._agents.items()))
