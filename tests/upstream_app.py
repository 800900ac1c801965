"""A real upstream for end-to-end tests, run by hypercorn on 127.0.0.1.

python -m hypercorn --worker-class trio --bind 127.0.0.1:0 tests.upstream_app:app
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import trio

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

EVENTS: list[str] = []  # what the upstream observed, for /_events
CHUNK = 64 * 1024


def pattern(n: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (the tests compute the same)."""
    return random.Random(seed).randbytes(n)


async def _respond(
    send: Send, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    all_headers = [(b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> tuple[int, str, bool]:
    """(length, sha256, disconnected)"""
    digest = hashlib.sha256()
    length = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return length, digest.hexdigest(), True
        body = message.get("body", b"")
        digest.update(body)
        length += len(body)
        if not message.get("more_body", False):
            return length, digest.hexdigest(), False


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    path: str = scope["path"]
    query = parse_qs(scope["query_string"].decode())

    def q(name: str, default: str) -> str:
        return query.get(name, [default])[0]

    if path.startswith("/echo"):
        length, sha, _ = await _read_body(receive)
        payload = {
            "method": scope["method"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body_length": length,
            "body_sha256": sha,
        }
        await _respond(
            send, 200, json.dumps(payload).encode(), [(b"content-type", b"application/json")]
        )
    elif path.startswith("/status/"):
        await _read_body(receive)
        status = int(path.rsplit("/", 1)[1])
        if status in (204, 304):
            headers = [(b"etag", b'"v1"')]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
        elif status in (301, 302, 303, 307, 308):
            await _respond(send, status, b"moved", [(b"location", b"/elsewhere?x=%20y")])
        else:
            await _respond(send, status, f"status {status}".encode())
    elif path == "/cookies":
        await _read_body(receive)
        await _respond(
            send,
            200,
            b"ok",
            [
                (b"set-cookie", b"a=1; Path=/"),
                (b"set-cookie", b"b=2; Path=/"),
                (b"connection", b"x-private"),
                (b"x-private", b"hop"),
                (b"keep-alive", b"timeout=5"),
                (b"x-end-to-end", b"yes"),
            ],
        )
    elif path == "/slow":
        await _read_body(receive)
        await trio.sleep(float(q("s", "1")))
        await _respond(send, 200, b"slow done")
    elif path == "/stream":
        await _read_body(receive)
        n, interval = int(q("n", "5")), float(q("interval", "0.2"))
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(n):
            await send(
                {"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True}
            )
            await trio.sleep(interval)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/bytes":
        await _read_body(receive)
        n, seed = int(q("n", "1024")), int(q("seed", "1"))
        data = pattern(n, seed)
        headers = [
            (b"content-length", str(n).encode()),
            (b"content-type", b"application/octet-stream"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        view = memoryview(data)
        for start in range(0, n, CHUNK):
            await send(
                {
                    "type": "http.response.body",
                    "body": bytes(view[start : start + CHUNK]),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b""})
    elif path == "/upload":
        length, sha, _ = await _read_body(receive)
        await _respond(send, 200, json.dumps({"length": length, "sha256": sha}).encode())
    elif path == "/hang":
        tag = q("tag", "hang")
        EVENTS.append(f"start {tag}")
        await _read_body(receive)
        # Wait for the client (the agent) to go away.
        while (await receive())["type"] != "http.disconnect":
            pass
        EVENTS.append(f"disconnect {tag}")
    elif path == "/form":
        # A form handler with a size limit: a larger body is refused from its
        # Content-Length alone, without reading it (hypercorn then closes).
        limit = int(q("limit", "65536"))
        headers = dict(scope["headers"])
        if int(headers.get(b"content-length", b"0")) > limit:
            body = json.dumps({"error": "too_large", "limit": limit}).encode()
            await _respond(send, 413, body, [(b"content-type", b"application/json")])
            return
        length, sha, _ = await _read_body(receive)
        await _respond(send, 200, json.dumps({"length": length, "sha256": sha}).encode())
    elif path == "/private":
        # Authorization is checked before a (large) PUT is read.
        if (b"authorization", b"Bearer letmein") not in scope["headers"]:
            challenge = [(b"www-authenticate", b'Bearer realm="private"')]
            await _respond(
                send, 401, b"who are you?", [*challenge, (b"content-type", b"text/plain")]
            )
            return
        length, sha, _ = await _read_body(receive)
        await _respond(send, 201, json.dumps({"length": length, "sha256": sha}).encode())
    elif path == "/_events":
        await _read_body(receive)
        await _respond(send, 200, json.dumps(EVENTS).encode())
    else:
        await _read_body(receive)
        await _respond(send, 404, b"no such path")
