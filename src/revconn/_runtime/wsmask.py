"""Fast WebSocket masking for revconn's own wsproto connections (a compat module).

RFC 6455 makes the client (the agent) mask every frame it sends and the server
(the gateway) unmask it: every byte of every response body. wsproto does this
in Python (~800 MiB/s here), which was a quarter of both processes' CPU on a
10 MiB download. FastMasker is built on the C ``apply_mask`` of the well-kept
``websockets`` library (~45 GiB/s here), with wsproto's masker interface and
byte-identical output (tested against wsproto's own).

It applies per connection: ``enable()`` on the gateway's wsproto connections,
``enable_trio_websocket()`` on the agent's. Every other wsproto user in the
process (hypercorn, an application embedding revconn) keeps wsproto's masker;
nothing global is patched. Without ``websockets``' compiled speedups both do
nothing and wsproto's masker stays.

How, and the wsproto internals relied on (``tests/runtime/test_wsmask.py``
fails loudly when they change): wsproto looks the global ``XorMaskerSimple`` up
in exactly two methods, ``FrameDecoder.parse_header`` (unmasking what arrives)
and ``FrameProtocol._serialize_frame`` (masking what is sent). The subclasses
below run those very functions with ``XorMaskerSimple`` resolved to FastMasker,
and ``enable()`` switches the class of a ``Connection``'s ``_proto`` and of
its ``_frame_decoder`` to them, which keeps their state (bytes already
buffered, a frame half-parsed). trio-websocket keeps its wsproto
``WSConnection`` in ``WebSocketConnection._wsproto``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from wsproto.connection import Connection
from wsproto.frame_protocol import FrameDecoder, FrameProtocol

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

__all__ = ["FastMasker", "enable", "enable_trio_websocket", "enabled"]

_F = TypeVar("_F", bound=Callable[..., Any])


class FastMasker:
    """wsproto's masker interface: ``process()`` masks the next bytes of a
    frame's payload, continuing the 4-byte key cycle across calls."""

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytearray:
        if not data:
            return bytearray(data)
        assert _apply_mask is not None
        out = bytearray(_apply_mask(data, self._key))
        shift = len(data) % 4
        if shift:
            self._key = self._key[shift:] + self._key[:shift]
        return out


_apply_mask: Callable[[bytes | bytearray, bytes], bytes] | None
try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # no compiled speedups: keep wsproto's masker
    _apply_mask = None


def _with_fast_masker(function: _F) -> _F:
    """wsproto's own ``function`` (same code, defaults and closure), with its
    global ``XorMaskerSimple`` resolved to FastMasker."""
    assert isinstance(function, types.FunctionType)
    namespace = {**function.__globals__, "XorMaskerSimple": FastMasker}
    rebound = types.FunctionType(
        function.__code__,
        namespace,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    rebound.__kwdefaults__ = function.__kwdefaults__
    rebound.__doc__ = function.__doc__
    rebound.__qualname__ = function.__qualname__
    result: _F = rebound  # type: ignore[assignment]
    return result


class _FastFrameDecoder(FrameDecoder):
    parse_header = _with_fast_masker(FrameDecoder.parse_header)


class _FastFrameProtocol(FrameProtocol):
    _serialize_frame = _with_fast_masker(FrameProtocol._serialize_frame)


def enable(connection: Connection) -> bool:
    """Mask and unmask this connection's frames with FastMasker from now on
    (idempotent); False, keeping wsproto's masker, without the speedups."""
    if _apply_mask is None:
        return False
    proto = connection._proto
    proto.__class__ = _FastFrameProtocol
    proto._frame_decoder.__class__ = _FastFrameDecoder
    return True


def enable_trio_websocket(ws: WebSocketConnection) -> bool:
    """:func:`enable` for a trio-websocket connection whose handshake is done."""
    connection: Connection | None = ws._wsproto.connection
    if connection is None:
        raise ValueError("the WebSocket handshake has not completed")
    return enable(connection)


def enabled(connection: Connection) -> bool:
    """Whether ``connection`` masks and unmasks with FastMasker."""
    proto = connection._proto
    return type(proto) is _FastFrameProtocol and type(proto._frame_decoder) is _FastFrameDecoder
