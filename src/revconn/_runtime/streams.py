"""One request stream of a tunnel, as its owner sees it (flow control, reads, writes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .. import _codes
from .._errors import StreamError
from .._proto.session import DataReceived, RequestReceived, ResponseReceived

if TYPE_CHECKING:
    from .._proto.connect import UpstreamInfo
    from .tunnel import Tunnel

__all__ = ["TunnelStream"]


class TunnelStream:
    """One request stream of a tunnel, as its owner (the gateway's forwarder or
    the agent's request handler) sees it.

    Received body chunks are buffered until ``read()`` consumes them, and their
    flow-control credit is returned only then: a stalled reader stops its own
    stream at the window (1 MiB) without slowing the others.
    """

    __slots__ = (
        "_changed",
        "_chunks",
        "_unacked",
        "cancel_scope",
        "id",
        "idle_since",
        "local_ended",
        "pooled",
        "remote_ended",
        "request",
        "reset_code",
        "responded",
        "response",
        "tunnel",
        "upstream",
    )

    def __init__(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.id = stream_id
        self.request: RequestReceived | None = None
        self.response: ResponseReceived | None = None
        self._chunks: list[DataReceived] = []
        self._unacked = 0
        self.remote_ended = False
        self.local_ended = False
        self.reset_code: int | None = None
        self.responded = False
        self.cancel_scope: trio.CancelScope | None = None
        self._changed = trio.Event()
        self.upstream: UpstreamInfo | None = None
        """(gateway) What the agent said about its upstream when it accepted the stream."""
        self.pooled = False
        """(gateway) Idle in the pool: nothing may arrive for it now."""
        self.idle_since = 0.0
        """(gateway) When the stream was last given back to the pool."""

    def _wake(self) -> None:
        self._changed.set()

    async def _wait(self) -> None:
        self._changed = trio.Event()
        await self._changed.wait()

    def _check(self) -> None:
        if self.reset_code is not None:
            raise StreamError(
                f"stream reset by the peer (HTTP/2 error {self.reset_code:#x})",
                error_code=self.reset_code,
            )
        if self.tunnel.end is not None:
            raise StreamError(f"tunnel lost: {self.tunnel.end.reason or 'closed'}")

    async def receive_response(self) -> ResponseReceived:
        """(gateway) Wait for the response headers."""
        while self.response is None:
            self._check()
            await self._wait()
        return self.response

    async def read(self) -> bytes | None:
        """The body bytes received so far (at most one stream window), or None at
        the end of the body."""
        if self._unacked:
            self.tunnel.session.ack_data(self.id, self._unacked)
            self._unacked = 0
            # h2 queues a WINDOW_UPDATE only once enough credit is owed: most
            # acks queue nothing, and a flush with several streams in flight
            # costs a schedule point even then. A reader cancelled in the flush
            # (an upload stopped once the upstream answered) loses nothing:
            # Tunnel.flush sends what it took from the session even then.
            if self.tunnel.session.has_data_to_send:
                await self.tunnel.flush()
        while not self._chunks:
            if self.remote_ended:
                return None
            self._check()
            await self._wait()
        # Everything buffered at once: fewer, larger writes downstream.
        chunks, self._chunks = self._chunks, []
        self._unacked += sum(c.flow_length for c in chunks)
        data = chunks[0].data if len(chunks) == 1 else b"".join(c.data for c in chunks)
        if not data:
            return None if self.remote_ended else await self.read()
        return data

    async def respond(
        self, status: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool
    ) -> None:
        """(agent) Send the response headers (``headers`` already clean)."""
        self.respond_nowait(status, headers, end_stream=end_stream)
        await self.tunnel.flush()

    def respond_nowait(
        self, status: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False
    ) -> None:
        """(agent) Queue the response headers; they leave with the next flush (so
        HEADERS and the first DATA share one WebSocket message)."""
        self._check()
        self.tunnel.session.send_response(self.id, status, headers, end_stream=end_stream)
        self.responded = True
        self.local_ended = end_stream

    async def send_body(
        self,
        data: bytes,
        *,
        end_stream: bool = False,
        queued: Callable[[], None] | None = None,
    ) -> None:
        """Send body bytes, waiting for flow-control credit as needed.
        ``queued`` is called once all of them are in the session's queue,
        before the last flush (another task's flush may send them)."""
        session = self.tunnel.session
        view = memoryview(data)
        while True:
            self._check()
            if not view:
                if end_stream:
                    session.send_data(self.id, b"", end_stream=True)
                    self.local_ended = True
                break
            n = session.send_data(self.id, view, end_stream=end_stream)
            if n == len(view):
                self.local_ended = end_stream
                break
            view = view[n:]
            if n:
                await self.tunnel.flush()
            else:
                await self.tunnel.wait_window()
        if queued is not None:
            queued()
        await self.tunnel.flush()

    async def end(self) -> None:
        """Finish our side of the stream (END_STREAM on an empty DATA frame)."""
        if not self.local_ended:
            await self.send_body(b"", end_stream=True)

    def reset(self, error_code: int = _codes.H2_CANCEL) -> None:
        """Abandon the stream with RST_STREAM (sent in the background); idempotent.

        Another task of the owner blocked on this stream (a ``read()``, or a
        ``send_body()`` waiting for window) gets StreamError at once: the peer
        may never send anything for this stream again to wake it."""
        live = self.id in self.tunnel._streams
        if live and self.reset_code is None and not (self.local_ended and self.remote_ended):
            self.tunnel.session.reset_stream(self.id, error_code)
            self.tunnel.flush_soon()
        if self.reset_code is None:
            self.reset_code = error_code
            self._wake()
            self.tunnel._window_opened()
        self.close()

    def _reset_by_peer(self, error_code: int) -> None:
        """(the tunnel's reader) The peer sent RST_STREAM.

        Calls waiting on the stream fail with StreamError, and a handler is
        cancelled. What the peer sent stays readable, whatever the error code:
        after END_STREAM the reset only ends our direction; without it,
        ``read()`` hands out what arrived, then raises StreamError (an agent
        whose upstream connection was reset mid-response: the bytes before
        the reset still count, the end does not look clean). A server that
        answered before reading the whole request resets with NO_ERROR to
        stop the upload, and the client must not discard that answer (RFC
        9113 8.1). The owner closes the stream as usual (which gives back the
        credit for what it did not read).
        """
        self.reset_code = error_code
        self._wake()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()
        if not self.remote_ended and not self._chunks:
            self.close()

    def close(self) -> None:
        """Forget the stream; credit for unread data goes back to the connection."""
        if self.tunnel._streams.pop(self.id, None) is None:
            return
        unread = self._unacked + sum(c.flow_length for c in self._chunks)
        self._chunks.clear()
        self._unacked = 0
        if unread:
            self.tunnel.session.ack_data(self.id, unread)
            self.tunnel.flush_soon()
        self.tunnel._maybe_finish_drain()
