"""``revconn-gateway``'s helpers: the demo agent dials loopback even when the
data plane is bound to every address (a plain-HTTP gateway URL that is not
loopback would be refused by the agent)."""

from __future__ import annotations

import pytest

from revconn import AgentConfig, ConfigError
from revconn._cli.gateway import _loopback

SECRET = "demo-secret-abcdefghijklmnop"


@pytest.mark.parametrize(
    ("bound", "dialed"),
    [
        ("http://0.0.0.0:8080", "http://127.0.0.1:8080"),
        ("https://0.0.0.0:8443", "https://127.0.0.1:8443"),
        ("http://[::]:8080", "http://[::1]:8080"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://192.0.2.7:8080", "http://192.0.2.7:8080"),
    ],
)
def test_the_demo_agent_dials_loopback_for_an_unspecified_bind(bound: str, dialed: str) -> None:
    assert _loopback(bound) == dialed


def test_the_demo_agent_config_is_accepted_for_a_gateway_on_every_address() -> None:
    with pytest.raises(ConfigError, match=r"in clear text to 0\.0\.0\.0"):
        AgentConfig(gateway="http://0.0.0.0:8080", name="demo", secret=SECRET)
    AgentConfig(gateway=_loopback("http://0.0.0.0:8080"), name="demo", secret=SECRET)
