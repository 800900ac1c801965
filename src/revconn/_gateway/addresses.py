"""Which addresses the gateway may connect to on behalf of an announced URL.

An agent announces a URL and the gateway makes HTTP requests to it for public
strangers, so a URL naming ``127.0.0.1``, ``10.0.0.5`` or the cloud metadata
service at ``169.254.169.254`` would let anyone reach the gateway's own network
(SSRF). The policy is checked when a URL is announced and again for every
connection, because DNS may have changed in between; ``resolve`` returns the
exact socket addresses it approved, and the caller connects to those and never
looks the name up again (no DNS-rebinding gap).

Allowed: an address in an operator's ``--announce-allow`` network, or a
globally reachable unicast address. Python 3.11's ``is_global`` misses a few
ranges (multicast counts as global, IPv6 outside ``2000::/3`` mostly does
too), so the special cases are spelled out here rather than trusted to it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from .._errors import ConfigError

__all__ = [
    "AddressPolicy",
    "AddressRefused",
    "IPAddress",
    "IPNetwork",
    "Resolver",
    "parse_networks",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[tuple[int, tuple[Any, ...]]]]]
"""``(host, port) -> [(family, sockaddr), ...]``, in the resolver's order."""

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
_PRIVATE = (_V4("10.0.0.0/8"), _V4("172.16.0.0/12"), _V4("192.168.0.0/16"))
_SHARED = _V4("100.64.0.0/10")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_UNIQUE_LOCAL = _V6("fc00::/7")
_GLOBAL_UNICAST = _V6("2000::/3")  # all of IPv6 that is allocated for global unicast
_NAT64 = _V6("64:ff9b::/96")  # well-known prefix, globally reachable
_LOCAL_NAT64 = _V6("64:ff9b:1::/48")  # local-use (RFC 8215): an operator's own translator
_IPV4_COMPATIBLE = _V6("::/96")  # deprecated ::a.b.c.d
# Not globally reachable per the IANA registries, but "global" to Python 3.11.
_SPECIAL = (_V4("192.0.0.0/24"), _V6("3fff::/20"), _LOCAL_NAT64)
_NOT_AN_ADDRESS = "not an IP address"


class AddressRefused(Exception):
    """The gateway will not connect to this host or address.

    ``str(exc)`` is the reason, naming the address (for logs); ``public_reason``
    says the same without it, safe to show a public client; ``unresolvable``:
    the name did not resolve (rather than resolving somewhere refused).
    """

    def __init__(self, reason: str, public_reason: str, *, unresolvable: bool = False) -> None:
        super().__init__(reason)
        self.public_reason = public_reason
        self.unresolvable = unresolvable


def parse_networks(
    values: Iterable[str], option: str = "--announce-allow"
) -> tuple[IPNetwork, ...]:
    """Parse CIDRs or single addresses; host bits are forgiven (``10.1.2.3/8`` is ``10/8``)."""
    networks: list[IPNetwork] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{option} {value!r}: not an IP network"
                " (expected CIDR such as 10.0.0.0/8 or an address)"
            ) from None
    return tuple(networks)


async def _getaddrinfo(host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _type, _proto, _name, sockaddr in infos]


def _within(ip: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(ip in network for network in networks)


def peer_in(peer: str | None, networks: Iterable[IPNetwork]) -> bool:
    """A peer's address (as a socket or ASGI server reports it: maybe with a
    zone, maybe IPv4-mapped on a dual-stack listener) is in ``networks``."""
    if peer is None:
        return False
    try:
        ip = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return _within(ip, networks)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 form carries (and the form's name), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64 or ip in _LOCAL_NAT64:  # the local prefix as operators use it, a /96
        return low32, "NAT64"
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are not IPv4-compatible
        return low32, "IPv4-compatible"
    return None


class AddressPolicy:
    """Decides which addresses the gateway may connect to (see the module docstring)."""

    def __init__(
        self, allow: Iterable[IPNetwork] = (), *, resolver: Resolver | None = None
    ) -> None:
        self.allow: tuple[IPNetwork, ...] = tuple(allow)
        self._resolver: Resolver = resolver or _getaddrinfo

    def refusal(self, address: IPAddress | str) -> str | None:
        """None if the gateway may connect to ``address``, else the reason."""
        kind = self._refused_as(address)
        if kind is None:
            return None
        return f"{address!r} is {kind}" if kind == _NOT_AN_ADDRESS else f"{address} is {kind}"

    def explicitly_allowed(self, address: str) -> bool:
        """``address`` is in an ``allow`` network (not merely public)."""
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return False
        return _within(ip, self.allow)

    async def resolve(self, host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
        """The ``(family, sockaddr)`` pairs to connect to, deduplicated, in order.

        Raises AddressRefused if ``host`` does not resolve, or if *any* of its
        addresses is refused: a name resolving to a public and a private
        address is refused as a whole.
        """
        literal = self._is_literal(host)
        found: list[tuple[int, tuple[Any, ...]]]
        try:
            if literal:
                # The OS's own parse (no DNS), so a zone becomes the scope id it will use.
                await trio.lowlevel.checkpoint()
                infos = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
                )
                found = [(family, sockaddr) for family, _type, _proto, _name, sockaddr in infos]
            else:
                found = await self._resolver(host, port)
        except (OSError, UnicodeError) as exc:  # gaierror; IDNA rejects some names
            raise AddressRefused(
                f"{host} does not resolve: {exc}", "the host does not resolve", unresolvable=True
            ) from None
        addresses = list(dict.fromkeys(found))
        if not addresses:
            raise AddressRefused(
                f"{host} does not resolve: no addresses",
                "the host does not resolve",
                unresolvable=True,
            )
        for _family, sockaddr in addresses:
            kind = self._refused_as(str(sockaddr[0]))
            if kind is None:
                continue
            if literal:
                raise AddressRefused(f"{host} is {kind}", f"the host is {kind}")
            raise AddressRefused(
                f"{host} resolves to {sockaddr[0]}, {kind}", f"the host resolves to {kind}"
            )
        return addresses

    @staticmethod
    def _is_literal(host: str) -> bool:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True

    def _refused_as(self, address: IPAddress | str) -> str | None:
        """What ``address`` is ("a loopback address"), or None if it is allowed."""
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            return _NOT_AN_ADDRESS
        return self._judge(ip)

    def _judge(self, ip: IPAddress) -> str | None:
        if _within(ip, self.allow):  # first: the operator may widen
            return None
        if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)) is not None:
            ipv4, form = embedded
            if (kind := self._judge(ipv4)) is not None:
                return f"{kind} ({form})"
            if form == "IPv4-mapped":  # the socket talks IPv4 to exactly that address
                return None
        if ip.is_unspecified:
            return "an unspecified address"
        if ip.is_loopback:
            return "a loopback address"
        if ip.is_multicast:
            return "a multicast address"
        if isinstance(ip, ipaddress.IPv4Address):
            if ip.is_link_local:
                return "a link-local address (cloud metadata services live there)"
            if ip == _BROADCAST:
                return "a broadcast address"
            if ip.is_reserved:
                return "a reserved address"
            if _within(ip, _PRIVATE):
                return "a private address"
            if ip in _SHARED:
                return "a shared address (carrier-grade NAT)"
        else:
            if ip.is_link_local or ip.scope_id:  # a zone names a link of this host
                return "a link-local address"
            if ip in _UNIQUE_LOCAL:
                return "a unique-local address"
            if ip.is_site_local:
                return "a site-local address"
            if not _within(ip, (_GLOBAL_UNICAST, _NAT64, _LOCAL_NAT64)):
                return "a reserved address"
        if not ip.is_global or _within(ip, _SPECIAL):
            return "a special-purpose address (documentation, benchmarking or similar)"
        return None
