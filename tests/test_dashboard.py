"""The operator dashboard (``GET /dashboard``): who may open it (Basic or
Bearer admin credentials; a browser is challenged for Basic), the headers
that pin it to itself, a page with no external asset, and a real headless
Chromium watching the real executables: agents appear, a request shows up in
its row, a stopped agent goes away with its reason, a phone gets cards, and a
gateway restart is followed (reconnect, the new snapshot replaces the rows).

``REVCONN_SCREENSHOT=docs/dashboard.png pytest tests/test_dashboard.py`` also
saves a screenshot of the populated page (docs/ keeps one; CI leaves it be)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from revconn import Gateway, GatewayConfig, SharedSecretPolicy, TokenPolicy
from revconn._gateway.admin import BASIC_CHALLENGE, admin_credential, basic_password
from revconn._gateway.tokens import SigningKey, TokenVerifier, issue_token

from ._gateway_helpers import SECRET as INPROC_SECRET
from ._gateway_helpers import running_gateway
from ._procs import ROOT, Proc, executable, free_port
from .test_e2e import SECRET, start_gateway

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT = 10.0  # every explicit wait, at most (seconds)
KEY = SigningKey(bytes(range(32)))
CSP = re.compile(
    r"default-src 'none'; script-src 'nonce-([A-Za-z0-9_-]{20,})'; style-src 'nonce-\1'; "
    r"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    r"frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'"
)


def basic(password: str, user: str = "admin") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


@asynccontextmanager
async def admin_client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway's operator app, in process (no sockets)."""
    transport = httpx.ASGITransport(app=gateway.admin_app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        yield client


def shared_secret_gateway() -> Gateway:
    return Gateway(GatewayConfig(admin_binds=()), SharedSecretPolicy(INPROC_SECRET))


# -- who may open it ---------------------------------------------------------------------


async def test_without_credentials_the_dashboard_challenges_for_basic() -> None:
    async with admin_client(shared_secret_gateway()) as client:
        r = await client.get("/dashboard")
        assert r.status_code == 401
        assert r.headers.get_list("www-authenticate") == [BASIC_CHALLENGE]
        assert BASIC_CHALLENGE == 'Basic realm="revconn admin", charset="UTF-8"'
        assert r.json()["error"] == "unauthorized"
        assert "text/html" not in r.headers["content-type"]
        # The API keeps its Bearer challenge: only the page a person opens prompts.
        for path in ("/endpoints", "/stats", "/metrics"):
            r = await client.get(path)
            assert r.status_code == 401
            assert r.headers["www-authenticate"] == 'Bearer realm="revconn"'


@pytest.mark.parametrize(
    "headers",
    [basic(INPROC_SECRET), basic(INPROC_SECRET, user=""), bearer(INPROC_SECRET)],
    ids=["basic", "basic-no-user", "bearer"],
)
async def test_the_dashboard_opens_with_basic_or_bearer(headers: dict[str, str]) -> None:
    async with admin_client(shared_secret_gateway()) as client:
        r = await client.get("/dashboard", headers=headers)
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert "<title>revconn dashboard</title>" in r.text


async def test_basic_credentials_open_every_operator_route() -> None:
    async with admin_client(shared_secret_gateway()) as client:
        for path in ("/endpoints", "/stats", "/metrics"):
            assert (await client.get(path, headers=basic(INPROC_SECRET))).status_code == 200
            assert (await client.get(path, headers=bearer(INPROC_SECRET))).status_code == 200
            wrong = await client.get(path, headers=basic("not-the-secret-at-all"))
            assert wrong.status_code == 401


async def test_events_accept_basic_credentials() -> None:
    """What an EventSource sends, on a real socket: the stream starts."""
    async with running_gateway() as gw:
        port = int(gw.admin_url.rsplit(":", 1)[1])
        ((name, value),) = basic(INPROC_SECRET).items()
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(f"GET /events HTTP/1.0\r\n{name}: {value}\r\n\r\n".encode())
            received = b""
            with trio.fail_after(WAIT):
                while b"event: snapshot\ndata: " not in received or not received.endswith(b"\n\n"):
                    received += await stream.receive_some()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-type: text/event-stream" in head.lower()
    data = body.split(b"event: snapshot\ndata: ", 1)[1].split(b"\n", 1)[0]
    assert json.loads(data) == {"event": "snapshot", "seq": 0, "agents": []}


async def test_tokens_admin_opens_it_agent_token_is_forbidden() -> None:
    policy = TokenPolicy(TokenVerifier([KEY]))
    admin_token, _ = issue_token(KEY, None, admin=True)
    agent_token, _ = issue_token(KEY, "web")
    async with admin_client(Gateway(GatewayConfig(admin_binds=()), policy)) as client:
        for headers in (basic(admin_token), bearer(admin_token)):
            assert (await client.get("/dashboard", headers=headers)).status_code == 200
        for headers in (basic(agent_token), bearer(agent_token)):
            r = await client.get("/dashboard", headers=headers)
            assert (r.status_code, r.json()["error"]) == (403, "wrong_scope")
            assert "www-authenticate" not in r.headers  # a good credential, not for this


async def test_the_browsers_first_request_is_no_failed_sign_in_but_wrong_passwords_are() -> None:
    gateway = Gateway(
        GatewayConfig(admin_binds=(), auth_failures=3), SharedSecretPolicy(INPROC_SECRET)
    )
    async with admin_client(gateway) as client:
        for _ in range(5):  # (a browser asks for the challenge each new session)
            assert (await client.get("/dashboard")).status_code == 401
        assert (await client.get("/dashboard", headers=basic(INPROC_SECRET))).status_code == 200
        for _ in range(3):
            r = await client.get("/dashboard", headers=basic("a-wrong-password-guess"))
            assert r.status_code == 401
        r = await client.get("/dashboard", headers=basic(INPROC_SECRET))
        assert r.status_code == 429  # locked out, the right password included
        assert "www-authenticate" not in r.headers


def raw_basic(payload: bytes) -> bytes:
    return b"Basic " + base64.b64encode(payload)


MALFORMED = {
    "not-base64": b"Basic !!!not base64!!!",
    "bad-padding": b"Basic " + base64.b64encode(b"admin:" + INPROC_SECRET.encode())[:-2],
    "no-colon": raw_basic(INPROC_SECRET.encode()),
    "not-utf8": raw_basic(b"admin:\xff\xfe" + INPROC_SECRET.encode()),
    "empty-password": raw_basic(b"admin:"),
    "empty": b"Basic ",
    "scheme-only": b"Basic",
    "other-scheme": b"Digest " + base64.b64encode(b"admin:" + INPROC_SECRET.encode()),
    "wrong-password": raw_basic(b"admin:" + INPROC_SECRET.encode() + b"x"),
}


@pytest.mark.parametrize("value", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_basic_credentials_are_a_401_never_a_500(value: bytes) -> None:
    async with admin_client(shared_secret_gateway()) as client:
        for path in ("/dashboard", "/endpoints"):
            r = await client.get(path, headers=[(b"authorization", value)])
            assert (r.status_code, r.json()["error"]) == (401, "unauthorized"), path


async def test_two_authorization_headers_count_as_none() -> None:
    async with admin_client(shared_secret_gateway()) as client:
        (name, good), (_, also) = (*basic(INPROC_SECRET).items(), *bearer(INPROC_SECRET).items())
        r = await client.get("/dashboard", headers=[(name, good), (name, also)])
        assert r.status_code == 401


def test_basic_password_parsing() -> None:
    assert basic_password(raw_basic(b"admin:s3cret")) == "s3cret"
    assert basic_password(raw_basic(b":s3cret")) == "s3cret"  # any user name, even none
    assert basic_password(raw_basic(b"admin:a:b:c")) == "a:b:c"  # the first colon splits
    assert basic_password(raw_basic("ops:pässwört".encode())) == "pässwört"  # UTF-8
    assert basic_password(b"bAsIc  " + base64.b64encode(b"u:p") + b"  ") == "p"
    for value in MALFORMED.values():
        if value is not MALFORMED["wrong-password"]:
            assert basic_password(value) is None, value
    assert basic_password(b"Bearer " + base64.b64encode(b"u:p")) is None
    # Bearer first, Basic beside it; neither when the header is repeated.
    assert admin_credential([(b"Authorization", b"Bearer tok")]) == "tok"
    assert admin_credential([(b"authorization", raw_basic(b"u:p"))]) == "p"
    assert admin_credential([(b"authorization", raw_basic(b"u:p"))] * 2) is None
    assert admin_credential([(b"x-other", b"1")]) is None


# -- what the page is --------------------------------------------------------------------


async def test_the_page_is_pinned_to_itself_by_its_headers() -> None:
    async with admin_client(shared_secret_gateway()) as client:
        first = await client.get("/dashboard", headers=basic(INPROC_SECRET))
        second = await client.get("/dashboard", headers=basic(INPROC_SECRET))
    nonces = []
    for r in (first, second):
        match = CSP.fullmatch(r.headers["content-security-policy"])
        assert match, r.headers["content-security-policy"]
        nonce = match.group(1)
        nonces.append(nonce)
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-content-type-options"] == "nosniff"
        # Every inline script and style carries this response's nonce.
        tags = re.findall(r"<(script|style)\b([^>]*)>", r.text)
        assert sorted(t for t, _ in tags) == ["script", "style"]
        assert all(attrs == f' nonce="{nonce}"' for _, attrs in tags)
        assert "__CSP_NONCE__" not in r.text
    assert nonces[0] != nonces[1]


async def test_the_page_loads_nothing_from_elsewhere_and_never_parses_strings_as_html() -> None:
    async with admin_client(shared_secret_gateway()) as client:
        page = (await client.get("/dashboard", headers=basic(INPROC_SECRET))).text
    for needle in ("http://", "https://", "//cdn", "@import", "url(", "<iframe", "<object"):
        assert needle not in page, needle
    # No src= anywhere; the only href is the empty data: favicon.
    assert not re.search(r"\bsrc\s*=", page)
    assert re.findall(r"\bhref\s*=\s*\"([^\"]*)\"", page) == ["data:,"]
    # The script builds the DOM with textContent only.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in page, sink


# -- a real browser on the real executables ----------------------------------------------


@pytest.fixture
def chromium() -> Iterator[WebDriver]:
    """A headless Chromium (Debian's, with its chromedriver) at 1200x820."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not found: install Debian's Chromium and its driver "
            "with `apt-get install chromium chromium-driver`"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,820",
        "--no-first-run",
        "--no-default-browser-check",
        "--force-prefers-reduced-motion",
    ):
        options.add_argument(flag)
    # Both paths given: Selenium Manager downloads nothing.
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def start_agent(procs: list[Proc], url: str, name: str) -> Proc:
    """``revconn-agent serve`` in front of tests/upstream_app.py."""
    args = [*executable("revconn-agent"), "serve", "--gateway", url, "--name", name]
    agent = Proc(
        [*args, "--app", "tests.upstream_app:app"],
        {"REVCONN_SECRET": SECRET, "PYTHONPATH": str(ROOT)},
    )
    procs.append(agent)
    return agent


def open_dashboard(driver: WebDriver, admin: str) -> None:
    """Sign in as a person would: user name and password in the URL (what a
    browser's Basic prompt fills in); the browser then sends them along with
    the page's own fetch() and EventSource requests."""
    host = admin.removeprefix("http://")
    driver.get(f"http://admin:{SECRET}@{host}/dashboard")


def raw_get(url: str, target: str) -> bytes:
    """A GET of ``target`` exactly as written (httpx would percent-encode it)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


class Page:
    """The open dashboard, read with one script call per question: the page
    re-renders every second, so element handles would go stale."""

    def __init__(self, driver: WebDriver) -> None:
        from selenium.webdriver.support.wait import WebDriverWait

        self.driver = driver
        self._wait = WebDriverWait(driver, WAIT, poll_frequency=0.05)

    def texts(self, selector: str) -> list[str]:
        script = "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent)"
        found: list[str] = self.driver.execute_script(script, selector)
        return found

    def text(self, selector: str) -> str:
        (found,) = self.texts(selector)
        return found

    def attrs(self, selector: str, name: str) -> list[str | None]:
        script = (
            "return Array.from(document.querySelectorAll(arguments[0]),"
            " e => e.getAttribute(arguments[1]))"
        )
        found: list[str | None] = self.driver.execute_script(script, selector, name)
        return found

    def shown(self, selector: str) -> bool:
        """It exists and takes up room on the page."""
        script = (
            "const e = document.querySelector(arguments[0]);"
            " return !!e && e.getClientRects().length > 0"
        )
        return bool(self.driver.execute_script(script, selector))

    def state(self) -> str | None:
        """The connection indicator: connecting, live, reconnecting, refused."""
        (found,) = self.attrs("#status", "data-state")
        return found

    def css(self, selector: str, prop: str) -> str:
        script = "return getComputedStyle(document.querySelector(arguments[0]))[arguments[1]]"
        return str(self.driver.execute_script(script, selector, prop))

    def js(self, expression: str) -> object:
        return self.driver.execute_script(f"return {expression}")

    def until(self, predicate: Callable[[], object], what: str) -> None:
        self._wait.until(lambda _: predicate(), message=what)

    def until_text(self, selector: str, text: str) -> None:
        self.until(lambda: self.texts(selector) == [text], f"{selector} reading {text!r}")

    def click(self, selector: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.CSS_SELECTOR, selector).click()


def row(name: str) -> str:
    return f'tr.agent[data-agent="{name}"]'


def test_the_dashboard_follows_agents_and_their_requests_live(
    procs: list[Proc], chromium: WebDriver
) -> None:
    page = Page(chromium)
    # (heartbeats every 0.3 s: an RTT to show soon)
    _, url, admin = start_gateway(procs, "--heartbeat-interval", "0.3")
    open_dashboard(chromium, admin)
    page.until(lambda: page.state() == "live", "the stream is live")
    assert page.text("#status") == "live"
    assert page.shown("#no-agents") and not page.shown("#agents")

    # Agents connecting appear without a reload, sorted by name.
    agents = {name: start_agent(procs, url, name) for name in ("web", "nas", "laptop")}
    page.until(lambda: page.attrs("tr.agent", "data-agent") == ["laptop", "nas", "web"], "3 rows")
    assert not page.shown("#no-agents")
    assert page.text(f"{row('web')} .c-transport") == "websocket"
    assert page.text(f"{row('web')} .c-version").startswith("revconn-agent/")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", page.text(f"{row('web')} .c-remote"))
    assert re.fullmatch(r"\d+ s", page.text(f"{row('web')} .c-since"))
    rtt = f"{row('web')} .c-rtt"
    page.until(lambda: re.fullmatch(r"(<1|[\d.]+) ms", page.text(rtt)), "an RTT")

    # Requests through "web" show up in its row (counters from /stats).
    with httpx.Client(base_url=f"{url}/a/web", timeout=WAIT) as client:
        assert client.get("/echo/x").status_code == 200
        assert client.get("/echo/hello", params={"token": "hunter2"}).status_code == 200
        assert client.post("/echo/upload", content=b"u" * 3000).status_code == 200
        assert client.get("/status/404").status_code == 404
        assert client.get("/status/503").status_code == 503
    assert httpx.get(f"{url}/a/nas/echo/nas", timeout=WAIT).status_code == 200

    page.until_text(f"{row('web')} .c-requests .total", "5")
    page.until_text(f"{row('nas')} .c-requests .total", "1")
    assert page.texts(f"{row('web')} .c-requests .badge") == ["1 5xx", "1 4xx"]
    assert page.text(f"{row('web')} .c-inflight") == "0"
    assert re.fullmatch(r"[\d.]+ KiB / [\d.]+ KiB", page.text(f"{row('web')} .c-bytes"))
    assert re.fullmatch(
        r"0 in flight · 6 requests answered · 1 5xx · 1 4xx · .+ in / .+ out",
        page.text("#summary"),
    )

    # Clicking the agent shows its last requests, newest first.
    page.click(f"{row('web')} button.name")
    detail = 'tr.detail[data-detail="web"]'
    page.until(lambda: page.shown(detail), "the detail row")
    assert page.texts(f"{detail} td.path") == [
        "/a/web/status/503",
        "/a/web/status/404",
        "/a/web/echo/upload",
        "/a/web/echo/hello",
        "/a/web/echo/x",
    ]
    assert page.texts(f"{detail} td.method") == ["GET", "GET", "POST", "GET", "GET"]
    assert page.texts(f"{detail} td.status") == ["503", "404", "200", "200", "200"]
    assert "bad" in str(page.attrs(f"{detail} tr.req:first-child td.status", "class"))
    assert page.attrs(f"{row('web')} button.name", "aria-expanded") == ["true"]
    assert "hunter2" not in chromium.page_source  # no query strings

    # An agent stopping goes away; its disconnect is listed with the reason.
    agents["laptop"].signal(signal.SIGTERM)
    assert agents["laptop"].wait() == 0
    page.until(lambda: not page.texts(row("laptop")), "laptop's row gone")
    page.until_text('#disconnects li[data-agent="laptop"] .reason', "closed")
    assert page.shown(detail)  # the open detail stays open

    # A phone: cards, no horizontal scrolling (the viewport is the phone's).
    chromium.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True},
    )
    try:
        page.until(lambda: page.js("window.innerWidth") == 390, "a phone's viewport")
        assert int(str(page.js("document.documentElement.scrollWidth"))) <= 390
        assert page.css("#agents thead", "display") == "none"
        assert page.css(row("web"), "display") == "block"
        width = page.js(f"document.querySelector('{row('web')}').getBoundingClientRect().right")
        assert float(str(width)) <= 390
        for label in ("since", "RTT", "requests"):
            assert page.shown(f"{row('web')} td[data-label='{label}']")
    finally:
        chromium.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    page.until(lambda: page.js("window.innerWidth") == 1200, "the desktop viewport again")
    screenshot = os.environ.get("REVCONN_SCREENSHOT")
    if screenshot:
        chromium.save_screenshot(screenshot)

    # A path is the client's: markup in it is shown as text, never parsed.
    assert raw_get(url, "/a/web/echo/<b>bold</b>").startswith(b"HTTP/1.1 200")
    page.until_text(f"{detail} tr.req:first-child td.path", "/a/web/echo/<b>bold</b>")
    assert not page.texts(f"{detail} b")

    # The agent that served the requests stops too.
    agents["web"].signal(signal.SIGTERM)
    assert agents["web"].wait() == 0
    page.until(lambda: not page.texts(row("web")), "web's row gone")
    assert not page.texts(detail)
    page.until_text('#disconnects li[data-agent="web"] .reason', "closed")
    assert page.texts("#disconnects li .who") == ["web", "laptop"]  # newest first
    assert page.attrs("tr.agent", "data-agent") == ["nas"]
    assert page.text("#status") == "live"
    # Nothing refused by the CSP or Trusted Types, no script error.
    assert [entry["message"] for entry in chromium.get_log("browser")] == []


def test_the_dashboard_reconnects_and_the_new_snapshot_replaces_its_rows(
    procs: list[Proc], chromium: WebDriver
) -> None:
    page = Page(chromium)
    port, admin_port = free_port(), free_port()
    gw, url, admin = start_gateway(procs, port=port, admin_port=admin_port)
    open_dashboard(chromium, admin)
    ghost = start_agent(procs, url, "ghost")
    page.until(lambda: page.attrs("tr.agent", "data-agent") == ["ghost"], "ghost's row")

    # The gateway dies without a word: no offline event reaches the page.
    gw.stop()
    page.until(lambda: page.state() == "reconnecting", "reconnecting")
    assert "reconnecting in" in page.text("#status")
    assert "stale" in str(page.attrs("#agents", "class"))
    assert page.attrs("tr.agent", "data-agent") == ["ghost"]  # (what it knew, dimmed)
    ghost.stop()  # (so that it cannot come back to the new gateway)

    # A new gateway on the same address: the page reconnects by itself (the
    # browser resends the Basic credentials) and its snapshot is the truth.
    start_gateway(procs, port=port, admin_port=admin_port)
    page.until(lambda: page.state() == "live", "live again")
    page.until(lambda: page.shown("#no-agents"), "no agents")
    assert not page.texts("tr.agent")
    assert not page.texts('#disconnects li[data-agent="ghost"]')
    assert "stale" not in str(page.attrs("#agents", "class"))
