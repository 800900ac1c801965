"""An upstream that answers before it has read the upload: its answer reaches the client.

A form handler's 413 or a 401 before a large PUT must come through the tunnel
as it does without it (RFC 9112 9.5, RFC 9113 8.1): the agent stops sending
the body upstream, relays the answer, ends the stream and resets it with
NO_ERROR; the gateway stops reading the body, writes the answer and lingers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import attrs
import httpx
import pytest
import trio
import trio.testing

from revconn import StreamError
from revconn._codes import H2_NO_ERROR
from revconn._proto.session import STREAM_WINDOW
from revconn._runtime.streams import TunnelStream

from ._memory import tunnels
from ._procs import Proc
from .test_forwarding import start_agent, start_gateway, start_upstream
from .upstream_app import pattern

REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]


# -- the gateway's half: an RST_STREAM(NO_ERROR) after a complete response ----------------
async def test_reset_with_no_error_after_complete_response_keeps_buffered_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """RFC 9113 8.1: a client must not discard a complete response because the
    server then reset the stream with NO_ERROR to stop the upload."""
    answer = b"a" * (STREAM_WINDOW // 2)  # fits the window: all of it arrives at once

    async def early(stream: TunnelStream) -> None:
        await stream.respond(413, [], end_stream=False)
        await stream.send_body(answer, end_stream=True)
        stream.reset(H2_NO_ERROR)

    async with tunnels(early) as gw:
        stream = gw.open_request(REQ, end_stream=False)
        await stream.send_body(b"x" * 1000)
        await trio.sleep(1)  # virtual: the answer and the reset have both arrived
        assert stream.reset_code == H2_NO_ERROR
        with pytest.raises(StreamError):
            await stream.send_body(b"more")  # the upload is over ...
        response = await stream.receive_response()
        assert response.status == 413
        body = b""
        while (chunk := await stream.read()) is not None:  # ... the answer is not
            body += chunk
        assert body == answer
        stream.close()
        assert not gw._streams


# -- end to end, with the real executables and a hypercorn upstream ------------------------
@attrs.frozen
class Early:
    public: str
    agent: Proc

    def url(self, path: str) -> str:
        return f"{self.public}/a/early{path}"


@pytest.fixture(scope="module")
def early() -> Iterator[Early]:
    procs: list[Proc] = []
    try:
        upstream = start_upstream(procs)
        _, admin, public = start_gateway(procs)
        agent = start_agent(procs, admin, "early", "--upstream", upstream, dial=public)
        yield Early(public, agent)
    finally:
        for p in procs:
            p.stop()


def check_upload_still_works(early: Early) -> None:
    data = pattern(3_000_000, 21)
    r = httpx.post(early.url("/upload"), content=data, timeout=30)
    assert r.status_code == 200
    assert r.json() == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.e2e
@pytest.mark.parametrize("size", [1_000_000, 5_000_000])
def test_413_from_a_form_handler_reaches_the_client(early: Early, size: int) -> None:
    r = httpx.post(early.url("/form?limit=65536"), content=pattern(size, 3), timeout=30)
    assert r.status_code == 413
    assert r.json() == {"error": "too_large", "limit": 65536}
    check_upload_still_works(early)
    r = httpx.post(early.url("/form?limit=65536"), content=b"small", timeout=30)
    assert r.status_code == 200
    assert r.json()["length"] == 5


@pytest.mark.e2e
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_401_before_a_large_put_reaches_the_client(early: Early, chunked: bool) -> None:
    data = pattern(5_000_000, 4)

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(data), 1 << 16):
            yield data[i : i + (1 << 16)]

    content = pieces() if chunked else data
    r = httpx.put(early.url("/private"), content=content, timeout=30)
    assert r.status_code == 401
    assert r.text == "who are you?"
    assert r.headers["www-authenticate"] == 'Bearer realm="private"'
    r = httpx.put(
        early.url("/private"),
        content=data,
        headers={"Authorization": "Bearer letmein"},
        timeout=30,
    )
    assert r.status_code == 201
    assert r.json() == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.e2e
def test_early_answers_cost_no_upstream_error(early: Early) -> None:
    for _ in range(3):
        r = httpx.post(early.url("/form?limit=10"), content=pattern(2_000_000, 5), timeout=30)
        assert r.status_code == 413
    check_upload_still_works(early)
    assert early.agent.count("upstream_unreachable|unreachable|failed mid-response") == 0
