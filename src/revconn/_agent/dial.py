"""Dialing the gateway: the tunnel URL, TCP/TLS, trio-websocket's handshake,
and every way that can fail mapped to the revconn error that says what to fix.

The gateway's certificate is verified (the system's CAs, or ``--ca-file``); a
failed verification is fatal. The credential never goes in clear text to a
host that is not loopback unless ``--insecure-plaintext`` says so."""

from __future__ import annotations

import ipaddress
import json
import ssl
from urllib.parse import quote, urlsplit, urlunsplit

import h11
import trio
import wsproto.utilities
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from .. import __version__
from .._errors import (
    AuthError,
    CertificateVerifyError,
    ConfigError,
    ConnectError,
    ConnectionLost,
    FatalError,
    HandshakeTimeout,
    RemoteProtocolError,
    RevconnError,
    RevokedError,
)
from .._proto.connect import WS_SUBPROTOCOL
from .._proto.rules import MAX_MESSAGE_SIZE
from .._runtime.fastpath import FastSendStream
from .._runtime.tunnel import EXPIRED_MESSAGE, REVOKED_MESSAGE

USER_AGENT = f"revconn-agent/{__version__}"
"""What the agent says it runs (the gateway lists it as the agent's version)."""

__all__ = [
    "USER_AGENT",
    "GatewayStream",
    "HandshakeWatch",
    "WebSocketTransport",
    "check_plaintext",
    "client_context",
    "is_loopback",
    "map_connect_error",
    "most_telling",
    "open_stream",
    "open_websocket",
    "redacted",
    "tunnel_url",
]

RECEIVE_BUFFER = 256 * 1024
GatewayStream = FastSendStream | trio.SSLStream[trio.SocketStream]

_CHECK_GATEWAY = "is --gateway the right host, port and scheme (http vs https)?"
# OpenSSL's reasons for a peer whose first bytes are not a TLS record (a plain
# HTTP server answers a ClientHello with "HTTP/1.1 400 ...": WRONG_VERSION_NUMBER).
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}
)


def tunnel_url(gateway: str, name: str) -> str:
    """The WebSocket URL an agent dials: ``ws(s)://host[:port][/prefix]/ws/connect?name=NAME``.

    ``gateway`` may use http, https, ws or wss; a path is kept as a prefix.
    """
    try:
        parts = urlsplit(gateway)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"gateway URL {gateway!r} is malformed: {exc}") from None
    scheme = {"http": "ws", "ws": "ws", "https": "wss", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None:
        raise ConfigError(
            f"gateway URL {gateway!r} must start with http://, https://, ws:// or wss://"
        )
    if not parts.hostname:
        raise ConfigError(f"gateway URL {gateway!r} has no host")
    if parts.query or parts.fragment:
        raise ConfigError(f"gateway URL {gateway!r} must not carry a query or fragment")
    if parts.username or parts.password:
        raise ConfigError(
            f"gateway URL {gateway!r} must not carry credentials: use --token or --secret"
        )
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    path = parts.path.rstrip("/")
    if not path.endswith("/ws/connect"):
        path += "/ws/connect"
    return urlunsplit((scheme, netloc, path, f"name={quote(name)}", ""))


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (also as ``::ffff:127.x.y.z``)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_plaintext(gateway: str, *, insecure_plaintext: bool) -> None:
    """ConfigError for a ``http://``/``ws://`` gateway URL whose host is not
    loopback, unless ``insecure_plaintext``: the bearer secret would cross the
    network in clear text (call after ``tunnel_url`` validated it)."""
    parts = urlsplit(gateway)
    host = parts.hostname or ""
    if parts.scheme.lower() in ("https", "wss") or insecure_plaintext or is_loopback(host):
        return
    secure = urlunsplit(("https" if parts.scheme.lower() == "http" else "wss", *parts[1:]))
    raise ConfigError(
        f"refusing to send the gateway secret in clear text to {host} ({gateway}): "
        f"use {secure} (the gateway serves TLS with --certfile/--keyfile, or sits behind "
        "a TLS proxy), or pass --insecure-plaintext if this network is trusted"
    )


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """The context that verifies the gateway: against ``ca_file`` (PEM CA
    certificates; the system's CAs are then not used) or the system's CAs."""
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca_file)
    except OSError as exc:  # (ssl.SSLError is one: OpenSSL read the file)
        if isinstance(exc, ssl.SSLError):
            reason = str(exc.args[1] if len(exc.args) > 1 else exc).split(" (_ssl.c:", 1)[0]
            raise ConfigError(
                f"--ca-file {ca_file}: no usable PEM certificate in it (OpenSSL: {reason})"
            ) from None
        raise ConfigError(f"--ca-file {ca_file}: cannot read it: {exc.strerror}") from None


class WebSocketTransport:
    """A trio-websocket connection as a MessageTransport."""

    __slots__ = ("_ws",)

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws

    async def send_message(self, data: bytes) -> None:
        try:
            await self._ws.send_message(data)
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    async def receive_message(self) -> bytes:
        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise _lost(exc) from None
        if isinstance(message, str):
            raise RemoteProtocolError("gateway sent a text message on the binary tunnel")
        return message

    async def close(self, code: int, reason: str) -> None:
        await self._ws.aclose(code, reason)


def _lost(exc: ConnectionClosed) -> ConnectionLost:
    reason = exc.reason
    code = None if reason is None else reason.code
    text = "" if reason is None or not reason.reason else f": {reason.reason}"
    return ConnectionLost(f"websocket closed (code {code}{text})", close_code=code)


async def open_websocket(
    nursery: trio.Nursery, stream: HandshakeWatch, url: str, secret: str, handshake_timeout: float
) -> WebSocketConnection:
    """trio-websocket's client handshake over ``stream`` (TCP or TLS, ours)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    default_port = 443 if parts.scheme == "wss" else 80
    host_header = host if parts.port in (None, default_port) else f"{host}:{parts.port}"
    if ":" in host:
        host_header = host_header.replace(host, f"[{host}]", 1)
    headers = [
        (b"authorization", b"Bearer " + secret.encode("utf-8")),
        (b"user-agent", USER_AGENT.encode("ascii")),
    ]
    try:
        # For a gateway that accepts and then says nothing; one that closes
        # or breaks the connection fails at once (HandshakeWatch).
        with trio.fail_after(handshake_timeout):
            return await wrap_client_stream(
                nursery,
                # "Wrap an arbitrary stream" (its docstring: trio.abc.Stream;
                # the annotation is narrower than the code).
                stream,  # type: ignore[arg-type]
                host_header,
                f"{parts.path}?{parts.query}",
                extra_headers=headers,
                message_queue_size=4,
                max_message_size=MAX_MESSAGE_SIZE,
                # trio-websocket reads 4 KiB at a time by default: a 100 MiB
                # upload cost ~25,000 recv calls and scheduler passes.
                receive_buffer_size=RECEIVE_BUFFER,
                subprotocols=[WS_SUBPROTOCOL],
            )
    except trio.TooSlowError:
        raise HandshakeTimeout(
            f"WebSocket handshake with the gateway did not complete within {handshake_timeout:g} s"
        ) from None
    except (HandshakeError, trio.BrokenResourceError, OSError) as exc:
        raise map_connect_error(exc, url) from None


async def open_stream(
    url: str, handshake_timeout: float, ssl_context: ssl.SSLContext | None
) -> GatewayStream:
    """TCP (and TLS for wss) to the gateway; we own and close it, not trio-websocket."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    try:
        with trio.fail_after(handshake_timeout):
            if secure:
                context = ssl_context or ssl.create_default_context()
                tls = await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=context, https_compatible=True
                )
                await _tls_handshake(tls, host)
                return tls
            # Plain TCP: each tunnel message trio-websocket writes costs no
            # schedule point when the kernel takes it at once.
            return FastSendStream(await trio.open_tcp_stream(host, port))
    except trio.TooSlowError:
        raise HandshakeTimeout(
            f"could not connect to the gateway within {handshake_timeout:g} s"
        ) from None
    except OSError as exc:
        raise map_connect_error(exc, url) from None


async def _tls_handshake(stream: trio.SSLStream[trio.SocketStream], host: str) -> None:
    """Complete the TLS handshake before trio-websocket sees the stream (it would
    take a failure for a closed connection and wait out the deadline), closing
    the stream on failure."""
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        raise _tls_error(exc.__cause__, host) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


def _tls_error(cause: BaseException | None, host: str) -> RevconnError:
    if isinstance(cause, ssl.SSLCertVerificationError):
        # Fatal: every retry would meet the same certificate (and hand the
        # secret to whoever presents it, were it accepted).
        reason = (cause.verify_message or str(cause)).rstrip(".")
        return CertificateVerifyError(
            f"the gateway's certificate for {host} could not be verified ({reason}): "
            "pass --ca-file with its CA, or fix the certificate"
        )
    if isinstance(cause, ssl.SSLError) and cause.reason in _NOT_TLS_REASONS:
        return ConnectError(
            f"the gateway port does not speak TLS ({cause.reason}): "
            "use http:// or ws:// for a plain-HTTP port, or give the TLS port"
        )
    if cause is None or isinstance(cause, ssl.SSLEOFError | ConnectionError):
        return ConnectError(
            f"the gateway closed the connection during the TLS handshake: {_CHECK_GATEWAY}"
        )
    return ConnectError(f"TLS handshake with the gateway failed: {cause}")


class HandshakeWatch(trio.abc.Stream):
    """The gateway stream as trio-websocket sees it: until ``opened()``, the
    peer closing or breaking the connection raises ConnectError.

    trio-websocket 0.12's reader task answers end-of-file or a broken stream
    during the opening handshake by marking the connection closed, but nothing
    wakes ``wrap_client_stream``, which waits for an accepted handshake only:
    every such attempt waited out the whole handshake timeout. An exception
    that is not a trio stream error escapes the reader task instead, fails the
    nursery it runs in and so ends the wait at once (``most_telling`` picks
    it out of the group). The first line the peer answered is kept for the
    message.
    """

    __slots__ = ("_first_line", "_stream", "handshaking")

    def __init__(self, stream: GatewayStream) -> None:
        self._stream = stream
        self.handshaking = True
        self._first_line = b""

    def opened(self) -> None:
        """The WebSocket handshake completed: from now on pass everything through."""
        self.handshaking = False

    def not_websocket(self) -> str:
        """Why the attempt failed, for an answer trio-websocket could not parse."""
        return f"the gateway's answer is not a WebSocket handshake{self._answer()}"

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.handshaking:
            return await self._stream.send_all(data)
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise self._ended(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self.handshaking:
            return await self._stream.receive_some(max_bytes)
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            raise self._ended(exc) from exc
        if not data:
            raise self._ended(None)
        if not self._first_line:
            self._first_line = bytes(data[:200]).split(b"\r\n", 1)[0][:100]
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _ended(self, exc: trio.BrokenResourceError | None) -> ConnectError:
        how = "closed" if exc is None else "broke"
        cause = exc.__cause__ if exc is not None else None
        detail = f" ({cause})" if cause is not None else ""
        return ConnectError(
            f"the gateway {how} the connection during the WebSocket handshake{detail}"
            f"{self._answer()}: {_CHECK_GATEWAY}"
        )

    def _answer(self) -> str:
        if not self._first_line:
            return ""
        return f" (it answered {self._first_line.decode('ascii', 'replace')!r})"


def rejection_error(status: int, answer: object) -> AuthError:
    """The error for a 401/403 from the gateway (``/ws/connect`` or
    ``/announce``; ``answer`` its parsed JSON body, if any): its ``error``
    says whether the token was revoked, expired, or is for another name or
    scope."""
    error: object = None
    detail: object = None
    if isinstance(answer, dict):
        error, detail = answer.get("error"), answer.get("detail")
    detail = "".join(c for c in str(detail or "")[:200] if c.isprintable())
    if error == "revoked":
        return RevokedError(REVOKED_MESSAGE, status=status)
    if error == "expired":
        return AuthError(EXPIRED_MESSAGE, status=status)
    if status == 403 and error in ("wrong_agent", "wrong_scope"):
        return AuthError(
            f"the gateway refused this token (HTTP 403 {error}): {detail}; "
            "check --name and --token / REVCONN_TOKEN",
            status=status,
        )
    return AuthError(
        f"the gateway rejected the credentials (HTTP {status}): "
        "check --token / REVCONN_TOKEN or --secret / REVCONN_SECRET",
        status=status,
    )


def map_connect_error(exc: BaseException, url: str) -> RevconnError:
    """A trio-websocket / socket error while dialing, as the revconn error it means."""
    if isinstance(exc, ConnectionRejected):
        status = exc.status_code
        if status in (401, 403):
            try:
                answer = json.loads(exc.body or b"")
            except ValueError:
                answer = None
            return rejection_error(status, answer)
        if status == 400:
            body = (exc.body or b"").decode("utf-8", "replace")[:200]
            return ConfigError(
                f"the gateway refused the connection as malformed (HTTP 400): {body}"
            )
        if status == 404:
            return ConfigError(
                f"{redacted(url)} answered HTTP 404 Not Found: is --gateway the URL of a "
                "revconn gateway's data plane (check the host, port and path)?"
            )
        if status < 400:
            return ConnectError(
                f"the gateway answered HTTP {status} instead of accepting the WebSocket "
                f"upgrade: {_CHECK_GATEWAY}"
            )
        return ConnectError(f"the gateway refused the connection (HTTP {status})")
    if isinstance(exc, OSError):
        return ConnectError(f"cannot reach the gateway at {redacted(url)}: {exc.strerror or exc}")
    return ConnectError(f"WebSocket handshake failed: {exc!r}")


def most_telling(
    group: BaseExceptionGroup[BaseException], url: str, *, not_websocket: str | None = None
) -> RevconnError | None:
    """The revconn error to raise for a group of errors from one attempt.

    ``not_websocket``, given while the WebSocket handshake is still running,
    is the message for an HTTP parse error: trio-websocket answers a response
    it cannot parse by trying to send a server's rejection, which fails with
    h11's LocalProtocolError in its reader task.

    None if the group holds anything that must propagate as is (cancellation,
    KeyboardInterrupt, a bug).
    """
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    mapped: list[RevconnError] = []
    for leaf in leaves:
        if isinstance(leaf, RevconnError):
            mapped.append(leaf)
        elif isinstance(leaf, HandshakeError | trio.BrokenResourceError | OSError):
            mapped.append(map_connect_error(leaf, url))
        elif not_websocket is not None and isinstance(
            leaf, h11.ProtocolError | wsproto.utilities.ProtocolError
        ):
            mapped.append(ConnectError(f"{not_websocket}: {_CHECK_GATEWAY}"))
        else:
            return None
    fatal = [e for e in mapped if isinstance(e, FatalError)]
    return (fatal or mapped or [None])[0]


def redacted(url: str) -> str:
    """The URL without its query (the agent name is logged separately)."""
    return url.split("?", 1)[0]
