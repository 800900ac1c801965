"""revconn: a self-hosted reverse-connection gateway on trio.

Agents behind NAT dial one outbound WebSocket to the gateway; the WebSocket
carries an HTTP/2 session (heartbeat PINGs, GOAWAY reasons, pooled streams of
raw HTTP/1.1). This module re-exports the public API; everything else is private.

The errors are imported at once (they need nothing); every other name is
loaded on first use, so that ``from revconn import Agent`` never loads the
gateway's libraries (hypercorn, Quart) and the other way round.
"""

import importlib as _importlib
import typing as _typing

from ._errors import AgentBusy as AgentBusy
from ._errors import AuthError as AuthError
from ._errors import CertificateVerifyError as CertificateVerifyError
from ._errors import ConfigError as ConfigError
from ._errors import ConnectError as ConnectError
from ._errors import ConnectionLost as ConnectionLost
from ._errors import EventsOverflow as EventsOverflow
from ._errors import FatalError as FatalError
from ._errors import HandshakeTimeout as HandshakeTimeout
from ._errors import HeartbeatTimeout as HeartbeatTimeout
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import ProtocolError as ProtocolError
from ._errors import ProtocolVersionError as ProtocolVersionError
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import ReplacedError as ReplacedError
from ._errors import RevconnError as RevconnError
from ._errors import RevconnTimeout as RevconnTimeout
from ._errors import RevokedError as RevokedError
from ._errors import StreamError as StreamError

if _typing.TYPE_CHECKING:
    from ._agent.agent import Agent as Agent
    from ._agent.agent import AgentConfig as AgentConfig
    from ._gateway.auth import AuthPolicy as AuthPolicy
    from ._gateway.auth import Denial as Denial
    from ._gateway.auth import Grant as Grant
    from ._gateway.auth import Scope as Scope
    from ._gateway.auth import SharedSecretPolicy as SharedSecretPolicy
    from ._gateway.auth import TokenPolicy as TokenPolicy
    from ._gateway.auth import generate_secret as generate_secret
    from ._gateway.gateway import Gateway as Gateway
    from ._gateway.gateway import GatewayConfig as GatewayConfig
    from ._gateway.registry import AgentInfo as AgentInfo
    from ._gateway.registry import InMemoryRegistry as InMemoryRegistry
    from ._gateway.registry import PresenceSnapshot as PresenceSnapshot
    from ._gateway.registry import Registration as Registration
    from ._gateway.registry import Registry as Registry
    from ._gateway.registry import RegistryEvent as RegistryEvent
    from ._gateway.registry import RegistryEventKind as RegistryEventKind
    from ._gateway.tokens import InvalidToken as InvalidToken
    from ._gateway.tokens import RevocationList as RevocationList
    from ._gateway.tokens import SigningKey as SigningKey
    from ._gateway.tokens import TokenClaims as TokenClaims
    from ._gateway.tokens import TokenVerifier as TokenVerifier
    from ._gateway.tokens import issue_token as issue_token
    from ._runtime.heartbeat import Heartbeat as Heartbeat
    from ._runtime.supervisor import Backoff as Backoff
    from ._runtime.supervisor import Supervisor as Supervisor
    from ._runtime.supervisor import SupervisorStatistics as SupervisorStatistics

_LAZY = {
    "Agent": "._agent.agent",
    "AgentConfig": "._agent.agent",
    "AuthPolicy": "._gateway.auth",
    "Denial": "._gateway.auth",
    "Grant": "._gateway.auth",
    "Scope": "._gateway.auth",
    "SharedSecretPolicy": "._gateway.auth",
    "TokenPolicy": "._gateway.auth",
    "generate_secret": "._gateway.auth",
    "Gateway": "._gateway.gateway",
    "GatewayConfig": "._gateway.gateway",
    "AgentInfo": "._gateway.registry",
    "InMemoryRegistry": "._gateway.registry",
    "PresenceSnapshot": "._gateway.registry",
    "Registration": "._gateway.registry",
    "Registry": "._gateway.registry",
    "RegistryEvent": "._gateway.registry",
    "RegistryEventKind": "._gateway.registry",
    "InvalidToken": "._gateway.tokens",
    "RevocationList": "._gateway.tokens",
    "SigningKey": "._gateway.tokens",
    "TokenClaims": "._gateway.tokens",
    "TokenVerifier": "._gateway.tokens",
    "issue_token": "._gateway.tokens",
    "Heartbeat": "._runtime.heartbeat",
    "Backoff": "._runtime.supervisor",
    "Supervisor": "._runtime.supervisor",
    "SupervisorStatistics": "._runtime.supervisor",
}

__version__ = "0.1.0"


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'revconn' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
