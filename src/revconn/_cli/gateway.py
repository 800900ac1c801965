"""``revconn-gateway``: flags -> GatewayConfig, then the gateway (and, with
``--demo``, an in-process demo agent) until SIGTERM/SIGINT; SIGHUP reloads
the TLS certificate and the revoked-tokens file. ``revconn-gateway token``:
signing keys and tokens, offline (no gateway runs)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import re
import signal
import ssl
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import attrs
import click
import trio

from .. import __version__
from .._agent.agent import Agent, AgentConfig
from .._agent.demo import demo_app
from .._errors import ConfigError
from .._files import read_private
from .._gateway.auth import AuthPolicy, SharedSecretPolicy, TokenPolicy, generate_secret
from .._gateway.gateway import Gateway, GatewayConfig
from .._gateway.tokens import (
    RevocationList,
    SigningKey,
    TokenVerifier,
    issue_token,
)
from .._proto.rules import MAX_MESSAGE_SIZE
from .._runtime.heartbeat import Heartbeat
from .common import (
    EXIT_CONFIG,
    EXIT_ERROR,
    LOG_FORMAT_HELP,
    TRACE_HELP,
    duration_text,
    fail,
    fetch_json,
    run,
    setup_logging,
    until_signal,
)
from .config import config_option, environment_for_every_option

__all__ = ["main"]

DEMO_NAME = "demo"

log = logging.getLogger("revconn.cli")


def default_state_dir() -> Path:
    """Where a gateway keeps what it generated: systemd's ``$STATE_DIRECTORY``
    (``StateDirectory=``), else ``$XDG_DATA_HOME/revconn``, else
    ``~/.local/share/revconn``."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "revconn"


def stored_secret(state_dir: Path) -> tuple[str, bool, Path]:
    """The secret kept in ``state_dir/secret``: (secret, generated now?, path).
    Made (0600, in a 0700 directory) the first time, so that agents keep
    working across restarts; refused if others can read it."""
    path = state_dir / "secret"
    generated = False
    try:
        text = read_private(path, "the state file").strip()
    except FileNotFoundError:
        # (another gateway starting at once may keep its own first: then that one)
        generated = _keep_secret(state_dir, path, generate_secret())
        text = read_private(path, "the state file").strip()
    if not text:
        raise ConfigError(f"{path} is empty: delete it to have a new secret generated")
    return text, generated, path


def _keep_secret(state_dir: Path, path: Path, secret: str) -> bool:
    """Write ``secret`` to ``path`` whole or not at all: a 0600 temporary file
    in the same directory, then a hard link to the name (never replacing a
    secret another gateway kept meanwhile: that one is used). True if
    ``secret`` was kept."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".secret-", dir=state_dir)
    except OSError as exc:
        raise ConfigError(
            f"--state-dir {state_dir}: cannot keep a generated secret there "
            f"({exc.strerror}): give --state-dir, --secret or --secret-file"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(secret + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    except OSError as exc:
        raise ConfigError(f"--state-dir {state_dir}: {exc.strerror}") from None
    finally:
        os.unlink(temporary)


def _load_secret(
    secret: str | None, secret_file: Path | None, state_dir: Path | None = None
) -> tuple[str, bool, Path | None]:
    """(secret, generated now?, the state file it is kept in) from --secret /
    --secret-file / REVCONN_SECRET, else the state directory's (None: a
    throwaway one, as for --demo)."""
    if secret is not None and secret_file is not None:
        raise ConfigError("give either --secret (or REVCONN_SECRET) or --secret-file, not both")
    if secret_file is not None:
        try:
            text = secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--secret-file {secret_file}: {exc.strerror}") from None
        if not text:
            raise ConfigError(f"--secret-file {secret_file} is empty")
        return text, False, None
    if secret is not None:
        return secret, False, None
    if "REVCONN_SECRET" in os.environ:  # click reads an empty variable as unset
        raise ConfigError(
            "the gateway secret is empty (REVCONN_SECRET is set but empty): set it, "
            "or unset it to have one generated"
        )
    if state_dir is None:
        return generate_secret(), True, None
    return stored_secret(state_dir)


@attrs.frozen
class _Auth:
    """How the gateway authenticates, from the credential flags."""

    policy: AuthPolicy
    secret: str | None
    """The shared secret; None with --no-shared-secret."""
    generated: bool
    """The shared secret was generated (and is shown once)."""
    keys: tuple[SigningKey, ...]
    """--token-key-file, in order (the first signs)."""
    key_files: tuple[Path, ...]
    stored_in: Path | None = None
    """The state file the shared secret is kept in (generated by an earlier start, or now)."""


def _auth_policy(
    secret: str | None,
    secret_file: Path | None,
    token_key_files: tuple[Path, ...],
    revoked_file: Path | None,
    no_shared_secret: bool,
    state_dir: Path | None = None,
) -> _Auth:
    """The policy for the credential flags; ConfigError naming the flag at fault."""
    if not token_key_files:
        if no_shared_secret:
            raise ConfigError(
                "--no-shared-secret needs --token-key-file: without either, no agent "
                "could connect (create a key with `revconn-gateway token keygen FILE`)"
            )
        if revoked_file is not None:
            raise ConfigError("--revoked-file lists token ids: it needs --token-key-file")
        only_key, generated, kept_in = _load_secret(secret, secret_file, state_dir)
        return _Auth(SharedSecretPolicy(only_key), only_key, generated, (), (), kept_in)
    keys = tuple(SigningKey.load(path) for path in token_key_files)
    ids = [key.id for key in keys]
    if len(set(ids)) != len(ids):
        raise ConfigError("--token-key-file: the same key is given twice")
    revoked = None if revoked_file is None else RevocationList(revoked_file)
    shared: SharedSecretPolicy | None = None
    shared_key: str | None = None
    stored: Path | None = None
    generated = False
    given = secret is not None or secret_file is not None or "REVCONN_SECRET" in os.environ
    if no_shared_secret:
        if given:
            raise ConfigError(
                "--no-shared-secret contradicts --secret/--secret-file/REVCONN_SECRET: "
                "drop one of them"
            )
    elif given:
        # With tokens, a shared secret only if one is given: none is made up
        # (it would open every name and the admin surface, and never expire).
        shared_key, generated, stored = _load_secret(secret, secret_file)
        shared = SharedSecretPolicy(shared_key)
    policy = TokenPolicy(TokenVerifier(keys), revoked=revoked, shared_secret=shared)
    return _Auth(policy, shared_key, generated, keys, token_key_files, stored)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=True,
    subcommand_metavar="[endpoints | token ...]",
)
@click.version_option(__version__, "--version", prog_name="revconn-gateway")
@config_option("gateway")
@click.option(
    "--bind",
    "binds",
    multiple=True,
    default=("127.0.0.1:8080",),
    show_default=True,
    help="HOST:PORT of the data plane: agents (/ws/connect), public requests "
    "(/a/NAME/...), /healthz. Repeatable; port 0 picks a free port.",
)
@click.option(
    "--admin-bind",
    "admin_binds",
    multiple=True,
    default=("127.0.0.1:8081",),
    show_default=True,
    help="HOST:PORT of the operator surface (/endpoints, /healthz); keep it "
    "private. Repeatable; port 0 picks a free port.",
)
@click.option("--secret", envvar="REVCONN_SECRET", help="Shared secret (env REVCONN_SECRET).")
@click.option(
    "--secret-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Read the shared secret from this file.",
)
@click.option(
    "--token-key-file",
    "token_key_files",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Accept per-agent and admin tokens signed with this key (`revconn-gateway token "
    "keygen`). Repeatable for a rotation: every key given verifies.",
)
@click.option(
    "--revoked-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Token ids refused, one a line; re-read on SIGHUP and when it changes, closing "
    "the revoked tokens' live sessions. Needs --token-key-file.",
)
@click.option(
    "--no-shared-secret",
    is_flag=True,
    help="Accept tokens only: no shared secret (needs --token-key-file).",
)
@click.option(
    "--heartbeat-interval",
    type=float,
    default=15.0,
    show_default=True,
    help="Seconds between heartbeat PINGs to each agent.",
)
@click.option(
    "--heartbeat-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds an agent has to answer a PING before its tunnel is closed.",
)
@click.option(
    "--handshake-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds an agent has to complete the tunnel handshake after connecting, an "
    "upstream to answer a public WebSocket handshake (then 504), and any client its TLS "
    "handshake, with --certfile.",
)
@click.option(
    "--idle-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds a public connection may sit idle between requests, and the "
    "time allowed to send a request head (then 408).",
)
@click.option(
    "--body-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds a public request's body may stall, no byte arriving from the client (then 408).",
)
@click.option(
    "--max-pending-connections",
    type=int,
    default=1024,
    show_default=True,
    help="Data-plane connections waiting for a request head at once (new, or kept alive "
    "between requests); beyond it new connections are closed at once.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where a secret generated (no --secret given) is kept, 0600, so agents keep "
    "working across restarts [default: $STATE_DIRECTORY, else $XDG_DATA_HOME/revconn, "
    "else ~/.local/share/revconn]; --demo keeps a throwaway one instead.",
)
@click.option(
    "--grace-period",
    type=float,
    default=30.0,
    show_default=True,
    help="On SIGTERM/SIGINT: seconds requests and WebSockets in flight may take to finish "
    "(new ones get 503) before agents get GOAWAY and close 1001; a second signal stops at "
    "once, and with nothing in flight the gateway exits at once.",
)
@click.option(
    "--access-log",
    is_flag=True,
    help="Log one line per request for an agent at INFO (agent, method, path without its "
    "query, status, bytes, duration); off by default.",
)
@click.option(
    "--no-metrics",
    is_flag=True,
    help="Count nothing per request (/metrics then has presence and auth only; the "
    "dashboard no counters).",
)
@click.option(
    "--metrics-per-agent",
    is_flag=True,
    help="Label request metrics with the agent's name (one series per agent).",
)
@click.option(
    "--max-streams-per-agent",
    type=int,
    default=128,
    show_default=True,
    help="Requests in flight to one agent at once (503 agent_busy beyond; the agent's own "
    "--max-streams applies too).",
)
@click.option(
    "--max-message-size",
    type=int,
    default=MAX_MESSAGE_SIZE,
    show_default=True,
    help="Bytes of one agent WebSocket message (close 1009 beyond, refused as soon as its "
    "header announces it); at least 262144, what a tunnel sends at most.",
)
@click.option(
    "--agent-basic-auth",
    "agent_basic_auth",
    multiple=True,
    metavar="NAME=USER:PASSWORD",
    envvar="REVCONN_AGENT_BASIC_AUTH",
    help="Public requests to agent NAME need this user and password (HTTP basic auth, "
    "checked by the gateway; the Authorization header is not forwarded). Repeatable "
    "(env REVCONN_AGENT_BASIC_AUTH, space-separated: keeps passwords out of ps).",
)
@click.option(
    "--agent-allow",
    "agent_allow",
    multiple=True,
    metavar="NAME=CIDR",
    help="Only clients in CIDR reach agent NAME (others get 403). Repeatable.",
)
@click.option(
    "--max-request-head",
    type=int,
    default=16 * 1024,
    show_default=True,
    help="Bytes of a public request's line and header fields (then 431).",
)
@click.option(
    "--max-header-fields",
    type=int,
    default=100,
    show_default=True,
    help="Header fields of a public request (then 431).",
)
@click.option(
    "--max-request-target",
    type=int,
    default=8 * 1024,
    show_default=True,
    help="Bytes of a public request's target (then 414).",
)
@click.option(
    "--max-body-size",
    type=int,
    default=None,
    help="Bytes of a public request's body (then 413; before the body is read when it has "
    "a Content-Length). Default: no limit.",
)
@click.option(
    "--max-agents",
    type=int,
    default=None,
    help="Agent tunnels held at once (the next gets 503 too_many_agents). Default: no limit.",
)
@click.option(
    "--auth-failures",
    type=int,
    default=10,
    show_default=True,
    help="Failed authentications from one address (IPv6: one /64) within --auth-failure-window "
    "before it gets 429 until the window ends.",
)
@click.option(
    "--auth-failure-window",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds over which failed authentications are counted.",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    metavar="CIDR",
    help="Believe X-Forwarded-For/-Proto/-Host from peers in this network (a TLS proxy "
    "such as Caddy or nginx in front); everyone else's are replaced. Repeatable.",
)
@click.option(
    "--domain",
    "domains",
    multiple=True,
    metavar="DOMAIN",
    help="Route requests for NAME.DOMAIN (any port) to agent NAME, path unchanged; "
    "DOMAIN itself serves /ws/connect, /healthz and /a/NAME/. Needs a wildcard DNS "
    "record *.DOMAIN. Repeatable.",
)
@click.option(
    "--announce-allow",
    "announce_allow",
    multiple=True,
    metavar="CIDR",
    help="Let announced URLs (revconn-agent --tunnel-url) reach this network too; by "
    "default only public addresses are (no loopback, private, link-local or metadata "
    "addresses). Repeatable, e.g. --announce-allow 10.0.0.0/8.",
)
@click.option(
    "--announce-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds an announced URL's service may stay silent once a request is sent "
    "(then 504 upstream_timeout).",
)
@click.option(
    "--certfile",
    type=click.Path(dir_okay=False),
    help="Serve HTTPS/WSS on --bind and --admin-bind with this PEM certificate (then "
    "its chain); needs --keyfile. SIGHUP reloads both files.",
)
@click.option(
    "--keyfile",
    type=click.Path(dir_okay=False),
    help="The certificate's PEM private key (unencrypted); needs --certfile.",
)
@click.option("--demo", is_flag=True, help="Also run an in-process demo agent named 'demo'.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option("--trace-protocol", is_flag=True, help=TRACE_HELP)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help=LOG_FORMAT_HELP,
)
@click.pass_context
def main(
    ctx: click.Context,
    binds: tuple[str, ...],
    admin_binds: tuple[str, ...],
    secret: str | None,
    secret_file: Path | None,
    token_key_files: tuple[Path, ...],
    revoked_file: Path | None,
    no_shared_secret: bool,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    handshake_timeout: float,
    idle_timeout: float,
    body_timeout: float,
    max_pending_connections: int,
    state_dir: Path | None,
    grace_period: float,
    access_log: bool,
    no_metrics: bool,
    metrics_per_agent: bool,
    max_streams_per_agent: int,
    max_message_size: int,
    domains: tuple[str, ...],
    trusted_proxies: tuple[str, ...],
    agent_basic_auth: tuple[str, ...],
    agent_allow: tuple[str, ...],
    max_request_head: int,
    max_header_fields: int,
    max_request_target: int,
    max_body_size: int | None,
    max_agents: int | None,
    auth_failures: int,
    auth_failure_window: float,
    announce_allow: tuple[str, ...],
    announce_timeout: float,
    certfile: str | None,
    keyfile: str | None,
    demo: bool,
    log_level: str,
    trace_protocol: bool,
    log_format: str,
) -> None:
    """Run the revconn gateway: agents dial /ws/connect (or announce a URL on
    /announce) and public requests for /a/NAME/... reach them on --bind;
    operators list /endpoints on --admin-bind.

    `revconn-gateway endpoints`: the agents online (over the admin API).
    `revconn-gateway token --help`: signing keys and per-agent tokens."""
    if ctx.invoked_subcommand is not None:
        return  # (a subcommand: it runs next, no gateway)
    setup_logging(log_level, trace_protocol=trace_protocol, log_format=log_format)
    try:
        auth = _auth_policy(
            secret,
            secret_file,
            token_key_files,
            revoked_file,
            no_shared_secret,
            None if demo else (state_dir or default_state_dir()),
        )
        config = GatewayConfig(
            binds=binds,
            admin_binds=admin_binds,
            idle_timeout=idle_timeout,
            body_timeout=body_timeout,
            max_pending_connections=max_pending_connections,
            graceful_timeout=grace_period,
            access_log=access_log,
            metrics=not no_metrics,
            metrics_per_agent=metrics_per_agent,
            max_streams_per_agent=max_streams_per_agent,
            max_message_size=max_message_size,
            heartbeat=Heartbeat(heartbeat_interval, heartbeat_timeout),
            handshake_timeout=handshake_timeout,
            domains=domains,
            trusted_proxies=trusted_proxies,
            agent_basic_auth=agent_basic_auth,
            agent_allow=agent_allow,
            max_request_head=max_request_head,
            max_header_fields=max_header_fields,
            max_request_target=max_request_target,
            max_body_size=max_body_size,
            max_agents=max_agents,
            auth_failures=auth_failures,
            auth_failure_window=auth_failure_window,
            announce_allow=announce_allow,
            announce_timeout=announce_timeout,
            certfile=certfile,
            keyfile=keyfile,
        )
        gateway = Gateway(config, auth.policy)  # (loads the certificate)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
        return

    async def main_task() -> None:
        stop = trio.Event()
        agents: list[Agent] = []

        def begin_stop() -> None:
            for agent in agents:
                agent.stop()
            stop.set()

        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
                await gateway.serve(shutdown_trigger=stop.wait, task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(
                until_signal, begin_stop, config.graceful_timeout + 5.0, nursery.cancel_scope
            )
            if gateway.tls_context is not None or revoked_file is not None:
                nursery.start_soon(_reload_on_sighup, gateway, revoked_file is not None)
            urls: list[str] = await nursery.start(serve)
            base = urls[0]
            click.echo(f"revconn-gateway listening on {', '.join(urls)}")
            click.echo(f"admin API on {', '.join(gateway.admin_urls)}")
            admin = gateway.admin_urls[0]
            # A kept secret is never printed (stdout goes to the journal): its file is named.
            if auth.generated and auth.stored_in is not None:
                click.echo(f"generated a secret, kept in {auth.stored_in} (0600)")
            elif auth.generated:
                click.echo(f"generated secret (shown once): {auth.secret}")
            elif auth.stored_in is not None:
                click.echo(f"using the secret kept in {auth.stored_in}")
            if demo:
                # The demo agent dials the address actually bound (port 0
                # resolved), on loopback, with the shared secret or else a
                # token of its own.
                credential = auth.secret
                if credential is None:
                    credential, _ = issue_token(auth.keys[0], DEMO_NAME)
                agent = Agent(
                    AgentConfig(gateway=_loopback(base), name=DEMO_NAME, secret=credential),
                    app=demo_app,
                    ssl_context=_own_socket_context() if gateway.tls_context else None,
                )
                agents.append(agent)
                nursery.start_soon(agent.run)
                click.echo(f"demo agent {DEMO_NAME!r} connecting; its page, through the tunnel:")
                click.echo(f"  curl '{base}/a/{DEMO_NAME}/'")
            # The secret is echoed only when it was generated (a given one stays unprinted).
            if auth.secret is None:
                issue = f"revconn-gateway token issue --admin --key-file {auth.key_files[0]}"
                bearer = f"$({issue})"
            else:
                bearer = auth.secret if auth.generated else "$REVCONN_SECRET"
                if auth.stored_in is not None:
                    bearer = f"$(cat {auth.stored_in})"
            click.echo("list the agents with:")
            click.echo(f"  curl -H \"Authorization: Bearer {bearer}\" '{admin}/endpoints'")
            click.echo(f"open the dashboard: {admin}/dashboard (any user name, password: {bearer})")
            sys.stdout.flush()

    run(main_task)


environment_for_every_option(main)


async def _reload_on_sighup(gateway: Gateway, revoked: bool) -> None:
    """SIGHUP: load the certificate and key again, and the revoked-tokens file
    (closing the sessions it lists); a failure keeps the current ones."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            # (each message says what is wrong: no traceback)
            if gateway.tls_context is not None:
                try:
                    gateway.reload_tls()
                except ConfigError as exc:
                    log.error("SIGHUP: TLS reload failed, the current certificate stays: %s", exc)  # noqa: TRY400
            if revoked:
                try:
                    await gateway.reload_revoked()
                except ConfigError as exc:
                    message = "SIGHUP: revoked tokens not reloaded, the current list stays: %s"
                    log.error(message, exc)  # noqa: TRY400


# -- `revconn-gateway endpoints`: the agents, over the admin API ------------------------


def _since(connected_at: str, now: datetime.datetime) -> str:
    """``2026-12-03T08:00:00.5Z`` -> ``3h12m`` (how long ago)."""
    try:
        then = datetime.datetime.fromisoformat(connected_at.replace("Z", "+00:00"))
    except ValueError:
        return connected_at
    return duration_text((now - then).total_seconds())


def endpoints_table(rows: list[dict[str, object]], now: datetime.datetime) -> str:
    """The agents as a table for humans (``revconn-gateway endpoints``)."""
    header = ("NAME", "TRANSPORT", "SINCE", "REMOTE", "RTT", "EPOCH", "VERSION")
    lines = [header]
    for row in rows:
        rtt = row.get("rtt_ms")
        flap = " (flapping)" if row.get("flapping") else ""
        lines.append(
            (
                f"{row.get('name')}{flap}",
                str(row.get("transport")),
                _since(str(row.get("connected_at")), now),
                str(row.get("remote") or "-"),
                "-" if rtt is None else f"{float(str(rtt)):.1f} ms",
                str(row.get("epoch")),
                str(row.get("version") or "-"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
    return text + ("\n(no agent online)" if not rows else "")


@main.command("endpoints")
@click.option(
    "--admin",
    "admin_url",
    default="http://127.0.0.1:8081",
    show_default=True,
    envvar="REVCONN_ADMIN_URL",
    help="The gateway's admin API (--admin-bind) (env REVCONN_ADMIN_URL).",
)
@click.option(
    "--token",
    "credential",
    envvar=["REVCONN_ADMIN_TOKEN", "REVCONN_SECRET"],
    help="An admin token or the shared secret (env REVCONN_ADMIN_TOKEN, else REVCONN_SECRET).",
)
@click.option("--json", "as_json", is_flag=True, help="The /endpoints JSON, for scripts.")
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True),
    help="Verify an https:// admin API against these PEM CA certificates.",
)
def endpoints_command(
    admin_url: str, credential: str | None, as_json: bool, ca_file: str | None
) -> None:
    """List the agents online (name, transport, since, remote, RTT, epoch, version)."""
    if not credential:
        fail(
            "no credential: pass --token with an admin token (`revconn-gateway token issue "
            "--admin`) or the shared secret, or set REVCONN_ADMIN_TOKEN",
            EXIT_CONFIG,
        )
    url = admin_url.rstrip("/") + "/endpoints"
    if urlsplit(url).scheme not in ("http", "https"):
        fail(f"--admin {admin_url!r}: give an http:// or https:// URL", EXIT_CONFIG)
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    payload = fetch_json(
        url,
        authorization=f"Bearer {credential}",
        context=context,
        auth_hint=" (check --token)",
        unreachable_hint="is --admin the gateway's --admin-bind?",
    )
    rows = payload.get("endpoints") if isinstance(payload, dict) else None
    if not isinstance(rows, list):
        fail(f"{url} did not answer with an endpoint list: is it a revconn gateway?", EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(endpoints_table(rows, datetime.datetime.now(datetime.UTC)))


# -- `revconn-gateway token ...`: keys and tokens, offline ----------------------------

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90d``, ``12h``, ``30m``, ``3600s`` or ``3600`` -> seconds; ConfigError otherwise."""
    match = _DURATION.fullmatch(text)
    seconds = float(match[1]) * _UNITS[match[2].lower()] if match else 0.0
    if seconds <= 0:
        raise ConfigError(
            f"--expires {text!r}: give a positive number with a unit s, m, h, d or w "
            "(for example 90d, 12h, 3600s)"
        )
    return seconds


@main.group(context_settings={"help_option_names": ["-h", "--help"]})
def token() -> None:
    """Signing keys and tokens (offline: no gateway is contacted).

    \b
    revconn-gateway token keygen /etc/revconn/token.key
    revconn-gateway token issue --key-file /etc/revconn/token.key laptop --expires 90d
    revconn-gateway token issue --key-file /etc/revconn/token.key --admin
    """


@token.command("keygen")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
def token_keygen(file: Path) -> None:
    """Write a new signing key to FILE (mode 0600; an existing file is never overwritten)."""
    key = SigningKey.generate()
    try:
        key.write(file)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
        return
    click.echo(f"wrote token key {key.id} to {file}", err=True)
    click.echo(f"  gateway:  revconn-gateway --token-key-file {file} ...", err=True)
    click.echo(f"  a token:  revconn-gateway token issue --key-file {file} NAME", err=True)


@token.command("issue")
@click.option(
    "--key-file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The signing key (`token keygen`); the gateway's first --token-key-file.",
)
@click.option(
    "--expires",
    metavar="DURATION",
    help="Lifetime, e.g. 90d, 12h, 30m, 3600s (default: no expiry; revoke it instead).",
)
@click.option("--admin", is_flag=True, help="An admin token (the admin API), bound to no agent.")
@click.option(
    "--json", "as_json", is_flag=True, help='Print {"token", "id", "name", "expires_at"}.'
)
@click.argument("name", required=False)
def token_issue(
    key_file: Path, expires: str | None, admin: bool, as_json: bool, name: str | None
) -> None:
    """Print a token for agent NAME (or, with --admin, an admin token).

    The token goes to stdout alone (or as JSON with --json); its id, which
    --revoked-file lists to revoke it, to stderr."""
    if admin and name is not None:
        fail(f"--admin tokens are bound to no agent: drop {name!r} or --admin", EXIT_CONFIG)
    if not admin and name is None:
        fail("give the agent NAME the token is for, or --admin", EXIT_CONFIG)
    try:
        lifetime = None if expires is None else parse_duration(expires)
        key = SigningKey.load(key_file)
        credential, claims = issue_token(key, name, admin=admin, expires_in=lifetime)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
        return
    expires_at = (
        None
        if claims.expires_at is None
        else datetime.datetime.fromtimestamp(claims.expires_at, datetime.UTC)
        .isoformat()
        .replace("+00:00", "Z")
    )
    if as_json:
        payload = {"token": credential, "id": claims.token_id, "name": name}
        click.echo(json.dumps({**payload, "expires_at": expires_at}))
    else:
        click.echo(credential)
    what = "admin token" if admin else f"token for agent {name!r}"
    until = f", expires {expires_at}" if expires_at else ", no expiry"
    click.echo(f"issued {what}: id {claims.token_id}{until} (key {key.id})", err=True)


def _loopback(url: str) -> str:
    """``url`` with an unspecified host (``0.0.0.0``, ``::``) replaced by loopback."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return url
    if not unspecified:
        return url
    netloc = "[::1]" if ":" in host else "127.0.0.1"
    return urlunsplit(parts._replace(netloc=f"{netloc}:{parts.port}"))


def _own_socket_context() -> ssl.SSLContext:
    """TLS for the demo agent, which dials this process's own listening socket
    on loopback: there is no one else to verify (the certificate names the
    public host, not 127.0.0.1)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
