"""The public API: small, re-exported from revconn, nothing private leaking."""

from __future__ import annotations

import revconn

EXPECTED = {
    "Agent",
    "AgentBusy",
    "StreamError",
    "AgentConfig",
    "AgentInfo",
    "AuthError",
    "AuthPolicy",
    "Backoff",
    "CertificateVerifyError",
    "ConfigError",
    "ConnectError",
    "ConnectionLost",
    "FatalError",
    "Gateway",
    "GatewayConfig",
    "HandshakeTimeout",
    "Heartbeat",
    "HeartbeatTimeout",
    "InMemoryRegistry",
    "LocalProtocolError",
    "ProtocolError",
    "ProtocolVersionError",
    "Registration",
    "Registry",
    "RegistryEvent",
    "RegistryEventKind",
    "RemoteProtocolError",
    "ReplacedError",
    "RevconnError",
    "RevconnTimeout",
    "Scope",
    "SharedSecretPolicy",
    "Supervisor",
    "SupervisorStatistics",
    "generate_secret",
    # per-agent and admin tokens (issue 12)
    "Denial",
    "Grant",
    "InvalidToken",
    "RevocationList",
    "RevokedError",
    "SigningKey",
    "TokenClaims",
    "TokenPolicy",
    "TokenVerifier",
    "issue_token",
    # presence events (issue 13)
    "EventsOverflow",
    "PresenceSnapshot",
}


def test_exports() -> None:
    public = {name for name in dir(revconn) if not name.startswith("_")}
    assert public == EXPECTED


def test_exports_live_in_private_modules() -> None:
    for name in EXPECTED:
        module = getattr(revconn, name).__module__
        assert module.startswith("revconn._"), (name, module)


def test_every_error_is_a_revconn_error() -> None:
    for name in EXPECTED:
        obj = getattr(revconn, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, revconn.RevconnError), name


def test_fatal_errors() -> None:
    assert issubclass(revconn.AuthError, revconn.FatalError)
    assert issubclass(revconn.ReplacedError, revconn.FatalError)
    assert issubclass(revconn.CertificateVerifyError, revconn.FatalError)
    assert not issubclass(revconn.ConnectError, revconn.FatalError)
    assert not issubclass(revconn.HeartbeatTimeout, revconn.FatalError)
