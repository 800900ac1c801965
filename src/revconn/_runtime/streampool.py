"""(gateway) The pool of an agent's open tunnel streams.

Each stream is an HTTP/2 extended CONNECT stream carrying raw HTTP/1.1 (one
kept-alive upstream connection at the agent, docs/protocol.md section 5). A
request borrows a stream, sends its bytes, reads its response and gives the
stream back once the response has ended, as nginx's upstream keepalive does
with connections: opening and closing an HTTP/2 stream per request costs
about four times the DATA frames of a small exchange (docs/architecture.md).

The pool grows on demand up to the agent's concurrent stream limit (which
thereby bounds the agent's upstream connections), reuses the most recently
returned stream first (LIFO: the others age out), and closes streams idle
for ``IDLE_TIMEOUT`` (the heartbeat scheduler calls :meth:`prune`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from .. import _codes
from .._errors import LocalProtocolError
from .._proto.connect import CONNECT_HEADERS, UpstreamInfo

if TYPE_CHECKING:
    from .streams import TunnelStream
    from .tunnel import Tunnel

__all__ = ["IDLE_TIMEOUT", "StreamPool", "StreamRefused"]

IDLE_TIMEOUT = 30.0
"""An idle stream is closed after this long (s); the agent closes its upstream
connection with it."""

MAX_REFUSAL_BODY = 16 * 1024
"""Most of an agent's error body (a refused CONNECT) kept for the client."""


class StreamRefused(Exception):
    """The agent answered a stream's CONNECT with an error (its upstream is
    unreachable): ``status``, ``headers`` and ``body`` are its answer."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        super().__init__(f"agent refused the stream with {status}")
        self.status = status
        self.headers = headers
        self.body = body


class StreamPool:
    """The open streams of one gateway-side tunnel, idle ones on a LIFO stack."""

    __slots__ = ("_idle", "_tunnel")

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel
        self._idle: list[TunnelStream] = []

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _usable(self, stream: TunnelStream) -> bool:
        """Open both ways, and nothing unread: bytes an upstream sent on an idle
        connection (a 408 before it closes) must never pass for the answer to
        the next request."""
        return (
            stream.reset_code is None
            and not stream.remote_ended
            and not stream.local_ended
            and not stream._chunks
            and stream.id in self._tunnel._streams
        )

    async def acquire(self, *, fresh: bool = False) -> tuple[TunnelStream, bool]:
        """A stream for one request, and whether it is new (never used); with
        ``fresh``, always a new one (a retry: idle streams of an upstream
        that closed its kept-alive connections tend to go stale together).

        Raises AgentBusy at the agent's stream limit, StreamError when the
        tunnel is closing or the stream failed before it was accepted, and
        StreamRefused when the agent refused it (its upstream is unreachable).
        """
        tunnel = self._tunnel
        idle = self._idle
        while idle and not fresh:
            stream = idle.pop()
            stream.pooled = False
            if self._usable(stream) and tunnel.accepting:
                return stream, False
            stream.reset(_codes.H2_CANCEL)
        stream = tunnel.open_request(CONNECT_HEADERS, end_stream=False)
        try:
            await tunnel.flush()
            response = await stream.receive_response()
            if response.status != 200:
                body = b""
                while len(body) < MAX_REFUSAL_BODY and (chunk := await stream.read()) is not None:
                    body += chunk
                raise StreamRefused(  # noqa: TRY301
                    response.status, response.headers, body[:MAX_REFUSAL_BODY]
                )
        except BaseException:
            stream.reset(_codes.H2_CANCEL)
            raise
        stream.upstream = UpstreamInfo.from_headers(response.headers)
        return stream, True

    def release(self, stream: TunnelStream, *, reusable: bool) -> None:
        """Take a stream back: pooled if ``reusable`` (its last response ended
        cleanly and the upstream keeps the connection), else reset."""
        tunnel = self._tunnel
        if (
            reusable
            and self._usable(stream)
            and tunnel.accepting
            and not tunnel.session.peer_draining
        ):
            stream.idle_since = trio.current_time()
            stream.pooled = True
            self._idle.append(stream)
        else:
            stream.reset(_codes.H2_CANCEL)

    def prune(self, now: float, *, everything: bool = False) -> None:
        """Close streams idle for ``IDLE_TIMEOUT`` (all idle ones with
        ``everything``: the tunnel drains). Sync; frames leave with the next flush."""
        idle = self._idle
        keep = 0
        if not everything:
            # LIFO: the oldest are at the bottom of the stack.
            while keep < len(idle) and now - idle[keep].idle_since >= IDLE_TIMEOUT:
                keep += 1
            expired, self._idle = idle[:keep], idle[keep:]
        else:
            expired, self._idle = idle, []
        for stream in expired:
            self._retire(stream)

    def _retire(self, stream: TunnelStream) -> None:
        """END_STREAM: no more requests here; the agent closes its upstream
        connection and ends its side (data still arriving is acknowledged
        by the tunnel as for any forgotten stream)."""
        if not self._usable(stream):
            stream.reset(_codes.H2_CANCEL)
            return
        try:
            self._tunnel.session.end_stream(stream.id)
        except LocalProtocolError:  # the session is closing: the stream goes with it
            stream.reset(_codes.H2_CANCEL)
            return
        stream.local_ended = True
        stream.close()
