"""What an agent knows about itself: the state of its connection (as a story
for the log, as numbers for ``--metrics-bind``), its reconnects and why it
lost its sessions, its heartbeat RTT and its upstream's latency.

Plain numbers updated where things happen (no lock, no label lookup, no
prometheus-client): ``metrics.py`` renders them when asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from .. import _codes
from .._errors import ConnectionLost, HeartbeatTimeout, ProtocolError
from .._runtime.tunnel import TunnelEnd
from .._stats import DURATION_BUCKETS, RTT_BUCKETS, Histogram

__all__ = [
    "DISCONNECT_REASONS",
    "STATES",
    "AgentMonitor",
    "FirstByteTimer",
    "disconnect_reason",
]

STATES = ("connecting", "online", "retrying", "stopping", "stopped")
"""An agent's states. Tunnel mode: connecting (dialing, handshaking) ->
online (the tunnel is up) -> retrying (waiting out the backoff after a lost
session or a failed attempt) -> connecting ... and, after ``stop()``,
stopping (requests in flight finish) -> stopped. Announce mode: connecting
until the first announcement is accepted, online while they are, retrying
while they fail."""

DISCONNECT_REASONS = (
    "stopped",
    "announce failed",
    "gateway shutdown",
    "closed",
    "heartbeat timeout",
    "connection lost",
    "protocol error",
    "replaced",
    "revoked",
    "credential expired",
)
"""Why a session ended, as counted (a bounded label set). Announce mode:
"announce failed" (the announcements stopped being accepted), "stopped"."""


def disconnect_reason(end: TunnelEnd) -> str:
    """The counted reason (one of DISCONNECT_REASONS) for a session that ended so."""
    error = end.error
    if end.reason in (_codes.REASON_REPLACED, _codes.REASON_REVOKED, _codes.REASON_EXPIRED):
        return end.reason
    if end.close_code == _codes.WS_REPLACED:
        return _codes.REASON_REPLACED
    if end.close_code == _codes.WS_REVOKED:
        return _codes.REASON_REVOKED
    if end.close_code == _codes.WS_CREDENTIAL_EXPIRED:
        return _codes.REASON_EXPIRED
    if isinstance(error, HeartbeatTimeout):
        return "heartbeat timeout"
    if isinstance(error, ProtocolError):
        return "protocol error"
    if end.by_peer:
        if end.reason == _codes.REASON_SHUTDOWN:
            return "gateway shutdown"
        return "closed" if error is None else "connection lost"
    if end.reason == _codes.REASON_SHUTDOWN:
        return "stopped"  # our own goodbye
    return "connection lost" if isinstance(error, ConnectionLost) else "closed"


class AgentMonitor:
    """An agent's state and counters (``Agent.monitor``)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.state = "connecting"
        """One of STATES."""
        self.state_since = clock()
        """Unix time the state was entered."""
        self.public_urls: list[str] = []
        """The URLs that reach the agent (as the gateway said), while online."""
        self.attempts = 0
        """Connection attempts started (announce mode: announcements sent)."""
        self.connects = 0
        """Sessions that came up (announce mode: first accepted announcements)."""
        self.connect_failures = 0
        """Attempts that failed before the session came up."""
        self.disconnects: dict[str, int] = {}
        """Sessions that ended, by reason (DISCONNECT_REASONS)."""
        self.last_error: str | None = None
        """Why the last session ended or the last attempt failed."""
        self.retry_at: float | None = None
        """Unix time of the next attempt, while retrying."""
        self.streams_open = 0
        """Tunnel streams open now. The gateway keeps idle ones pooled for its
        next requests: an open stream is not necessarily busy."""
        self.streams = 0
        """Tunnel streams opened so far (each carries one or more exchanges)."""
        self.upstream_unreachable = 0
        """Streams refused 502 because the upstream could not be connected."""
        self.upstream_connect = Histogram(RTT_BUCKETS)
        """Time to connect to the upstream (``--upstream``)."""
        self.upstream_latency = Histogram(DURATION_BUCKETS)
        """Time from a request's first byte to its answer's (FirstByteTimer);
        its count is the number of answers that began."""
        self.rtt = Histogram(RTT_BUCKETS)
        """Heartbeat PING round trips (the current one: ``Agent.tunnel.rtt``)."""

    @property
    def reconnects(self) -> int:
        """Sessions that came up after the first."""
        return max(0, self.connects - 1)

    @property
    def stopping(self) -> bool:
        """``stop()`` was called: only "stopped" may follow (an exchange that
        was in flight, shielded, must not make the agent look online again)."""
        return self.state in ("stopping", "stopped")

    def enter(self, state: str, *, retry_in: float | None = None) -> None:
        assert state in STATES, state
        if self.stopping and state != "stopped":
            return
        self.state = state
        self.state_since = now = self._clock()
        self.retry_at = None if retry_in is None else now + retry_in
        if state != "online":
            self.public_urls = []

    def online(self, public_urls: list[str]) -> None:
        if self.stopping:
            return
        self.connects += 1
        self.enter("online")
        self.public_urls = list(public_urls)

    def lost(self, reason: str, description: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1
        self.last_error = description

    def failed(self, description: str) -> None:
        self.connect_failures += 1
        self.last_error = description


_SWITCHING = b"HTTP/1.1 101"


class FirstByteTimer:
    """Upstream latency without parsing HTTP: from the first byte of a request
    (bytes towards the upstream after the previous answer began) to the first
    byte of its answer. A stream carrying several exchanges in turn (a pooled
    one) gives one observation each; an interim ``100 Continue`` ends one. A
    ``101 Switching Protocols`` answer is the last: what follows is a
    WebSocket's frames, not requests."""

    __slots__ = ("_histogram", "_off", "_since")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._since: float | None = None
        self._off = False

    def request_bytes(self) -> None:
        if self._since is None and not self._off:
            self._since = trio.current_time()

    def answer_bytes(self, data: bytes | bytearray) -> None:
        since = self._since
        if since is not None:
            self._histogram.observe(trio.current_time() - since)
            self._since = None
            self._off = data.startswith(_SWITCHING)
