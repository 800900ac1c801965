"""The fast WebSocket masker is byte-identical to wsproto's own."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage

from revconn._runtime import wsmask as _wsmask

pytestmark = pytest.mark.skipif(
    _wsmask._apply_mask is None, reason="websockets' compiled speedups unavailable"
)


@given(
    key=st.binary(min_size=4, max_size=4),
    chunks=st.lists(st.binary(max_size=300), max_size=8),
)
def test_fast_masker_matches_wsproto_across_chunks(key: bytes, chunks: list[bytes]) -> None:
    ours, reference = _wsmask.FastMasker(key), _wsmask._ORIGINAL(bytearray(key))
    for chunk in chunks:  # the key cycle continues across calls
        out = ours.process(chunk)
        assert isinstance(out, bytearray)
        assert out == reference.process(bytearray(chunk))


def test_installed_masker_round_trips_through_wsproto() -> None:
    assert _wsmask.install()
    assert _wsmask.installed()
    client, server = Connection(ConnectionType.CLIENT), Connection(ConnectionType.SERVER)
    payload = bytes(range(256)) * 1000 + b"tail"
    wire = client.send(BytesMessage(data=payload))
    assert payload not in wire  # masked on the wire
    server.receive_data(wire)
    received = b"".join(bytes(e.data) for e in server.events() if isinstance(e, BytesMessage))
    assert received == payload
