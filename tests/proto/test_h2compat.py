"""What revconn._proto.h2compat relies on in h2 and hpack is still there, and
its pieces behave like the h2 they replace. A failure here after an h2/hpack
upgrade names what changed and what to re-check."""

from __future__ import annotations

import ast
import collections
import hashlib
import inspect
import textwrap

import h2
import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings
import hpack
import hpack.table
import hyperframe.frame
import pytest

from revconn import RemoteProtocolError
from revconn._proto import h2compat
from revconn._proto.session import (
    RequestReceived,
    ResponseReceived,
    Role,
    TunnelSession,
)

from .test_session import connected_pair, pump

H2 = f"h2 {h2.__version__}"
HPACK = f"hpack {hpack.__version__}"
RECHECK = "re-check revconn/_proto/h2compat.py against it"

RECEIVE_FRAME_COPIED_FROM = {
    # normalised source hash of h2.connection.H2Connection._receive_frame:
    # the h2 version(s) whose body h2compat.H2Connection._receive_frame copies
    "1d5067c12912a8234ccbf52413d7bb52613a22de75e39ad97797fc7fccf3757d": "4.4.1",
}

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]


def _function_ast(function: object) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    node = tree.body[0]
    assert isinstance(node, ast.FunctionDef)
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        node.body = body[1:]  # the docstring
    return node


def normalised_hash(function: object) -> str:
    """sha256 of the function's AST: comments, docstring and layout do not count."""
    return hashlib.sha256(ast.dump(_function_ast(function)).encode()).hexdigest()


class _Comparable(ast.NodeTransformer):
    """Drops annotations and spells ``h2.exceptions.X`` / ``hyperframe.frame.X``
    as ``X``, the only ways the override is written differently from h2."""

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        module = node.value  # h2.exceptions in h2.exceptions.X
        if (
            isinstance(module, ast.Attribute)
            and isinstance(module.value, ast.Name)
            and module.value.id in {"h2", "hyperframe"}
        ):
            return ast.Name(id=node.attr, ctx=node.ctx)
        self.generic_visit(node)
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.returns = None
        for arg in node.args.args:
            arg.annotation = None
        self.generic_visit(node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        node.annotation = ast.Constant(value=None)
        return node


def _is_trace_log(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Call)
        and isinstance(stmt.value.func, ast.Attribute)
        and stmt.value.func.attr == "trace"
    )


# -- h2's code the override copies -----------------------------------------------


def test_h2_receive_frame_is_the_version_the_override_copies() -> None:
    digest = normalised_hash(h2.connection.H2Connection._receive_frame)
    copied_from = ", ".join(sorted(set(RECEIVE_FRAME_COPIED_FROM.values())))
    assert digest in RECEIVE_FRAME_COPIED_FROM, (
        f"{H2} changed H2Connection._receive_frame (normalised source hash {digest}); "
        f"revconn._proto.h2compat.H2Connection._receive_frame is a copy of h2 {copied_from}'s "
        "minus its repr(frame) trace log. Port h2's changes into the copy (keep out the "
        "trace log), then record the new hash in RECEIVE_FRAME_COPIED_FROM here."
    )


def test_override_is_h2s_receive_frame_without_the_trace_log() -> None:
    theirs = _function_ast(h2.connection.H2Connection._receive_frame)
    traces = [stmt for stmt in theirs.body if _is_trace_log(stmt)]
    assert len(traces) == 1, (
        f"{H2}: _receive_frame no longer logs each frame with a trace call; the override "
        "exists only to drop that log (and its repr(frame)): it may be unnecessary now, "
        f"{RECHECK}"
    )
    theirs.body = [stmt for stmt in theirs.body if not _is_trace_log(stmt)]
    ours = _function_ast(h2compat.H2Connection._receive_frame)
    assert ast.dump(_Comparable().visit(ours)) == ast.dump(_Comparable().visit(theirs)), (
        f"h2compat.H2Connection._receive_frame is no longer {H2}'s minus the trace log: "
        "port h2's version into it"
    )


def test_h2_internals_the_override_calls_exist() -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    table = getattr(conn, "_frame_dispatch_table", None)
    assert isinstance(table, dict), f"{H2}: H2Connection._frame_dispatch_table is gone: {RECHECK}"
    frame_types = {
        cls
        for cls in vars(hyperframe.frame).values()
        if isinstance(cls, type)
        and issubclass(cls, hyperframe.frame.Frame)
        and cls is not hyperframe.frame.Frame
        and getattr(cls, "type", None) is not None
    }
    missing = sorted(cls.__name__ for cls in frame_types - set(table))
    assert not missing, f"{H2}: _frame_dispatch_table no longer handles {missing}: {RECHECK}"
    assert all(callable(handler) for handler in table.values())
    for name in ("_stream_is_closed_by_reset", "_stream_is_closed_by_end"):
        method = getattr(conn, name, None)
        assert callable(method), f"{H2}: H2Connection.{name} is gone: {RECHECK}"
        assert list(inspect.signature(method).parameters) == ["stream_id"], (
            f"{H2}: H2Connection.{name} no longer takes (stream_id): {RECHECK}"
        )
        assert method(1) is False, f"{H2}: H2Connection.{name} no longer returns a bool"
    prepare = getattr(conn, "_prepare_for_sending", None)
    assert callable(prepare), f"{H2}: H2Connection._prepare_for_sending is gone: {RECHECK}"
    assert list(inspect.signature(prepare).parameters) == ["frames"], (
        f"{H2}: H2Connection._prepare_for_sending no longer takes (frames): {RECHECK}"
    )
    closed = h2.exceptions.StreamClosedError(1)
    assert closed.stream_id == 1 and isinstance(closed._events, list), (
        f"{H2}: StreamClosedError lost stream_id or _events: {RECHECK}"
    )
    assert closed.error_code == h2.errors.ErrorCodes.STREAM_CLOSED
    too_low = h2.exceptions.StreamIDTooLowError(1, 3)
    assert too_low.stream_id == 1, f"{H2}: StreamIDTooLowError lost stream_id: {RECHECK}"


def test_h2_and_hpack_still_keep_settings_and_header_tables_in_deques() -> None:
    settings = h2.settings.Settings(client=True)
    table = getattr(settings, "_settings", None)
    assert isinstance(table, dict) and table, f"{H2}: Settings._settings is gone: {RECHECK}"
    assert all(type(values) is collections.deque for values in table.values()), (
        f"{H2}: Settings._settings no longer maps to deques; compact_h2 swaps them for "
        f"SlimDeque: {RECHECK}"
    )
    entries = getattr(hpack.table.HeaderTable(), "dynamic_entries", None)
    assert type(entries) is collections.deque, (
        f"{HPACK}: HeaderTable.dynamic_entries is no longer a deque; compact_h2 swaps it for "
        f"SlimDeque: {RECHECK}"
    )
    conn = h2.connection.H2Connection()
    for coder in (conn.encoder, conn.decoder):
        assert isinstance(coder.header_table, hpack.table.HeaderTable), (
            f"{H2}: the connection's HPACK coders have no header_table: {RECHECK}"
        )


# -- behaviour ---------------------------------------------------------------------


def test_session_pair_exchanges_a_request_and_response_without_frame_reprs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_repr(frame: object) -> str:
        raise AssertionError("a received frame was repr()'d: the trace log is back")

    monkeypatch.setattr(hyperframe.frame.Frame, "__repr__", no_repr)
    gw, ag = connected_pair()
    assert type(gw._conn) is type(ag._conn) is h2compat.H2Connection
    sid = gw.open_stream(REQUEST, end_stream=False)
    gw.send_data(sid, b"x" * 40_000, end_stream=True)
    _, ev_ag = pump(gw, ag)
    assert isinstance(ev_ag[0], RequestReceived) and ev_ag[0].stream_id == sid
    ag.send_response(sid, 200, [(b"x-a", b"1")], end_stream=False)
    ag.send_data(sid, b"y" * 40_000, end_stream=True)
    ev_gw, _ = pump(gw, ag)
    assert ev_gw[0] == ResponseReceived(sid, 200, [(b"x-a", b"1")], False)


def _frames(data: bytes) -> list[hyperframe.frame.Frame]:
    out = []
    view = memoryview(data)
    while view:
        frame, length = hyperframe.frame.Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        out.append(frame)
        view = view[9 + length :]
    return out


@pytest.mark.parametrize(
    "later_streams",
    [0, 1],
    ids=["stream-closed-error", "stream-id-too-low-error"],  # the two branches taken
)
def test_late_headers_on_a_reset_stream_are_answered_with_rst_stream(later_streams: int) -> None:
    gw, ag = connected_pair()
    sid = gw.open_stream(REQUEST, end_stream=True)
    pump(gw, ag)
    ag.send_response(sid, 200, [], end_stream=False)
    late = ag.data_to_send()
    gw.reset_stream(sid)
    gw.data_to_send()
    for _ in range(later_streams):  # h2 then forgets the reset stream
        gw.open_stream(REQUEST, end_stream=True)
        gw.data_to_send()
    assert gw.receive_data(late) == []
    assert not gw.closed
    [rst] = _frames(gw.data_to_send())
    assert isinstance(rst, hyperframe.frame.RstStreamFrame)
    assert (rst.stream_id, rst.error_code) == (sid, h2.errors.ErrorCodes.STREAM_CLOSED)


def test_headers_on_a_stream_closed_by_end_stream_are_a_connection_error() -> None:
    gw, ag = connected_pair()
    sid = gw.open_stream(REQUEST, end_stream=True)
    pump(gw, ag)
    ag.send_response(sid, 204, [], end_stream=True)
    pump(gw, ag)
    gw.open_stream(REQUEST, end_stream=True)  # h2 forgets the closed stream
    gw.data_to_send()
    headers = hyperframe.frame.HeadersFrame(sid)
    headers.data = hpack.Encoder().encode([(b":status", b"200")])
    headers.flags.add("END_HEADERS")
    with pytest.raises(RemoteProtocolError) as info:
        gw.receive_data(headers.serialize())
    assert info.value.h2_error == h2.errors.ErrorCodes.STREAM_CLOSED


def _settings_values(conn: h2.connection.H2Connection) -> list[dict[int, list[int]]]:
    return [
        {int(key): list(values) for key, values in settings._settings.items()}
        for settings in (conn.local_settings, conn.remote_settings)
    ]


def test_compact_h2_keeps_settings_and_header_tables_identical() -> None:
    """Compacted mid-use (pending settings, a filled HPACK table), a connection
    goes on exactly as an uncompacted one driven the same way."""
    codes = h2.settings.SettingCodes

    def connection() -> h2.connection.H2Connection:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.update_settings({codes.HEADER_TABLE_SIZE: 96, codes.MAX_CONCURRENT_STREAMS: 7})
        conn.update_settings({codes.MAX_CONCURRENT_STREAMS: 9})
        conn.encoder.header_table_size = 128
        conn.encoder.encode([(b"x-one", b"1"), (b"x-two", b"2"), (b"x-three", b"3")])
        return conn

    plain, compact = connection(), connection()
    assert _settings_values(plain)[0][codes.MAX_CONCURRENT_STREAMS] == [100, 7, 9]
    assert len(plain.encoder.header_table.dynamic_entries) > 1
    h2compat.compact_h2(compact)
    for settings in (compact.local_settings, compact.remote_settings):
        assert all(isinstance(v, h2compat.SlimDeque) for v in settings._settings.values())
    for table in (compact.encoder.header_table, compact.decoder.header_table):
        assert isinstance(table.dynamic_entries, h2compat.SlimDeque)

    def same() -> None:
        assert _settings_values(compact) == _settings_values(plain)
        assert dict(compact.local_settings) == dict(plain.local_settings)
        assert list(compact.encoder.header_table.dynamic_entries) == list(
            plain.encoder.header_table.dynamic_entries
        )

    same()
    for _ in range(2):  # the pending values, one acknowledgement at a time
        for conn in (plain, compact):
            conn.local_settings.acknowledge()
        same()
    # HPACK: insertions at the front, evictions at the back of the small table.
    for i in range(20):
        headers = [(b"x-name-%d" % i, b"value-%d" % i), (b"x-name-%d" % (i // 2), b"v")]
        assert compact.encoder.encode(headers) == plain.encoder.encode(headers)
        same()


def _string_literal_h_bits(block: bytes) -> list[bool]:
    """The Huffman (H) bit of every string literal in an HPACK block (RFC 7541 6)."""
    bits: list[bool] = []
    pos = 0

    def integer(prefix: int) -> int:
        nonlocal pos
        mask = (1 << prefix) - 1
        value = block[pos] & mask
        pos += 1
        if value == mask:
            shift = 0
            while True:
                byte = block[pos]
                pos += 1
                value += (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
        return value

    def string() -> None:
        nonlocal pos
        bits.append(bool(block[pos] & 0x80))
        pos += integer(7)

    while pos < len(block):
        first = block[pos]
        if first & 0x80:  # indexed field
            integer(7)
            continue
        if first & 0x20 and not first & 0x40:  # dynamic table size update
            integer(5)
            continue
        if integer(6 if first & 0x40 else 4) == 0:  # literal with a new name
            string()
        string()
    return bits


def test_plain_encoder_output_decodes_and_has_no_huffman_bit() -> None:
    headers = [
        (b":method", b"POST"),
        (b":path", b"/a/some/path?q=1"),
        (b"x-custom-name", b"a literal value, not yet in the table"),
        (b"authorization", b"Bearer secret"),
        (b"x-custom-name", b"a literal value, not yet in the table"),  # now indexed
    ]
    for huffman in (False, True):  # even when asked for
        block = h2compat.PlainEncoder().encode(headers, huffman=huffman)
        bits = _string_literal_h_bits(block)
        assert bits and not any(bits)
        assert hpack.Decoder().decode(block, raw=True) == headers
    # The check can see Huffman coding: hpack's own encoder uses it.
    assert any(_string_literal_h_bits(hpack.Encoder().encode(headers)))


def test_sessions_encode_with_plain_encoder() -> None:
    assert type(TunnelSession(Role.GATEWAY)._conn.encoder) is h2compat.PlainEncoder
