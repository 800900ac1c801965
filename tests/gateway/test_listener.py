"""The data-plane listener's sockets: options and clear errors for bad binds."""

from __future__ import annotations

import socket

import pytest

from revconn import ConfigError
from revconn._gateway.listener import listen_all, parse_bind, socket_url


def test_data_plane_sockets_get_nodelay_and_tcp_user_timeout() -> None:
    (sock,) = listen_all(["127.0.0.1:0"], 16, 25.0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 25_000
        assert socket_url(sock).startswith("http://127.0.0.1:")
        assert not socket_url(sock).endswith(":0")
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        ("nonsense", "expected HOST:PORT"),
        (":80", "expected HOST:PORT"),
        ("127.0.0.1:http", "not a number"),
        ("127.0.0.1:70000", "0-65535"),
    ],
)
def test_a_bad_bind_names_the_flag_and_the_problem(bind: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_bind(bind, "--admin-bind")
    assert str(info.value).startswith(f"--admin-bind {bind!r}")


def test_a_port_in_use_names_the_flag_and_closes_what_it_opened() -> None:
    (held,) = listen_all(["127.0.0.1:0"], 16, None)
    port = held.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=rf"cannot listen on --admin-bind 127.0.0.1:{port}"):
            listen_all(["127.0.0.1:0", f"127.0.0.1:{port}"], 16, None, "--admin-bind")
    finally:
        held.close()


def test_ipv6_url_is_bracketed() -> None:
    try:
        (sock,) = listen_all(["[::1]:0"], 16, None)
    except ConfigError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert socket_url(sock).startswith("http://[::1]:")
    finally:
        sock.close()
