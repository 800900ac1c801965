"""The demo agent's built-in page, served through the tunnel by an in-process ASGI app."""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["demo_app"]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>revconn demo</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;line-height:1.5}}
code{{background:#f2f2f2;padding:.1rem .3rem}}</style></head>
<body><h1>It works: revconn demo agent</h1>
<p>This page came from the in-process demo agent, through its WebSocket tunnel
(one HTTP/2 stream per request).</p>
<ul><li>method: <code>{method}</code></li><li>path: <code>{path}</code></li>
<li>X-Forwarded-For: <code>{xff}</code></li><li>X-Forwarded-Prefix: <code>{prefix}</code></li></ul>
<p>Try <a href="echo?hello=world">echo</a> for the request as JSON.</p></body></html>
"""


async def demo_app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    if scope["path"] == "/echo":
        payload = {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope["query_string"].decode("latin-1"),
            "headers": headers,
            "body_bytes": len(body),
        }
        content = json.dumps(payload, indent=2).encode()
        ctype = b"application/json"
        status = 200
    elif scope["path"] == "/":
        content = PAGE.format(
            method=html.escape(scope["method"]),
            path=html.escape(scope["path"]),
            xff=html.escape(headers.get("x-forwarded-for", "")),
            prefix=html.escape(headers.get("x-forwarded-prefix", "")),
        ).encode()
        ctype = b"text/html; charset=utf-8"
        status = 200
    else:
        content = b'{"error": "not_found"}'
        ctype = b"application/json"
        status = 404
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(content)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": content})
