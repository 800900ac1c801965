"""revconn: a self-hosted reverse-connection gateway on trio.

Agents behind NAT dial one outbound WebSocket to the gateway; the WebSocket
carries an HTTP/2 session (heartbeat PINGs, GOAWAY reasons, one stream per
forwarded request). This module re-exports the public API; everything else is private.
"""

from ._agent import Agent as Agent
from ._agent import AgentConfig as AgentConfig
from ._auth import AuthPolicy as AuthPolicy
from ._auth import Scope as Scope
from ._auth import SharedSecretPolicy as SharedSecretPolicy
from ._auth import generate_secret as generate_secret
from ._errors import AgentBusy as AgentBusy
from ._errors import AuthError as AuthError
from ._errors import ConfigError as ConfigError
from ._errors import ConnectError as ConnectError
from ._errors import ConnectionLost as ConnectionLost
from ._errors import FatalError as FatalError
from ._errors import HandshakeTimeout as HandshakeTimeout
from ._errors import HeartbeatTimeout as HeartbeatTimeout
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import ReplacedError as ReplacedError
from ._errors import RevconnError as RevconnError
from ._errors import RevconnTimeout as RevconnTimeout
from ._errors import StreamError as StreamError
from ._gateway import Gateway as Gateway
from ._gateway import GatewayConfig as GatewayConfig
from ._registry import AgentInfo as AgentInfo
from ._registry import InMemoryRegistry as InMemoryRegistry
from ._registry import Registration as Registration
from ._registry import Registry as Registry
from ._registry import RegistryEvent as RegistryEvent
from ._registry import RegistryEventKind as RegistryEventKind
from ._supervisor import Backoff as Backoff
from ._supervisor import Supervisor as Supervisor
from ._supervisor import SupervisorStatistics as SupervisorStatistics
from ._tunnel import Heartbeat as Heartbeat

__version__ = "0.1.0"
