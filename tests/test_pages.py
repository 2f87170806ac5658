"""The demo page and the live debugger, in real Chromium.

Each test saves screenshots in $TEST_ARTIFACTS (default: the test's tmp_path) to be looked at.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from pathlib import Path

import pytest
from conftest import Collector, StartCollector, eventually
from playwright.async_api import Browser, Page

from collector.config import Secret

ADMIN = "admin-token-for-tests-42"
LIMIT = 500  # rows the live view keeps (static/live.js)


@pytest.fixture
async def served(start_collector: StartCollector) -> Collector:
    # Headless Chromium names itself in its user agent; here it is the wanted visitor.
    return await start_collector(admin_token=Secret(ADMIN), bot_user_agents=None)


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: $TEST_ARTIFACTS, else the test's own temporary directory."""
    where = Path(os.environ.get("TEST_ARTIFACTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


async def open_debugger(browser: Browser, served: Collector) -> Page:
    page = await browser.new_page(viewport={"width": 1200, "height": 800})
    await page.goto(served.url("/debug"))
    await page.fill("input[name=token]", ADMIN)
    await page.click("input[type=submit]")
    await page.wait_for_selector("#events[data-connected]", state="attached")
    return page


async def rows(page: Page) -> int:
    count: int = await page.locator("#events tbody.event").count()
    return count


# Pixels of the accepted line (#2b8a3e) above the chart's zero line: a second with events.
ACCEPTED_PIXELS = """() => {
    const canvas = document.getElementById("chart");
    const ratio = window.devicePixelRatio || 1;
    const above = Math.floor((canvas.clientHeight - 16 - 4) * ratio);
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, above).data;
    let count = 0;
    for (let i = 0; i < data.length; i += 4) {
        const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
        if (a > 200 && Math.abs(r - 43) < 30 && Math.abs(g - 138) < 30 && Math.abs(b - 62) < 30) {
            count += 1;
        }
    }
    return count;
}"""


async def test_demo_shows_the_click_and_its_outbound_call(
    browser: Browser, served: Collector, artifacts: Path
) -> None:
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    await page.goto(served.url("/demo"))
    await page.wait_for_selector("#events[data-connected]", state="attached")
    await page.click("#renew")
    row = page.locator("#events tbody.event", has_text="renewMembership")
    await row.wait_for()
    assert await row.locator(".status").text_content() == "accepted"
    assert await row.locator(".detail").is_hidden()
    # The visitor's calls reach the demo too (under the anonymous namespace at Outbound).
    await row.locator(".call.sent", has_text="track").first.wait_for()

    # A row opens to the event, pretty-printed, with readable times.
    await row.locator(".summary").click()
    detail = row.locator(".detail")
    assert await detail.is_visible()
    event = await detail.locator(".event-json").inner_text()
    assert '\n  "status": "accepted",\n' in event
    assert '"kind"' not in event
    assert "(17" in event  # "at": "<local date and time> (17...)": the Unix time beside it

    # Page views carry the name Outbound receives, also after single-page navigation.
    views = page.locator("#events tbody.event[data-event=pageView]")
    before = await views.count()  # the first page view may have come before the stream
    await page.click("#to-pricing")
    await eventually(lambda: _equals(views.count(), before + 1))
    assert await views.first.locator(".name").inner_text() == "pageView"
    await page.click("#custom")
    await page.locator("#events tbody.event", has_text="demoCustom").wait_for()
    assert page.url.endswith("/demo?page=pricing")  # the link stayed on the page
    await eventually(lambda: _positive(page.evaluate(ACCEPTED_PIXELS)))
    await page.screenshot(path=str(artifacts / "demo.png"), full_page=True)


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _positive(value: Awaitable[int]) -> bool:
    return await value > 0


async def test_demo_is_off_once_origins_are_configured(start_collector: StartCollector) -> None:
    collector = await start_collector(allowed_origins=("https://shop.example",))
    status, _, _ = await collector.get("/demo")
    assert status == 404


async def test_pages_have_no_inline_script_style_or_handlers(served: Collector) -> None:
    for path in ("/demo", "/debug"):
        status, body, _ = await served.get(path, headers={"Authorization": f"Bearer {ADMIN}"})
        assert status == 200
        html = body.decode()
        assert "<style" not in html
        assert " style=" not in html
        assert " on" not in html.replace(" one", "")  # no onclick=, onsubmit=, ...
        scripts = html.count("<script")
        external = html.count("<script defer src=") + html.count("<script src=")
        # The demo's pre-load stub is the one inline script, as on any site using the script.
        assert scripts - external == (1 if path == "/demo" else 0)


async def test_debugger_needs_the_token(browser: Browser, served: Collector) -> None:
    status, _, _ = await served.get("/debug/events")
    assert status == 401
    page = await browser.new_page()
    await page.goto(served.url("/debug"))
    assert await page.locator("#events").count() == 0  # only the token form
    await page.fill("input[name=token]", "not the token")
    await page.click("input[type=submit]")
    assert await page.locator("#events").count() == 0


async def test_debugger_table_rows_open_and_filters_survive_a_reload(
    browser: Browser, served: Collector, artifacts: Path
) -> None:
    page = await open_debugger(browser, served)
    await served.post("/e", {"event": "checkout", "user_id": "", "properties": []})
    await served.post("/e", {"event": "renewMembership", "anonymous_id": "anon-5"})
    await served.post("/e", {"type": "page", "anonymous_id": "anon-6"})
    rejected = page.locator("#events tbody.event.rejected", has_text="checkout")
    await rejected.wait_for()
    accepted = page.locator("#events tbody.event.accepted", has_text="renewMembership")
    await accepted.locator(".calls .call", has_text="track").wait_for()
    assert await accepted.locator(".calls .call").all_inner_texts() == [
        "identify sent 200",
        "track sent 200",
    ]
    view = page.locator("#events tbody.event", has_text="anon-6")
    await view.locator(".calls .call", has_text="track").wait_for()
    assert await view.locator(".name").inner_text() == "pageView"
    assert await page.locator("#count").inner_text() == "3 events"

    await rejected.locator(".summary").click()
    errors = await rejected.locator(".error").all_inner_texts()
    assert any(e.startswith("/properties: must be an object") for e in errors)
    await accepted.locator(".summary").press("Enter")  # rows open from the keyboard too
    assert '"received_at": "' in await accepted.locator(".event-json").inner_text()
    # Each call, pretty-printed, with what became of it.
    heads = await accepted.locator(".call-head").all_text_contents()
    assert heads == ["POST /v2/identify \u2192 sent 200", "POST /v2/track \u2192 sent 200"]
    calls = await accepted.locator(".call-json").all_inner_texts()
    assert '\n  "event": "renewMembership",\n' in calls[1]
    await page.screenshot(path=str(artifacts / "debug-open.png"), full_page=True)

    await page.fill("#filter-event", "renew")
    assert await rejected.is_hidden()
    assert await accepted.is_visible()
    assert await page.locator("#count").inner_text() == "3 events, 1 shown"
    await page.fill("#filter-event", "")
    await page.fill("#filter-user", "anon-5")
    assert await rejected.is_hidden()
    assert await accepted.is_visible()
    await page.select_option("#filter-status", "rejected")
    assert await accepted.is_hidden()

    # The filters are kept: after a reload they are back, and apply to what arrives.
    await page.reload()
    await page.wait_for_selector("#events[data-connected]", state="attached")
    assert await page.input_value("#filter-user") == "anon-5"
    assert await page.input_value("#filter-status") == "rejected"
    await served.post("/e", {"event": "other", "anonymous_id": "anon-5", "properties": 1})
    await served.post("/e", {"event": "other", "anonymous_id": "anon-7", "properties": 1})
    await page.locator("#events tbody.event", has_text="anon-7").wait_for(state="attached")
    assert await page.locator("#events tbody.event", has_text="anon-5").is_visible()
    assert await page.locator("#events tbody.event", has_text="anon-7").is_hidden()
    await page.screenshot(path=str(artifacts / "debug-filtered.png"), full_page=True)


async def test_debugger_pause_clear_and_a_bounded_list(
    browser: Browser, served: Collector, artifacts: Path
) -> None:
    page = await open_debugger(browser, served)
    await served.post("/e", {"event": "first", "anonymous_id": "a1"})
    await page.locator("#events tbody.event", has_text="first").wait_for()

    await page.click("#pause")
    await served.post("/e", {"event": "whilePaused", "anonymous_id": "a1"})
    await eventually(lambda: _contains(page.locator("#count").inner_text(), "1 new event"))
    assert await rows(page) == 1  # paused: no new row
    await page.screenshot(path=str(artifacts / "debug-paused.png"), full_page=True)
    await page.click("#pause")  # resume: what came meanwhile is shown
    await page.locator("#events tbody.event", has_text="whilePaused").wait_for()
    assert await rows(page) == 2

    await page.click("#clear")
    assert await rows(page) == 0
    assert await page.locator("#count").inner_text() == "0 events"

    # More events than the list keeps: the oldest go, and the count says so.
    for start in range(0, LIMIT + 20, 100):
        batch = [{"event": f"bulk{n}", "anonymous_id": "a2"} for n in range(start, start + 100)][
            : LIMIT + 20 - start
        ]
        await served.post("/e", {"batch": batch})
    await page.locator("#events tbody.event", has_text=f"bulk{LIMIT + 19}").wait_for()
    assert await rows(page) == LIMIT
    assert await page.locator("#events tbody[data-event=bulk19]").count() == 0
    assert await page.locator("#events tbody[data-event=bulk20]").count() == 1
    assert await page.locator("#count").inner_text() == (
        f"{LIMIT} events (the latest {LIMIT}; 20 older removed)"
    )
    # The chart counted them: the accepted line stands above zero.
    await eventually(lambda: _positive(page.evaluate(ACCEPTED_PIXELS)))
    await page.screenshot(path=str(artifacts / "debug-bounded.png"))


async def _contains(text: Awaitable[str], part: str) -> bool:
    return part in await text


async def test_debugger_is_off_without_an_admin_token(collector: Collector) -> None:
    status, _, _ = await collector.get("/debug")
    assert status == 404
