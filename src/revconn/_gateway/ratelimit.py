"""The failed-authentication limiter: which source addresses must wait (sans-I/O).

``FailureLimiter`` counts failed authentications per source in a fixed window:
the ``max_failures``-th failure within ``window`` seconds of a source's first
one locks that source out until the window ends. The gateway asks
``retry_after()`` before it even compares a credential, so a locked-out
source is refused (429) whatever it presents, a correct credential included,
and nobody else waits.

Sources: an IPv4 address is its own source; IPv6 addresses are grouped by
their /64 (one host commonly gets a whole /64, so counting single IPv6
addresses would hand an attacker 2**64 fresh counters); an IPv4-mapped IPv6
address (a dual-stack listener's IPv4 peer) counts as its IPv4 address.
Anything that is not an IP address is a source of its own, as given.

Memory is bounded: at most ``max_tracked`` sources are remembered (about
100 bytes each). Beyond that, a new source evicts the least recently failed
one that is still only counting; a locked-out source is evicted only when
every tracked source is locked out. The tradeoff: an attacker with many
addresses (or /64s) can make the limiter forget other sources' partial
counts, and, with ``max_tracked`` addresses of its own all locked out, other
lock-outs too, and so gain tries against a credential. Each address it uses
is still held to ``max_failures`` per window while it is remembered; the
alternative, remembering every address, is memory an attacker controls.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable

import attrs
import trio

from .._errors import ConfigError

__all__ = ["FailureLimiter", "source_of"]

IPV6_GROUP = 64


def source_of(address: str) -> str:
    """The key failures from ``address`` are counted under: the IPv4 address,
    the IPv6 address's /64, or ``address`` itself if it is not an IP address."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_GROUP), strict=False))
    return str(ip)


@attrs.define(slots=True)
class _Record:
    started: float
    """When the window opened (the source's first failure in it)."""
    failures: int = 1


class FailureLimiter:
    """Failed authentications per source, and who must wait before trying again."""

    def __init__(
        self,
        max_failures: int = 10,
        window: float = 60.0,
        max_tracked: int = 10_000,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if max_failures < 1:
            raise ConfigError(f"auth failures must be >= 1, got {max_failures!r}")
        if not (math.isfinite(window) and window > 0):
            raise ConfigError(f"auth failure window must be > 0 seconds, got {window!r}")
        if max_tracked < 1:
            raise ConfigError(f"max tracked sources must be >= 1, got {max_tracked!r}")
        self.max_failures = max_failures
        self.window = window
        self.max_tracked = max_tracked
        self._clock = clock
        # Least recently failed first. Two queues so that a flood of new
        # sources evicts counting ones before any that are locked out.
        self._counting: OrderedDict[str, _Record] = OrderedDict()
        self._limited: OrderedDict[str, _Record] = OrderedDict()
        self.refusals: dict[str, int] = {}
        """Refused credentials by reason (``unauthorized``, ``expired``,
        ``revoked``, ``wrong_agent``, ``wrong_scope``,
        ``too_many_auth_failures``), ever: for ``/metrics``."""

    def refused(self, reason: str) -> None:
        """Count one refusal (a few fixed reasons: the dict stays small)."""
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def __len__(self) -> int:
        """How many sources are remembered (at most ``max_tracked``)."""
        return len(self._counting) + len(self._limited)

    def retry_after(self, address: str) -> float | None:
        """None if ``address`` may try to authenticate now; else the seconds
        until it may (> 0)."""
        key = source_of(address)
        record = self._limited.get(key)
        if record is None:
            return None
        wait = record.started + self.window - self._clock()
        if wait <= 0:
            del self._limited[key]
            return None
        return wait

    def failed(self, address: str) -> bool:
        """Count one failed authentication from ``address``; True if this one
        locked it out (once per source and window: the moment to log)."""
        key = source_of(address)
        now = self._clock()
        record = self._counting.pop(key, None) or self._limited.pop(key, None)
        if record is None or now - record.started >= self.window:
            record = _Record(now)
        else:
            record.failures += 1
        if record.failures >= self.max_failures:
            self._limited[key] = record
        else:
            self._counting[key] = record
        while len(self) > self.max_tracked:
            (self._counting or self._limited).popitem(last=False)
        return record.failures == self.max_failures

    def succeeded(self, address: str) -> None:
        """Forget ``address``'s failures (a locked-out source stays locked out:
        it is refused before its credential is checked)."""
        self._counting.pop(source_of(address), None)
