"""Rules both ends of a tunnel share: valid agent names and WebSocket message sizes."""

from __future__ import annotations

import re

__all__ = ["MAX_MESSAGE_SIZE", "NAME_RULE", "valid_agent_name"]

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
NAME_RULE = "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
"""An agent name is one lowercase DNS label (RFC 1123)."""

MAX_MESSAGE_SIZE = 1 << 20
"""Largest WebSocket message either end accepts (1 MiB: far above one HTTP/2
frame of 128 KiB + 9). A tunnel sends at most 256 KiB per message."""


def valid_agent_name(name: str) -> bool:
    """A lowercase DNS label: ``[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?``."""
    return _NAME_RE.fullmatch(name) is not None
