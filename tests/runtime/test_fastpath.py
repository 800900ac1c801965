"""The write-path helpers that skip trio's schedule points (revconn._runtime.fastpath),
and the tunnel flush policy built on them: no detour through the scheduler
with one stream in flight, one shared message when several streams write at
once."""

from __future__ import annotations

import hashlib
import os
import ssl

import pytest
import trio
import trio.testing
import trio_websocket

from revconn._runtime.fastpath import FastSendStream, WriteLock, send_all

from .._memory import tunnels
from .test_streams import REQ, echo_handler


class _Bystander:
    """A task started before an operation: if it has run, the operation yielded
    to the scheduler. (trio runs a batch in random order, so one yield goes
    unseen half the time: callers repeat the operation, see TRIALS.)"""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.ran = False
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        self.ran = True


TRIALS = 20


async def test_free_write_lock_is_taken_without_a_schedule_point() -> None:
    lock = WriteLock()
    for _ in range(TRIALS):
        async with trio.open_nursery() as nursery:
            bystander = _Bystander(nursery)
            async with lock:
                assert lock.locked()
            assert not bystander.ran
        assert not lock.locked()


async def test_contended_write_lock_is_exclusive_and_fifo() -> None:
    lock = WriteLock()
    log: list[str] = []

    async def writer(name: str) -> None:
        async with lock:
            log.append(f"{name}+")
            await trio.testing.wait_all_tasks_blocked()  # the others queue up meanwhile
            log.append(f"{name}-")

    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(writer, name)
            await trio.testing.wait_all_tasks_blocked()
    assert log == ["a+", "a-", "b+", "b-", "c+", "c-"]


async def test_write_lock_is_released_on_error() -> None:
    lock = WriteLock()
    with pytest.raises(ValueError, match="boom"):
        async with lock:
            raise ValueError("boom")
    assert not lock.locked()


def _stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def _read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, "peer closed early"
        data += chunk
    return bytes(data)


async def test_send_all_small_write_has_no_schedule_point() -> None:
    left, right = _stream_pair()
    async with left, right:
        for i in range(TRIALS):
            async with trio.open_nursery() as nursery:
                bystander = _Bystander(nursery)
                await send_all(left, b"hello %d" % i)
                assert not bystander.ran
            assert await _read_exactly(right, len(b"hello %d" % i)) == b"hello %d" % i


async def test_send_all_waits_for_a_slow_reader_and_keeps_every_byte() -> None:
    left, right = _stream_pair()
    payload = os.urandom(8 << 20)  # far above a socket buffer: partial writes, then waits
    received = bytearray()

    async def slow_reader() -> None:
        while len(received) < len(payload):
            received.extend(await right.receive_some(64 * 1024))
            await trio.sleep(0.0001)

    async with left, right:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_reader)
                await send_all(left, memoryview(payload))
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_send_all_on_a_closed_stream_is_closed_resource_error() -> None:
    left, right = _stream_pair()
    await left.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await send_all(left, b"x")
    await right.aclose()


async def test_send_all_to_a_vanished_peer_is_broken_resource_error() -> None:
    left, right = _stream_pair()
    await right.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first write may still be accepted by the kernel
            await send_all(left, b"x" * 65536)
    await left.aclose()


async def test_send_all_on_tls_uses_the_tls_streams_own_send(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plaintext written to a TLS socket's fd would corrupt the session: on any
    stream but a plain SocketStream, send_all is the stream's own send."""
    server_context, client_context = tls
    left, right = _stream_pair()
    server = trio.SSLStream(left, server_context, server_side=True, https_compatible=True)
    client = trio.SSLStream(right, client_context, server_hostname="127.0.0.1")
    payload = os.urandom(3 << 20)  # many TLS records, partial writes
    received = bytearray()

    def no_write(fd: int, data: object) -> int:
        raise AssertionError("os.write on a TLS socket")

    monkeypatch.setattr(os, "write", no_write)

    async def read_all() -> None:
        while len(received) < len(payload):
            received.extend(await client.receive_some(64 * 1024))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await send_all(server, payload)
    assert received == payload
    memory, peer = trio.testing.memory_stream_pair()  # any other stream, likewise
    await send_all(memory, b"via its own send_all")
    assert await peer.receive_some() == b"via its own send_all"
    await trio.aclose_forcefully(server)
    await trio.aclose_forcefully(client)


async def test_send_all_honours_cancellation() -> None:
    left, right = _stream_pair()
    async with left, right:
        with trio.CancelScope() as scope:
            scope.cancel()
            await send_all(left, b"never")
        assert scope.cancelled_caught
        with trio.move_on_after(0.05):
            data = await right.receive_some(10)
            pytest.fail(f"cancelled send wrote {data!r}")


# -- the tunnel's flush policy ------------------------------------------------------


async def test_flush_with_one_stream_needs_no_schedule_point(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with tunnels(echo_handler) as gw:
        for _ in range(TRIALS):
            async with trio.open_nursery() as nursery:
                bystander = _Bystander(nursery)
                await gw.flush()
                assert not bystander.ran  # nothing queued: returns at once
        transport = gw.transport
        assert hasattr(transport, "sent")
        before = len(transport.sent)
        stream = gw.open_request(REQ, end_stream=True)
        await gw.flush()
        assert len(transport.sent) == before + 1  # sent at once, on its own
        response = await stream.receive_response()
        assert response.status == 200
        stream.close()


async def test_concurrent_streams_share_one_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with tunnels(echo_handler, max_streams=10) as gw:
        transport = gw.transport
        assert hasattr(transport, "sent")
        first = gw.open_request(REQ, end_stream=False)  # in flight: batching is worth a wait
        await gw.flush()
        before = len(transport.sent)
        streams = []

        async def open_one() -> None:
            stream = gw.open_request(REQ, end_stream=True)
            streams.append(stream)
            await gw.flush()

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(open_one)
        assert len(transport.sent) == before + 1  # three HEADERS, one WebSocket message
        for stream in streams:
            assert (await stream.receive_response()).status == 200
            stream.close()
        await first.end()
        assert (await first.receive_response()).status == 200
        first.close()


async def _fast_stream_pair() -> tuple[FastSendStream, FastSendStream]:
    left, right = _stream_pair()
    return FastSendStream(left), FastSendStream(right)


async def test_trio_websocket_runs_over_a_fast_send_stream() -> None:
    # (trio.testing.check_half_closeable_stream does not apply: it requires
    # send_all to be a schedule point, which is what this stream avoids.)
    client_stream, server_stream = _stream_pair()
    big = os.urandom(900 * 1024)
    async with trio.open_nursery() as nursery:

        async def accept_and_echo() -> None:
            ws = await trio_websocket.wrap_server_stream(nursery, server_stream)
            connection = await ws.accept()
            while True:
                try:
                    message = await connection.get_message()
                except trio_websocket.ConnectionClosed:
                    return
                await connection.send_message(message)

        nursery.start_soon(accept_and_echo)
        with trio.fail_after(10):
            client = await trio_websocket.wrap_client_stream(
                nursery, FastSendStream(client_stream), "localhost", "/", max_message_size=1 << 20
            )
            for message in (b"small", big, b"after the big one"):
                await client.send_message(message)
                assert await client.get_message() == message
            await client.aclose(1000, "done")
            assert client.closed is not None and client.closed.code == 1000


async def test_fast_send_stream_half_close_and_close() -> None:
    left, right = await _fast_stream_pair()
    await left.send_all(b"last words")
    await left.send_eof()
    assert await _read_all(right) == b"last words"
    await right.send_all(b"reply after the peer's EOF")
    assert await left.receive_some(100) == b"reply after the peer's EOF"
    await left.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await left.send_all(b"x")
    await right.aclose()


async def _read_all(stream: FastSendStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(100):
        data += chunk
    return data


async def test_fast_send_stream_small_send_has_no_schedule_point() -> None:
    left, right = await _fast_stream_pair()
    async with left, right:
        for i in range(TRIALS):
            async with trio.open_nursery() as nursery:
                bystander = _Bystander(nursery)
                await left.send_all(b"message %d" % i)
                assert not bystander.ran
            assert await right.receive_some(100) == b"message %d" % i
