from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio.testing

from ._procs import Proc


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Subprocesses a test starts; all are killed (with their children) afterwards."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()
