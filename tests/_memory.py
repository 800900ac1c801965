"""In-memory tunnels for network-free tests: a MessageTransport pair, and a
gateway Tunnel whose agent Tunnel serves streams with a handler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from revconn._errors import ConnectionLost
from revconn._proto.session import Role, TunnelSession
from revconn._runtime.heartbeat import Heartbeat, HeartbeatScheduler
from revconn._runtime.streams import TunnelStream
from revconn._runtime.tunnel import RequestHandler, Tunnel


@attrs.frozen
class _Close:
    code: int
    reason: str


class MemoryTransport:
    def __init__(
        self,
        send: trio.MemorySendChannel[bytes | _Close],
        receive: trio.MemoryReceiveChannel[bytes | _Close],
    ) -> None:
        self._send = send
        self._receive = receive
        self.closed_with: _Close | None = None
        self.peer_closed_with: _Close | None = None
        self.reading = True
        self.sent: list[bytes] = []

    async def send_message(self, data: bytes) -> None:
        if self.closed_with is not None or self.peer_closed_with is not None:
            raise ConnectionLost("closed")
        self.sent.append(data)
        try:
            await self._send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionLost("peer gone") from None

    async def receive_message(self) -> bytes:
        while not self.reading:
            await trio.sleep_forever()
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionLost("peer gone") from None
        if isinstance(item, _Close):
            self.peer_closed_with = item
            raise ConnectionLost(f"closed {item.code}", close_code=item.code)
        return item

    async def close(self, code: int, reason: str) -> None:
        if self.closed_with is not None:
            return
        self.closed_with = _Close(code, reason)
        try:
            self._send.send_nowait(_Close(code, reason))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self._send.close()


def transport_pair(capacity: int = 64) -> tuple[MemoryTransport, MemoryTransport]:
    a_send, b_receive = trio.open_memory_channel[bytes | _Close](capacity)
    b_send, a_receive = trio.open_memory_channel[bytes | _Close](capacity)
    return MemoryTransport(a_send, a_receive), MemoryTransport(b_send, b_receive)


@asynccontextmanager
async def tunnels(handler: RequestHandler, *, max_streams: int = 100) -> AsyncIterator[Tunnel]:
    """A handshaken gateway Tunnel; its agent Tunnel runs ``handler`` per stream."""
    t_gw, t_ag = transport_pair(capacity=1024)
    hb = Heartbeat(15, 10)
    gw = Tunnel(TunnelSession(Role.GATEWAY), t_gw, heartbeat=hb)
    ag = Tunnel(TunnelSession(Role.AGENT, max_concurrent_streams=max_streams), t_ag, heartbeat=hb)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.handshake)
        nursery.start_soon(ag.handshake)
    async with trio.open_nursery() as nursery:
        scheduler = HeartbeatScheduler(hb)
        await nursery.start(scheduler.run)
        nursery.start_soon(gw.serve, scheduler)
        nursery.start_soon(lambda: ag.serve(on_request=handler))
        yield gw
        gw.request_close(1001, "shutdown")
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def read_all(stream: TunnelStream) -> bytes:
    out = b""
    while (chunk := await stream.read()) is not None:
        out += chunk
    return out
