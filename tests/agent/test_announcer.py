"""Announce mode (``--tunnel-url``): the schedule in exact virtual time, what
each gateway answer means, the withdrawal on stop, and the HTTP request on a
real socket."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from functools import partial

import attrs
import httpx
import pytest
import trio
import trio.testing

from revconn import (
    Agent,
    AgentConfig,
    AuthError,
    ConfigError,
    ConnectError,
    FatalError,
    ReplacedError,
)
from revconn._agent.announcer import MAX_ANSWER, WITHDRAW_TIMEOUT, Announcer, HttpExchange
from revconn._agent.dial import USER_AGENT

from .. import upstream_app

SECRET = "announce-secret-abcdefghijklmnop"
SERVICE = "http://svc.example:8000"
NORMALIZED = "http://svc.example:8000/"
OK = (200, {"name": "probe", "transport": "url", "url": NORMALIZED, "epoch": 12, "ttl": 30})
WITHDRAWN = (200, {"name": "probe", "withdrawn": True})
HANG = object()
"""An answer that never comes."""

Answer = tuple[int, dict[str, object]] | BaseException | object


def config(**changes: object) -> AgentConfig:
    settings: dict[str, object] = {
        "gateway": "https://gw.example",
        "name": "probe",
        "secret": SECRET,
        "tunnel_url": SERVICE,
        "handshake_timeout": 3.0,
    }
    settings.update(changes)
    return AgentConfig(**settings)  # type: ignore[arg-type]


@attrs.frozen
class Call:
    at: float
    method: bytes
    target: str
    body: dict[str, object] | None


class FakeGateway:
    """An Exchange answering PUTs from a script (the last answer repeats) and
    DELETEs with ``delete``; it records every call and its virtual time."""

    def __init__(self, *answers: Answer, delete: Answer = WITHDRAWN) -> None:
        self.answers = list(answers or [OK])
        self.delete = delete
        self.calls: list[Call] = []
        self._wanted = 0
        self._reached = trio.Event()

    async def __call__(
        self, method: bytes, target: str, body: bytes
    ) -> tuple[int, dict[str, object]]:
        self.calls.append(
            Call(trio.current_time(), method, target, json.loads(body) if body else None)
        )
        if len(self.calls) == self._wanted:
            self._reached.set()
        if method == b"DELETE":
            answer = self.delete
        else:
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer is HANG:
            await trio.sleep_forever()
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, tuple)
        return answer

    async def wait_calls(self, count: int) -> None:
        if len(self.calls) < count:
            self._wanted, self._reached = count, trio.Event()
            await self._reached.wait()

    @property
    def puts(self) -> list[Call]:
        return [c for c in self.calls if c.method == b"PUT"]

    @property
    def deletes(self) -> list[Call]:
        return [c for c in self.calls if c.method == b"DELETE"]


def agent_logs(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "revconn.agent"]


# -- configuration ---------------------------------------------------------------


def test_config_rejects_a_bad_tunnel_url() -> None:
    with pytest.raises(ConfigError, match=r"^--tunnel-url 'ftp://x': the URL must start with"):
        config(tunnel_url="ftp://x")
    with pytest.raises(ConfigError, match=r"--tunnel-url 'http://svc\?a=1': .*query"):
        config(tunnel_url="http://svc?a=1")


def test_config_rejects_upstream_with_tunnel_url() -> None:
    with pytest.raises(ConfigError, match=r"--upstream is for tunnel mode; .* drop --upstream"):
        config(upstream="http://127.0.0.1:9")


@pytest.mark.parametrize("interval", [0.0, -1.0, 0.3, 1200.5, float("nan"), float("inf")])
def test_config_rejects_an_interval_whose_ttl_is_out_of_range(interval: float) -> None:
    with pytest.raises(ConfigError, match=r"^--announce-interval .*: must be 0.333-1200 seconds"):
        config(announce_interval=interval)


def test_config_listen_goes_with_tunnel_url_and_an_app() -> None:
    with pytest.raises(ConfigError, match=r"^--listen is for --tunnel-url"):
        AgentConfig(
            gateway="https://gw.example", name="probe", secret=SECRET, upstream="http://u:1",
            listen="127.0.0.1:0",
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"^--listen 'nope': expected HOST:PORT"):
        config(listen="nope")
    with pytest.raises(ConfigError, match="nothing to serve there: pass --app"):
        Agent(config(listen="127.0.0.1:0"))
    Agent(config())  # no app, nothing served locally: fine


# -- the schedule ------------------------------------------------------------------


async def test_announces_every_interval_from_the_start_of_each_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(OK)
    announcer = Announcer(config(), exchange=gateway)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(announcer.run)
        await gateway.wait_calls(4)
        nursery.cancel_scope.cancel()
    assert [c.at - start for c in gateway.calls] == [0.0, 10.0, 20.0, 30.0]
    assert {(c.method, c.target) for c in gateway.calls} == {(b"PUT", "/announce?name=probe")}
    assert [c.body for c in gateway.calls] == [
        {"url": NORMALIZED, "ttl": 30},  # the first: no epoch
        *[{"url": NORMALIZED, "ttl": 30, "epoch": 12}] * 3,
    ]
    assert not gateway.deletes  # cancelled, not stopped: no withdrawal


async def test_a_slow_answer_does_not_shift_the_schedule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(method: bytes, target: str, body: bytes) -> tuple[int, dict[str, object]]:
        started.append(trio.current_time() - start)
        await trio.sleep(2.5)
        return OK

    started: list[float] = []
    announcer = Announcer(config(announce_interval=4.0), exchange=slow)
    start = trio.current_time()
    with trio.move_on_after(13.0):
        await announcer.run()
    assert started == [0.0, 4.0, 8.0, 12.0]
    assert announcer.ttl == 12


async def test_fractional_interval_gives_a_fractional_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(OK)
    announcer = Announcer(config(announce_interval=2.5), exchange=gateway)
    with trio.move_on_after(6.0):
        await announcer.run()
    assert [c.at for c in gateway.calls] == [0.0, 2.5, 5.0]
    assert gateway.calls[0].body == {"url": NORMALIZED, "ttl": 7.5}


async def test_gateway_path_prefix_is_kept(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway(OK)
    announcer = Announcer(config(gateway="https://gw.example/revconn/"), exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer.run)
        await gateway.wait_calls(1)
        announcer.stop()
    assert [(c.method, c.target) for c in gateway.calls] == [
        (b"PUT", "/revconn/announce?name=probe"),
        (b"DELETE", "/revconn/announce?name=probe&epoch=12"),
    ]


async def test_first_answer_sets_connected_and_logs_once_at_info(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="revconn.agent")
    gateway = FakeGateway(OK)
    agent = Agent(config(), announce_exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await agent.connected.wait()
        assert trio.current_time() == 0.0
        assert len(gateway.calls) == 1
        await gateway.wait_calls(3)
        # renewals are not new connections
        assert (agent.monitor.state, agent.monitor.connects) == ("online", 1)
        agent.stop()
        assert agent.monitor.state == "stopping"
    assert agent.monitor.state == "stopped"
    assert agent_logs(caplog) == [
        ("INFO", f"announced {NORMALIZED} as 'probe' (ttl 30 s)"),
        ("DEBUG", f"renewed {NORMALIZED} as 'probe' (ttl 30 s, epoch 12)"),
        ("DEBUG", f"renewed {NORMALIZED} as 'probe' (ttl 30 s, epoch 12)"),
        ("INFO", f"withdrew {NORMALIZED}"),
        ("INFO", "offline: stopped"),
    ]
    assert SECRET not in caplog.text


async def test_connected_stays_unset_until_the_gateway_accepts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway((503, {"error": "shutting_down"}), (503, {}), OK)
    agent = Agent(config(), announce_exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await agent.connected.wait()
        assert trio.current_time() == 20.0
        nursery.cancel_scope.cancel()


# -- answers that end the agent ---------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_credentials_are_fatal(
    status: int, autojump_clock: trio.testing.MockClock
) -> None:
    gateway = FakeGateway((status, {"error": "unauthorized"}))
    with pytest.raises(AuthError, match=rf"HTTP {status}.*--secret") as info:
        await Announcer(config(), exchange=gateway).run()
    assert info.value.status == status
    assert len(gateway.calls) == 1
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("transport", "message"),
    [
        ("websocket", "replaced: a websocket agent connected as 'probe'"),
        ("url", "replaced: another agent announced a URL as 'probe'"),
    ],
)
async def test_replaced_is_fatal_and_names_the_holder(
    transport: str, message: str, autojump_clock: trio.testing.MockClock
) -> None:
    replaced = (409, {"error": "replaced", "holder": {"transport": transport}, "detail": "x"})
    gateway = FakeGateway(OK, OK, replaced)
    with pytest.raises(ReplacedError) as info:
        await Announcer(config(), exchange=gateway).run()
    assert str(info.value) == message
    assert [c.at for c in gateway.calls] == [0.0, 10.0, 20.0]
    assert not gateway.deletes  # the entry is not ours any more


async def test_name_held_by_a_websocket_agent_is_fatal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    in_use = (409, {"error": "name_in_use", "holder": {"transport": "websocket"}, "detail": "x"})
    with pytest.raises(FatalError) as info:
        await Announcer(config(), exchange=FakeGateway(in_use)).run()
    assert type(info.value) is FatalError
    assert str(info.value) == (
        "name 'probe' is held by a websocket agent: stop it, or pick another --name"
    )


async def test_refused_announcement_is_a_config_error_with_the_gateways_detail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refused = (
        400,
        {"error": "url_forbidden", "detail": "svc.example resolves to 10.0.0.5, a private address"},
    )
    with pytest.raises(ConfigError) as info:
        await Announcer(config(), exchange=FakeGateway(refused)).run()
    assert "HTTP 400 url_forbidden" in str(info.value)
    assert "svc.example resolves to 10.0.0.5, a private address" in str(info.value)


async def test_old_gateway_without_announce_is_a_config_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(ConfigError, match=r"does not serve /announce \(HTTP 404\): .*older"):
        await Announcer(config(), exchange=FakeGateway((404, {}))).run()


# -- answers that are retried --------------------------------------------------------


async def test_failures_are_logged_and_retried_on_schedule(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="revconn.agent")
    gateway = FakeGateway(
        OK,
        ConnectError("cannot reach the gateway at ws://gw.example/ws/connect: refused"),
        HANG,
        (503, {"error": "shutting_down", "detail": "the gateway is shutting down"}),
        (200, {"epoch": "twelve"}),
        (502, {}),
        OK,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Announcer(config(), exchange=gateway).run)
        await gateway.wait_calls(8)
        nursery.cancel_scope.cancel()
    assert [c.at for c in gateway.calls] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]
    # The last epoch the gateway gave is sent on, through the failures.
    assert [c.body and c.body.get("epoch") for c in gateway.calls] == [None, *[12] * 7]
    assert agent_logs(caplog) == [
        ("INFO", f"announced {NORMALIZED} as 'probe' (ttl 30 s)"),
        (
            "WARNING",
            "announce failed: cannot reach the gateway at ws://gw.example/ws/connect: refused; "
            "next try in 10 s",
        ),
        ("WARNING", "announce failed: no answer from the gateway within 3 s; next try in 7 s"),
        (
            "WARNING",
            "announce failed: the gateway answered HTTP 503 "
            "(shutting_down, the gateway is shutting down); next try in 10 s",
        ),
        (
            "WARNING",
            "announce failed: the gateway's answer (HTTP 200) carries no valid epoch; "
            "next try in 10 s",
        ),
        ("WARNING", "announce failed: the gateway answered HTTP 502; next try in 10 s"),
        ("INFO", f"announced {NORMALIZED} as 'probe' (ttl 30 s)"),  # back after failures
    ]


async def test_a_bug_in_the_exchange_propagates(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(ZeroDivisionError):
        await Announcer(config(), exchange=FakeGateway(ZeroDivisionError())).run()


# -- stopping ------------------------------------------------------------------------


async def test_stop_withdraws_with_the_epoch_and_run_returns(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="revconn.agent")
    gateway = FakeGateway(OK, (200, {**OK[1], "epoch": 13}))
    announcer = Announcer(config(), exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer.run)
        await gateway.wait_calls(2)
        await trio.sleep(4.0)
        announcer.stop()
    # the nursery exited: run() returned
    assert trio.current_time() == 14.0
    assert gateway.deletes == [Call(14.0, b"DELETE", "/announce?name=probe&epoch=13", None)]
    assert agent_logs(caplog)[-1] == ("INFO", f"withdrew {NORMALIZED}")


async def test_agent_stop_in_announce_mode_returns_from_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(OK)
    agent = Agent(config(), announce_exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await gateway.wait_calls(2)
        agent.stop()
    assert [c.method for c in gateway.calls] == [b"PUT", b"PUT", b"DELETE"]


async def test_a_hanging_withdrawal_is_bounded(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="revconn.agent")
    gateway = FakeGateway(OK, delete=HANG)
    announcer = Announcer(config(), exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer.run)
        await gateway.wait_calls(1)
        announcer.stop()
    assert trio.current_time() == WITHDRAW_TIMEOUT == 5.0
    assert agent_logs(caplog)[-1] == (
        "WARNING",
        f"withdraw failed: no answer within 5 s; the gateway drops {NORMALIZED} within 30 s",
    )


async def test_the_withdrawal_is_shielded_from_cancellation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The CLI cancels everything when its grace period ends or at a second
    signal; the withdrawal already under way still gets its 5 s."""
    gateway = FakeGateway(OK, delete=HANG)
    announcer = Announcer(config(), exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer.run)
        await gateway.wait_calls(1)
        announcer.stop()
        await gateway.wait_calls(2)
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 5.0
    assert gateway.calls[-1].method == b"DELETE"


@pytest.mark.parametrize(
    ("delete", "level", "message"),
    [
        ((200, {"name": "probe", "withdrawn": False}), "INFO",
         f"nothing to withdraw: the gateway no longer held {NORMALIZED} as 'probe'"),
        ((503, {}), "WARNING",
         f"withdraw failed: the gateway answered HTTP 503; the gateway drops {NORMALIZED} "
         "within 30 s"),
        (ConnectError("refused"), "WARNING",
         f"withdraw failed: refused; the gateway drops {NORMALIZED} within 30 s"),
    ],
)  # fmt: skip
async def test_withdrawal_outcomes_are_logged(
    delete: Answer,
    level: str,
    message: str,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="revconn.agent")
    gateway = FakeGateway(OK, delete=delete)
    announcer = Announcer(config(), exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer.run)
        await gateway.wait_calls(1)
        announcer.stop()
    assert agent_logs(caplog)[-1] == (level, message)


async def test_stop_during_an_unanswered_first_announcement_withdraws_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway(HANG)
    announcer = Announcer(config(), exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer.run)
        await gateway.wait_calls(1)
        await trio.sleep(1.0)
        announcer.stop()  # the attempt in flight runs out its timeout (3 s), no longer
    assert trio.current_time() == 3.0
    assert [c.method for c in gateway.calls] == [b"PUT"]


class SlowFirst(FakeGateway):
    """Answers the first PUT only after 2 s."""

    async def __call__(
        self, method: bytes, target: str, body: bytes
    ) -> tuple[int, dict[str, object]]:
        if method == b"PUT" and not self.calls:
            self.calls.append(Call(trio.current_time(), method, target, json.loads(body)))
            await trio.sleep(2.0)
            return OK
        return await super().__call__(method, target, body)


async def test_stop_while_the_first_announcement_is_in_flight_withdraws_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The gateway may accept the announcement being cancelled: the agent waits
    for its answer and withdraws the epoch it got (nothing lingers for the TTL)."""
    gateway = SlowFirst()
    announcer = Announcer(config(), exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer.run)
        await trio.sleep(1.0)
        announcer.stop()
    assert [(c.at, c.method) for c in gateway.calls] == [(0.0, b"PUT"), (2.0, b"DELETE")]
    assert gateway.calls[1].target.endswith("epoch=12")


async def test_unresolvable_url_is_retried_not_fatal(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A DNS failure at the gateway is not a configuration error: the agent
    keeps announcing (the gateway cannot forward to it meanwhile either)."""
    unresolvable = (400, {"error": "url_unresolvable", "detail": "x does not resolve"})
    gateway = FakeGateway(unresolvable, unresolvable, OK)
    announcer = Announcer(config(), exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer.run)
        await gateway.wait_calls(3)
        await trio.testing.wait_all_tasks_blocked()
        assert announcer.epoch == 12
        announcer.stop()
    assert [c.at for c in gateway.calls if c.method == b"PUT"] == [0.0, 10.0, 20.0]
    assert sum("cannot resolve" in r.getMessage() for r in caplog.records) == 2


async def test_stop_before_run_returns_at_once(autojump_clock: trio.testing.MockClock) -> None:
    gateway = FakeGateway(OK)
    announcer = Announcer(config(), exchange=gateway)
    announcer.stop()
    await announcer.run()
    assert gateway.calls == []


# -- the HTTP exchange on a real socket ------------------------------------------------


@attrs.frozen
class Request:
    line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def read_request(stream: trio.SocketStream) -> Request:
    """One request as the bytes say it: head to the empty line, body by Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        assert chunk, f"closed mid-head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    line, *lines = head.split(b"\r\n")
    headers = [(n.lower(), v.strip()) for n, _, v in (x.partition(b":") for x in lines)]
    length = int(dict(headers).get(b"content-length", b"0"))
    while len(body) < length:
        body += await stream.receive_some()
    return Request(line, headers, body)


Respond = Callable[[Request], bytes]


def json_answer(status: int, payload: dict[str, object]) -> bytes:
    body = json.dumps(payload).encode()
    return (
        b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, len(body), body)
    )


async def fake_gateway(nursery: trio.Nursery, respond: Respond) -> tuple[int, list[Request]]:
    """A TCP server on 127.0.0.1 answering each request with ``respond``."""
    seen: list[Request] = []

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            request = await read_request(stream)
            seen.append(request)
            await stream.send_all(respond(request))

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], seen


async def test_http_exchange_sends_the_announce_request() -> None:
    async with trio.open_nursery() as nursery:
        port, seen = await fake_gateway(
            nursery, lambda r: json_answer(200, {"name": "probe", "epoch": 7, "ttl": 30})
        )
        exchange = HttpExchange(config(gateway=f"http://127.0.0.1:{port}/gw"))
        body = b'{"url":"http://svc.example:8000/","ttl":30}'
        answer = await exchange(b"PUT", "/gw/announce?name=probe", body)
        nursery.cancel_scope.cancel()
    assert answer == (200, {"name": "probe", "epoch": 7, "ttl": 30})
    [request] = seen
    assert request.line == b"PUT /gw/announce?name=probe HTTP/1.1"
    assert request.headers == [
        (b"host", f"127.0.0.1:{port}".encode()),
        (b"authorization", f"Bearer {SECRET}".encode()),
        (b"user-agent", USER_AGENT.encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    assert request.body == body


async def test_http_exchange_withdraws_without_a_body() -> None:
    async with trio.open_nursery() as nursery:
        port, seen = await fake_gateway(
            nursery, lambda r: json_answer(200, {"name": "probe", "withdrawn": True})
        )
        exchange = HttpExchange(config(gateway=f"http://127.0.0.1:{port}"))
        answer = await exchange(b"DELETE", "/announce?name=probe&epoch=7", b"")
        nursery.cancel_scope.cancel()
    assert answer == (200, {"name": "probe", "withdrawn": True})
    assert seen[0].line == b"DELETE /announce?name=probe&epoch=7 HTTP/1.1"
    assert [name for name, _ in seen[0].headers] == [
        b"host",
        b"authorization",
        b"user-agent",
        b"connection",
    ]
    assert seen[0].body == b""


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found", (404, {})),
        (b"HTTP/1.1 200 OK\r\n\r\n[1, 2]", (200, {})),  # close-delimited, not an object
        (b"HTTP/1.1 100 Continue\r\n\r\n" + json_answer(200, {"epoch": 1}), (200, {"epoch": 1})),
    ],
)
async def test_http_exchange_reads_any_answer_to_its_end(
    answer: bytes, expected: tuple[int, dict[str, object]]
) -> None:
    async with trio.open_nursery() as nursery:
        port, _ = await fake_gateway(nursery, lambda r: answer)
        result = await HttpExchange(config(gateway=f"http://127.0.0.1:{port}"))(b"PUT", "/", b"{}")
        nursery.cancel_scope.cancel()
    assert result == expected


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"", "the gateway closed the connection without an answer"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "the gateway's answer is not valid HTTP/1.1"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "closed the connection mid-answer"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (MAX_ANSWER, b" " * MAX_ANSWER),
            f"the gateway's answer is larger than {MAX_ANSWER} bytes",
        ),
    ],
)
async def test_http_exchange_failures_are_connect_errors(answer: bytes, message: str) -> None:
    async with trio.open_nursery() as nursery:
        port, _ = await fake_gateway(nursery, lambda r: answer)
        with pytest.raises(ConnectError, match=re.escape(message)):
            await HttpExchange(config(gateway=f"http://127.0.0.1:{port}"))(b"PUT", "/", b"{}")
        nursery.cancel_scope.cancel()


async def test_http_exchange_unreachable_gateway_is_a_connect_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ConnectError, match="cannot reach the gateway"):
            await HttpExchange(config(gateway=f"http://127.0.0.1:{port}"))(b"PUT", "/", b"{}")


async def test_announcer_over_real_sockets_announces_and_withdraws(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    def respond(request: Request) -> bytes:
        if request.line.startswith(b"PUT "):
            return json_answer(200, {"name": "probe", "epoch": 3, "ttl": 30})
        return json_answer(200, {"name": "probe", "withdrawn": True})

    async with trio.open_nursery() as nursery:
        port, seen = await fake_gateway(nursery, respond)
        agent = Agent(config(gateway=f"http://127.0.0.1:{port}"))
        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(agent.run)
                await agent.connected.wait()
                agent.stop()
        nursery.cancel_scope.cancel()
    assert [r.line for r in seen] == [
        b"PUT /announce?name=probe HTTP/1.1",
        b"DELETE /announce?name=probe&epoch=3 HTTP/1.1",
    ]
    assert json.loads(seen[0].body) == {"url": NORMALIZED, "ttl": 30}
    assert f"withdrew {NORMALIZED}" in caplog.text
    assert SECRET not in caplog.text


async def test_announce_mode_serves_the_app_locally_until_withdrawn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="revconn.agent")
    gateway = FakeGateway(OK)
    agent = Agent(config(listen="127.0.0.1:0"), app=upstream_app.app, announce_exchange=gateway)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await agent.connected.wait()
            match = re.search(r"serving the app on (http://127\.0\.0\.1:\d+)", caplog.text)
            assert match, caplog.text
            async with httpx.AsyncClient(base_url=match[1]) as client:
                response = await client.get("/status/201")
            assert (response.status_code, response.text) == (201, "status 201")
            agent.stop()
    assert [c.method for c in gateway.calls] == [b"PUT", b"DELETE"]
    assert agent_logs(caplog)[-2:] == [
        ("INFO", f"withdrew {NORMALIZED}"),
        ("INFO", "offline: stopped"),
    ]
    assert "serving the app" in agent_logs(caplog)[0][1]  # listening before announcing


# -- the agent's monitor in announce mode ---------------------------------------------


class SlowGateway(FakeGateway):
    """Answers each PUT after ``delay`` seconds."""

    def __init__(self, *answers: Answer, delay: float) -> None:
        super().__init__(*answers)
        self.delay = delay

    async def __call__(
        self, method: bytes, target: str, body: bytes
    ) -> tuple[int, dict[str, object]]:
        if method == b"PUT":
            await trio.sleep(self.delay)
        return await super().__call__(method, target, body)


async def test_an_announcement_accepted_after_stop_does_not_look_online(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """stop() while the first PUT is in flight (shielded, so its epoch can be
    withdrawn): its late acceptance must not flip the state back to online."""
    gateway = SlowGateway(OK, delay=2.0)
    agent = Agent(config(), announce_exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.sleep(1.0)
        assert (agent.monitor.state, agent.monitor.attempts) == ("connecting", 1)
        agent.stop()
        assert agent.monitor.state == "stopping"
        await trio.sleep(0.5)
        assert agent.monitor.state == "stopping"
    # the PUT was accepted at t=2, then withdrawn: never counted as online
    assert (agent.monitor.state, agent.monitor.connects) == ("stopped", 0)
    assert trio.current_time() == 2.0
    assert [c.method for c in gateway.calls] == [b"PUT", b"DELETE"]


async def test_announcements_failing_after_acceptance_count_as_a_lost_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    unavailable = (503, {"error": "shutting_down", "detail": "the gateway is shutting down"})
    gateway = FakeGateway(OK, unavailable, unavailable, OK)
    agent = Agent(config(announce_interval=10.0), announce_exchange=gateway)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await gateway.wait_calls(2)  # t=10: the first failure
        await trio.sleep(1.0)
        monitor = agent.monitor
        assert (monitor.state, monitor.retry_at is not None) == ("retrying", True)
        assert monitor.disconnects == {"announce failed": 1}
        await gateway.wait_calls(3)  # t=20: still failing, not a second loss
        await trio.sleep(1.0)
        assert (monitor.disconnects, monitor.connect_failures) == ({"announce failed": 1}, 1)
        await gateway.wait_calls(4)  # t=30: accepted again
        await trio.sleep(1.0)
        assert (monitor.state, monitor.connects, monitor.reconnects) == ("online", 2, 1)
        assert monitor.attempts == 4
        agent.stop()
