"""The live admin page, GET /admin (issue 16): off without `admin_token`; its data,
GET /admin/stats, only for the right Bearer token (401 otherwise); and in a real headless Chromium
(Debian's `chromium` + `chromium-driver`, driven by Selenium) a wrong token is refused, the right one
shows the counts, and the counts change when test clients connect.

Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from pystrands.testing import running_broker
from v1peer import DEADLINE, connect_client, connect_v2_backend


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def test_the_admin_page_is_off_without_a_token_and_its_data_needs_the_token():
    with running_broker() as br:
        assert http_get(br.ws_port, "/admin")[0] == 404
        assert http_get(br.ws_port, "/admin/stats", {"Authorization": "Bearer x"})[0] == 404
    with running_broker(admin_token="s3cret t") as br:
        status, body = http_get(br.ws_port, "/admin")
        assert status == 200 and 'id="login"' in body and "s3cret" not in body
        assert "http://" not in body and "https://" not in body, "self-contained: nothing from a CDN"
        assert http_get(br.ws_port, "/admin/stats")[0] == 401
        assert http_get(br.ws_port, "/admin/stats?token=s3cret+t")[0] == 401, "never from a URL"
        assert http_get(br.ws_port, "/admin/stats", {"Authorization": "Bearer nope"})[0] == 401
        assert http_get(br.ws_port, "/admin/stats", {"Authorization": "Basic czNjcmV0IHQ="})[0] == 401
        status, body = http_get(br.ws_port, "/admin/stats", {"Authorization": "Bearer s3cret t"})
        assert status == 200 and json.loads(body)["clients"] == 0


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI"):
            raise RuntimeError("chromium and chromium-driver are required in CI (.ci/run installs them)")
        pytest.skip("chromium / chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_shows_live_counts_in_a_real_browser(browser: Any):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def text(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    def until(predicate: Any, what: str) -> None:
        WebDriverWait(browser, DEADLINE).until(lambda _: predicate(), message=f"timed out waiting for {what}")

    async def main() -> None:
        with running_broker(admin_token="tok") as br:
            # Sign in through the page's form, as a person would: first with a wrong token.
            browser.get(f"http://127.0.0.1:{br.ws_port}/admin")
            browser.find_element(By.ID, "token").send_keys("wrong")
            browser.find_element(By.ID, "signin").click()
            until(lambda: text("login_error") == "Wrong token.", "the wrong token refused")
            assert not browser.find_element(By.ID, "dashboard").is_displayed()
            field = browser.find_element(By.ID, "token")
            field.clear()
            field.send_keys("tok")
            browser.find_element(By.ID, "signin").click()
            until(lambda: text("clients") == "0" and text("backends") == "0", "the first figures")
            assert "tok" not in browser.current_url
            assert text("status").startswith("live")
            b = await connect_v2_backend(br)
            clients = [(await connect_client(br.ws_port, b, client_id=f"c{i}", room_id=f"r{i % 2}"))[0] for i in range(3)]
            until(lambda: text("clients") == "3" and text("rooms") == "2" and text("backends") == "1", "the new counts")
            for ws in clients:
                await ws.send("hello")
            until(lambda: text("c_messages_in") == "3", "the counter table")
            assert browser.find_element(By.ID, "plot").is_displayed()
            for ws in clients:
                await ws.close()
            until(lambda: text("clients") == "0", "clients gone")
            await b.close()

    asyncio.run(asyncio.wait_for(main(), 90))
