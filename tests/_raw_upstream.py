"""Hand-written upstream servers for tests: trio handlers on 127.0.0.1 that
read requests with h11 and answer exactly as a test needs (early, broken,
silent)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import h11
import trio

CHUNK = 64 * 1024
Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler, port: int = 0) -> AsyncIterator[int]:
    """Run ``handler`` for each connection to ``port`` (0: any) on 127.0.0.1;
    yields the port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, port, host="127.0.0.1"))
        yield int(listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


async def read_head(stream: trio.abc.Stream) -> tuple[h11.Connection, h11.Request]:
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(CHUNK))
            continue
        assert isinstance(event, h11.Request)
        return conn, event


async def read_body(conn: h11.Connection, stream: trio.abc.Stream) -> int:
    """Read the rest of the request; returns the body's length."""
    length = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(CHUNK))
        elif isinstance(event, h11.Data):
            length += len(event.data)
        else:
            assert isinstance(event, h11.EndOfMessage)
            return length


async def respond(conn: h11.Connection, stream: trio.abc.Stream, status: int, body: bytes) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    data += conn.send(h11.Data(data=body)) or b""
    await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
