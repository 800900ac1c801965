"""The fast WebSocket masker: byte-identical to wsproto's own, used by revconn's
connections only, and the wsproto internals it leans on are still there."""

from __future__ import annotations

import dis
import importlib
import itertools
import pkgutil
import types
from collections.abc import Iterable, Iterator
from unittest import mock

import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.connection
import wsproto.frame_protocol
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameDecoder, FrameProtocol, XorMaskerSimple

from revconn import Agent, AgentConfig, Backoff
from revconn._gateway.websocket import WebSocketTransport
from revconn._runtime import wsmask

from .._gateway_helpers import SECRET, running_gateway, wait_for

pytestmark = pytest.mark.skipif(
    wsmask._apply_mask is None, reason="websockets' compiled speedups unavailable"
)

WSPROTO = f"wsproto {wsproto.__version__}"
RECHECK = "re-check how revconn._runtime.wsmask reaches wsproto's masker"


class Counter:
    calls = 0


@pytest.fixture
def fast_calls(monkeypatch: pytest.MonkeyPatch) -> type[Counter]:
    """Counts FastMasker.process calls (a spy on the class, undone after the test)."""
    process = wsmask.FastMasker.process

    def counting(self: wsmask.FastMasker, data: bytes | bytearray) -> bytearray:
        Counter.calls += 1
        return process(self, data)

    Counter.calls = 0
    monkeypatch.setattr(wsmask.FastMasker, "process", counting)
    return Counter


def fast(connection_type: ConnectionType) -> Connection:
    conn = Connection(connection_type)
    assert wsmask.enable(conn)
    return conn


def messages(events: Iterable[Event]) -> list[bytes]:
    return [bytes(e.data) for e in events if isinstance(e, BytesMessage)]


def masker_in_use(server: Connection, client: Connection) -> type:
    """The masker class ``server`` unmasks with: feed it half a masked frame
    (wsproto keeps the frame's masker until the frame is complete)."""
    wire = client.send(BytesMessage(data=b"x" * 64))
    server.receive_data(wire[: len(wire) // 2])
    list(server.events())
    masker = server._proto._frame_decoder.masker
    server.receive_data(wire[len(wire) // 2 :])
    list(server.events())
    return type(masker)


# -- the masker ----------------------------------------------------------------


@given(
    key=st.binary(min_size=4, max_size=4),
    chunks=st.lists(st.binary(max_size=300), max_size=8),
)
def test_fast_masker_matches_wsproto_across_chunks(key: bytes, chunks: list[bytes]) -> None:
    ours, reference = wsmask.FastMasker(key), XorMaskerSimple(bytearray(key))
    for chunk in chunks:  # the key cycle continues across calls
        out = ours.process(chunk)
        assert isinstance(out, bytearray)
        assert out == reference.process(bytearray(chunk))


_events = st.lists(
    st.one_of(
        st.builds(BytesMessage, data=st.binary(max_size=70_000), message_finished=st.booleans()),
        st.builds(Ping, payload=st.binary(max_size=125)),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=50, deadline=None)
@given(events=_events, key=st.binary(min_size=4, max_size=4))
def test_client_frames_are_byte_identical_to_wsprotos(events: list[Event], key: bytes) -> None:
    ours, reference = fast(ConnectionType.CLIENT), Connection(ConnectionType.CLIENT)
    with mock.patch("os.urandom", lambda n: key[:n]):  # the same masking key on both
        for event in [*events, CloseConnection(code=1000, reason="bye")]:
            assert ours.send(event) == reference.send(event)


@settings(max_examples=50, deadline=None)
@given(events=_events, cuts=st.lists(st.integers(min_value=0, max_value=1 << 18), max_size=12))
def test_server_unmasks_like_wsproto_with_frames_split_anywhere(
    events: list[Event], cuts: list[int]
) -> None:
    client = Connection(ConnectionType.CLIENT)
    wire = b"".join(client.send(event) for event in events)
    ours, reference = fast(ConnectionType.SERVER), Connection(ConnectionType.SERVER)
    bounds = [0, *sorted(c % (len(wire) + 1) for c in cuts), len(wire)]
    for start, end in itertools.pairwise(bounds):
        ours.receive_data(wire[start:end])
        reference.receive_data(wire[start:end])
        assert list(ours.events()) == list(reference.events())


def test_enable_keeps_bytes_already_buffered_and_a_frame_half_parsed(
    fast_calls: type[Counter],
) -> None:
    client = Connection(ConnectionType.CLIENT)
    first = client.send(BytesMessage(data=b"first" * 100))
    second = client.send(BytesMessage(data=b"second" * 100))
    server = Connection(ConnectionType.SERVER, trailing_data=first + second[:20])
    assert wsmask.enable(server)
    server.receive_data(second[20:])
    assert messages(server.events()) == [b"first" * 100, b"second" * 100]
    assert fast_calls.calls > 0
    # Half a frame parsed before enable(): it finishes with wsproto's masker.
    server = Connection(ConnectionType.SERVER, trailing_data=first[:100])
    received = messages(server.events())
    assert type(server._proto._frame_decoder.masker) is XorMaskerSimple
    assert wsmask.enable(server)
    server.receive_data(first[100:] + second)
    received += messages(server.events())
    assert b"".join(received) == b"first" * 100 + b"second" * 100


def test_without_speedups_connections_keep_wsprotos_masker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wsmask, "_apply_mask", None)
    conn = Connection(ConnectionType.SERVER)
    assert not wsmask.enable(conn)
    assert not wsmask.enabled(conn)
    assert masker_in_use(conn, Connection(ConnectionType.CLIENT)) is XorMaskerSimple


# -- the wsproto and trio-websocket internals wsmask relies on ------------------


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _wsproto_code() -> Iterator[types.CodeType]:
    for info in pkgutil.walk_packages(wsproto.__path__, "wsproto."):
        module = importlib.import_module(info.name)
        spec = module.__spec__
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as f:
            yield from _code_objects(compile(f.read(), spec.origin, "exec"))


_LOOKUPS = {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM"}


def _loads_masker(code: types.CodeType) -> bool:
    """Whether ``code`` looks the name XorMaskerSimple up (defining it does not count)."""
    return any(
        ins.argval == "XorMaskerSimple" and ins.opname in _LOOKUPS
        for ins in dis.get_instructions(code)
    )


def test_wsproto_creates_its_masker_only_where_wsmask_rebinds_it() -> None:
    users = {code.co_qualname for code in _wsproto_code() if _loads_masker(code)}
    expected = {"FrameDecoder.parse_header", "FrameProtocol._serialize_frame"}
    assert users == expected, (
        f"{WSPROTO} looks XorMaskerSimple up in {sorted(users)}, not in {sorted(expected)} "
        f"as when revconn's FastMasker was written: {RECHECK} (its _FastFrameDecoder and "
        "_FastFrameProtocol rebind those two methods), or connections silently keep the slow masker"
    )
    for method, rebound in (
        (FrameDecoder.parse_header, wsmask._FastFrameDecoder.parse_header),
        (FrameProtocol._serialize_frame, wsmask._FastFrameProtocol._serialize_frame),
    ):
        assert rebound.__code__ is method.__code__  # wsproto's code, not a copy
        assert rebound.__defaults__ == method.__defaults__
        assert rebound.__globals__["XorMaskerSimple"] is wsmask.FastMasker


def test_wsproto_connection_keeps_a_frame_protocol_and_decoder_whose_class_can_change() -> None:
    conn = Connection(ConnectionType.SERVER)
    proto = getattr(conn, "_proto", None)
    assert type(proto) is FrameProtocol, (
        f"{WSPROTO}: Connection._proto is {type(proto).__name__}, not a FrameProtocol: {RECHECK}"
    )
    decoder = getattr(proto, "_frame_decoder", None)
    assert type(decoder) is FrameDecoder, (
        f"{WSPROTO}: FrameProtocol._frame_decoder is {type(decoder).__name__}, not a "
        f"FrameDecoder: {RECHECK}"
    )
    assert hasattr(decoder, "masker"), f"{WSPROTO}: FrameDecoder has no masker: {RECHECK}"
    assert wsmask.enable(conn)  # __class__ assignment accepted (same layout)
    assert wsmask.enabled(conn)
    assert masker_in_use(conn, Connection(ConnectionType.CLIENT)) is wsmask.FastMasker


async def _trio_websocket_pair(
    nursery: trio.Nursery,
) -> tuple[trio_websocket.WebSocketConnection, trio_websocket.WebSocketConnection]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server: list[trio_websocket.WebSocketConnection] = []

    async def accept() -> None:
        request = await trio_websocket.wrap_server_stream(nursery, server_stream)
        server.append(await request.accept())

    nursery.start_soon(accept)
    client = await trio_websocket.wrap_client_stream(nursery, client_stream, "x", "/")  # type: ignore[arg-type]
    await wait_for(lambda: server)
    return client, server[0]


async def test_trio_websocket_client_masks_with_fast_masker(fast_calls: type[Counter]) -> None:
    async with trio.open_nursery() as nursery:
        client, server = await _trio_websocket_pair(nursery)
        ws_connection = getattr(client, "_wsproto", None)
        assert isinstance(ws_connection, wsproto.WSConnection), (
            f"trio-websocket {trio_websocket.__version__}: WebSocketConnection._wsproto is not a "
            f"wsproto WSConnection: {RECHECK} (enable_trio_websocket)"
        )
        assert wsmask.enable_trio_websocket(client)
        assert ws_connection.connection is not None and wsmask.enabled(ws_connection.connection)
        payload = bytes(range(256)) * 300
        await client.send_message(payload)
        assert await server.get_message() == payload
        assert fast_calls.calls > 0
        await client.aclose()
        nursery.cancel_scope.cancel()


# -- revconn's own connections, and nobody else's -------------------------------


async def test_gateway_transport_unmasks_with_fast_masker(fast_calls: type[Counter]) -> None:
    client = Connection(ConnectionType.CLIENT)
    first = client.send(BytesMessage(data=b"in the handshake's trailing data"))
    second = client.send(BytesMessage(data=bytes(range(256)) * 100))
    ours, theirs = trio.testing.memory_stream_pair()
    transport = WebSocketTransport(ours, first, 1 << 20)  # type: ignore[arg-type]
    assert wsmask.enabled(transport._ws)
    assert await transport.receive_message() == b"in the handshake's trailing data"
    await theirs.send_all(second)
    assert await transport.receive_message() == bytes(range(256)) * 100
    assert fast_calls.calls > 0


def _assert_wsproto_untouched() -> None:
    fp = wsproto.frame_protocol
    masker: object = fp.XorMaskerSimple
    assert masker is not wsmask.FastMasker
    assert masker is XorMaskerSimple
    assert XorMaskerSimple.__module__ == "wsproto.frame_protocol"
    assert fp.FrameProtocol is FrameProtocol and FrameProtocol.__module__ == fp.__name__
    assert fp.FrameDecoder is FrameDecoder and FrameDecoder.__module__ == fp.__name__
    assert vars(wsproto.connection)["FrameProtocol"] is FrameProtocol
    assert FrameDecoder.parse_header.__globals__ is vars(fp)


def _assert_plain_wsproto_uses_its_own_masker(fast_calls: type[Counter]) -> None:
    before = fast_calls.calls
    client, server = Connection(ConnectionType.CLIENT), Connection(ConnectionType.SERVER)
    assert not wsmask.enabled(client) and not wsmask.enabled(server)
    assert masker_in_use(server, client) is XorMaskerSimple
    wire = client.send(TextMessage(data="plain"))
    server.receive_data(wire)
    assert [e.data for e in server.events() if isinstance(e, TextMessage)] == ["plain"]
    # The same through the handshaking WSConnection.
    ws_client = wsproto.WSConnection(ConnectionType.CLIENT)
    ws_server = wsproto.WSConnection(ConnectionType.SERVER)
    ws_server.receive_data(ws_client.send(Request(host="x", target="/")))
    list(ws_server.events())
    ws_client.receive_data(ws_server.send(AcceptConnection()))
    list(ws_client.events())
    assert ws_client.connection is not None and ws_server.connection is not None
    assert not wsmask.enabled(ws_client.connection) and not wsmask.enabled(ws_server.connection)
    ws_server.receive_data(ws_client.send(BytesMessage(data=b"plain" * 100)))
    assert b"".join(messages(ws_server.events())) == b"plain" * 100
    assert fast_calls.calls == before


async def _no_app(scope: object, receive: object, send: object) -> None:
    """An ASGI app that is never called (the agent needs something to serve)."""


async def test_only_revconns_connections_use_fast_masker(fast_calls: type[Counter]) -> None:
    async with running_gateway() as gw, trio.open_nursery() as nursery:
        agent = Agent(
            AgentConfig(gateway=gw.agent_url, name="masked", secret=SECRET, backoff=Backoff(5, 10)),
            app=_no_app,
        )
        nursery.start_soon(agent.run)
        with trio.fail_after(5):
            await agent.connected.wait()
        await wait_for(lambda: gw.gateway.registry.lookup("masked") is not None)
        assert agent.tunnel is not None
        agent_ws = agent.tunnel.transport._ws  # type: ignore[attr-defined]
        assert agent_ws._wsproto.connection is not None
        assert wsmask.enabled(agent_ws._wsproto.connection)
        (tunnel,) = gw.gateway._tunnels
        gateway_transport = tunnel.transport
        assert isinstance(gateway_transport, WebSocketTransport)
        assert wsmask.enabled(gateway_transport._ws)
        assert fast_calls.calls > 0  # the tunnel handshake went through it

        _assert_wsproto_untouched()
        _assert_plain_wsproto_uses_its_own_masker(fast_calls)
        agent.stop()
