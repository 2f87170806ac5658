"""The debugger's token form, in real Chromium: a wrong token is said to be wrong."""

from __future__ import annotations

import pytest
from conftest import Collector, StartCollector
from playwright.async_api import Browser

from collector.config import Secret

ADMIN = "admin-token-for-login-tests-7"
WRONG = "Wrong-Token-Typed-By-Hand"
NOTICE = "That is not the admin token"


@pytest.fixture
async def served(start_collector: StartCollector) -> Collector:
    return await start_collector(admin_token=Secret(ADMIN))


async def test_a_wrong_token_is_said_to_be_wrong(browser: Browser, served: Collector) -> None:
    page = await browser.new_page()
    await page.goto(served.url("/debug"))
    form = page.locator("form[action='debug/login']")
    await form.wait_for()
    assert await page.get_by_role("alert").count() == 0  # nothing is wrong yet

    await page.fill("input[name=token]", WRONG)
    await page.click("input[type=submit]")
    alert = page.get_by_role("alert")
    await alert.wait_for()
    assert (await alert.inner_text()).startswith(NOTICE)
    assert await form.is_visible()  # to try again at once
    assert WRONG not in await page.content()  # what was typed is not shown back

    await page.fill("input[name=token]", ADMIN)
    await page.click("input[type=submit]")
    await page.wait_for_url(served.url("/debug"))
    assert await page.locator("input[name=token]").count() == 0  # the live view, no form
    assert await page.get_by_role("alert").count() == 0


async def test_the_notice_needs_no_script(served: Collector) -> None:
    # Rendered by the server: it shows with JavaScript off, and only after a failed try.
    _, fresh, _ = await served.get("/debug")
    _, after, _ = await served.get("/debug?wrong=1")
    assert NOTICE.encode() not in fresh
    assert NOTICE.encode() in after
    assert b"{{" not in fresh + after  # no placeholder left in either
