"""``revconn-agent serve``: flags -> AgentConfig, then the agent until
SIGTERM/SIGINT. Loads nothing of the gateway side (tests check sys.modules)."""

from __future__ import annotations

import importlib
import os
import sys

import click
import trio

from .._agent.agent import Agent, AgentConfig
from .._agent.upstream import ASGIApp
from .._errors import ConfigError
from .._runtime.heartbeat import Heartbeat
from .._runtime.supervisor import Backoff
from .common import EXIT_CONFIG, fail, run, setup_logging, until_signal

__all__ = ["main"]

STOP_GRACE = 10.0  # time for requests in flight to finish after SIGTERM


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


def _secret(value: str | None) -> str:
    """The --secret value; click reads an empty REVCONN_SECRET as unset, so tell
    that apart from a missing one here."""
    if value:
        return value
    if value is None and os.environ.get("REVCONN_SECRET") == "":
        raise ConfigError(
            "REVCONN_SECRET is set but empty: set it to the gateway's secret, or pass --secret"
        )
    if value is None:
        raise ConfigError("no secret: pass --secret or set REVCONN_SECRET")
    raise ConfigError("--secret is empty: pass the gateway's secret")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """revconn agent: makes a local service reachable through a revconn gateway."""


@main.command("serve")
@click.option(
    "--gateway",
    envvar="REVCONN_GATEWAY",
    required=True,
    help="Gateway URL: http, https, ws or wss (env REVCONN_GATEWAY).",
)
@click.option(
    "--name",
    envvar="REVCONN_NAME",
    required=True,
    help="Agent name, a lowercase DNS label (env REVCONN_NAME).",
)
@click.option(
    "--upstream",
    envvar="REVCONN_UPSTREAM",
    help="Local service URL requests are forwarded to (env REVCONN_UPSTREAM).",
)
@click.option("--secret", envvar="REVCONN_SECRET", help="Gateway secret (env REVCONN_SECRET).")
@click.option(
    "--app",
    "app_ref",
    envvar="REVCONN_APP",
    help="Serve an in-process ASGI app instead of --upstream: module:attribute (env REVCONN_APP).",
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
    "tunnel handshake, in seconds.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def agent_serve(
    gateway: str,
    name: str,
    upstream: str | None,
    secret: str | None,
    app_ref: str | None,
    upstream_timeout: float,
    max_streams: int,
    backoff_min: float,
    backoff_max: float,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    handshake_timeout: float,
    log_level: str,
) -> None:
    """Connect to the gateway and keep the tunnel up until SIGTERM/SIGINT."""
    setup_logging(log_level)
    try:
        config = AgentConfig(
            gateway=gateway,
            name=name,
            secret=_secret(secret),
            upstream=upstream,
            upstream_timeout=upstream_timeout,
            max_concurrent_streams=max_streams,
            backoff=Backoff(backoff_min, backoff_max),
            heartbeat=Heartbeat(heartbeat_interval, heartbeat_timeout),
            handshake_timeout=handshake_timeout,
        )
        app = _load_app(app_ref, upstream) if app_ref is not None else None
        agent = Agent(config, app=app)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
        return

    async def main_task() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_signal, agent.stop, STOP_GRACE, nursery.cancel_scope)
            await agent.run()
            nursery.cancel_scope.cancel()

    run(main_task)
