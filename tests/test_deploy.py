"""The documented deployment: a real nginx on loopback in front of the collector, and the
systemd unit's command line."""

from __future__ import annotations

import asyncio
import configparser
import ipaddress
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS, SEED_EVENT, Collector, StartCollector
from fake_outbound import FakeOutbound
from playwright.async_api import async_playwright
from test_browser import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CLIENT = "127.0.0.9"  # the visitor's address, as nginx sees it
PAGE_TAG = '<script defer src="/c/s.js" data-allow-automation></script>'


@pytest.fixture
async def proxied(
    start_collector: StartCollector, tmp_path: Path
) -> AsyncIterator[tuple[str, Collector]]:
    """The collector behind nginx with the documented location block, both on loopback."""
    port = free_port()
    collector = await start_collector(
        # The site's pages and the collector share nginx's origin: the collector's own, which
        # it learns from public_url (never from the Host header nginx passes on).
        public_url=f"http://127.0.0.1:{port}/c",
        trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
        forward_ip="full",
        allowed_origins=("https://www.example.com",),
        bot_user_agents=None,  # the page test drives headless Chromium
    )
    documented = (DEPLOY / "nginx-collector.conf").read_text()
    location = documented.replace("127.0.0.1:8080", f"127.0.0.1:{collector.port}")
    (tmp_path / "logs").mkdir()
    config = tmp_path / "nginx.conf"
    config.write_text(
        f"""
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/logs/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    server {{
        listen 127.0.0.1:{port};
        server_name www.example.com;
        location = /page.html {{
            default_type text/html;
            return 200 '<!doctype html><title>Shop</title>{PAGE_TAG}';
        }}
        {location}
    }}
}}
"""
    )
    nginx = await asyncio.create_subprocess_exec(
        NGINX,
        "-p",
        str(tmp_path),
        "-c",
        str(config),
        "-g",
        "daemon off;",
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                if nginx.returncode is not None:
                    assert nginx.stderr is not None
                    raise AssertionError(await nginx.stderr.read()) from None
                await asyncio.sleep(0.05)
        yield base, collector
    finally:
        nginx.terminate()
        await asyncio.wait_for(nginx.wait(), 10)


async def post_as_visitor(url: str, body: object, headers: dict[str, str]) -> int:
    connector = aiohttp.TCPConnector(local_addr=(CLIENT, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        return response.status


async def test_nginx_passes_the_visitor_address_not_a_forged_one(
    proxied: tuple[str, Collector], fake: FakeOutbound
) -> None:
    base, _ = proxied
    origin = {"Origin": "https://www.example.com"}
    assert await post_as_visitor(f"{base}/c/e", {**SEED_EVENT, "event": "direct"}, origin) == 202
    forged = {**origin, "X-Forwarded-For": "203.0.113.7"}
    assert await post_as_visitor(f"{base}/c/e", {**SEED_EVENT, "event": "forged"}, forged) == 202
    received = await fake.wait_for(3)
    ips = {r.body["event"]: r.body["properties"]["collector"]["ip"] for r in received[1:]}
    assert ips == {"direct": CLIENT, "forged": CLIENT}


async def test_script_and_endpoint_work_through_the_proxy(proxied: tuple[str, Collector]) -> None:
    base, collector = proxied
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/c/s.js") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/javascript; charset=utf-8"
            script = await response.read()
        async with session.get(f"{base}/c/readyz") as response:
            assert response.status == 200
    # The script finds its endpoint under the same prefix it was loaded from.
    assert b'"/s.js"' in script
    assert b'"/e"' in script
    assert collector.queue.stored == 0


async def test_a_page_on_the_site_sends_through_the_prefix(
    proxied: tuple[str, Collector], fake: FakeOutbound
) -> None:
    base, _ = proxied
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"{base}/page.html")
            _, track = await fake.wait_for(2)
        finally:
            await browser.close()
    assert track.body["event"] == "pageView"
    assert track.body["properties"]["path"] == "/page.html"


def test_systemd_unit_runs_the_documented_command() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "outbound-collector.service")
    command = shlex.split(unit["Service"]["ExecStart"])
    assert command[0].endswith("/bin/outbound-collector")
    assert command[1] == "serve"
    result = subprocess.run(
        [sys.executable, "-m", "collector", "check", *command[2:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    assert unit["Service"]["Environment"].startswith("COLLECTOR_")
