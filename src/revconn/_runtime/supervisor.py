"""The connection supervisor: runs one connection attempt after another, with backoff.

``Backoff`` is the pure schedule (no I/O, no clock); ``Supervisor`` runs a
connection function again and again with that schedule between attempts.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from .._errors import ConfigError, FatalError, RevconnError

__all__ = ["Backoff", "ConnectFn", "Supervisor", "SupervisorStatistics"]

log = logging.getLogger("revconn.supervisor")


@attrs.frozen
class Backoff:
    """Capped exponential backoff with full jitter.

    The n-th consecutive failure (n = 0, 1, ...) waits a delay drawn uniformly
    from ``[minimum, min(maximum, minimum * 2 ** (n + 1))]``: with the defaults
    1-2 s, 1-4 s, 1-8 s, 1-16 s, then 1-30 s for ever.
    """

    minimum: float = 1.0
    maximum: float = 30.0

    def __attrs_post_init__(self) -> None:
        if not (math.isfinite(self.minimum) and self.minimum > 0):
            raise ConfigError(f"backoff minimum must be > 0 seconds, got {self.minimum!r}")
        if not (math.isfinite(self.maximum) and self.maximum >= self.minimum):
            raise ConfigError(
                f"backoff maximum ({self.maximum!r}) must be >= the minimum ({self.minimum!r})"
            )

    def cap(self, failures: int) -> float:
        """Upper bound of the delay after ``failures`` consecutive failures (0-based)."""
        exponent = min(failures + 1, 64)  # avoid float overflow
        return min(self.maximum, self.minimum * 2.0**exponent)

    def delay(self, failures: int, uniform01: float) -> float:
        """The delay for ``failures`` consecutive failures and a random draw in [0, 1]."""
        low = self.minimum
        return low + uniform01 * (self.cap(failures) - low)


@attrs.frozen
class SupervisorStatistics:
    """A snapshot of a supervisor's state."""

    attempts: int
    """Connection attempts started so far."""
    failures: int
    """Consecutive failures since the last stable connection."""
    current_delay: float | None
    """The delay being waited now (None while connecting or connected)."""
    last_error: str | None
    """Description of the most recent failure."""
    connected_since: float | None
    """trio clock time the current connection came up, or None."""


class ConnectFn(Protocol):
    """A connection task: calls ``connected()`` once the session is up, then
    returns when the connection ends cleanly or raises why it failed."""

    def __call__(self, connected: Callable[[], None], /) -> Awaitable[None]: ...


class Supervisor:
    """Runs ``connect`` until cancelled or a fatal error.

    * A :class:`FatalError` (credentials rejected, replaced, bad config) stops
      the supervisor at once and is re-raised.
    * Any other :class:`RevconnError` or :class:`OSError` is transient: wait
      ``backoff.delay(...)`` and try again.
    * A clean return (the peer said goodbye) is retried after ``backoff.minimum``
      without counting as a failure.
    * A connection that stayed up for ``stable_after`` seconds resets the
      failure count, so the next failure waits the shortest delay again.
    * Anything else is a bug: it propagates.
    """

    def __init__(
        self,
        connect: ConnectFn,
        *,
        backoff: Backoff | None = None,
        stable_after: float = 10.0,
        uniform01: Callable[[], float] = random.random,
        on_retry: Callable[[float, BaseException | None], None] | None = None,
    ) -> None:
        self._connect = connect
        self.backoff = backoff or Backoff()
        self.stable_after = stable_after
        self._uniform01 = uniform01
        self._on_retry = on_retry
        self._attempts = 0
        self._failures = 0
        self._current_delay: float | None = None
        self._last_error: str | None = None
        self._connected_since: float | None = None
        self._stopping = False
        self._sleep_scope: trio.CancelScope | None = None

    def stop(self) -> None:
        """Make ``run()`` return after the current attempt, without further retries.

        Interrupts a backoff wait at once; a running attempt is left to end on
        its own (the caller asks the connection to say goodbye).
        """
        self._stopping = True
        if self._sleep_scope is not None:
            self._sleep_scope.cancel()

    def statistics(self) -> SupervisorStatistics:
        """A snapshot of the attempts, failures and current backoff."""
        return SupervisorStatistics(
            attempts=self._attempts,
            failures=self._failures,
            current_delay=self._current_delay,
            last_error=self._last_error,
            connected_since=self._connected_since,
        )

    async def run(self) -> None:
        """Connect, and reconnect as the class describes, until ``stop()`` or
        cancellation; re-raises a :class:`FatalError`."""
        while not self._stopping:
            error = await self._attempt()
            if self._stopping:
                return
            if error is None:
                delay = self.backoff.minimum
            else:
                delay = self.backoff.delay(self._failures, self._uniform01())
                self._failures += 1
            self._current_delay = delay
            if self._on_retry is not None:
                self._on_retry(delay, error)
            with trio.CancelScope() as self._sleep_scope:
                await trio.sleep(delay)
            self._sleep_scope = None
            self._current_delay = None

    async def _attempt(self) -> BaseException | None:
        """One connection attempt; returns the transient error, or None on a clean end."""
        self._attempts += 1
        try:
            await self._connect(self._mark_up)
        except FatalError as exc:
            self._last_error = str(exc)
            raise
        except (RevconnError, OSError) as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            return exc
        finally:
            self._mark_down()
        return None

    def _mark_up(self) -> None:
        self._connected_since = trio.current_time()

    def _mark_down(self) -> None:
        if self._connected_since is not None:
            if trio.current_time() - self._connected_since >= self.stable_after:
                self._failures = 0
            self._connected_since = None
