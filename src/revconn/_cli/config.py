"""``--config FILE`` (TOML, read with the standard library) and an
environment variable for every option, for both executables.

Precedence, highest first: a flag on the command line, its environment
variable (``REVCONN_`` + the option's name, upper case, dashes as
underscores: ``--heartbeat-interval`` is ``REVCONN_HEARTBEAT_INTERVAL``), the
config file, the built-in default. That is click's own order for a
command's ``default_map``, which the file fills.

The file holds the options by their flag names (``heartbeat-interval = 15``;
underscores work too), at the top level or in a ``[gateway]`` / ``[agent]``
table (so that one file can serve both executables; a table's keys win over
top-level ones). Repeatable flags take a list (``bind = ["0.0.0.0:8080"]``),
switches a boolean. Every key is checked before anything starts: an unknown
key, or a value of the wrong kind, is an error naming the file, the key, the
value and what is wrong, exit 2.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .common import EXIT_CONFIG, fail

__all__ = ["config_option", "environment_for_every_option"]

F = TypeVar("F", bound=Callable[..., Any])

ENV_PREFIX = "REVCONN_"
SECRET_KEYS = frozenset({"secret", "token", "agent-basic-auth"})
"""Keys whose values are credentials: errors do not print them."""


def _flag_name(param: click.Parameter) -> str | None:
    """``heartbeat-interval`` for ``--heartbeat-interval`` (None: not an option)."""
    if not isinstance(param, click.Option):
        return None
    longs = [opt for opt in param.opts if opt.startswith("--")]
    return longs[0][2:] if longs else None


def environment_for_every_option(command: click.Command) -> click.Command:
    """Give each option of ``command`` that has none the variable
    ``REVCONN_<NAME>`` (``--config``, ``--help`` and ``--version`` aside)."""
    for param in command.params:
        name = _flag_name(param)
        if name is None or name in ("config", "help", "version") or param.envvar:
            continue
        param.envvar = ENV_PREFIX + name.upper().replace("-", "_")
    return command


def _check(param: click.Option, key: str, value: object, ctx: click.Context, where: str) -> object:
    """``value`` from the file for ``param``, as click will take it; exits 2 if it cannot."""

    # (a credential's value is never echoed: stderr goes to the journal)
    shown = "***" if key.replace("_", "-") in SECRET_KEYS else repr(value)

    def wrong(problem: str) -> None:
        if shown == "***":
            problem = "(value not shown: it is a credential)"
        fail(f"{where}: key {key!r} = {shown}: {problem}", EXIT_CONFIG)

    if param.is_flag and not param.multiple:
        if not isinstance(value, bool):
            wrong("expected true or false")
        return value
    values = value if param.multiple else [value]
    if param.multiple and not isinstance(value, list):
        wrong(f"--{key} is repeatable: give a list, e.g. {key} = [{value!r}]")
    assert isinstance(values, list)
    for item in values:
        if isinstance(item, dict | list):
            wrong("expected a single value (a string or a number)")
        try:
            param.type.convert(item, param, ctx)
        except click.BadParameter as exc:
            wrong(exc.format_message())
    return value


def _load(path: str, section: str, command: click.Command, ctx: click.Context) -> dict[str, object]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        fail(f"--config {path}: no such file", EXIT_CONFIG)
    except OSError as exc:
        fail(f"--config {path}: {exc.strerror}", EXIT_CONFIG)
    except tomllib.TOMLDecodeError as exc:
        fail(f"--config {path}: not valid TOML: {exc}", EXIT_CONFIG)
    options = {
        name: param
        for param in command.params
        if (name := _flag_name(param)) is not None and name not in ("config", "help", "version")
    }
    # ([gateway] and [agent] are tables; a top-level "gateway" string is the
    # agent's --gateway)
    tables = {k for k in ("gateway", "agent") if isinstance(data.get(k), dict)}
    chosen = data.get(section, {}) if section in tables else {}
    merged = {k: v for k, v in data.items() if k not in tables}
    merged.update(chosen)
    defaults: dict[str, object] = {}
    for raw_key, value in merged.items():
        key = raw_key.replace("_", "-")
        param = options.get(key)
        if param is None:
            close = difflib.get_close_matches(key, list(options), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"[{section}] " if raw_key in chosen else ""
            fail(f"--config {path}: unknown key {where}{raw_key!r}{hint}", EXIT_CONFIG)
        assert isinstance(param, click.Option) and param.name is not None
        defaults[param.name] = _check(param, raw_key, value, ctx, f"--config {path}")
    return defaults


def config_option(section: str) -> Callable[[F], F]:
    """The ``--config FILE`` option of a command whose file table is ``section``."""

    def load(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is None:
            return
        defaults = _load(os.fspath(value), section, ctx.command, ctx)
        ctx.default_map = {**(ctx.default_map or {}), **defaults}

    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        envvar=ENV_PREFIX + "CONFIG",
        is_eager=True,
        expose_value=False,
        callback=load,
        help=f"Read options from this TOML file (top level or a [{section}] table); flags "
        "and REVCONN_* variables win over it (env REVCONN_CONFIG).",
    )
