"""The server side of an agent's WebSocket on the data plane: wsproto
over a trio stream, as a :class:`~revconn._runtime.transport.MessageTransport`.

The opening handshake is answered by the data plane's exchange (a 101
response); after it the connection (TCP, or TLS after its handshake) belongs
to this transport. One object per agent, no task of its own: the tunnel's
reader calls ``receive_message`` and its flush calls ``send_message``; writes
go through ``fastpath.send_all`` (``os.write`` on plain TCP only, the TLS
stream's own send otherwise).

A message above ``max_message_size`` is refused with close 1009 as soon as a
frame header announces more than the limit allows (before its payload
arrives), and otherwise once the bytes received pass it: memory is never
allocated for an announced size, only for bytes that arrived (at most the
limit plus one read).
"""

from __future__ import annotations

from typing import NoReturn

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping
from wsproto.utilities import generate_accept_token

from .. import _codes
from .._errors import ConnectionLost
from .._runtime import wsmask
from .._runtime.fastpath import WriteLock, send_all
from .replies import Reply, json_reply
from .tls import AcceptedStream

__all__ = ["WebSocketTransport", "upgrade_response"]

READ_SIZE = 256 * 1024


def upgrade_response(
    method: bytes, headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]] | Reply:
    """The 101 response headers for a WebSocket opening handshake (RFC 6455
    4.2), or the 400/426 reply that explains what is wrong with it."""

    def values(name: bytes) -> list[bytes]:
        return [v for n, v in headers if n == name]

    def tokens(name: bytes) -> set[bytes]:
        return {t.strip().lower() for v in values(name) for t in v.split(b",")}

    def bad(detail: str, status: int = 400) -> Reply:
        extra = [(b"sec-websocket-version", b"13")] if status == 426 else []
        return json_reply(status, {"error": "bad_websocket_handshake", "detail": detail}, extra)

    if method != b"GET":
        return bad("the WebSocket handshake must be a GET")
    if b"websocket" not in tokens(b"upgrade") or b"upgrade" not in tokens(b"connection"):
        return bad("expected 'Upgrade: websocket' and 'Connection: Upgrade'")
    if values(b"sec-websocket-version") != [b"13"]:
        return bad("only WebSocket version 13 is supported", 426)
    keys = values(b"sec-websocket-key")
    if len(keys) != 1 or not keys[0]:
        return bad("missing Sec-WebSocket-Key")
    return [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", generate_accept_token(keys[0])),
    ]


def _announced(ws: Connection) -> int:
    """Payload bytes the data frame being received still announces (0 between
    frames and for control frames, which wsproto caps at 125 bytes).

    Leans on wsproto's FrameDecoder, as ``_runtime/wsmask.py`` does
    (``Connection._proto._frame_decoder``: ``header``, set once a frame's
    header is parsed, and ``payload_consumed``);
    tests/hostile/test_limits.py fails loudly if that changes."""
    decoder = ws._proto._frame_decoder
    header = decoder.header
    if header is None or header.opcode.iscontrol():
        return 0
    return header.payload_len - decoder.payload_consumed


class WebSocketTransport:
    """Binary messages over an accepted WebSocket (no extensions)."""

    __slots__ = ("_buffer", "_closed", "_send_lock", "_stream", "_ws", "max_message_size")

    def __init__(self, stream: AcceptedStream, trailing_data: bytes, max_message_size: int):
        self._stream = stream
        self._ws = Connection(ConnectionType.SERVER, trailing_data=trailing_data)
        wsmask.enable(self._ws)  # unmasks what the agent sends
        self._send_lock = WriteLock()
        self._buffer: list[bytes] = []
        self._closed = False
        self.max_message_size = max_message_size

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await send_all(self._stream, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._closed = True
                raise ConnectionLost(f"websocket send failed: {exc}") from None

    async def send_message(self, data: bytes) -> None:
        if self._closed or self._ws.state is not ConnectionState.OPEN:
            raise ConnectionLost("websocket closed")
        await self._send(self._ws.send(Message(data=data)))

    async def receive_message(self) -> bytes:
        size = sum(map(len, self._buffer))
        while True:
            for event in self._ws.events():
                if isinstance(event, BytesMessage):
                    self._buffer.append(bytes(event.data))
                    size += len(event.data)
                    if size > self.max_message_size:
                        await self._fail(_codes.WS_MESSAGE_TOO_BIG, "message too big")
                    if event.message_finished:
                        message = b"".join(self._buffer)
                        self._buffer.clear()
                        return message
                elif isinstance(event, Message):  # text
                    await self._fail(_codes.WS_UNSUPPORTED_DATA, "text message on a binary tunnel")
                elif isinstance(event, Ping):
                    await self._send(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    # Answer the close (if still open) and report it.
                    if self._ws.state is ConnectionState.REMOTE_CLOSING:
                        try:
                            await self._send(self._ws.send(event.response()))
                        except ConnectionLost:
                            pass
                    self._closed = True
                    raise ConnectionLost(
                        f"websocket closed (code {event.code})", close_code=event.code
                    )
            if size + _announced(self._ws) > self.max_message_size:
                await self._fail(_codes.WS_MESSAGE_TOO_BIG, "message too big")
            if self._closed:
                raise ConnectionLost("websocket closed")
            try:
                data = await self._stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._closed = True
                raise ConnectionLost(f"websocket connection lost: {exc}", close_code=1006) from None
            if not data:
                self._closed = True
                raise ConnectionLost("websocket closed (code 1006)", close_code=1006)
            self._ws.receive_data(data)

    async def _fail(self, code: int, reason: str) -> NoReturn:
        """Refuse what the agent sent: the close frame goes at once and the
        tunnel learns of it at once (the agent is off the list). Waiting for
        the agent's close frame is left to ``close()``, which the tunnel calls
        with its own bound: an agent that never answers must not keep its
        tunnel (and its name) for as long as it keeps the TCP connection."""
        if not self._closed and self._ws.state is ConnectionState.OPEN:
            try:
                await self._send(self._ws.send(CloseConnection(code=code, reason=reason)))
            except ConnectionLost:
                pass
        raise ConnectionLost(f"websocket closed: {reason}", close_code=code)

    def _closing(self) -> bool:
        for _ in self._ws.events():
            pass
        return self._ws.state is ConnectionState.LOCAL_CLOSING

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame (unless ``_fail`` sent one already), wait (the
        caller bounds it) for the peer's, then close the socket."""
        try:
            if not self._closed and self._ws.state is ConnectionState.OPEN:
                await self._send(self._ws.send(CloseConnection(code=code, reason=reason)))
            if not self._closed:
                while self._closing():  # until the peer's close frame arrives
                    data = await self._stream.receive_some(READ_SIZE)
                    if not data:
                        break
                    self._ws.receive_data(data)
        except (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._closed = True
            await trio.aclose_forcefully(self._stream)
