"""The two executables: ``revconn-gateway`` and ``revconn-agent serve``.

Thin: parse flags into config records, configure logging, run the library
under trio with signal handling, map expected failures to exit codes.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import click
import trio

from ._agent import Agent, AgentConfig
from ._auth import SharedSecretPolicy, generate_secret
from ._demo import demo_app
from ._errors import AuthError, ConfigError, ReplacedError, RevconnError
from ._gateway import Gateway, GatewayConfig
from ._supervisor import Backoff
from ._tunnel import Heartbeat
from ._upstream import ASGIApp

__all__ = ["EXIT_AUTH", "EXIT_CONFIG", "EXIT_REPLACED", "agent_main", "gateway_main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2  # also click's usage errors
EXIT_AUTH = 3
EXIT_REPLACED = 4

DEMO_NAME = "demo"
STOP_GRACE = 10.0  # agent: time for requests in flight to finish after SIGTERM

log = logging.getLogger("revconn.cli")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # hypercorn and quart are chatty at INFO about things we log ourselves.
    logging.getLogger("revconn.hypercorn").setLevel(logging.WARNING)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


async def _until_signal(stop: Callable[[], None], grace: float, cancel: trio.CancelScope) -> None:
    """On SIGTERM/SIGINT call ``stop()``; cancel ``cancel`` after ``grace`` seconds
    or at a second signal."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop()
            break
        with trio.move_on_after(grace):
            async for _ in signals:
                break
        cancel.cancel()


def _run(main: Callable[[], Awaitable[None]]) -> None:
    try:
        trio.run(main)
    except (RevconnError, BaseExceptionGroup) as exc:
        error = _revconn_error(exc)
        if error is None:
            raise
        if isinstance(error, AuthError):
            _fail(str(error), EXIT_AUTH)
        elif isinstance(error, ReplacedError):
            _fail(f"{error}; not reconnecting (two agents must not share a name)", EXIT_REPLACED)
        elif isinstance(error, ConfigError):
            _fail(str(error), EXIT_CONFIG)
        else:
            _fail(str(error), EXIT_ERROR)


def _revconn_error(exc: BaseException) -> RevconnError | None:
    """The RevconnError behind ``exc``, seeing through nursery exception groups.

    None if anything else is in there (a bug must show its traceback).
    """
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc if isinstance(exc, RevconnError) else None


# -- gateway ----------------------------------------------------------------------
def _load_secret(secret: str | None, secret_file: Path | None) -> tuple[str, bool]:
    """(secret, generated?) from --secret / --secret-file / REVCONN_SECRET."""
    if secret is not None and secret_file is not None:
        raise ConfigError("give either --secret (or REVCONN_SECRET) or --secret-file, not both")
    if secret_file is not None:
        try:
            text = secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--secret-file {secret_file}: {exc.strerror}") from None
        if not text:
            raise ConfigError(f"--secret-file {secret_file} is empty")
        return text, False
    if secret is not None:
        return secret, False
    if "REVCONN_SECRET" in os.environ:  # click reads an empty variable as unset
        raise ConfigError(
            "the gateway secret is empty (REVCONN_SECRET is set but empty): set it, "
            "or unset it to have one generated"
        )
    return generate_secret(), True


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--bind",
    "binds",
    multiple=True,
    default=("127.0.0.1:8080",),
    show_default=True,
    help="HOST:PORT to listen on; repeatable. Port 0 picks a free port.",
)
@click.option(
    "--public-bind",
    "public_binds",
    multiple=True,
    help="HOST:PORT for the dedicated public listener (/a/NAME/... only, the fast "
    "path); repeatable. Without it, public traffic uses /a/ on --bind.",
)
@click.option("--secret", envvar="REVCONN_SECRET", help="Shared secret (env REVCONN_SECRET).")
@click.option(
    "--secret-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Read the shared secret from this file.",
)
@click.option("--heartbeat-interval", type=float, default=15.0, show_default=True)
@click.option("--heartbeat-timeout", type=float, default=10.0, show_default=True)
@click.option("--handshake-timeout", type=float, default=10.0, show_default=True)
@click.option("--demo", is_flag=True, help="Also run an in-process demo agent named 'demo'.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def gateway_main(
    binds: tuple[str, ...],
    public_binds: tuple[str, ...],
    secret: str | None,
    secret_file: Path | None,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    handshake_timeout: float,
    demo: bool,
    log_level: str,
) -> None:
    """Run the revconn gateway: agents connect to /ws/connect, operators list /endpoints."""
    _setup_logging(log_level)
    try:
        key, generated = _load_secret(secret, secret_file)
        policy = SharedSecretPolicy(key)
        config = GatewayConfig(
            binds=binds,
            public_binds=public_binds,
            heartbeat=Heartbeat(heartbeat_interval, heartbeat_timeout),
            handshake_timeout=handshake_timeout,
        )
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
        return
    gateway = Gateway(config, policy)

    async def main() -> None:
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
                _until_signal, begin_stop, config.graceful_timeout + 5.0, nursery.cancel_scope
            )
            urls: list[str] = await nursery.start(serve)
            base = urls[0]
            click.echo(f"revconn-gateway listening on {', '.join(urls)}")
            if gateway.public_urls:
                click.echo(f"public traffic on {', '.join(gateway.public_urls)}")
            public = (gateway.public_urls or urls)[0]
            if generated:
                click.echo(f"generated secret (shown once): {key}")
            if demo:
                # The demo agent dials the address actually bound (port 0 resolved).
                agent = Agent(AgentConfig(gateway=base, name=DEMO_NAME, secret=key), app=demo_app)
                agents.append(agent)
                nursery.start_soon(agent.run)
                click.echo(f"demo agent {DEMO_NAME!r} connecting; its page, through the tunnel:")
                click.echo(f"  curl {public}/a/{DEMO_NAME}/")
                click.echo("list the agents with:")
                click.echo(f"  curl -H 'Authorization: Bearer {key}' {base}/endpoints")
            sys.stdout.flush()

    _run(main)


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


# -- agent ----------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def agent_main() -> None:
    """revconn agent: makes a local service reachable through a revconn gateway."""


@agent_main.command("serve")
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
@click.option(
    "--secret", envvar="REVCONN_SECRET", required=True, help="Gateway secret (env REVCONN_SECRET)."
)
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
    help="Seconds to wait for the upstream's response (then 504 upstream_timeout).",
)
@click.option(
    "--max-streams",
    type=int,
    default=100,
    show_default=True,
    help="Concurrent requests this agent accepts (then 503 agent_busy).",
)
@click.option("--backoff-min", type=float, default=1.0, show_default=True)
@click.option("--backoff-max", type=float, default=30.0, show_default=True)
@click.option("--heartbeat-interval", type=float, default=15.0, show_default=True)
@click.option("--heartbeat-timeout", type=float, default=10.0, show_default=True)
@click.option("--handshake-timeout", type=float, default=10.0, show_default=True)
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
    secret: str,
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
    _setup_logging(log_level)
    try:
        config = AgentConfig(
            gateway=gateway,
            name=name,
            secret=secret,
            upstream=upstream,
            upstream_timeout=upstream_timeout,
            max_concurrent_streams=max_streams,
            backoff=Backoff(backoff_min, backoff_max),
            heartbeat=Heartbeat(heartbeat_interval, heartbeat_timeout),
            handshake_timeout=handshake_timeout,
        )
        app = _load_app(app_ref, upstream) if app_ref is not None else None
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
        return
    agent = Agent(config, app=app)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_signal, agent.stop, STOP_GRACE, nursery.cancel_scope)
            await agent.run()
            nursery.cancel_scope.cancel()

    _run(main)
