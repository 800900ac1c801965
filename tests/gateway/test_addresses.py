"""The SSRF address policy for announced URLs: which addresses the gateway may
connect to, and what ``resolve`` hands the caller to connect to."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from revconn._errors import ConfigError
from revconn._gateway.addresses import AddressPolicy, AddressRefused, parse_networks

Found = list[tuple[int, tuple[Any, ...]]]


@pytest.mark.parametrize(
    ("address", "word"),
    [
        ("127.0.0.1", "loopback"),
        ("127.5.5.5", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("169.254.169.254", "metadata"),
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("2606:4700::1%eth0", "link-local"),  # a zone names one of the gateway's links
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("fd12::1", "unique-local"),
        ("fc00::1", "unique-local"),
        ("fec0::1", "site-local"),
        ("224.0.0.1", "multicast"),  # "global" to Python 3.11
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("ff0e::1", "multicast"),  # global scope, still not unicast
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("::ffff:127.0.0.1", "loopback address (IPv4-mapped)"),
        ("::ffff:10.0.0.1", "private address (IPv4-mapped)"),
        ("::ffff:169.254.169.254", "metadata services live there) (IPv4-mapped)"),
        ("2002:7f00:1::", "loopback address (6to4)"),
        ("2002:a9fe:a9fe::1", "link-local"),
        ("64:ff9b::a00:1", "private address (NAT64)"),
        ("64:ff9b:1::7f00:1", "loopback address (NAT64)"),
        ("64:ff9b:1::808:808", "special-purpose"),  # local-use NAT64 is never public
        ("::127.0.0.1", "loopback address (IPv4-compatible)"),
        ("::8.8.8.8", "reserved"),  # deprecated form, even of a public address
        ("5f00::1", "reserved"),  # outside 2000::/3
        ("192.0.2.1", "special-purpose"),
        ("198.51.100.1", "special-purpose"),
        ("203.0.113.1", "special-purpose"),
        ("198.18.0.1", "special-purpose"),
        ("192.0.0.8", "special-purpose"),  # "global" to Python 3.11
        ("0.1.2.3", "special-purpose"),
        ("2001:db8::1", "special-purpose"),
        ("3fff::1", "special-purpose"),  # "global" to Python 3.11
        ("2001::1", "special-purpose"),  # Teredo
    ],
)
def test_refused_addresses_name_what_they_are(address: str, word: str) -> None:
    reason = AddressPolicy().refusal(address)
    assert reason is not None
    assert reason.startswith(f"{address} is ")
    assert word in reason
    ip = ipaddress.ip_address(address)
    assert AddressPolicy().refusal(ip) == f"{ip} is {reason.removeprefix(f'{address} is ')}"


def test_the_metadata_address_reason_in_full() -> None:
    assert AddressPolicy().refusal("169.254.169.254") == (
        "169.254.169.254 is a link-local address (cloud metadata services live there)"
    )
    assert AddressPolicy().refusal("127.0.0.1") == "127.0.0.1 is a loopback address"


@pytest.mark.parametrize(
    "address",
    [
        "1.1.1.1",
        "8.8.8.8",
        "93.184.216.34",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "2002:808:808::1",  # 6to4 of a public address
        "64:ff9b::808:808",  # NAT64 (well-known prefix) of a public address
        "172.32.0.1",  # just past 172.16/12
        "172.15.255.255",  # just before it
        "100.128.0.1",  # just past 100.64/10
        "11.0.0.1",
    ],
)
def test_public_unicast_addresses_are_allowed(address: str) -> None:
    assert AddressPolicy().refusal(address) is None
    assert AddressPolicy().refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address", ["", "example.com", "1.2.3", "256.0.0.1", "::g", " 8.8.8.8"])
def test_a_malformed_address_is_refused(address: str) -> None:
    assert AddressPolicy().refusal(address) == f"{address!r} is not an IP address"


def test_the_allow_list_widens_loopback_only() -> None:
    policy = AddressPolicy(parse_networks(["127.0.0.0/8"]))
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("127.9.9.9") is None
    assert policy.refusal("::ffff:127.0.0.1") is None  # the same IPv4 address
    assert policy.refusal("10.0.0.1") == "10.0.0.1 is a private address"
    assert policy.refusal("::1") == "::1 is a loopback address"


def test_the_allow_list_takes_single_addresses() -> None:
    policy = AddressPolicy(parse_networks(["10.0.0.5", "::1/128"]))
    assert policy.refusal("10.0.0.5") is None
    assert policy.refusal("10.0.0.6") is not None
    assert policy.refusal("::1") is None
    assert policy.refusal("127.0.0.1") is not None


def test_parse_networks_forgives_host_bits_and_spaces() -> None:
    assert parse_networks(["10.1.2.3/8", " fd00::/8 ", "192.168.1.1"]) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.168.1.1/32"),
    )
    assert parse_networks([]) == ()


@pytest.mark.parametrize("value", ["garbage", "", "10.0.0.0/33", "10.0.0.0/8,", "example.com"])
def test_parse_networks_rejects_garbage_naming_option_and_value(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_networks(["10.0.0.0/8", value], option="--allow-x")
    assert str(info.value) == (
        f"--allow-x {value!r}: not an IP network (expected CIDR such as 10.0.0.0/8 or an address)"
    )


def test_parse_networks_names_the_default_option() -> None:
    with pytest.raises(ConfigError, match=r"^--announce-allow 'nope': "):
        parse_networks(["nope"])


class FakeResolver:
    def __init__(self, found: Found | Exception) -> None:
        self.found = found
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Found:
        self.calls.append((host, port))
        if isinstance(self.found, Exception):
            raise self.found
        return self.found


V4 = socket.AF_INET
V6 = socket.AF_INET6


async def test_a_public_name_resolves_to_its_addresses_in_order() -> None:
    found: Found = [(V6, ("2606:4700::1", 80, 0, 0)), (V4, ("1.1.1.1", 80))]
    resolver = FakeResolver(found)
    assert await AddressPolicy(resolver=resolver).resolve("example.com", 80) == found
    assert resolver.calls == [("example.com", 80)]


async def test_duplicate_addresses_are_dropped_keeping_order() -> None:
    a, b = (V4, ("1.1.1.1", 443)), (V4, ("8.8.8.8", 443))
    resolver = FakeResolver([a, b, a, b, a])
    assert await AddressPolicy(resolver=resolver).resolve("example.com", 443) == [a, b]


async def test_a_name_with_any_private_address_is_refused_as_a_whole() -> None:
    resolver = FakeResolver([(V4, ("1.1.1.1", 80)), (V4, ("10.0.0.7", 80))])
    with pytest.raises(AddressRefused) as info:
        await AddressPolicy(resolver=resolver).resolve("mixed.example", 80)
    assert str(info.value) == "mixed.example resolves to 10.0.0.7, a private address"
    assert info.value.public_reason == "the host resolves to a private address"


async def test_a_name_resolving_to_loopback_is_refused_without_leaking_the_address() -> None:
    resolver = FakeResolver([(V6, ("::ffff:127.0.0.1", 80, 0, 0))])
    with pytest.raises(AddressRefused) as info:
        await AddressPolicy(resolver=resolver).resolve("internal.example", 80)
    assert str(info.value) == (
        "internal.example resolves to ::ffff:127.0.0.1, a loopback address (IPv4-mapped)"
    )
    public = info.value.public_reason
    assert public == "the host resolves to a loopback address (IPv4-mapped)"
    assert "127" not in public
    assert "internal.example" not in public


async def test_the_allow_list_applies_to_resolved_addresses() -> None:
    found: Found = [(V4, ("10.0.0.7", 80))]
    policy = AddressPolicy(parse_networks(["10.0.0.0/24"]), resolver=FakeResolver(found))
    assert await policy.resolve("intranet.example", 80) == found


@pytest.mark.parametrize(
    ("outcome", "detail"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "Name or service"),
        ([], "no addresses"),
    ],
)
async def test_a_name_that_does_not_resolve_is_refused(
    outcome: Found | Exception, detail: str
) -> None:
    with pytest.raises(AddressRefused) as info:
        await AddressPolicy(resolver=FakeResolver(outcome)).resolve("nx.example", 80)
    assert str(info.value).startswith("nx.example does not resolve: ")
    assert detail in str(info.value)
    assert info.value.public_reason == "the host does not resolve"


async def test_a_malformed_resolver_address_is_refused() -> None:
    resolver = FakeResolver([(V4, ("1.1.1.1", 80)), (V4, ("not-an-ip", 80))])
    with pytest.raises(AddressRefused, match="resolves to not-an-ip, not an IP address"):
        await AddressPolicy(resolver=resolver).resolve("odd.example", 80)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("8.8.8.8", [(V4, ("8.8.8.8", 8080))]),
        ("2606:4700:4700::1111", [(V6, ("2606:4700:4700::1111", 8080, 0, 0))]),
    ],
)
async def test_an_ip_literal_is_not_looked_up(host: str, expected: Found) -> None:
    resolver = FakeResolver(AssertionError("looked up"))
    assert await AddressPolicy(resolver=resolver).resolve(host, 8080) == expected
    assert resolver.calls == []


async def test_a_refused_ip_literal_says_what_it_is() -> None:
    resolver = FakeResolver(AssertionError("looked up"))
    with pytest.raises(AddressRefused) as info:
        await AddressPolicy(resolver=resolver).resolve("169.254.169.254", 80)
    assert str(info.value) == (
        "169.254.169.254 is a link-local address (cloud metadata services live there)"
    )
    assert info.value.public_reason == (
        "the host is a link-local address (cloud metadata services live there)"
    )
    assert resolver.calls == []


async def test_an_allowed_ip_literal_is_returned() -> None:
    policy = AddressPolicy(parse_networks(["127.0.0.0/8"]))
    assert await policy.resolve("127.0.0.1", 9) == [(V4, ("127.0.0.1", 9))]


# The real resolver, on names that never leave the host: /etc/hosts, and the
# shorthand IPv4 forms inet_aton accepts (which ipaddress does not, so they are
# judged by what they resolve to).
@pytest.mark.parametrize("host", ["localhost", "127.1", "2130706433"])
async def test_the_real_resolver_refuses_loopback_names(host: str) -> None:
    with pytest.raises(AddressRefused) as info:
        await AddressPolicy().resolve(host, 80)
    assert str(info.value).startswith(f"{host} resolves to ")
    assert "a loopback address" in str(info.value)
    assert info.value.public_reason.startswith("the host resolves to a loopback address")
