"""The gateway's TLS (``--certfile``/``--keyfile``): one server context for
both surfaces, reloaded without touching established connections, and an
accepted TLS connection as the half-closeable stream the exchange writes to.

Reloading: ``ServerTLS.context`` is the one context the data plane and
hypercorn (the admin surface) wrap every new connection with. A reload builds
and checks a *new* context from the files and makes it the current one; the
long-lived context's ``sni_callback`` (which OpenSSL calls for every
ClientHello, with or without SNI) hands each new handshake to the current
context. Calling ``load_cert_chain`` on the live context instead is not safe:
with a key that does not match the certificate it raises after installing
the certificate, and every later handshake fails ("no suitable signature
algorithm", measured with OpenSSL 3.0); and a certificate of another key
type (RSA, then ECDSA) would keep the old one loaded in its own slot, where a
client that takes only that type still gets it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import trio

from .._errors import ConfigError

__all__ = ["AcceptedStream", "ServerTLS", "TLSConnection"]

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class ServerTLS:
    """The certificate and key the gateway serves, as an ``ssl.SSLContext``."""

    __slots__ = ("_current", "certfile", "context", "keyfile")

    def __init__(self, certfile: str, keyfile: str) -> None:
        """Load ``certfile`` (PEM, the certificate then its chain) and ``keyfile``
        (PEM, unencrypted); ConfigError names the file and OpenSSL's reason."""
        self.certfile = certfile
        self.keyfile = keyfile
        self.context = server_context(certfile, keyfile)
        """What every new TLS connection is wrapped with, for the gateway's life."""
        self._current = self.context
        self.context.sni_callback = self._select

    def reload(self) -> None:
        """Read the files again: new handshakes get the new certificate,
        established connections keep theirs. ConfigError (and the current
        certificate stays) if the files cannot be loaded."""
        self._current = server_context(self.certfile, self.keyfile)

    def _select(
        self, connection: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, _: object
    ) -> None:
        if self._current is not self.context:
            connection.context = self._current


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context serving ``certfile``/``keyfile`` (HTTP/1.1 by ALPN)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    context.set_alpn_protocols(["http/1.1"])  # both surfaces speak HTTP/1.1 over TLS
    cert_text, key_text = _read("--certfile", certfile), _read("--keyfile", keyfile)

    def encrypted() -> str:
        raise ConfigError(
            f"--keyfile {keyfile} is encrypted: give the key unencrypted "
            "(readable by the gateway's user only)"
        )

    try:
        context.load_cert_chain(certfile, keyfile, password=encrypted)
    except ssl.SSLError as exc:
        raise ConfigError(_load_error(exc, certfile, keyfile, cert_text, key_text)) from None
    except OSError as exc:  # (replaced between the read and the load)
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return context


def _read(flag: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it: {exc.strerror}") from None


def _load_error(
    exc: ssl.SSLError, certfile: str, keyfile: str, cert_text: str, key_text: str
) -> str:
    """Which file is wrong, and OpenSSL's reason. OpenSSL says only "PEM lib"
    for a file without the expected PEM block, whichever it is."""
    reason = _openssl_reason(exc)
    if exc.reason == "KEY_VALUES_MISMATCH":
        return (
            f"--keyfile {keyfile} is not the key of the certificate in --certfile {certfile} "
            f"(OpenSSL: {reason})"
        )
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        return f"--certfile {certfile}: no PEM certificate in it (OpenSSL: {reason})"
    if "PRIVATE KEY-----" not in key_text:
        return f"--keyfile {keyfile}: no PEM private key in it (OpenSSL: {reason})"
    return f"--certfile {certfile} / --keyfile {keyfile}: cannot load them (OpenSSL: {reason})"


def _openssl_reason(exc: ssl.SSLError) -> str:
    """``[X509: KEY_VALUES_MISMATCH] key values mismatch``, without CPython's
    source position."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return text.split(" (_ssl.c:", 1)[0]


class TLSConnection(trio.abc.HalfCloseableStream):
    """An accepted connection after its TLS handshake, as the exchange and the
    agent WebSocket use a TCP one.

    trio's SSLStream cannot half-close: ``send_eof()`` (the exchange's
    lingering close after an early answer) only ends our sending; the client
    learns the end from the answer's ``Connection: close`` and closes, while
    we read and drop what it still sends. ``receive_some`` returns ``bytes``
    (the parsers' input type)."""

    __slots__ = ("_ended", "tls")

    def __init__(self, tls: trio.SSLStream[trio.SocketStream]) -> None:
        self.tls = tls
        self._ended = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._ended:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("send_eof() was called")
        await self.tls.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tls.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self._ended = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.tls.receive_some(max_bytes)
        return data if type(data) is bytes else bytes(data)

    async def aclose(self) -> None:
        # https_compatible: closes the socket at once (no close_notify to wait on).
        await self.tls.aclose()


AcceptedStream = trio.SocketStream | TLSConnection
"""An accepted data-plane connection: plain TCP, or TLS after its handshake."""
