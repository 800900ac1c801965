"""A tiny site for the browser test, in plain ASGI: a link, a form, a 303 and a WebSocket.

Every URL it writes is absolute (``/about``, ``/login``, ``/welcome``, ``/ws``
on ``location.host``), so it works only where the gateway leaves the path
unchanged: under ``NAME.DOMAIN`` (``revconn-gateway --domain``), not under
``/a/NAME/``.

    revconn-agent serve --gateway URL --name web --app tests.browser_app:app
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, quote

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MAX_FORM = 4096  # the login form's body, at most

HOME = """<!doctype html>
<title>home</title>
<h1>revconn browser test</h1>
<p><a id="about" href="/about">About this site</a></p>
"""

ABOUT = """<!doctype html>
<title>about</title>
<h1>About</h1>
<form id="login" method="post" action="/login">
  <label>User <input id="user" name="user"></label>
  <button id="submit" type="submit">Log in</button>
</form>
"""

WELCOME = """<!doctype html>
<title>welcome</title>
<h1>Welcome, <span id="user">{user}</span></h1>
<p>WebSocket: <span id="ws">connecting</span></p>
<script>
const out = document.getElementById("ws");
const ws = new WebSocket(
  (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
ws.onopen = () => ws.send("ping");
ws.onmessage = (event) => {{ out.textContent = event.data; ws.close(); }};
ws.onerror = () => {{ out.textContent = "error"; }};
</script>
"""


async def _respond(
    send: Send,
    status: int,
    body: str = "",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    data = body.encode()
    all_headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(data)).encode()),
        (b"cache-control", b"no-store"),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": data})


async def _form(receive: Receive) -> dict[str, list[str]] | None:
    """The urlencoded body; None if it is too large or the client went away."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > MAX_FORM:
            return None
        if not message.get("more_body", False):
            return parse_qs(body.decode("utf-8", "replace"))


async def _http(scope: Scope, receive: Receive, send: Send) -> None:
    method, path = scope["method"], scope["path"]
    if path == "/login" and method == "POST":
        form = await _form(receive)
        if form is None:
            await _respond(send, 413, "form too large\n")
            return
        user = form.get("user", [""])[0]
        location = "/welcome?user=" + quote(user, safe="")
        await _respond(send, 303, "", [(b"location", location.encode())])
        return
    if method not in ("GET", "HEAD"):
        await _respond(send, 405, "method not allowed\n", [(b"allow", b"GET, HEAD")])
        return
    if path == "/":
        await _respond(send, 200, HOME)
    elif path == "/about":
        await _respond(send, 200, ABOUT)
    elif path == "/welcome":
        query = parse_qs(scope["query_string"].decode("latin-1"))
        user = query.get("user", ["stranger"])[0]
        await _respond(send, 200, WELCOME.format(user=html.escape(user)))
    else:
        await _respond(send, 404, "not found\n")


async def _websocket(scope: Scope, receive: Receive, send: Send) -> None:
    """``/ws``: answers each text message with ``"pong: " + message``."""
    message = await receive()
    assert message["type"] == "websocket.connect", message
    if scope["path"] != "/ws":
        await send({"type": "websocket.close", "code": 4404, "reason": "no such socket"})
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            text = message["bytes"].decode("utf-8", "replace")
        await send({"type": "websocket.send", "text": "pong: " + text})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    elif scope["type"] == "http":
        await _http(scope, receive, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)
