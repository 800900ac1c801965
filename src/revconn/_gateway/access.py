"""Access control on the public side, per agent, checked by the gateway before
anything reaches the agent (sans-I/O): an IP allow-list (403) and HTTP basic
auth (401 with ``WWW-Authenticate``), for plain requests and WebSocket
handshakes alike.

The check runs on the same parsed request the router read, right after the
one routing decision, so no header can make the check read one field and the
router another. Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable, Mapping, Sequence

import attrs

from .._errors import ConfigError
from .._proto.rules import valid_agent_name
from .addresses import IPNetwork, parse_networks, peer_in
from .replies import Reply, json_reply

__all__ = ["AccessPolicy", "AgentAccess", "parse_access"]


@attrs.frozen
class AgentAccess:
    """What one agent's public side requires."""

    allow: tuple[IPNetwork, ...] = ()
    """Client networks let through (empty: everyone)."""
    credentials: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    """``user:password`` pairs for basic auth (empty: none needed)."""


class AccessPolicy:
    """Per-agent access rules; agents without rules are open."""

    def __init__(self, rules: Mapping[str, AgentAccess] | None = None) -> None:
        self._rules = dict(rules or {})

    def __bool__(self) -> bool:
        return bool(self._rules)

    def guards_credentials(self, name: str) -> bool:
        """Agent ``name`` uses basic auth (the gateway's Authorization header
        is then not forwarded to it)."""
        rule = self._rules.get(name)
        return rule is not None and bool(rule.credentials)

    def check(
        self, name: str, client: str | None, headers: Iterable[tuple[bytes, bytes]]
    ) -> Reply | None:
        """The refusal for a public request to agent ``name`` from ``client``
        (an IP address), or None to let it through."""
        rule = self._rules.get(name)
        if rule is None:
            return None
        if rule.allow and not peer_in(client, rule.allow):
            detail = "your address may not reach this agent"
            return json_reply(403, {"error": "forbidden", "agent": name, "detail": detail})
        if rule.credentials and not _authenticated(headers, rule.credentials):
            detail = "this agent needs a user name and password (HTTP basic auth)"
            challenge = f'Basic realm="{name}", charset="UTF-8"'.encode()
            return json_reply(
                401,
                {"error": "unauthorized", "agent": name, "detail": detail},
                [(b"www-authenticate", challenge)],
            )
        return None


def _authenticated(headers: Iterable[tuple[bytes, bytes]], credentials: Sequence[bytes]) -> bool:
    """Exactly one ``Authorization: Basic`` header whose ``user:password``
    matches one of ``credentials`` (every one compared, in constant time)."""
    values = [v for n, v in headers if n == b"authorization"]
    if len(values) != 1:
        return False
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    matched = False
    for expected in credentials:
        matched |= hmac.compare_digest(given, expected)
    return matched


def parse_access(
    basic_auth: Iterable[str] = (), allow: Iterable[str] = ()
) -> dict[str, AgentAccess]:
    """``--agent-basic-auth NAME=USER:PASSWORD`` and ``--agent-allow
    NAME=CIDR`` (both repeatable) as rules; ConfigError names a bad value."""
    credentials: dict[str, list[bytes]] = {}
    networks: dict[str, list[str]] = {}
    for value in basic_auth:
        name, sep, pair = value.partition("=")
        user, colon, password = pair.partition(":")
        if not sep or not colon or not user or not password or not valid_agent_name(name):
            raise ConfigError(
                "--agent-basic-auth expects NAME=USER:PASSWORD with NAME an agent name "
                "(got a value without NAME=, user or password)"
            )
        credentials.setdefault(name, []).append(pair.encode("utf-8"))
    for value in allow:
        name, sep, cidr = value.partition("=")
        if not sep or not valid_agent_name(name):
            raise ConfigError(f"--agent-allow {value!r}: expected NAME=CIDR, e.g. web=10.0.0.0/8")
        parse_networks([cidr], f"--agent-allow {name}=")
        networks.setdefault(name, []).append(cidr)
    return {
        name: AgentAccess(
            parse_networks(networks.get(name, ()), "--agent-allow"),
            tuple(credentials.get(name, ())),
        )
        for name in sorted(set(credentials) | set(networks))
    }
