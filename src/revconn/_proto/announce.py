"""The announce request (sans-I/O): an agent whose service is reachable by
another route tells the gateway that URL, by heartbeat, instead of opening a
tunnel (docs/protocol.md section 8).

Both sides share this module: the agent builds the request body, the gateway
parses and validates it. What an announced URL may be is decided here; which
*addresses* the gateway will connect to (SSRF) is the gateway's policy.
"""

from __future__ import annotations

import json
import math
import re
from urllib.parse import quote, urlsplit

import attrs

__all__ = [
    "ANNOUNCE_PATH",
    "DEFAULT_INTERVAL",
    "MAX_BODY",
    "MAX_TTL",
    "MIN_TTL",
    "TTL_INTERVALS",
    "AnnouncedUrl",
    "Announcement",
    "announce_target",
    "announcement_body",
    "parse_announcement",
    "parse_url",
]

ANNOUNCE_PATH = "/announce"
"""``PUT`` announces or renews, ``DELETE`` withdraws (``?name=NAME``)."""
DEFAULT_INTERVAL = 10.0
"""Seconds between an agent's announcements."""
TTL_INTERVALS = 3
"""An announcement lives for this many intervals unless renewed."""
MIN_TTL = 1.0
MAX_TTL = 3600.0
MAX_BODY = 8 * 1024
"""Largest announce request body the gateway reads (413 beyond)."""
MAX_URL = 2048
_HOST = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_.])?")


@attrs.frozen(slots=True)
class AnnouncedUrl:
    """A validated base URL: ``http(s)://host[:port][/prefix]``."""

    text: str
    """Normalized: lower-case scheme and host, default port omitted, one trailing slash."""
    scheme: str
    host: str
    """The host name or IP literal (IPv6 without brackets), lower case."""
    port: int
    prefix: bytes
    """Path prefix put before every forwarded target (b"" for none; no trailing slash)."""
    authority: bytes
    """The Host header the service expects: host, and the port if not the default."""

    @property
    def secure(self) -> bool:
        return self.scheme == "https"


def parse_url(text: str) -> AnnouncedUrl:
    """Validate an announced URL; ValueError says what is wrong with it."""
    if not isinstance(text, str) or not text:
        raise ValueError("the URL is empty")
    if len(text) > MAX_URL:
        raise ValueError(f"the URL is longer than {MAX_URL} characters")
    if not text.isascii() or any(c <= " " or c == "\x7f" for c in text):
        raise ValueError(
            "the URL must be ASCII without spaces or control characters "
            "(percent-encode the path, punycode the host)"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"the URL is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("the URL must start with http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the URL must not carry credentials (user:password@)")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError("the URL has no host")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError("the URL must not carry a query or fragment: give the base URL")
    if port == 0:
        raise ValueError("the URL's port must be 1-65535")
    bracketed = f"[{host}]" if ":" in host else host
    given = bracketed if parts.port is None else f"{bracketed}:{parts.port}"
    if parts.netloc.lower() not in (given, f"{bracketed}:{port_text(parts.netloc)}"):
        raise ValueError(f"the URL's host and port {parts.netloc!r} are malformed")
    if not (parts.netloc.startswith("[") and ":" in host) and not _HOST.fullmatch(host):
        raise ValueError(f"the URL's host {host!r} is not a host name or an IP address")
    default = 443 if scheme == "https" else 80
    port = default if port is None else port
    netloc = bracketed
    if port != default:
        netloc += f":{port}"
    path = parts.path.rstrip("/")
    if path and not path.startswith("/"):
        raise ValueError("the URL's path must start with /")
    return AnnouncedUrl(
        text=f"{scheme}://{netloc}{path}/",
        scheme=scheme,
        host=host,
        port=port,
        prefix=path.encode("ascii"),
        authority=netloc.encode("ascii"),
    )


def port_text(netloc: str) -> str:
    """The port as written after the host (``"08080"`` stays as it is)."""
    return netloc.rpartition("]")[2].rpartition(":")[2] if ":" in netloc else ""


@attrs.frozen(slots=True)
class Announcement:
    """What an announce request asks for."""

    url: AnnouncedUrl
    ttl: float
    epoch: int | None
    """The epoch of the announcement this one renews (None: a new one)."""


def parse_announcement(body: bytes) -> Announcement:
    """The JSON body ``{"url": ..., "ttl": ..., "epoch": ...}``; ValueError
    names the field that is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError('the body must be JSON: {"url": "https://...", "ttl": 30}') from None
    if not isinstance(data, dict):
        raise ValueError('the body must be a JSON object: {"url": "https://...", "ttl": 30}')  # noqa: TRY004
    unknown = sorted(set(data) - {"url", "ttl", "epoch"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (known: url, ttl, epoch)")
    if "url" not in data or not isinstance(data["url"], str):
        raise ValueError('"url" is missing or not a string')
    try:
        url = parse_url(data["url"])
    except ValueError as exc:
        raise ValueError(f'"url": {exc}') from None
    ttl = data.get("ttl", DEFAULT_INTERVAL * TTL_INTERVALS)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        raise ValueError('"ttl" must be a number of seconds')
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise ValueError(f'"ttl" must be {MIN_TTL:g}-{MAX_TTL:g} seconds, got {ttl!r}')
    epoch = data.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1):
        raise ValueError('"epoch" must be a positive integer (from an earlier answer) or absent')
    return Announcement(url, float(ttl), epoch)


def announcement_body(url: str, ttl: float, epoch: int | None = None) -> bytes:
    payload: dict[str, object] = {"url": url, "ttl": ttl}
    if epoch is not None:
        payload["epoch"] = epoch
    return json.dumps(payload, separators=(",", ":")).encode()


def announce_target(prefix: str, name: str, epoch: int | None = None) -> str:
    """The request target: ``PREFIX/announce?name=NAME[&epoch=N]``."""
    query = f"name={quote(name)}"
    if epoch is not None:
        query += f"&epoch={epoch}"
    return f"{prefix.rstrip('/')}{ANNOUNCE_PATH}?{query}"
