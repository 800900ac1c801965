"""``revconn-agent serve``: flags -> AgentConfig, then the agent until
SIGTERM/SIGINT. Loads nothing of the gateway side (tests check sys.modules)."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
import time
from functools import partial

import click
import trio

from .. import __version__
from .._agent.agent import Agent, AgentConfig
from .._agent.dial import is_loopback
from .._agent.local import DEFAULT_LISTEN, parse_listen, serve_local
from .._agent.upstream import ASGIApp
from .._errors import ConfigError
from .._files import read_private
from .._proto.announce import DEFAULT_INTERVAL, TTL_INTERVALS
from .._runtime.heartbeat import Heartbeat
from .._runtime.supervisor import Backoff
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

STOP_GRACE = 10.0
"""``--grace-period``'s default: time for requests in flight to finish after SIGTERM."""
DEFAULT_METRICS_BIND = "127.0.0.1:9465"
"""Where ``revconn-agent status`` looks by default (``--metrics-bind`` is off
unless given)."""
EXIT_NOT_ONLINE = 5
"""``revconn-agent status``: the agent answered, but is not online."""

log = logging.getLogger("revconn.agent")


def _load_app(ref: str, upstream: str | None) -> ASGIApp:
    """Import ``module:attribute`` (the current directory is importable)."""
    if upstream is not None:
        raise ConfigError("give either --upstream or --app, not both")
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--app {ref!r}: expected module:attribute, e.g. myservice.app:app")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--app {ref!r}: cannot import {module_name!r}: {exc}") from None
    app = module
    for part in attr.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise ConfigError(f"--app {ref!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(app):
        raise ConfigError(f"--app {ref!r} is not an ASGI application (not callable)")
    return app


def _secret(value: str | None, token: str | None = None) -> str:
    """The credential: --token, or else --secret. Click reads an empty
    REVCONN_SECRET/REVCONN_TOKEN as unset, so tell that apart from a missing
    one here."""
    if value and token:
        raise ConfigError(
            "give either --token (REVCONN_TOKEN) or --secret (REVCONN_SECRET), not both"
        )
    if token:
        return token
    if value:
        return value
    if token is None and os.environ.get("REVCONN_TOKEN") == "":
        raise ConfigError(
            "REVCONN_TOKEN is set but empty: set it to this agent's token, or pass --token"
        )
    if value is None and os.environ.get("REVCONN_SECRET") == "":
        raise ConfigError(
            "REVCONN_SECRET is set but empty: set it to the gateway's secret, or pass --secret"
        )
    if token is not None:
        raise ConfigError("--token is empty: pass this agent's token")
    if value is None:
        raise ConfigError(
            "no credential: pass --token (REVCONN_TOKEN) with this agent's token, or "
            "--secret (REVCONN_SECRET) with the gateway's shared secret"
        )
    raise ConfigError("--secret is empty: pass the gateway's secret")


def _token(token: str | None, token_file: str | None, secret: str | None) -> str | None:
    """--token, or the token --token-file holds (checked as the gateway checks
    its key files: a regular file nobody else can read)."""
    if token_file is None:
        return token
    if token or os.environ.get("REVCONN_TOKEN"):
        raise ConfigError(
            "give either --token (REVCONN_TOKEN) or --token-file (REVCONN_TOKEN_FILE), not both"
        )
    if secret:
        raise ConfigError(
            "give either --token-file (REVCONN_TOKEN_FILE) or --secret (REVCONN_SECRET), not both"
        )
    try:
        text = read_private(token_file, "--token-file").strip()
    except FileNotFoundError:
        raise ConfigError(f"--token-file {token_file}: no such file") from None
    if not text:
        raise ConfigError(f"--token-file {token_file} is empty: write this agent's token in it")
    return text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="revconn-agent")
def main() -> None:
    """revconn agent: makes a local service reachable through a revconn gateway."""


def _check_modes(
    *,
    no_tunnel: bool,
    tunnel_url: str | None,
    upstream: str | None,
    app_ref: str | None,
    listen: str | None,
    gateway: str | None,
    name: str | None,
    metrics_bind: str | None,
) -> None:
    """The flags that go together, per mode (click.UsageError: exit 2)."""
    if no_tunnel and metrics_bind is not None:
        raise click.UsageError(
            "--no-tunnel and --metrics-bind do not go together: with no tunnel there is no "
            "connection to report on (the app serves its own metrics, if any)"
        )
    if no_tunnel:
        if upstream is not None:
            raise click.UsageError(
                "--no-tunnel and --upstream do not go together: --no-tunnel serves an "
                "in-process --app on --listen; --upstream is for tunnel mode"
            )
        if tunnel_url is not None:
            raise click.UsageError(
                "--no-tunnel and --tunnel-url do not go together: --tunnel-url announces a URL "
                "to a gateway, --no-tunnel registers with none"
            )
        if app_ref is None:
            raise click.UsageError(
                "--no-tunnel needs --app module:attribute: the ASGI app to serve on --listen"
            )
        return
    if tunnel_url is not None and upstream is not None:
        raise click.UsageError(
            "--tunnel-url and --upstream do not go together: --upstream is for tunnel mode; "
            "with --tunnel-url the gateway connects to URL itself: drop --upstream"
        )
    if listen is not None:
        if tunnel_url is None:
            raise click.UsageError(
                "--listen goes with --tunnel-url or --no-tunnel: in tunnel mode the app is "
                "served through the tunnel, on no port"
            )
        if app_ref is None:
            raise click.UsageError(
                "--listen goes with --app: it is where --app is served next to --tunnel-url"
            )
    for flag, value, env in (
        ("--gateway", gateway, "REVCONN_GATEWAY"),
        ("--name", name, "REVCONN_NAME"),
    ):
        if value is None:
            raise click.UsageError(f"Missing option '{flag}' (or env {env}).")


@main.command("serve")
@config_option("agent")
@click.option(
    "--gateway",
    envvar="REVCONN_GATEWAY",
    help="Gateway URL: http, https, ws or wss (env REVCONN_GATEWAY). Not with --no-tunnel.",
)
@click.option(
    "--name",
    envvar="REVCONN_NAME",
    help="Agent name, a lowercase DNS label (env REVCONN_NAME). Not with --no-tunnel.",
)
@click.option(
    "--upstream",
    envvar="REVCONN_UPSTREAM",
    help="Local service URL requests are forwarded to (env REVCONN_UPSTREAM).",
)
@click.option("--secret", envvar="REVCONN_SECRET", help="Gateway secret (env REVCONN_SECRET).")
@click.option(
    "--token",
    envvar="REVCONN_TOKEN",
    help="This agent's token, from `revconn-gateway token issue` (env REVCONN_TOKEN); "
    "instead of --secret.",
)
@click.option(
    "--token-file",
    envvar="REVCONN_TOKEN_FILE",
    type=click.Path(dir_okay=False),
    help="Read this agent's token from FILE (mode 0600, owned by this user or root: a "
    "secret volume, systemd's credentials directory) instead of --token "
    "(env REVCONN_TOKEN_FILE).",
)
@click.option(
    "--ca-file",
    envvar="REVCONN_CA_FILE",
    type=click.Path(dir_okay=False),
    help="Verify an https:// gateway's certificate against the PEM CA certificates in "
    "this file instead of the system's (env REVCONN_CA_FILE).",
)
@click.option(
    "--insecure-plaintext",
    is_flag=True,
    help="Allow an http:// or ws:// gateway that is not on loopback: the secret then "
    "crosses the network in clear text.",
)
@click.option(
    "--app",
    "app_ref",
    envvar="REVCONN_APP",
    help="Serve an in-process ASGI app instead of --upstream: module:attribute (env REVCONN_APP).",
)
@click.option(
    "--tunnel-url",
    envvar="REVCONN_TUNNEL_URL",
    help="Announce mode: the http(s) URL the gateway reaches this service at; no tunnel "
    "(env REVCONN_TUNNEL_URL).",
)
@click.option(
    "--announce-interval",
    type=float,
    default=DEFAULT_INTERVAL,
    show_default=True,
    envvar="REVCONN_ANNOUNCE_INTERVAL",
    help=f"With --tunnel-url: time between announcements, in seconds; each lives "
    f"{TTL_INTERVALS} intervals (env REVCONN_ANNOUNCE_INTERVAL).",
)
@click.option(
    "--no-tunnel",
    is_flag=True,
    help="Serve --app on --listen only: no gateway, nothing registered.",
)
@click.option(
    "--listen",
    envvar="REVCONN_LISTEN",
    metavar="HOST:PORT",
    help=f"Where --app is served with --no-tunnel or --tunnel-url [default: {DEFAULT_LISTEN}] "
    "(env REVCONN_LISTEN).",
)
@click.option(
    "--upstream-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="How long to wait for the upstream's response, in seconds (then 504 upstream_timeout).",
)
@click.option(
    "--max-streams",
    type=int,
    default=100,
    show_default=True,
    help="Concurrent requests this agent accepts (then 503 agent_busy).",
)
@click.option(
    "--backoff-min",
    type=float,
    default=1.0,
    show_default=True,
    help="Shortest wait before redialing after a failure, in seconds.",
)
@click.option(
    "--backoff-max",
    type=float,
    default=30.0,
    show_default=True,
    help="Longest wait before redialing, in seconds (the wait doubles up to it, with jitter).",
)
@click.option(
    "--heartbeat-interval",
    type=float,
    default=15.0,
    show_default=True,
    help="Time between heartbeat PINGs to the gateway, in seconds.",
)
@click.option(
    "--heartbeat-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="How long to wait for a PING's acknowledgement before redialing, in seconds.",
)
@click.option(
    "--handshake-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Time allowed for each of the TCP/TLS connect, the WebSocket upgrade and the "
    "tunnel handshake, in seconds (with --tunnel-url: for each announcement).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--grace-period",
    type=float,
    default=STOP_GRACE,
    show_default=True,
    envvar="REVCONN_GRACE_PERIOD",
    help="On SIGTERM/SIGINT: seconds requests in flight may take to finish (the gateway "
    "sends no new ones) before the tunnel closes; a second signal stops at once, and with "
    "nothing in flight the agent exits at once (env REVCONN_GRACE_PERIOD).",
)
@click.option(
    "--metrics-bind",
    envvar="REVCONN_METRICS_BIND",
    metavar="HOST:PORT",
    help=f"Serve GET /metrics (Prometheus) and GET /status (what `revconn-agent status` "
    f"reads) on HOST:PORT, e.g. {DEFAULT_METRICS_BIND}. No authentication: keep it on "
    "loopback or a private network (env REVCONN_METRICS_BIND).",
)
@click.option("--trace-protocol", is_flag=True, help=TRACE_HELP)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help=LOG_FORMAT_HELP,
)
def agent_serve(
    gateway: str | None,
    name: str | None,
    upstream: str | None,
    secret: str | None,
    token: str | None,
    token_file: str | None,
    ca_file: str | None,
    insecure_plaintext: bool,
    app_ref: str | None,
    tunnel_url: str | None,
    announce_interval: float,
    no_tunnel: bool,
    listen: str | None,
    upstream_timeout: float,
    max_streams: int,
    backoff_min: float,
    backoff_max: float,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    handshake_timeout: float,
    log_level: str,
    grace_period: float,
    metrics_bind: str | None,
    trace_protocol: bool,
    log_format: str,
) -> None:
    """Serve until SIGTERM/SIGINT, in one of three modes:

    \b
    tunnel:    --upstream URL | --app M:A; --gateway sends requests over a WebSocket
    announce:  --tunnel-url URL [--app M:A]; --gateway connects to URL itself
    no tunnel: --no-tunnel --app M:A; served on --listen, registered with no gateway
    """
    _check_modes(
        no_tunnel=no_tunnel,
        tunnel_url=tunnel_url,
        upstream=upstream,
        app_ref=app_ref,
        listen=listen,
        gateway=gateway,
        name=name,
        metrics_bind=metrics_bind,
    )
    setup_logging(log_level, trace_protocol=trace_protocol, log_format=log_format)
    if not (math.isfinite(grace_period) and grace_period >= 0):
        fail(f"--grace-period {grace_period:g}: give a number of seconds >= 0", EXIT_CONFIG)
    if no_tunnel:
        assert app_ref is not None
        _serve_without_tunnel(app_ref, listen or DEFAULT_LISTEN, grace_period)
        return
    assert gateway is not None and name is not None
    try:
        config = AgentConfig(
            gateway=gateway,
            name=name,
            secret=_secret(secret, _token(token, token_file, secret)),
            upstream=upstream,
            upstream_timeout=upstream_timeout,
            max_concurrent_streams=max_streams,
            backoff=Backoff(backoff_min, backoff_max),
            heartbeat=Heartbeat(heartbeat_interval, heartbeat_timeout),
            handshake_timeout=handshake_timeout,
            tunnel_url=tunnel_url,
            announce_interval=announce_interval,
            listen=listen,
            ca_file=ca_file,
            insecure_plaintext=insecure_plaintext,
        )
        if metrics_bind is not None:
            parse_listen(metrics_bind, "--metrics-bind")
        app = _load_app(app_ref, upstream) if app_ref is not None else None
        agent = Agent(config, app=app)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
        return

    async def main_task() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_signal, agent.stop, grace_period, nursery.cancel_scope)
            if metrics_bind is not None:
                await nursery.start(_serve_metrics, agent, metrics_bind)
            await agent.run()
            nursery.cancel_scope.cancel()

    run(main_task)


async def _serve_metrics(
    agent: Agent, bind: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """``--metrics-bind``: /metrics and /status until cancelled (the agent has stopped)."""
    from .._agent.metrics import metrics_app  # prometheus-client, hypercorn: only if asked

    host, _ = parse_listen(bind, "--metrics-bind")
    if not is_loopback(host):
        log.warning(
            "--metrics-bind %s is not a loopback address: /metrics and /status have no "
            "authentication (they name the agent, its gateway and public URLs)",
            bind,
        )
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            partial(
                serve_local,
                metrics_app(agent),
                bind,
                shutdown_trigger=trio.sleep_forever,
                flag="--metrics-bind",
            )
        )
        log.info("metrics on %s/metrics, status on %s/status", url, url)
        task_status.started()


environment_for_every_option(agent_serve)


def _serve_without_tunnel(app_ref: str, listen: str, grace_period: float) -> None:
    """``--no-tunnel``: the app on ``listen`` until SIGTERM/SIGINT, no gateway."""
    try:
        parse_listen(listen)
        app = _load_app(app_ref, None)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
        return

    async def main_task() -> None:
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_signal, done.set, grace_period, nursery.cancel_scope)
            # The server returns once done is set and its requests in flight
            # are over (a second signal, or the grace period, cancels it).
            async with trio.open_nursery() as server:
                url = await server.start(
                    partial(serve_local, app, listen, shutdown_trigger=done.wait)
                )
                log.info(
                    "serving %s on %s (no tunnel: not registered with any gateway)", app_ref, url
                )
            nursery.cancel_scope.cancel()

    run(main_task)


# -- `revconn-agent status`: a running agent's state, from its --metrics-bind ---------


def status_text(status: dict[str, object], now: float) -> str:
    """``GET /status`` for humans (``revconn-agent status``)."""
    state = str(status.get("state"))
    since = status.get("state_since")
    lasting = f" for {duration_text(now - since)}" if isinstance(since, int | float) else ""
    line = f"{state}{lasting}"
    retry_in = status.get("retry_in_s")
    if state == "retrying" and isinstance(retry_in, int | float):
        attempts = status.get("attempts")
        upcoming = attempts + 1 if isinstance(attempts, int) else "?"
        line = f"retrying in {retry_in:.1f} s (attempt {upcoming} next)"
    rtt = status.get("rtt_ms")
    disconnects = status.get("disconnects")
    lost = (
        ", ".join(f"{reason} x{count}" for reason, count in disconnects.items())
        if isinstance(disconnects, dict) and disconnects
        else "none"
    )
    rows = [
        (
            "agent",
            f"{status.get('name')} (revconn-agent {status.get('version')}, "
            f"{status.get('mode')} mode)",
        ),
        ("state", line),
        ("public", " and ".join(str(u) for u in _items(status.get("public_urls"))) or "-"),
        ("gateway", str(status.get("gateway"))),
        ("upstream", str(status.get("upstream"))),
        ("rtt", "-" if not isinstance(rtt, int | float) else f"{rtt:.1f} ms"),
        (
            "requests",
            f"{status.get('answers')} answered, {status.get('upstream_unreachable')} refused "
            f"(upstream unreachable); streams: {status.get('streams_open')} open, "
            f"{status.get('streams')} opened",
        ),
        (
            "sessions",
            f"{status.get('connects')} up ({status.get('reconnects')} reconnects), "
            f"failed attempts: {status.get('connect_failures')}, lost: {lost}",
        ),
    ]
    if status.get("last_error"):
        rows.append(("last error", str(status["last_error"])))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _items(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


@main.command("status")
@click.option(
    "--agent",
    "agent_url",
    default=f"http://{DEFAULT_METRICS_BIND}",
    show_default=True,
    envvar="REVCONN_AGENT_URL",
    help="The agent's --metrics-bind address (HOST:PORT or a URL) (env REVCONN_AGENT_URL).",
)
@click.option("--json", "as_json", is_flag=True, help="The /status JSON, for scripts.")
def status_command(agent_url: str, as_json: bool) -> None:
    """Show a running agent's state (it must run with --metrics-bind).

    Exits 0 when the agent is online, 5 when it answers but is not (connecting,
    retrying, stopping), 1 when it cannot be reached.
    """
    base = agent_url if "://" in agent_url else f"http://{agent_url}"
    url = base.rstrip("/") + "/status"
    if not url.startswith(("http://", "https://")):
        fail(f"--agent {agent_url!r}: give HOST:PORT or an http:// URL", EXIT_CONFIG)
    status = fetch_json(
        url,
        timeout=3.0,  # a local endpoint answers at once, or is not the agent's
        unreachable_hint=(
            f"start the agent with --metrics-bind {DEFAULT_METRICS_BIND}, or pass its "
            "--metrics-bind address with --agent"
        ),
    )
    if not isinstance(status, dict) or "state" not in status:
        fail(f"{url} did not answer with an agent's status: is it a revconn agent?", EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        click.echo(status_text(status, time.time()))
    if status.get("state") != "online":
        sys.exit(EXIT_NOT_ONLINE)
