"""The gateway over TLS (``certfile``/``keyfile``), in-process: agents dial
wss://, public requests arrive over https (X-Forwarded-Proto https), large
bodies and early answers are byte-exact through the TLS write path, a bad
handshake costs only its own connection, and ``reload_tls()`` serves a new
certificate to new connections while the established tunnel stays up."""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import serialization

from revconn import (
    Agent,
    AgentConfig,
    Backoff,
    ConfigError,
    Gateway,
    GatewayConfig,
    SharedSecretPolicy,
)
from revconn._runtime.tunnel import Tunnel

from .._certs import CertFiles, issue, replace
from .._gateway_helpers import SECRET, RunningGateway, running_gateway, wait_for
from ..upstream_app import app, pattern

MiB = 1 << 20


@asynccontextmanager
async def tls_stack(
    certs: CertFiles, *, ssl_context: ssl.SSLContext | None = None, handshake_timeout: float = 10
) -> AsyncIterator[tuple[RunningGateway, Agent]]:
    """A TLS gateway with agent "web" (the test app, in-process) online over
    wss://; the agent trusts ``certs``' CA (``ca_file``) unless given a context."""
    async with running_gateway(
        certfile=certs.certfile, keyfile=certs.keyfile, handshake_timeout=handshake_timeout
    ) as gw:
        agent_config = AgentConfig(
            gateway=gw.url,
            name="web",
            secret=SECRET,
            backoff=Backoff(0.1, 1),
            ca_file=None if ssl_context is not None else certs.ca_file,
        )
        agent = Agent(agent_config, app=app, ssl_context=ssl_context)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await wait_for(lambda: gw.gateway.registry.lookup("web") is not None)
            yield gw, agent
            agent.stop()
            nursery.cancel_scope.deadline = trio.current_time() + 2


def client(certs: CertFiles, gw: RunningGateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.url, verify=certs.client_context(), timeout=30)


def tunnel(gw: RunningGateway) -> Tunnel:
    session = gw.gateway.registry.lookup("web")
    assert isinstance(session, Tunnel)
    return session


async def verifies(url: str, context: ssl.SSLContext) -> bool:
    """Whether a new TLS connection to ``url`` verifies against ``context``."""
    port = int(url.rsplit(":", 1)[1])
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=context, https_compatible=True
    )
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        assert isinstance(exc.__cause__, ssl.SSLCertVerificationError), exc.__cause__
        return False
    finally:
        await trio.aclose_forcefully(stream)
    return True


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return issue(tmp_path)


# -- serving ---------------------------------------------------------------------------
async def test_tunnel_and_public_requests_over_tls(certs: CertFiles) -> None:
    async with tls_stack(certs) as (gw, agent), client(certs, gw) as http:
        assert gw.url.startswith("https://127.0.0.1:")
        assert gw.admin_url.startswith("https://127.0.0.1:")
        assert agent.public_urls == [f"{gw.url}/a/web/"]
        r = await http.get("/a/web/echo/x?y=1")
        assert r.status_code == 200
        headers = dict((k.lower(), v) for k, v in r.json()["headers"])
        assert headers["x-forwarded-proto"] == "https"
        assert r.json()["raw_path"] == "/echo/x"
        # The admin surface: the same certificate, over hypercorn.
        admin = await http.get(
            f"{gw.admin_url}/endpoints", headers={"Authorization": f"Bearer {SECRET}"}
        )
        assert [row["name"] for row in admin.json()["endpoints"]] == ["web"]


async def test_10_mib_download_and_upload_are_byte_exact_over_tls(certs: CertFiles) -> None:
    data = pattern(10 * MiB, 7)
    async with tls_stack(certs) as (gw, _), client(certs, gw) as http:
        r = await http.get(f"/a/web/bytes?n={10 * MiB}&seed=8")
        assert r.status_code == 200
        assert r.content == pattern(10 * MiB, 8)
        r = await http.post("/a/web/upload", content=data)
        assert r.json() == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def test_an_early_answer_reaches_the_client_over_tls(
    certs: CertFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """The lingering close after a 413 the upstream gave before reading the
    upload (TLS cannot half-close: the gateway reads and drops the rest)."""
    caplog.set_level(logging.DEBUG, logger="revconn")
    async with tls_stack(certs) as (gw, _), client(certs, gw) as http:
        r = await http.post("/a/web/form?limit=65536", content=pattern(5 * MiB, 3))
        assert r.status_code == 413
        assert r.json() == {"error": "too_large", "limit": 65536}
        assert r.headers["connection"] == "close"
        r = await http.post("/a/web/form?limit=65536", content=b"small")
        assert r.json()["length"] == 5
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


async def test_a_plain_http_client_on_the_tls_port_is_closed_others_unaffected(
    certs: CertFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="revconn.listener")
    async with (
        tls_stack(certs, handshake_timeout=0.5) as (gw, _),
        client(certs, gw) as http,
    ):
        assert (await http.get("/a/web/echo/before")).status_code == 200  # kept alive
        port = int(gw.url.rsplit(":", 1)[1])
        with trio.fail_after(5):
            async with await trio.open_tcp_stream("127.0.0.1", port) as plain:
                await plain.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    assert await plain.receive_some() == b""
                except trio.BrokenResourceError:
                    pass  # (reset: the handshake bytes were left unread)
            # A client that never says anything is closed after the handshake timeout.
            async with await trio.open_tcp_stream("127.0.0.1", port) as silent:
                started = trio.current_time()
                assert await silent.receive_some() == b""
                assert 0.4 < trio.current_time() - started < 3
        assert (await http.get("/a/web/echo/after")).status_code == 200
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert tunnel(gw).end is None
    messages = [r.getMessage() for r in caplog.records if r.name == "revconn.listener"]
    assert any("TLS handshake with 127.0.0.1" in m and "failed" in m for m in messages)
    assert any("none within 0.5 s" in m for m in messages)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "revconn.listener")


# -- reloading --------------------------------------------------------------------------
async def test_reload_serves_the_new_certificate_and_keeps_the_tunnel(
    certs: CertFiles, tmp_path: Path
) -> None:
    old = certs.client_context()
    # The agent trusts both CAs: it would reconnect happily, so staying on
    # the first connection is the gateway's doing, not a failed redial.
    both = certs.client_context()
    async with tls_stack(certs, ssl_context=both) as (gw, agent):
        established = tunnel(gw)
        epoch = (await gw.gateway.registry.snapshot())[0].epoch
        new = issue(tmp_path)  # same paths, a new CA
        both.load_verify_locations(new.ca_file)
        gw.gateway.reload_tls()
        assert not await verifies(gw.url, old)
        assert await verifies(gw.url, new.client_context())
        assert not await verifies(gw.admin_url, old)  # hypercorn: the same context
        assert await verifies(gw.admin_url, new.client_context())
        async with client(new, gw) as http:
            r = await http.get("/a/web/echo/through-the-old-tunnel")
            assert r.status_code == 200
        assert tunnel(gw) is established
        assert established.end is None
        assert (await gw.gateway.registry.snapshot())[0].epoch == epoch
        assert agent.statistics().attempts == 1


@pytest.mark.parametrize("broken", ["mismatched key", "garbage certificate", "missing key"])
async def test_a_failed_reload_keeps_the_current_certificate(
    certs: CertFiles, tmp_path: Path, broken: str
) -> None:
    async with tls_stack(certs) as (gw, _):
        message = break_files(certs, tmp_path, broken)
        with pytest.raises(ConfigError, match=message):
            gw.gateway.reload_tls()
        assert await verifies(gw.url, certs.client_context())
        assert await verifies(gw.admin_url, certs.client_context())
        async with client(certs, gw) as http:
            assert (await http.get("/a/web/echo/still")).status_code == 200


def break_files(certs: CertFiles, tmp_path: Path, broken: str) -> str:
    """Spoil ``certs``' files as ``broken`` says; returns the error expected."""
    if broken == "mismatched key":
        other = issue(tmp_path, stem="other")
        replace(certs.keyfile, Path(other.keyfile).read_bytes())
        return r"--keyfile .* is not the key of the certificate in --certfile"
    if broken == "garbage certificate":
        replace(certs.certfile, b"not a certificate\n")
        return r"--certfile .*: no PEM certificate in it \(OpenSSL: "
    Path(certs.keyfile).unlink()
    return r"--keyfile .*: cannot read it: No such file or directory"


def test_reload_without_tls_is_a_config_error() -> None:
    gateway = Gateway(GatewayConfig(binds=("127.0.0.1:0",)), SharedSecretPolicy(SECRET))
    assert gateway.scheme == "http"
    with pytest.raises(ConfigError, match="without --certfile"):
        gateway.reload_tls()


# -- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("certfile", "--certfile without --keyfile: give both for HTTPS, or neither"),
        ("keyfile", "--keyfile without --certfile: give both for HTTPS, or neither"),
    ],
)
def test_certfile_and_keyfile_go_together(certs: CertFiles, given: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GatewayConfig(**{given: getattr(certs, given)})


def test_bad_files_name_the_file_and_the_reason(certs: CertFiles, tmp_path: Path) -> None:
    def load(certfile: str, keyfile: str) -> str:
        with pytest.raises(ConfigError) as info:
            Gateway(GatewayConfig(certfile=certfile, keyfile=keyfile), SharedSecretPolicy(SECRET))
        return str(info.value)

    missing = str(tmp_path / "nope.crt")
    assert load(missing, certs.keyfile) == (
        f"--certfile {missing}: cannot read it: No such file or directory"
    )
    other = issue(tmp_path, stem="other")
    assert load(certs.certfile, other.keyfile) == (
        f"--keyfile {other.keyfile} is not the key of the certificate in --certfile "
        f"{certs.certfile} (OpenSSL: [X509: KEY_VALUES_MISMATCH] key values mismatch)"
    )
    assert load(certs.keyfile, certs.keyfile).startswith(
        f"--certfile {certs.keyfile}: no PEM certificate in it (OpenSSL: "
    )
    assert load(certs.certfile, certs.certfile).startswith(
        f"--keyfile {certs.certfile}: no PEM private key in it (OpenSSL: "
    )
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(encrypted_key(certs))
    assert load(certs.certfile, str(encrypted)) == (
        f"--keyfile {encrypted} is encrypted: give the key unencrypted "
        "(readable by the gateway's user only)"
    )


def encrypted_key(certs: CertFiles) -> bytes:
    """The certificate's key, encrypted with a passphrase."""
    key = serialization.load_pem_private_key(Path(certs.keyfile).read_bytes(), None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )


def test_tls_1_2_is_the_minimum(certs: CertFiles) -> None:
    gateway = Gateway(
        GatewayConfig(certfile=certs.certfile, keyfile=certs.keyfile), SharedSecretPolicy(SECRET)
    )
    assert gateway.scheme == "https"
    assert gateway.tls_context is not None
    assert gateway.tls_context.minimum_version is ssl.TLSVersion.TLSv1_2
