"""What both executables share: exit codes, logging set-up, signal handling,
and mapping revconn's errors to a message and an exit code.

The executables themselves are thin: parse flags into config records, run the
library under trio, map expected failures to exit codes.
"""

from __future__ import annotations

import datetime
import http.client
import json
import logging
import signal
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import NoReturn

import click
import trio

from .._errors import (
    AuthError,
    CertificateVerifyError,
    ConfigError,
    ProtocolVersionError,
    ReplacedError,
    RevconnError,
    revconn_error_in,
)

__all__ = [
    "EXIT_AUTH",
    "EXIT_CONFIG",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REPLACED",
    "LOG_FORMAT_HELP",
    "TRACE_HELP",
    "duration_text",
    "fail",
    "fetch_json",
    "run",
    "setup_logging",
    "until_signal",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2  # also click's usage errors
EXIT_AUTH = 3
EXIT_REPLACED = 4

log = logging.getLogger("revconn.cli")


PROTOCOL_LOGGERS = ("hpack", "h2", "h11", "wsproto", "trio-websocket", "hypercorn", "quart")
"""Libraries whose debug lines show what crosses the wire: decoded header
values (cookies, ``Authorization``, the agent's credential) and bodies."""

TRACE_HELP = (
    "Also log the protocol libraries' debug lines (hpack, h2, h11, wsproto, "
    "trio-websocket): they include header values, cookies and credentials. For "
    "debugging only; needs --log-level debug."
)


LOG_KEYS = ("event", "agent", "epoch", "remote", "reason", "duration_ms")
"""The stable keys of ``--log-format json``: present on every line (null
when a line is not about them), set by the library's ``extra=``."""

LOG_FORMAT_HELP = (
    "text: one human line per event; json: one JSON object a line, with the stable keys "
    "ts, level, logger, message, " + ", ".join(LOG_KEYS) + "."
)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts`` (ISO 8601 UTC), ``level``, ``logger``,
    ``message``, then LOG_KEYS (null when absent) and, for an access-log
    line, ``method``, ``path``, ``status``, ``bytes_in``, ``bytes_out``."""

    EXTRA = ("method", "path", "status", "bytes_in", "bytes_out")

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, object] = {
            "ts": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        for key in LOG_KEYS:
            line[key] = fields.get(key)
        for key in self.EXTRA:
            if key in fields:
                line[key] = fields[key]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def setup_logging(level: str, *, trace_protocol: bool = False, log_format: str = "text") -> None:
    """Our log lines at ``level``, as text or JSON. The protocol libraries
    stay at WARNING at every level, debug included, unless
    ``trace_protocol``: nothing secret reaches a log by accident (revconn's
    own lines never carry a credential, a header value or a body)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    for name in PROTOCOL_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if trace_protocol else logging.WARNING)
    # hypercorn and quart are chatty at INFO about things we log ourselves.
    logging.getLogger("revconn.hypercorn").setLevel(logging.WARNING)


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


async def until_signal(stop: Callable[[], None], grace: float, cancel: trio.CancelScope) -> None:
    """On SIGTERM/SIGINT call ``stop()``; cancel ``cancel`` after ``grace`` seconds
    or at a second signal."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop()
            break
        with trio.move_on_after(grace) as waiting:
            async for signum in signals:
                log.warning(
                    "received %s again: stopping now, cutting off what is in flight",
                    signal.Signals(signum).name,
                )
                break
        if waiting.cancelled_caught:
            log.warning(
                "grace period (%g s) over: stopping now, cutting off what is in flight", grace
            )
        cancel.cancel()


def run(main: Callable[[], Awaitable[None]]) -> None:
    try:
        trio.run(main)
    except (RevconnError, BaseExceptionGroup) as exc:
        error = revconn_error_in(exc)
        if error is None:
            raise
        if isinstance(error, AuthError):
            fail(str(error), EXIT_AUTH)
        elif isinstance(error, ReplacedError):
            fail(f"{error}; not reconnecting (two agents must not share a name)", EXIT_REPLACED)
        elif isinstance(error, ConfigError | ProtocolVersionError | CertificateVerifyError):
            fail(str(error), EXIT_CONFIG)
        else:
            fail(str(error), EXIT_ERROR)


def duration_text(seconds: float) -> str:
    """``3h12m``, ``4m05s``, ``12s``, ``2d3h``: how long, for humans."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def fetch_json(
    url: str,
    *,
    unreachable_hint: str,
    auth_hint: str = "",
    authorization: str | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> object:
    """GET ``url`` and decode its JSON, or exit with a message: an HTTP error
    names the status and the answer's ``error: detail`` (exit 3 with
    ``auth_hint`` for 401/403, else 1), an unreachable URL says why and
    ``unreachable_hint`` (exit 1)."""
    request = urllib.request.Request(url)
    if authorization is not None:
        # (not sent on to wherever a redirect points: these APIs never redirect)
        request.add_unredirected_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read())
            reason = f"{answer.get('error')}: {answer.get('detail', '')}".rstrip(": ")
        except (ValueError, AttributeError):
            reason = exc.reason
        hint = auth_hint if exc.code in (401, 403) else ""
        fail(f"{url} answered HTTP {exc.code} {reason}{hint}", EXIT_AUTH if hint else EXIT_ERROR)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        fail(f"cannot reach {url}: {why} ({unreachable_hint})", EXIT_ERROR)
    except http.client.HTTPException as exc:  # not HTTP at all (another service's port)
        fail(
            f"{url} did not answer HTTP ({type(exc).__name__}: {exc}) ({unreachable_hint})",
            EXIT_ERROR,
        )
    try:
        return json.loads(body)
    except ValueError:
        fail(f"{url} did not answer JSON ({unreachable_hint})", EXIT_ERROR)
