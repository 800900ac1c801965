"""The agent and the gateway's certificate: verified by default (the system's
CAs) or against ``--ca-file``; a failed verification is fatal with a message
naming the host and the reason; the secret never goes in clear text to a
host that is not loopback unless ``--insecure-plaintext`` says so."""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from revconn import Agent, AgentConfig, Backoff, CertificateVerifyError, ConfigError

from .._certs import CertFiles, issue
from ..cli.test_agent_cli import serve_agent

SECRET = "tls-secret-abcdefghijklmnop"
UPSTREAM = "http://127.0.0.1:9"  # never reached: no request goes through


@asynccontextmanager
async def tls_listener(certs: CertFiles) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 presenting ``certs``' certificate (it never
    gets further than the handshake here); yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.certfile, certs.keyfile)

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            async with stream:
                await stream.do_handshake()
                while await stream.receive_some():
                    pass
        except trio.BrokenResourceError:
            pass  # the agent refused our certificate

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, handler, 0, context, host="127.0.0.1")
        )
        yield int(listeners[0].transport_listener.socket.getsockname()[1])
        nursery.cancel_scope.cancel()


def agent_for(gateway: str, **config: object) -> Agent:
    return Agent(
        AgentConfig(
            gateway=gateway,
            name="probe",
            secret=SECRET,
            upstream=UPSTREAM,
            backoff=Backoff(0.1, 0.2),
            **config,  # type: ignore[arg-type]
        )
    )


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return issue(tmp_path)


# -- verification -----------------------------------------------------------------------
async def test_an_untrusted_certificate_is_fatal_at_the_first_attempt(certs: CertFiles) -> None:
    async with tls_listener(certs) as port:
        agent = agent_for(f"https://127.0.0.1:{port}")  # the system's CAs only
        with trio.fail_after(5), pytest.raises(CertificateVerifyError) as info:
            await agent.run()
    assert str(info.value) == (
        "the gateway's certificate for 127.0.0.1 could not be verified "
        "(unable to get local issuer certificate): pass --ca-file with its CA, "
        "or fix the certificate"
    )
    assert agent.statistics().attempts == 1


async def test_a_certificate_for_another_host_is_fatal(certs: CertFiles, tmp_path: Path) -> None:
    other = issue(tmp_path, "gw.example.com", stem="other")
    async with tls_listener(other) as port:
        agent = agent_for(f"wss://127.0.0.1:{port}", ca_file=other.ca_file)
        with trio.fail_after(5), pytest.raises(CertificateVerifyError) as info:
            await agent.run()
    assert str(info.value).startswith(
        "the gateway's certificate for 127.0.0.1 could not be verified "
        "(IP address mismatch, certificate is not valid for '127.0.0.1'): pass --ca-file"
    )


async def test_ca_file_makes_the_certificate_trusted(certs: CertFiles) -> None:
    """The handshake passes; the attempt then fails on our stand-in server's
    silence (it is no gateway), a transient error that is retried."""
    async with tls_listener(certs) as port:
        agent = agent_for(f"https://127.0.0.1:{port}", ca_file=certs.ca_file, handshake_timeout=0.2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            with trio.fail_after(5):
                while agent.statistics().attempts < 2:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert "WebSocket handshake" in (agent.statistics().last_error or "")


async def test_announce_mode_verifies_the_gateway_too(certs: CertFiles) -> None:
    async with tls_listener(certs) as port:
        agent = Agent(
            AgentConfig(
                gateway=f"https://127.0.0.1:{port}",
                name="probe",
                secret=SECRET,
                tunnel_url="https://svc.example.net/",
            )
        )
        with trio.fail_after(5), pytest.raises(CertificateVerifyError, match=r"for 127\.0\.0\.1"):
            await agent.run()


def test_ca_file_problems_are_config_errors(certs: CertFiles, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(
        ConfigError, match=rf"^--ca-file {re.escape(missing)}: cannot read it: No such file"
    ):
        agent_for("https://gw.example.com", ca_file=missing)
    with pytest.raises(ConfigError, match=r"--ca-file .*: no usable PEM certificate in it \("):
        agent_for("https://gw.example.com", ca_file=certs.keyfile)
    with pytest.raises(ConfigError, match=r"^--ca-file is for an https:// \(or wss://\) gateway"):
        agent_for("http://127.0.0.1:9", ca_file=certs.ca_file)
    with pytest.raises(ConfigError, match=r"either ssl_context or AgentConfig\.ca_file"):
        Agent(
            AgentConfig(
                gateway="https://gw.example.com",
                name="probe",
                secret=SECRET,
                upstream=UPSTREAM,
                ca_file=certs.ca_file,
            ),
            ssl_context=ssl.create_default_context(),
        )


@pytest.mark.e2e
async def test_the_executable_exits_2_on_an_untrusted_certificate(certs: CertFiles) -> None:
    async with tls_listener(certs) as port:
        code, stderr = await serve_agent(
            "--gateway", f"https://127.0.0.1:{port}", "--upstream", UPSTREAM,
            env={"REVCONN_SECRET": SECRET},
        )  # fmt: skip
    assert code == 2, stderr
    assert "error: the gateway's certificate for 127.0.0.1 could not be verified" in stderr
    assert "retry" not in stderr
    assert "Traceback" not in stderr


# -- no secret in clear text ------------------------------------------------------------
@pytest.mark.parametrize(
    ("gateway", "host", "secure"),
    [
        ("http://gw.example.com:8080", "gw.example.com", "https://gw.example.com:8080"),
        ("ws://gw.example.com/prefix", "gw.example.com", "wss://gw.example.com/prefix"),
        ("http://10.0.0.5", "10.0.0.5", "https://10.0.0.5"),
        ("http://[2001:db8::1]", "2001:db8::1", "https://[2001:db8::1]"),
        ("http://0.0.0.0:8080", "0.0.0.0", "https://0.0.0.0:8080"),
    ],
)
@pytest.mark.parametrize("mode", ["tunnel", "announce"])
def test_plaintext_to_a_host_that_is_not_loopback_is_refused(
    gateway: str, host: str, secure: str, mode: str
) -> None:
    settings: dict[str, object] = {"gateway": gateway, "name": "probe", "secret": SECRET}
    if mode == "announce":
        settings["tunnel_url"] = "https://svc.example.net/"
    with pytest.raises(ConfigError) as info:
        AgentConfig(**settings)  # type: ignore[arg-type]
    assert str(info.value) == (
        f"refusing to send the gateway secret in clear text to {host} ({gateway}): use "
        f"{secure} (the gateway serves TLS with --certfile/--keyfile, or sits behind a TLS "
        "proxy), or pass --insecure-plaintext if this network is trusted"
    )
    AgentConfig(**settings, insecure_plaintext=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "gateway",
    [
        "http://127.0.0.1:8080",
        "http://127.4.5.6",
        "ws://localhost:1",
        "http://LOCALHOST.",
        "http://[::1]:8080",
        "http://[::ffff:127.0.0.1]",
        "https://gw.example.com",
        "wss://10.0.0.5",
    ],
)
def test_loopback_or_tls_needs_no_override(gateway: str) -> None:
    AgentConfig(gateway=gateway, name="probe", secret=SECRET, upstream=UPSTREAM)


@pytest.mark.e2e
async def test_the_executable_refuses_plaintext_with_exit_2() -> None:
    code, stderr = await serve_agent(
        "--gateway", "http://gw.example.com:8080", "--upstream", UPSTREAM,
        env={"REVCONN_SECRET": SECRET},
    )  # fmt: skip
    assert code == 2, stderr
    assert "error: refusing to send the gateway secret in clear text to gw.example.com" in stderr
    assert "pass --insecure-plaintext" in stderr
    assert "connecting to" not in stderr
