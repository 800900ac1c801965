"""What a tunnel runs over: a WebSocket seen as a stream of binary messages."""

from __future__ import annotations

from typing import Protocol

__all__ = ["MessageTransport"]


class MessageTransport(Protocol):
    """A WebSocket seen as a stream of binary messages."""

    async def send_message(self, data: bytes) -> None:
        """Send one binary message; raise ConnectionLost if the socket is gone."""
        ...

    async def receive_message(self) -> bytes:
        """Next binary message; raise ConnectionLost (with the close code) at the end."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with ``code``/``reason``; never raises for a dead socket."""
        ...
