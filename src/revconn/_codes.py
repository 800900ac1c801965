"""Numeric codes used on the wire: WebSocket close codes and HTTP/2 error codes.

docs/protocol.md and docs/operations.md list them with their meaning.
"""

from __future__ import annotations

# WebSocket close codes (RFC 6455 section 7.4 plus revconn's private 4xxx range).
WS_NORMAL = 1000
WS_GOING_AWAY = 1001  # gateway or agent shutting down
WS_PROTOCOL_ERROR = 1002  # tunnel protocol violated
WS_UNSUPPORTED_DATA = 1003  # a text message on the binary tunnel
WS_POLICY = 1008
WS_MESSAGE_TOO_BIG = 1009  # a message above the gateway's max message size (1 MiB)
WS_INTERNAL_ERROR = 1011
WS_CREDENTIAL_EXPIRED = 4401  # the agent's token expired while it was online
WS_REVOKED = 4403  # the agent's token was revoked (--revoked-file)
WS_TIMEOUT = 4408  # tunnel handshake or heartbeat timed out
WS_REPLACED = 4409  # a newer agent with the same name took over
WS_VERSION_MISMATCH = 4426  # the peer speaks another protocol version (no revconn.v2 subprotocol)

# HTTP/2 error codes (RFC 9113 section 7) used in GOAWAY / RST_STREAM.
H2_NO_ERROR = 0x0
H2_PROTOCOL_ERROR = 0x1
H2_INTERNAL_ERROR = 0x2
H2_FLOW_CONTROL_ERROR = 0x3
H2_SETTINGS_TIMEOUT = 0x4
H2_FRAME_SIZE_ERROR = 0x6
H2_REFUSED_STREAM = 0x7
H2_CANCEL = 0x8
H2_CONNECT_ERROR = 0xA  # (agent) its upstream connection was reset (RFC 9113 8.5)
H2_ENHANCE_YOUR_CALM = 0xB

# GOAWAY debug data (ASCII) naming why a session ends.
REASON_REPLACED = "replaced"
REASON_SHUTDOWN = "shutdown"
REASON_HEARTBEAT = "heartbeat timeout"
REASON_PROTOCOL = "protocol error"
REASON_REVOKED = "revoked"
REASON_EXPIRED = "credential expired"
