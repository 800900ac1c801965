"""The exceptions revconn raises, all under one root.

::

    RevconnError
    ├── ConfigError               bad configuration or command-line input (local)
    ├── InvalidToken              (gateway) a credential is not a valid token
    ├── EventsOverflow            (gateway) an event subscriber fell too far behind
    ├── ProtocolError             the tunnel protocol was violated
    │   ├── LocalProtocolError    we were about to break it (a caller's misuse)
    │   └── RemoteProtocolError   the peer broke it; carries the close code to answer with
    ├── AuthError                 credentials missing or rejected             [fatal]
    │   └── RevokedError          the token was revoked                       [fatal]
    ├── ReplacedError             a newer agent with the same name took over  [fatal]
    ├── ProtocolVersionError      the peer speaks another protocol version    [fatal]
    ├── CertificateVerifyError    the gateway's certificate is not trusted    [fatal]
    ├── ConnectError              could not reach or talk to the peer         [transient]
    │   ├── ConnectionLost        an established session ended unexpectedly  [transient]
    │   ├── UpstreamConnectError  (agent) its upstream service cannot be reached
    │   └── UpstreamClosed        (agent) its upstream broke an HTTP/1.1 exchange
    ├── StreamError               one request stream failed (reset, or its tunnel was lost)
    │   └── AgentBusy             the agent's concurrent-stream limit is reached
    └── RevconnTimeout            a deadline passed                          [transient]
        ├── HandshakeTimeout      the session handshake did not complete
        └── HeartbeatTimeout      the peer stopped answering PINGs

Errors are *fatal* when retrying cannot help (``FatalError`` mixin); the
supervisor stops at once on them and retries everything else that derives
from ``RevconnError``.
"""

from __future__ import annotations

from . import _codes

__all__ = [
    "AgentBusy",
    "AuthError",
    "CertificateVerifyError",
    "ConfigError",
    "ConnectError",
    "ConnectionLost",
    "EventsOverflow",
    "FatalError",
    "HandshakeTimeout",
    "HeartbeatTimeout",
    "LocalProtocolError",
    "ProtocolError",
    "ProtocolVersionError",
    "RemoteProtocolError",
    "ReplacedError",
    "RevconnError",
    "RevconnTimeout",
    "StreamError",
    "UpstreamClosed",
    "UpstreamConnectError",
    "revconn_error_in",
]


class RevconnError(Exception):
    """Root of every exception revconn raises on purpose."""


class FatalError(RevconnError):
    """Retrying will not help: the supervisor stops and re-raises."""


class ConfigError(FatalError):
    """Invalid configuration (a flag, an environment variable, a URL)."""


class ProtocolError(RevconnError):
    """The tunnel protocol was violated.

    ``close_code`` is the WebSocket close code to end the connection with, and
    ``h2_error`` the HTTP/2 error code for the GOAWAY frame.
    """

    def __init__(
        self,
        message: str,
        *,
        close_code: int = _codes.WS_PROTOCOL_ERROR,
        h2_error: int = _codes.H2_PROTOCOL_ERROR,
    ) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.h2_error = h2_error


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class EventsOverflow(RevconnError):
    """(gateway) A presence-event subscriber fell more events behind than its
    capacity and was dropped (the registry never waits for one): subscribe
    again, starting from a fresh snapshot."""


class AuthError(FatalError):
    """The gateway rejected the credentials (HTTP 401/403)."""

    def __init__(self, message: str, *, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


class RevokedError(AuthError):
    """(agent) The gateway revoked this agent's token (HTTP 401 ``revoked`` or,
    online, GOAWAY ``revoked`` and close 4403): a new token is needed."""


class ProtocolVersionError(FatalError):
    """The peer speaks another version of the revconn protocol (WebSocket close
    4426): upgrade the older side."""


class CertificateVerifyError(FatalError):
    """(agent) The gateway's TLS certificate could not be verified (unknown CA,
    expired, issued for another host): retrying would send the credential to
    the same unverified peer, so the agent stops."""


class ReplacedError(FatalError):
    """A newer connection with the same agent name replaced this one (close 4409)."""


class ConnectError(RevconnError):
    """The peer could not be reached, or the connection failed."""


class ConnectionLost(ConnectError):
    """An established tunnel session ended without a clean goodbye."""

    def __init__(self, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class UpstreamConnectError(ConnectError):
    """(agent) The upstream service could not be reached (refused, no route, TLS failed).

    ``reason`` says why, briefly ("connection refused"); the message also
    names the address, which only the agent's log shows (the public answer
    stays generic). Not an OSError: the socket error is its cause.
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class UpstreamClosed(ConnectError):
    """(agent) The upstream broke an HTTP/1.1 exchange: it closed the connection
    early, or sent a malformed response."""


class StreamError(RevconnError):
    """A request stream ended abnormally.

    ``error_code`` is the HTTP/2 code of the peer's RST_STREAM, or None when
    the whole tunnel was lost.
    """

    def __init__(self, message: str, *, error_code: int | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code


class AgentBusy(StreamError):
    """No stream can be opened now: the agent's SETTINGS_MAX_CONCURRENT_STREAMS is reached."""


class RevconnTimeout(RevconnError):
    """A revconn deadline passed."""


class HandshakeTimeout(RevconnTimeout):
    """The WebSocket or tunnel handshake did not complete in time."""


class HeartbeatTimeout(RevconnTimeout):
    """The peer did not acknowledge a PING within the heartbeat timeout."""


def revconn_error_in(exc: BaseException) -> RevconnError | None:
    """The RevconnError behind ``exc``, seen through the one-exception groups
    of the nurseries it crossed; None if anything else is in there (a bug
    must show its traceback)."""
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc if isinstance(exc, RevconnError) else None
