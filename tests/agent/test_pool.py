"""The agent's HTTP/1.1 upstream pool against in-process trio servers on 127.0.0.1."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

from revconn import ConnectError, RevconnError
from revconn._agent.pool import Pool, PoolResponse, PoolStatistics, UpstreamConnectError

from .._procs import free_port

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


class Source:
    """A request body of ``chunks`` pieces; counts how many were taken."""

    def __init__(self, chunks: int, *, fail_after: int | None = None) -> None:
        self.chunks = chunks
        self.taken = 0
        self.fail_after = fail_after

    @property
    def length(self) -> int:
        return self.chunks * CHUNK

    async def read(self) -> bytes | None:
        await trio.lowlevel.checkpoint()
        if self.taken == self.fail_after:
            raise ValueError("the body's source failed")
        if self.taken == self.chunks:
            return None
        self.taken += 1
        return b"x" * CHUNK


async def body_of(response: PoolResponse) -> bytes:
    return b"".join([chunk async for chunk, _ in response.aiter_chunks()])


def post(pool: Pool, source: Source) -> AbstractAsyncContextManager[PoolResponse]:
    headers = [(b"host", b"up"), (b"content-length", str(source.length).encode())]
    return pool.request(b"POST", b"/", headers, source.read)


# -- an answer before the body is read ----------------------------------------------------
async def test_answer_before_the_body_is_read_arrives_and_stops_the_upload() -> None:
    """Like hypercorn under a form handler's 413: answer from the head, then close
    with the body unread (the kernel resets the connection)."""

    async def refuse(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await respond(conn, stream, 413, b'{"error": "too_large"}')
        await stream.aclose()

    source = Source(1000)  # 64 MiB: far more than the sockets buffer
    async with serving(refuse) as port:
        pool = Pool("127.0.0.1", port, io_timeout=5)
        with trio.fail_after(5):
            async with post(pool, source) as response:
                assert response.status == 413
                assert await body_of(response) == b'{"error": "too_large"}'
    assert source.taken < source.chunks
    assert pool.statistics() == PoolStatistics(idle=0, in_use=0)  # closed, not pooled


async def test_broken_pipe_while_sending_keeps_the_answer() -> None:
    """The upstream reads a little, answers and closes: a send that then fails
    (broken pipe, reset) must not hide the answer already received."""

    async def answer_then_close(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await stream.receive_some(CHUNK)
        await respond(conn, stream, 401, b"who are you?")
        await stream.aclose()

    source = Source(1000)
    async with serving(answer_then_close) as port:
        pool = Pool("127.0.0.1", port, io_timeout=5)
        headers = [(b"host", b"up"), (b"content-length", str(source.length).encode())]
        with trio.fail_after(5):
            async with pool.request(b"PUT", b"/", headers, source.read) as response:
                assert response.status == 401
                assert await body_of(response) == b"who are you?"
    assert pool.statistics().idle == 0


async def test_error_answer_stops_the_upload_even_if_the_upstream_reads_on() -> None:
    """An upstream that answers 401 and then drains the body (a lingering close):
    the rest of the body is not sent, and the connection is not reused."""
    drained = trio.Event()

    async def answer_then_drain(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await respond(conn, stream, 401, b"no")
        while await stream.receive_some(CHUNK):
            pass
        drained.set()  # the agent closed the connection

    source = Source(1000)
    async with serving(answer_then_drain) as port:
        pool = Pool("127.0.0.1", port, io_timeout=5)
        with trio.fail_after(5):
            async with post(pool, source) as response:
                assert response.status == 401
                assert await body_of(response) == b"no"
            await drained.wait()
    assert source.taken < source.chunks
    assert pool.statistics() == PoolStatistics(idle=0, in_use=0)


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts for a self-signed certificate for 127.0.0.1."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    args = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run([*args, *subject, *files], check=True, capture_output=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


async def test_error_answer_over_tls_is_read_to_its_end_after_the_upload_stops(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """Stopping an upload blocked in a write must not break the TLS stream the
    rest of the answer comes on (a cancelled SSLStream write does)."""
    server_context, client_context = tls

    async def slow_refusal(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, server_context, server_side=True)
        conn, _ = await read_head(stream)
        # A slow upstream: the upload fills the buffers and blocks meanwhile.
        await trio.sleep(0.2)
        head = h11.Response(status_code=401, headers=[(b"content-length", b"12")])
        await stream.send_all(conn.send(head) or b"")
        for piece in (b"who ", b"are ", b"you?"):  # several reads after the stop
            await trio.sleep(0.1)
            await stream.send_all(conn.send(h11.Data(data=piece)) or b"")
        await trio.sleep_forever()  # reads nothing more; the agent closes

    source = Source(1000)
    async with serving(slow_refusal) as port:
        pool = Pool("127.0.0.1", port, ssl_context=client_context, io_timeout=5)
        with trio.fail_after(5):
            async with post(pool, source) as response:
                assert response.status == 401
                assert await body_of(response) == b"who are you?"
    assert source.taken < source.chunks
    assert pool.statistics() == PoolStatistics(idle=0, in_use=0)


async def test_early_2xx_head_lets_the_upload_finish() -> None:
    """A full-duplex upstream: it starts a 200 at once and ends it once it has
    read the whole body; the body is sent in full and the connection kept."""
    connections = 0

    async def duplex(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        while True:
            conn, _ = await read_head(stream)
            head = h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])
            await stream.send_all(conn.send(head) or b"")
            length = await read_body(conn, stream)
            data = conn.send(h11.Data(data=str(length).encode())) or b""
            await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
            conn.start_next_cycle()

    async with serving(duplex) as port:
        pool = Pool("127.0.0.1", port, io_timeout=5)
        for _ in range(2):
            source = Source(100)
            with trio.fail_after(5):
                async with post(pool, source) as response:
                    assert response.status == 200
                    assert await body_of(response) == str(source.length).encode()
            assert source.taken == source.chunks
            assert pool.statistics() == PoolStatistics(idle=1, in_use=0)
        await pool.aclose()
    assert connections == 1


async def test_slow_upload_is_not_a_response_timeout() -> None:
    """``io_timeout`` counts from the end of the upload: an upstream may wait for
    the whole body before it answers."""

    async def echo_length(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        length = await read_body(conn, stream)
        await respond(conn, stream, 200, str(length).encode())

    source = Source(8)

    async def trickle() -> bytes | None:
        await trio.sleep(0.1)  # 0.8 s in all, io_timeout is 0.3 s
        return await source.read()

    async with serving(echo_length) as port:
        pool = Pool("127.0.0.1", port, io_timeout=0.3)
        headers = [(b"host", b"up"), (b"content-length", str(source.length).encode())]
        with trio.fail_after(5):
            async with pool.request(b"POST", b"/", headers, trickle) as response:
                assert response.status == 200
                assert await body_of(response) == str(source.length).encode()
        await pool.aclose()


async def test_no_answer_after_the_upload_is_a_timeout() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await read_body(conn, stream)
        await trio.sleep_forever()

    async with serving(silent) as port:
        pool = Pool("127.0.0.1", port, io_timeout=0.2)
        t0 = trio.current_time()
        with trio.fail_after(5), pytest.raises(trio.TooSlowError):
            async with post(pool, Source(4)):
                pass
        assert 0.2 <= trio.current_time() - t0 < 3


async def test_failing_body_source_is_raised_as_is() -> None:
    async def read_all(stream: trio.SocketStream) -> None:
        conn, _ = await read_head(stream)
        await read_body(conn, stream)

    async with serving(read_all) as port:
        pool = Pool("127.0.0.1", port, io_timeout=5)
        with trio.fail_after(5), pytest.raises(ValueError, match="source failed"):
            async with post(pool, Source(10, fail_after=3)):
                pass
    assert pool.statistics() == PoolStatistics(idle=0, in_use=0)


async def test_a_normal_upload_keeps_the_connection() -> None:
    async def echo_length(stream: trio.SocketStream) -> None:
        while True:
            conn, _ = await read_head(stream)
            length = await read_body(conn, stream)
            await respond(conn, stream, 200, str(length).encode())
            conn.start_next_cycle()

    async with serving(echo_length) as port:
        pool = Pool("127.0.0.1", port, io_timeout=5)
        with trio.fail_after(5):
            async with post(pool, Source(20)) as response:
                assert await body_of(response) == str(20 * CHUNK).encode()
        assert pool.statistics() == PoolStatistics(idle=1, in_use=0)
        await pool.aclose()


# -- errors ---------------------------------------------------------------------------------
async def test_connect_error_is_a_revconn_error_with_a_short_reason() -> None:
    pool = Pool("127.0.0.1", free_port(), io_timeout=5)
    with pytest.raises(UpstreamConnectError) as info:
        async with pool.request(b"GET", b"/", [(b"host", b"up")], None):
            pass
    assert info.value.reason == "connection refused"
    assert isinstance(info.value, ConnectError)
    assert isinstance(info.value, RevconnError)
    assert not isinstance(info.value, OSError)
    assert isinstance(info.value.__cause__, OSError)  # the socket error, for the log


def test_pool_errors_sit_under_revconn_error() -> None:
    from revconn._agent import pool

    for name in ("UpstreamClosed", "UpstreamConnectError"):
        error = getattr(pool, name)
        assert issubclass(error, RevconnError), name
        assert not issubclass(error, OSError), name
