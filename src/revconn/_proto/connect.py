"""The tunnel stream's CONNECT exchange (sans-I/O): the head the gateway
opens each stream with, and what the agent's ``200`` says about its upstream
(docs/protocol.md section 5)."""

from __future__ import annotations

import math

import attrs

__all__ = [
    "CONNECT_HEADERS",
    "PROTOCOL_TOKEN",
    "PUBLIC_URL_HEADER",
    "UPSTREAM_UNREACHABLE",
    "WS_SUBPROTOCOL",
    "UpstreamInfo",
]

WS_SUBPROTOCOL = "revconn.v2"
"""The protocol version, offered by the agent as its WebSocket subprotocol."""
PROTOCOL_TOKEN = b"revconn-http1"
"""The ``:protocol`` of a tunnel stream (RFC 8441 extended CONNECT)."""
PUBLIC_URL_HEADER = b"revconn-public-url"
"""A header of the gateway's ``101`` to an agent, once per public URL that
reaches it (``NAME.DOMAIN`` forms first, then the ``/a/NAME/`` form)."""
UPSTREAM_UNREACHABLE = "the agent could not reach its upstream service"
"""The detail of ``502 upstream_unreachable`` when a connection to the upstream
fails, whoever made it (the agent, or the gateway for an announced URL): the
same words, so public clients cannot tell the modes apart."""
CONNECT_HEADERS = [
    (b":method", b"CONNECT"),
    (b":protocol", PROTOCOL_TOKEN),
    (b":scheme", b"http"),
    (b":path", b"/"),
    (b":authority", b"upstream"),
]


@attrs.frozen(slots=True)
class UpstreamInfo:
    """What the agent said about its upstream when it accepted a stream."""

    host: bytes | None
    """The Host header its upstream expects (None: keep the public one)."""
    prefix: bytes
    """Path prefix to put before the forwarded target (b"" for none)."""
    timeout: float | None
    """Seconds the upstream may stay silent once a request is sent (None: no limit)."""

    @classmethod
    def from_headers(cls, headers: list[tuple[bytes, bytes]]) -> UpstreamInfo:
        host: bytes | None = None
        prefix = b""
        timeout: float | None = None
        for name, value in headers:
            if name == b"revconn-upstream-host" and value:
                host = value
            elif name == b"revconn-upstream-prefix":
                prefix = value.rstrip(b"/")
            elif name == b"revconn-upstream-timeout":
                try:
                    seconds = float(value)
                except ValueError:
                    continue
                if math.isfinite(seconds) and seconds > 0:
                    timeout = seconds
        return cls(host, prefix, timeout)
