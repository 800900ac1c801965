"""Serving an ASGI app on a local TCP port with hypercorn's trio worker
(``--no-tunnel``, and ``--tunnel-url`` with ``--app``).

hypercorn is imported only when an app is served: ``parse_listen``, used
while reading the configuration, loads nothing of it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import trio

from .._errors import ConfigError, FatalError
from .upstream import ASGIApp

__all__ = ["DEFAULT_LISTEN", "parse_listen", "serve_local"]

DEFAULT_LISTEN = "127.0.0.1:8000"


def parse_listen(listen: str, flag: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address) as (host, port); a
    ConfigError names ``flag``."""
    text, sep, port_text = listen.rpartition(":")
    bracketed = text.startswith("[") and text.endswith("]")
    host = text[1:-1] if bracketed else text
    if (
        not sep
        or not host
        # an IPv6 address needs brackets (the port would be ambiguous), only it has them
        or (":" in host) != bracketed
        or any(c.isspace() or c in "/[]@" for c in host)
    ):
        raise ConfigError(
            f"{flag} {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8000 or [::1]:8000"
        )
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ConfigError(f"{flag} {listen!r}: the port must be 0-65535 (0: any free port)")
    return host, int(port_text)


async def serve_local(
    app: ASGIApp,
    listen: str,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    flag: str = "--listen",
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (HOST:PORT; port 0 picks a free one) until
    ``shutdown_trigger()`` returns, then let requests in flight finish
    (hypercorn's graceful timeout, 3 s) and run the app's lifespan shutdown.

    ``task_status.started`` gets the URL served, with the bound port
    (``http://127.0.0.1:8000``). ConfigError for a malformed ``listen``,
    FatalError when the address cannot be bound (in use, not local); both
    name ``flag``.
    """
    host, port = parse_listen(listen, flag)
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # the app, or the gateway in front, logs requests
    config.errorlog = logging.getLogger("revconn.hypercorn")
    # ASGIApp is the plain ASGI signature; hypercorn's Framework spells out every event type.
    run = partial(serve, cast(Any, app), config, shutdown_trigger=shutdown_trigger, mode="asgi")
    async with trio.open_nursery() as nursery:
        try:
            binds: list[str] = await nursery.start(run)
        except (OSError, BaseExceptionGroup) as exc:
            # hypercorn binds inside its own nurseries: a taken port comes out
            # as an OSError, possibly in a group.
            error = _only_os_error(exc)
            if error is None:
                raise
            raise FatalError(
                f"cannot listen on {listen} ({flag}): {error.strerror or error}"
            ) from None
        task_status.started(binds[0])


def _only_os_error(exc: BaseException) -> OSError | None:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError) else None
