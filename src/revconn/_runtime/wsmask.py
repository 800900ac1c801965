"""Fast WebSocket masking for wsproto.

RFC 6455 makes the client (the agent) mask every frame it sends and the server
(the gateway) unmask it: every byte of every response body. wsproto does this
in Python (~800 MiB/s here), which was a quarter of both processes' CPU on a
10 MiB download. ``install()`` gives wsproto a masker built on the C
``apply_mask`` of the well-kept ``websockets`` library (~45 GiB/s here), with
the same interface and byte-identical output (tested against wsproto's own).

It replaces ``wsproto.frame_protocol.XorMaskerSimple``, so every wsproto user
in the process benefits (trio-websocket in the agent, hypercorn and the public
listener in the gateway). ``Agent.run()`` and ``Gateway.serve()`` call it;
without ``websockets``' compiled speedups it does nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import wsproto.frame_protocol

__all__ = ["install", "installed"]

_ORIGINAL = wsproto.frame_protocol.XorMaskerSimple


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


def install() -> bool:
    """Use FastMasker in wsproto (idempotent); False if unavailable."""
    if _apply_mask is None:
        return False
    wsproto.frame_protocol.XorMaskerSimple = FastMasker  # type: ignore[misc,assignment]
    return True


def installed() -> bool:
    masker: object = wsproto.frame_protocol.XorMaskerSimple
    return masker is FastMasker
