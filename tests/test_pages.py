"""The demo page and the live debugger, in real Chromium."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from conftest import Collector, StartCollector
from playwright.async_api import Browser, async_playwright
from test_browser import CHROMIUM, CHROMIUM_ARGS

from collector.config import Secret

ADMIN = "admin-token-for-tests-42"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture
async def served(start_collector: StartCollector) -> Collector:
    # Headless Chromium names itself in its user agent; here it is the wanted visitor.
    return await start_collector(admin_token=Secret(ADMIN), bot_user_agents=None)


async def test_demo_shows_the_click_and_its_outbound_call(
    browser: Browser, served: Collector
) -> None:
    page = await browser.new_page()
    await page.goto(served.url("/demo"))
    await page.wait_for_selector("#events[data-connected]", state="attached")
    await page.click("#renew")
    event = page.locator("#events li.event", has_text="renewMembership")
    await event.wait_for()
    assert await event.locator(".status").text_content() == "accepted"
    await event.locator(".call", has_text="/v2/track").wait_for()
    call = await event.locator(".call", has_text="/v2/track").inner_text()
    assert "sent" in call
    assert '"plan":"gold"' in call
    await page.click("#to-pricing")
    await page.locator("#events li.event", has_text="page").first.wait_for()


async def test_demo_is_off_once_origins_are_configured(start_collector: StartCollector) -> None:
    collector = await start_collector(allowed_origins=("https://shop.example",))
    status, _, _ = await collector.get("/demo")
    assert status == 404


async def test_debugger_needs_the_token(browser: Browser, served: Collector) -> None:
    status, _, _ = await served.get("/debug/events")
    assert status == 401
    page = await browser.new_page()
    await page.goto(served.url("/debug"))
    assert await page.locator("#events").count() == 0  # only the token form
    await page.fill("input[name=token]", "not the token")
    await page.click("input[type=submit]")
    assert await page.locator("#events").count() == 0


async def test_debugger_streams_rejected_events_with_errors_and_filters(
    browser: Browser, served: Collector
) -> None:
    page = await browser.new_page()
    await page.goto(served.url("/debug"))
    await page.fill("input[name=token]", ADMIN)
    await page.click("input[type=submit]")
    await page.wait_for_selector("#events[data-connected]", state="attached")

    await served.post("/e", {"event": "checkout", "user_id": "", "properties": []})
    await served.post("/e", {"event": "renewMembership", "anonymous_id": "anon-5"})
    rejected = page.locator("#events li.event.rejected", has_text="checkout")
    await rejected.wait_for()
    errors = await rejected.locator(".error").all_inner_texts()
    assert any(e.startswith("/properties: must be an object") for e in errors)
    accepted = page.locator("#events li.event.accepted", has_text="renewMembership")
    await accepted.wait_for()
    await accepted.locator(".call", has_text="/v2/track").wait_for()
    assert '"received_at"' in await accepted.locator(".enrichment").inner_text()

    await page.fill("#filter-event", "renew")
    assert await rejected.is_hidden()
    assert await accepted.is_visible()
    await page.fill("#filter-event", "")
    await page.fill("#filter-user", "anon-5")
    assert await rejected.is_hidden()


async def test_debugger_is_off_without_an_admin_token(collector: Collector) -> None:
    status, _, _ = await collector.get("/debug")
    assert status == 404
