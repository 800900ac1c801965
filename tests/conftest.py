from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest
import trio.testing
import trustme

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


@pytest.fixture
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts for a test CA's certificate for 127.0.0.1."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client
