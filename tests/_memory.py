"""An in-memory MessageTransport pair for network-free tunnel tests."""

from __future__ import annotations

import attrs
import trio

from revconn._errors import ConnectionLost


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
