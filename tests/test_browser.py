"""A real browser through the real executables: headless Chromium (Selenium)
browses an agent's site by host name (``revconn-gateway --domain``): a link, a
form POST answered with 303, and a WebSocket opened on ``location.host``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import pytest

from ._procs import Proc
from .test_e2e import start_agent, start_gateway

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOMAIN = "revconn.test"
WAIT = 10.0  # every explicit wait, at most (seconds)


@pytest.fixture
def chromium() -> Iterator[WebDriver]:
    """A headless Chromium that resolves every ``*.revconn.test`` to 127.0.0.1."""
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
        f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1",
        # Plain http:// on a test domain: no automatic try of https:// first.
        "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable",
        "--no-first-run",
        "--no-default-browser-check",
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


def test_a_browser_follows_a_link_posts_a_form_and_talks_websocket_by_host_name(
    procs: list[Proc], chromium: WebDriver
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.wait import WebDriverWait

    driver = chromium
    wait = WebDriverWait(driver, WAIT)
    _, url, _ = start_gateway(procs, "--domain", DOMAIN)
    port = urlsplit(url).port
    agent = start_agent(procs, url, "web", "--app", "tests.browser_app:app")
    agent.wait_for(r"\(agent 'web'\)")

    site = f"http://web.{DOMAIN}:{port}"
    driver.get(f"{site}/")
    wait.until(ec.title_is("home"))
    # An absolute link: the path is the agent's own (host routing leaves it alone).
    driver.find_element(By.ID, "about").click()
    wait.until(ec.url_to_be(f"{site}/about"))
    wait.until(ec.title_is("about"))

    driver.find_element(By.ID, "user").send_keys("Ada Lovelace & co")
    driver.find_element(By.ID, "submit").click()
    # POST /login answered 303 See Other: the browser GETs /welcome.
    wait.until(ec.title_is("welcome"))
    where = urlsplit(driver.current_url)
    assert (where.scheme, where.hostname, where.port, where.path) == (
        "http",
        f"web.{DOMAIN}",
        port,
        "/welcome",
    )
    assert parse_qs(where.query) == {"user": ["Ada Lovelace & co"]}
    assert driver.find_element(By.ID, "user").text == "Ada Lovelace & co"

    # The page's script opened ws://web.revconn.test:PORT/ws through the
    # gateway and wrote the echo's answer into the page.
    wait.until(ec.text_to_be_present_in_element((By.ID, "ws"), "pong:"))
    assert driver.find_element(By.ID, "ws").text == "pong: ping"
