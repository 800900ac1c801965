"""Reading a credential file (a token key, a secret, an agent's token) so
that nobody else could have read or swapped it: shared by both sides."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ._errors import ConfigError

__all__ = ["MAX_PRIVATE_FILE", "read_private"]

MAX_PRIVATE_FILE = 64 * 1024
"""Bytes a key or secret file may hold at most."""


def read_private(path: str | os.PathLike[str], label: str) -> str:
    """The ASCII text of a credential file, checked on the descriptor it is
    read from (no window between the check and the read): a regular file,
    accessible to its owner only, owned by this user (or root). Raises
    FileNotFoundError as is, ConfigError naming ``label`` and the file
    otherwise."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"{label} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{label} {path} is not a regular file")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{label} {path} is accessible to other users (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): run `chmod 600 {path}`"
            )
        if info.st_uid not in (os.geteuid(), 0):
            raise ConfigError(
                f"{label} {path} belongs to another user (uid {info.st_uid}): it must be "
                "owned by the user this process runs as"
            )
        data = os.read(fd, MAX_PRIVATE_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{label} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PRIVATE_FILE:
        raise ConfigError(f"{label} {path} is larger than {MAX_PRIVATE_FILE} bytes")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{label} {path}: not ASCII text") from None
