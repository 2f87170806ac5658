"""The script in real Chromium: pages on one origin, the collector on another, Outbound faked.

Events are checked where it matters, at the fake Outbound after the relay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import CHROMIUM, CHROMIUM_ARGS, Collector, eventually
from fake_outbound import FakeOutbound, Received
from playwright.async_api import Browser, Page, Request, async_playwright

from collector.config import Settings
from collector.script import STUB, Script

ROOT = Path(__file__).resolve().parent.parent

HOME = """<!doctype html><html><head><title>Home</title>{stub}{tag}</head><body>
<button id="renew" data-outbound="renewMembership" data-outbound-plan="gold">Renew</button>
<button id="plain">Plain button</button>
<button id="to-a" onclick="history.pushState({{}}, '', '/app/a')">A</button>
<button id="to-b" onclick="history.pushState({{}}, '', '/app/b')">B</button>
<button id="to-c" onclick="history.pushState({{}}, '', '/app/c')">C</button>
<button id="same" onclick="history.replaceState({{}}, '', location.href)">same</button>
<form id="signup" action="/thanks" method="post"
      data-outbound="signedUp" data-outbound-source="footer">
  <input name="email" type="email"><input name="password" type="password">
  <button id="submit" type="submit">Sign up</button>
</form>
</body></html>"""
THANKS = "<!doctype html><html><head><title>Thanks</title>{tag}</head><body>Thanks</body></html>"


@dataclass
class Site:
    """Pages on one loopback origin, a collector on another, and the fake Outbound behind it."""

    pages: TestServer
    collector: Collector
    fake: FakeOutbound
    attributes: str = "data-allow-automation"
    stub: str = ""
    integrity: str = ""
    body_seen: list[str] | None = None
    refusals: list[str] = dataclasses.field(default_factory=list)

    def url(self, path: str) -> str:
        return str(self.pages.make_url(path))

    @property
    def origin(self) -> str:
        return self.url("/").rstrip("/")

    def tag(self) -> str:
        src = f"http://127.0.0.1:{self.collector.port}/s.js"
        pinned = f'integrity="{self.integrity}" crossorigin="anonymous" ' if self.integrity else ""
        return f'<script defer src="{src}" {pinned}{self.attributes}></script>'

    def render(self, template: str) -> str:
        return template.format(stub=self.stub, tag=self.tag())

    def page_views(self) -> list[str]:
        return [
            r.body["properties"]["path"]
            for r in self.fake.tracks()
            if r.body["event"] == "pageView"
        ]

    def events(self) -> list[Received]:
        return [r for r in self.fake.tracks() if r.body["event"] != "pageView"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def site(settings: Settings, fake: FakeOutbound) -> AsyncIterator[Site]:
    app = web.Application()
    pages = TestServer(app, host="127.0.0.1")
    collector = Collector(settings, port=free_port())
    site = Site(pages, collector, fake)

    async def home(request: web.Request) -> web.Response:
        return web.Response(text=site.render(HOME), content_type="text/html")

    async def thanks(request: web.Request) -> web.Response:
        site.body_seen = [await request.text()]
        return web.Response(text=site.render(THANKS), content_type="text/html")

    async def refuse(request: web.Request) -> web.Response:
        # A collector of the page's own origin that answers the first batch with the status
        # in the path, and each later one with a 202. Batches are told apart by their body
        # (sent_at changes): Chromium itself resends a request once that got a 408 on a
        # reused connection, and that is not the script retrying.
        body = await request.text()
        if body not in site.refusals:
            site.refusals.append(body)
        if site.refusals.index(body) == 0:
            return web.json_response({"error": "no"}, status=int(request.match_info["status"]))
        return web.json_response({"accepted": 1, "rejected": []}, status=202)

    app.router.add_get("/", home)
    app.router.add_get("/app/{page}", home)
    app.router.add_route("*", "/thanks", thanks)
    app.router.add_post("/refuse/{status}", refuse)
    await pages.start_server()
    # Headless Chromium says so in its user agent; these tests are the wanted automation.
    collector.settings = dataclasses.replace(
        settings, allowed_origins=(site.origin,), bot_user_agents=None
    )
    await collector.start()
    yield site
    await collector.stop()
    await pages.close()


async def open_page(browser: Browser, site: Site, path: str = "/") -> tuple[Page, list[Request]]:
    page = await browser.new_page()
    sent: list[Request] = []
    page.on(
        "request",
        lambda request: (
            sent.append(request)
            if request.url.startswith(f"http://127.0.0.1:{site.collector.port}/e")
            else None
        ),
    )
    await page.goto(site.url(path))
    return page, sent


async def test_page_views_on_load_and_spa_navigation(browser: Browser, site: Site) -> None:
    page, _ = await open_page(browser, site)
    await site.fake.wait_for(2)  # identify of the new visitor, then the page view
    assert site.page_views() == ["/"]
    first = next(r for r in site.fake.tracks() if r.body["event"] == "pageView")
    assert first.body["properties"]["title"] == "Home"
    assert first.body["properties"]["url"] == site.url("/")
    # The message id (sent on as the GUID) begins with the time in hex milliseconds.
    guid = first.headers["X-Outbound-GUID"]
    assert re.fullmatch("[0-9a-f]{32}", guid), guid
    assert abs(int(guid[:12], 16) / 1000 - first.at) < 60

    for button in ("#to-a", "#to-b", "#to-c"):
        await page.click(button)
    await page.click("#same")  # replaceState to the same URL: no page view
    await page.go_back()
    await page.go_forward()
    await site.fake.wait_for(7)
    await asyncio.sleep(1.5)  # let anything extra arrive, then check there is none
    assert site.page_views() == ["/", "/app/a", "/app/b", "/app/c", "/app/b", "/app/c"]
    tracks = [r for r in site.fake.tracks() if r.body["event"] == "pageView"]
    assert tracks[2].body["properties"]["referrer"] == site.url("/app/a")


async def test_marked_button_and_form_with_navigation(browser: Browser, site: Site) -> None:
    page, sent = await open_page(browser, site)
    await page.click("#renew")
    await page.fill("input[name=email]", "jane@example.com")
    await page.fill("input[name=password]", "hunter2-secret")
    async with page.expect_navigation():
        await page.click("#submit")
    assert site.body_seen
    assert "hunter2-secret" in site.body_seen[0]  # the form itself worked
    await eventually(lambda: len(site.events()) >= 2)
    await asyncio.sleep(1)  # time for a duplicate to show, if the next page sent one
    assert site.collector.queue.stored == 4  # two page views, the click, the form: once each
    assert [
        (r.body["event"], r.body["properties"].get("plan"), r.body["properties"].get("source"))
        for r in site.events()
    ] == [
        ("renewMembership", "gold", None),
        ("signedUp", None, "footer"),
    ]
    await eventually(lambda: site.page_views() == ["/", "/thanks"])
    # No field value ever left the page, to the collector or to Outbound.
    bodies = [request.post_data or "" for request in sent]
    assert bodies
    for text in [*bodies, *(str(r.body) for r in site.fake.received)]:
        assert "jane@example.com" not in text
        assert "hunter2-secret" not in text


async def test_calls_before_the_script_loads_arrive_in_order(browser: Browser, site: Site) -> None:
    site.stub = STUB + (
        "<script>outbound('track', 'early1'); outbound('track', 'early2', {n: 2});"
        "history.replaceState({}, '', '/app/later');"
        "outbound('track', 'early3')</script>"
    )
    await open_page(browser, site)
    await eventually(lambda: len(site.events()) == 3)
    events = site.events()
    assert [r.body["event"] for r in events] == ["early1", "early2", "early3"]
    assert events[1].body["properties"]["n"] == 2
    # Each call keeps the page it was made on.
    paths = [r.body["properties"]["collector"]["page"]["path"] for r in events]
    assert paths == ["/", "/", "/app/later"]


IDENTITY_SECRET = b"identity-secret"


def user_hash(user_id: str) -> str:
    return hmac.new(IDENTITY_SECRET, user_id.encode(), hashlib.sha256).hexdigest()


async def test_identify_then_track_under_the_known_id(browser: Browser, site: Site) -> None:
    page, _ = await open_page(browser, site)
    await site.fake.wait_for(2)
    anonymous_id = site.fake.received[0].body["user_id"]
    await page.evaluate(
        "([id, hash]) => { outbound.identify(id, {email: 'u42@example.com'}, hash);"
        " outbound.track('purchase', {total: '45.00'}); }",
        ["u42", user_hash("u42")],
    )
    await site.fake.wait_for(4)
    identify, track = site.fake.received[2:4]
    assert identify.endpoint == "identify"
    assert identify.body == {
        "user_id": "u42",
        "previous_id": anonymous_id,
        "email": "u42@example.com",
    }
    assert (track.endpoint, track.body["user_id"], track.body["event"]) == (
        "track",
        "u42",
        "purchase",
    )
    assert track.body["properties"]["total"] == "45.00"


async def test_closing_the_tab_flushes_what_was_pending(browser: Browser, site: Site) -> None:
    page, _ = await open_page(browser, site)
    await page.evaluate("outbound.track('leaving', {step: 3})")  # waits a second to batch
    await page.close(run_before_unload=True)
    await eventually(lambda: any(r.body["event"] == "leaving" for r in site.fake.tracks()))


async def test_events_wait_in_the_outbox_while_the_collector_is_down(
    browser: Browser, site: Site
) -> None:
    page, sent = await open_page(browser, site)
    await site.fake.wait_for(2)
    await site.collector.stop()
    await page.evaluate("outbound.track('offline1'); outbound.track('offline2')")
    await eventually(lambda: len(sent) >= 3, within=15)  # tried, failed, retried
    waiting = await page.evaluate("JSON.parse(localStorage.getItem('outbound:outbox')).length")
    assert waiting == 2

    await site.collector.start()
    await page.reload()
    await eventually(lambda: len(site.events()) == 2)
    await eventually(lambda: len(site.page_views()) == 2)
    await asyncio.sleep(1.5)
    assert [r.body["event"] for r in site.events()] == ["offline1", "offline2"]
    # Each event reached the restarted collector exactly once: the reload's page view and
    # the two tracks.
    assert site.collector.queue.stored == 3
    # And Outbound had each once: two page views and the two tracks (the relay may carry
    # several in one batch call, whose GUID is the batch's).
    assert len(site.fake.tracks()) == 4
    assert await page.evaluate("JSON.parse(localStorage.getItem('outbound:outbox')).length") == 0


async def test_no_preflight_and_text_plain(browser: Browser, site: Site) -> None:
    page, sent = await open_page(browser, site)
    await page.click("#renew")
    await eventually(lambda: len(site.events()) == 1)
    methods = [method for method, path, _ in site.collector.requests if path == "/e"]
    assert methods
    assert set(methods) == {"POST"}
    assert all(
        headers["Content-Type"].startswith("text/plain")
        for method, path, headers in site.collector.requests
        if path == "/e"
    )
    assert all(request.headers["content-type"].startswith("text/plain") for request in sent)


def posts_from(site: Site, path: str, origin: str) -> int:
    """POSTs to `path` that the collector received from pages on `origin`."""
    return sum(
        1
        for method, where, headers in site.collector.requests
        if (method, where) == ("POST", path) and headers.get("Origin") == origin
    )


async def outbox_empty(page: Page) -> bool:
    size: int = await page.evaluate(
        "JSON.parse(localStorage.getItem('outbound:outbox') || '[]').length"
    )
    return size == 0


# A call a page's own code makes: [status, JSON body], or the error when it cannot read it.
FETCH = """async ([url, contentType, body]) => {
    const headers = contentType ? {"Content-Type": contentType} : {};
    try {
        const response = await fetch(url, {method: "POST", headers, body});
        return [response.status, await response.json()];
    } catch (error) {
        return [0, String(error)];
    }
}"""


async def test_a_page_on_an_allowed_origin_reads_the_answers(browser: Browser, site: Site) -> None:
    page, _ = await open_page(browser, site)
    await page.evaluate("outbound.track('renewMembership', {plan: 'gold'})")
    await eventually(lambda: len(site.events()) == 1)
    # The script could read each 202 (CORS let it), so it emptied its outbox and sent each
    # batch once: the page view, then the track.
    await eventually(lambda: outbox_empty(page))
    await asyncio.sleep(1.5)  # a batch the script could not read would go again after 1 s
    assert posts_from(site, "/e", site.origin) == 2
    assert site.collector.queue.stored == 2
    event = '{"event": "x", "anonymous_id": "a1"}'
    answer = await page.evaluate(FETCH, [site.collector.url("/e"), None, event])
    assert answer == [202, {"accepted": 1, "rejected": []}]


async def test_a_page_on_a_refused_origin_reads_its_403_and_drops_the_batch(
    browser: Browser, site: Site
) -> None:
    refused = site.origin.replace("127.0.0.1", "localhost")  # same pages, another origin
    page = await browser.new_page()
    await page.goto(f"{refused}/")
    await eventually(lambda: posts_from(site, "/e", refused) == 1)  # the page view
    # An answer the script cannot read looks like a network error: it would keep the batch
    # and send it again after 1 s, 2 s more, and so on.
    await asyncio.sleep(4)
    assert posts_from(site, "/e", refused) == 1
    assert await outbox_empty(page)
    answer = await page.evaluate(
        FETCH, [site.collector.url("/e"), None, '{"event": "x", "anonymous_id": "a1"}']
    )
    assert answer == [403, {"error": f"the origin '{refused}' is not allowed to send events"}]
    assert site.collector.queue.stored == 0
    assert site.fake.received == []


async def test_a_preflighted_json_call_from_a_page(browser: Browser, site: Site) -> None:
    page, _ = await open_page(browser, site)
    track = '{"user_id": "u1", "event": "renewMembership", "properties": {"plan": "gold"}}'
    answer = await page.evaluate(
        FETCH, [site.collector.url("/v2/track"), "application/json", track]
    )
    assert answer == [202, {"accepted": 1, "rejected": []}]
    # application/json is not a simple request: Chromium asked first, and aiohttp-cors said yes.
    preflights = [
        headers
        for method, path, headers in site.collector.requests
        if (method, path) == ("OPTIONS", "/v2/track")
    ]
    assert len(preflights) == 1
    assert preflights[0]["Origin"] == site.origin
    assert preflights[0]["Access-Control-Request-Method"] == "POST"
    assert preflights[0]["Access-Control-Request-Headers"] == "content-type"
    await eventually(lambda: any(r.body.get("user_id") == "u1" for r in site.events()))


@pytest.mark.parametrize(
    ("init_script", "attributes"),
    [
        ("Object.defineProperty(navigator, 'globalPrivacyControl', {get: () => true})", None),
        ("", ""),  # an automated browser, not allowed by the tag
        ("localStorage.setItem('outbound:opt_out', 'true')", None),
        (
            "Object.defineProperty(navigator, 'doNotTrack', {get: () => '1'})",
            "data-allow-automation data-respect-dnt",
        ),
    ],
    ids=["gpc", "webdriver", "opt-out", "dnt"],
)
async def test_privacy_signals_send_nothing(
    browser: Browser, site: Site, init_script: str, attributes: str | None
) -> None:
    if attributes is not None:
        site.attributes = attributes
    page = await browser.new_page()
    if init_script:
        await page.add_init_script(init_script)
    await page.goto(site.url("/"))
    await page.click("#renew")
    await page.evaluate("outbound.track('x')")
    await page.close(run_before_unload=True)
    await asyncio.sleep(2)
    assert [r for r in site.collector.requests if r[1] == "/e"] == []
    assert site.fake.attempts == []


async def test_gpc_can_be_switched_off_by_the_site(browser: Browser, site: Site) -> None:
    site.attributes = 'data-allow-automation data-respect-gpc="false"'
    page = await browser.new_page()
    await page.add_init_script(
        "Object.defineProperty(navigator, 'globalPrivacyControl', {get: () => true})"
    )
    await page.goto(site.url("/"))
    await site.fake.wait_for(2)
    assert site.page_views() == ["/"]


async def test_generic_button_capture_is_off_by_default_and_never_sends_values(
    browser: Browser, site: Site
) -> None:
    page, _ = await open_page(browser, site)
    await page.click("#plain")
    await page.click("#renew")
    await eventually(lambda: len(site.events()) == 1)
    assert site.events()[0].body["event"] == "renewMembership"

    site.attributes = "data-allow-automation data-track-clicks data-track-forms"
    await page.reload()
    await page.click("#plain")
    await eventually(lambda: len(site.events()) == 2)
    assert site.events()[1].body["event"] == "Button clicked"
    props = site.events()[1].body["properties"]
    assert {k: v for k, v in props.items() if k != "collector"} == {
        "id": "plain",
        "text": "Plain button",
    }


async def test_bfcache_restore_is_counted(site: Site) -> None:
    async with async_playwright() as playwright:
        # Playwright turns the back/forward cache off by default; this test needs it on.
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            ignore_default_args=["--disable-back-forward-cache"],
        )
        try:
            await _restore_from_bfcache(browser, site)
        finally:
            await browser.close()


async def _restore_from_bfcache(browser: Browser, site: Site) -> None:
    page, _ = await open_page(browser, site)
    await site.fake.wait_for(2)
    await page.evaluate("window.restoredFromCache = true")
    await page.goto(site.url("/thanks"))
    await eventually(lambda: len(site.page_views()) == 2)
    await page.go_back(wait_until="commit")  # a restore fires no load event
    # The same document came back (its state survived): a bfcache restore, not a new load.
    assert await page.evaluate("window.restoredFromCache === true")
    await eventually(lambda: len(site.page_views()) == 3)
    assert site.page_views() == ["/", "/thanks", "/"]


async def test_script_pinned_with_integrity_loads(browser: Browser, site: Site) -> None:
    site.integrity = Script.packaged().integrity
    await open_page(browser, site)
    await site.fake.wait_for(2)
    assert site.page_views() == ["/"]


async def test_script_with_wrong_integrity_is_refused_by_the_browser(
    browser: Browser, site: Site
) -> None:
    site.integrity = "sha384-" + "A" * 64
    page, _ = await open_page(browser, site)
    await asyncio.sleep(1.5)
    assert await page.evaluate("typeof window.outbound") == "undefined"
    assert site.fake.attempts == []


def test_stub_in_readme_is_the_tested_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert STUB in readme
    assert re.search(r'<script defer src="https://collect\.example\.com/s\.js"', readme)


async def test_identify_lasts_across_pages_until_reset(browser: Browser, site: Site) -> None:
    page, _ = await open_page(browser, site)
    await site.fake.wait_for(2)
    anonymous_id = site.fake.received[0].body["user_id"]
    await page.evaluate(
        "([id, hash]) => outbound('identify', id, {}, hash)", ["u42", user_hash("u42")]
    )
    # A new page load: the script starts afresh and must find the user it was told of.
    await page.goto(site.url("/app/next"))
    await page.evaluate("outbound('track', 'afterLoad')")
    await eventually(lambda: any(r.body["event"] == "afterLoad" for r in site.fake.tracks()))
    after = next(r for r in site.fake.tracks() if r.body["event"] == "afterLoad")
    assert after.body["user_id"] == "u42"
    next_view = next(
        r for r in site.fake.tracks() if r.body["properties"].get("path") == "/app/next"
    )
    assert next_view.body["user_id"] == "u42"

    await page.evaluate("outbound('reset')")
    await page.goto(site.url("/app/anonymous"))
    await page.evaluate("outbound('track', 'afterReset')")
    await eventually(lambda: any(r.body["event"] == "afterReset" for r in site.fake.tracks()))
    reset = next(r for r in site.fake.tracks() if r.body["event"] == "afterReset")
    assert reset.body["user_id"] not in {"u42", anonymous_id}  # a new anonymous id


@pytest.mark.parametrize(
    ("status", "posts"),
    [(408, 2), (429, 2), (503, 2), (400, 1), (403, 1), (413, 1)],
)
async def test_what_is_retried_and_what_is_dropped(
    browser: Browser, site: Site, status: int, posts: int
) -> None:
    # The page's own origin plays the collector: its first answer is `status`, then 202s;
    # `posts` counts the batches the script sent.
    site.attributes = f'data-allow-automation data-endpoint="/refuse/{status}"'
    page, _ = await open_page(browser, site)
    await eventually(lambda: len(site.refusals) >= 1)
    await asyncio.sleep(2.5)  # the first retry comes after 1 s
    assert len(site.refusals) == posts
    assert await outbox_empty(page)


async def console_of(page: Page) -> list[str]:
    """The script's console messages on `page` so far (collected since it opened)."""
    said: list[str] = await page.evaluate("window.said || []")
    return said


# Collects what the script tells the console, from before the script runs.
CONSOLE = """window.said = [];
const warn = console.warn.bind(console);
console.warn = (...args) => { window.said.push(args.join(" ")); warn(...args); };"""


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "silent"])
async def test_debug_says_why_once(browser: Browser, site: Site, debug: bool) -> None:
    flag = " data-debug" if debug else ""
    site.attributes = "data-allow-automation" + flag

    # A command that does not exist, a rejected event, each twice; then a bot's page.
    page = await browser.new_page()
    await page.add_init_script(CONSOLE)
    await page.goto(site.url("/"))
    await page.evaluate("outbound('trak', 'x'); outbound('trak', 'y')")
    for _ in range(2):
        await page.evaluate("outbound('track', 'checkout', 'not an object'); outbound.page()")
        await eventually(lambda: outbox_empty(page))
        await asyncio.sleep(1.2)
    said = await console_of(page)
    # The page view in the same batch went through: a 202 that names the rejected event.
    rejected = (
        'outbound: 202 {"accepted":1,"rejected":[{"index":0,"errors":'
        '[{"path":"/properties","message":"must be an object, not a string"}]}]}'
    )
    assert said == (["outbound: unknown command: trak", rejected] if debug else [])

    # A page on an origin the collector refuses: one POST, and the 403 said once.
    refused = site.origin.replace("127.0.0.1", "localhost")
    page = await browser.new_page()
    await page.add_init_script(CONSOLE)
    await page.goto(f"{refused}/")
    await page.evaluate("outbound('track', 'one')")
    await eventually(lambda: posts_from(site, "/e", refused) == 2)
    await asyncio.sleep(1.5)
    assert posts_from(site, "/e", refused) == 2
    error = f"the origin '{refused}' is not allowed to send events"
    said = await console_of(page)
    assert said == ([f'outbound: 403 {{"error":"{error}"}}'] if debug else [])

    # A browser the collector takes for a bot: its events are dropped, and that is said once.
    await site.collector.stop()
    site.collector.settings = dataclasses.replace(
        site.collector.settings, bot_user_agents=re.compile("ExampleBot")
    )
    await site.collector.start()
    page = await browser.new_page(user_agent="ExampleBot/1.0")
    await page.add_init_script(CONSOLE)
    await page.goto(site.url("/"))
    await page.evaluate("outbound('track', 'one')")
    await eventually(lambda: outbox_empty(page))
    await asyncio.sleep(1.2)
    await page.evaluate("outbound('track', 'two')")
    await eventually(lambda: outbox_empty(page))
    said = await console_of(page)
    assert said == (['outbound: 202 {"accepted":0,"rejected":[],"dropped":1}'] if debug else [])

    site.attributes = flag.strip()  # no data-allow-automation: an automated browser is skipped
    page = await browser.new_page()
    await page.add_init_script(CONSOLE)
    await page.goto(site.url("/"))
    await page.evaluate("outbound('track', 'one'); outbound('track', 'two')")
    await asyncio.sleep(1.2)
    assert await console_of(page) == (
        ["outbound: webdriver: add data-allow-automation"] if debug else []
    )
    assert site.collector.queue.stored == 0  # the restarted collector got nothing from it
