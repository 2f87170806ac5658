"""The documented deployments: a real nginx on loopback in front of the collector, and in
front of two collectors sharing the documented Redis; the systemd units, checked by
systemd-analyze and by running their command lines."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import ipaddress
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from conftest import CHROMIUM, CHROMIUM_ARGS, SEED_EVENT, Collector, StartCollector, eventually
from fake_outbound import KEY, FakeOutbound
from playwright.async_api import async_playwright
from redis_server import RedisServer
from serve_process import ServeProcess
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
    server = f"""
    server {{
        listen 127.0.0.1:{port};
        server_name www.example.com;
        location = /page.html {{
            default_type text/html;
            return 200 '<!doctype html><title>Shop</title>{PAGE_TAG}';
        }}
        {location}
    }}
"""
    async with nginx(tmp_path, server, port) as base:
        yield base, collector


@contextlib.asynccontextmanager
async def nginx(directory: Path, http: str, port: int) -> AsyncIterator[str]:
    """A real nginx with `http` inside its http block, checked by `nginx -t` first, then
    running until the block ends; yields its base URL (it listens on 127.0.0.1:`port`)."""
    (directory / "logs").mkdir(parents=True)
    config = directory / "nginx.conf"
    config.write_text(
        f"""
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/logs/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
{http}
}}
"""
    )
    command = [NGINX, "-p", str(directory), "-c", str(config)]
    tested = await asyncio.create_subprocess_exec(*command, "-t", stderr=subprocess.PIPE)
    _, said = await tested.communicate()
    assert tested.returncode == 0, said.decode()
    process = await asyncio.create_subprocess_exec(
        *command, "-g", "daemon off;", stderr=subprocess.PIPE
    )
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                if process.returncode is not None:
                    assert process.stderr is not None
                    raise AssertionError(await process.stderr.read()) from None
                await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def post_as_visitor(url: str, body: object, headers: dict[str, str]) -> int:
    connector = aiohttp.TCPConnector(local_addr=(CLIENT, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        return response.status


async def visitor_answer(url: str, body: object, headers: dict[str, str]) -> dict[str, Any]:
    """What the collector answers the visitor's 202."""
    connector = aiohttp.TCPConnector(local_addr=(CLIENT, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        assert response.status == 202, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


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


def unit_directives(path: Path) -> list[tuple[str, str]]:
    """The [Service] section's directives in order, repeated ones included (configparser
    keeps only the last of each)."""
    found, section = [], ""
    for line in path.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            found.append((name, value))
    return found


@pytest.mark.parametrize(
    ("unit", "instance"),
    [
        ("outbound-collector.service", "outbound-collector.service"),
        ("outbound-collector@.service", "outbound-collector@8081.service"),
    ],
)
def test_systemd_analyze_verifies_the_units(tmp_path: Path, unit: str, instance: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd has it)")
    # Installed where the unit expects it: here, this environment's command.
    installed = str(Path(sys.executable).parent / "outbound-collector")
    text = (DEPLOY / unit).read_text()
    assert "/opt/outbound-collector/bin/outbound-collector" in text
    (tmp_path / unit).write_text(
        text.replace("/opt/outbound-collector/bin/outbound-collector", installed)
    )
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / instance)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # A directive it cannot parse is only a warning: any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


class DocumentedRedis(RedisServer):
    """redis-server with deploy/redis-collector.conf as it is documented, but for the port,
    the directory and the passwords (fresh ones)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, password=secrets.token_urlsafe(24))
        self.collector_password = secrets.token_urlsafe(24)

    def _write_config(self) -> Path:
        documented = (DEPLOY / "redis-collector.conf").read_text()
        assert "\nport 6379\n" in documented
        assert "OPERATOR-PASSWORD" in documented
        assert "COLLECTOR-PASSWORD" in documented
        assert self.password is not None
        text = (
            documented.replace("\nport 6379\n", f"\nport {self.port}\n")
            .replace("OPERATOR-PASSWORD", self.password)
            .replace("COLLECTOR-PASSWORD", self.collector_password)
        )
        text += f'\ndir "{self.directory}"\nlogfile "{self.log}"\ndaemonize no\n'
        config = self.directory / "redis.conf"
        config.write_text(text)
        config.chmod(0o600)
        return config

    @property
    def collector_url(self) -> str:
        """COLLECTOR_QUEUE_URL as the environment file holds it: the collectors' own user."""
        return f"redis://collector:{self.collector_password}@127.0.0.1:{self.port}/0"


@pytest.fixture
def documented_redis(tmp_path: Path) -> Iterator[DocumentedRedis]:
    server = DocumentedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


def as_collector(server: DocumentedRedis) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=server.port, username="collector", password=server.collector_password
    )


def test_the_documented_redis_keeps_events_and_lets_collectors_do_no_more(
    documented_redis: DocumentedRedis,
) -> None:
    with as_collector(documented_redis) as client:
        said = {
            name: client.config_get(name)[name]
            for name in ("appendonly", "appendfsync", "maxmemory-policy", "bind")
        }
        assert said == {
            "appendonly": "yes",
            "appendfsync": "everysec",
            # Eviction would delete acknowledged events to make room.
            "maxmemory-policy": "noeviction",
            "bind": "127.0.0.1",
        }
        client.set("collector:probe", "1")  # its own keys
        refused: list[Callable[[], object]] = [
            lambda: client.set("elsewhere", "1"),
            client.flushall,
            lambda: client.config_set("appendonly", "no"),
            client.shutdown,
        ]
        for command in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                command()
    with (
        redis.Redis(host="127.0.0.1", port=documented_redis.port) as anonymous,
        pytest.raises(redis.exceptions.AuthenticationError),
    ):
        anonymous.ping()


def test_the_commands_work_as_the_documented_collector_user(
    documented_redis: DocumentedRedis, tmp_path: Path
) -> None:
    env = {"COLLECTOR_QUEUE_URL": documented_redis.collector_url}
    for command in (
        ["stats", "--json"],
        ["dead-letters", "list"],
        ["dead-letters", "purge", "--all"],
    ):
        result = run_command(env, *command, "--data-dir", str(tmp_path))
        assert result.returncode == 0, result.stderr


def run_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """An `outbound-collector` command, with only `env` for settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("COLLECTOR_", "OUTBOUND_"))}
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check_with(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`outbound-collector check` as a unit would run it, with only `env` for settings."""
    return run_command(env, "check", *args)


def test_template_unit_with_its_environment_file_checks_clean(
    documented_redis: DocumentedRedis, tmp_path: Path
) -> None:
    """The template's command and environment, the queue from the environment file, on the
    documented Redis: `check` reads appendonly and appendfsync and has nothing to warn of."""
    directives = unit_directives(DEPLOY / "outbound-collector@.service")
    port = str(free_port())
    env: dict[str, str] = {}
    for name, value in directives:
        if name == "Environment":
            key, _, setting = value.replace("%i", port).partition("=")
            env[key] = setting
    # The password is in the environment file only: not in the unit, which anyone may read.
    assert not any("QUEUE_URL" in value for name, value in directives if name == "Environment")
    files = [value for name, value in directives if name == "EnvironmentFile"]
    assert files == ["/etc/outbound-collector/env", "-/etc/outbound-collector/%i.env"]
    assert env["COLLECTOR_DATA_DIR"] == f"/var/lib/outbound-collector/{port}"  # StateDirectory
    env["COLLECTOR_DATA_DIR"] = str(tmp_path / "data" / port)
    env["COLLECTOR_QUEUE_URL"] = documented_redis.collector_url
    command = shlex.split(dict(directives)["ExecStart"].replace("%i", port))
    assert command[0].endswith("/bin/outbound-collector")
    assert command[1] == "serve"
    result = check_with(env, *command[2:])
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("all is well\n"), result.stderr
    assert documented_redis.collector_password not in result.stdout + result.stderr
    # durability = "full" wants appendfsync always, which the documented everysec is not.
    full = check_with({**env, "COLLECTOR_DURABILITY": "full"}, *command[2:])
    assert "appendfsync everysec but durability is full" in full.stderr
    assert dict(directives)["KillSignal"] == "SIGTERM"


async def metric(base_url: str, name: str) -> float:
    """A counter of one collector's /metrics (loopback clients may read it)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base_url}/metrics") as response,
    ):
        text = await response.text()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"no {name} in /metrics"
    return float(match.group(1))


async def test_two_collectors_behind_nginx_share_the_documented_redis(
    documented_redis: DocumentedRedis, fake: FakeOutbound, tmp_path: Path
) -> None:
    """deploy/nginx-collectors.conf in front of two collectors on one Redis, in their data
    directories as the template unit runs them: requests go to both, the visitor's address
    is the one nginx saw, a browser's resend through the other collector is a duplicate, and
    with one collector stopped the other takes every request and relays everything."""
    port = free_port()
    unit = dict(
        value.partition("=")[::2]
        for name, value in unit_directives(DEPLOY / "outbound-collector@.service")
        if name == "Environment"
    )

    def data_dir(instance: str) -> Path:
        """The instance's data directory as the template unit gives it, under tmp_path."""
        return tmp_path / unit["COLLECTOR_DATA_DIR"].replace("%i", instance).lstrip("/")

    env = {
        "OUTBOUND_API_KEY": KEY,
        "COLLECTOR_OUTBOUND_URL": fake.url,
        "COLLECTOR_QUEUE_URL": documented_redis.collector_url,
        "COLLECTOR_TRUSTED_PROXIES": "127.0.0.1",
        "COLLECTOR_FORWARD_IP": "full",
        "COLLECTOR_ALLOWED_ORIGINS": "https://www.example.com",
        "COLLECTOR_PUBLIC_URL": f"http://127.0.0.1:{port}/c",
    }
    collectors = [
        ServeProcess(
            ["--data-dir", str(data_dir(instance))],
            env=env,
            log=tmp_path / f"collector{n}.log",
        )
        for n, instance in enumerate(("8081", "8082"))
    ]
    try:
        documented = (DEPLOY / "nginx-collectors.conf").read_text()
        assert "server 127.0.0.1:8081 " in documented
        assert "listen 80;" in documented
        for n, collector in enumerate(collectors):
            collector_port = collector.base_url.rsplit(":", 1)[1]
            documented = documented.replace(
                f"127.0.0.1:808{n + 1} ", f"127.0.0.1:{collector_port} "
            )
        documented = documented.replace("listen 80;", f"listen 127.0.0.1:{port};")
        async with nginx(tmp_path / "nginx", documented, port) as base:
            origin = {"Origin": "https://www.example.com", "X-Forwarded-For": "203.0.113.7"}
            for n in range(6):
                body = {**SEED_EVENT, "event": f"before{n}"}
                assert await post_as_visitor(f"{base}/c/e", body, origin) == 202
            # Round robin: each collector took some of them.
            accepted = [
                await metric(c.base_url, "collector_events_accepted_total") for c in collectors
            ]
            assert sum(accepted) == 6
            assert min(accepted) > 0, accepted
            # A browser sends an event again (its beacon's answer was lost) and reaches the
            # other collector, which knows the event: both derive its dedupe key with the
            # same key, kept in Redis.
            resent = {**SEED_EVENT, "event": "resent", "message_id": "m-resent-0001"}
            answers = [await visitor_answer(f"{c.base_url}/e", resent, origin) for c in collectors]
            assert [answer.get("duplicates", 0) for answer in answers] == [0, 1]
            survivor = await metric(collectors[1].base_url, "collector_events_accepted_total")
            # systemctl stop on one: it hands its partitions back and exits; nginx then
            # finds its port closed and sends everything to the other.
            # (On a thread: it waits for the exit while the collector finishes its calls to
            # the fake Outbound, which runs on this loop.)
            assert await asyncio.to_thread(collectors[0].stop, signal.SIGTERM) == 0
            for n in range(6):
                body = {**SEED_EVENT, "event": f"after{n}"}
                assert await post_as_visitor(f"{base}/c/e", body, origin) == 202
            assert await metric(collectors[1].base_url, "collector_events_accepted_total") == (
                survivor + 6
            )
            names = {f"before{n}" for n in range(6)} | {f"after{n}" for n in range(6)}
            names.add("resent")

            def delivered() -> set[str]:
                return {r.body["event"] for r in fake.tracks()}

            await eventually(lambda: delivered() == names, within=30)
            assert {r.body["properties"]["collector"]["ip"] for r in fake.tracks()} == {CLIENT}
    finally:
        for collector in collectors:
            await asyncio.to_thread(collector.stop, signal.SIGTERM)
