"""The relay reaches Outbound through the proxy HTTPS_PROXY/HTTP_PROXY name, unless NO_PROXY
names Outbound's host: against a real proxy (Debian's tinyproxy) on loopback."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from conftest import SEED_EVENT
from fake_outbound import KEY, FakeOutbound
from serve_process import ServeProcess

from collector.config import Secret
from collector.outbound import Call, HttpOutbound

# Lower case first: where both are set, Python (and so aiohttp) takes the lower-case one.
PROXY_VARIABLES = [
    f"{name}_proxy" if lower else f"{name.upper()}_PROXY"
    for lower in (True, False)
    for name in ("http", "https", "all", "no")
]
TLS = Path(__file__).parent / "tls"
CALL = Call("/v2/track", {"user_id": "u1", "event": "clicked"}, "g-1", "clicked")


@pytest.fixture(autouse=True)
def no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test here sets the variables it means; none comes from the machine or conftest."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@dataclass
class Tinyproxy:
    """A tinyproxy process on 127.0.0.1, its log in a file."""

    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def requests(self) -> list[str]:
        """The request lines it received, in order: `CONNECT host:port HTTP/1.1` for a
        tunnel, `POST http://host:port/path HTTP/1.1` for a plain request."""
        return re.findall(r"Request \(file descriptor \d+\): (.+)", self.log.read_text())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_tinyproxy(directory: Path, connect_ports: list[int], basic_auth: str = "") -> Tinyproxy:
    """Run tinyproxy in the foreground on a free loopback port; CONNECT only to these ports."""
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    assert Path(binary).exists(), "tinyproxy is missing: apt-get install tinyproxy"
    port, log = free_port(), directory / "tinyproxy.log"
    config = directory / "tinyproxy.conf"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "Listen 127.0.0.1",
                "Allow 127.0.0.1",
                "Timeout 30",
                "MaxClients 50",
                f'LogFile "{log}"',
                "LogLevel Connect",  # a line per connection and per request line
                *(f"ConnectPort {p}" for p in connect_ports),
                *([f"BasicAuth {basic_auth}"] if basic_auth else []),
                "",
            ]
        )
    )
    process = subprocess.Popen(
        [binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    proxy = Tinyproxy(f"http://127.0.0.1:{port}", log, process)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proxy
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                proxy.stop()
                output = log.read_text() if log.exists() else ""
                raise AssertionError(f"tinyproxy did not start:\n{output}") from None
            time.sleep(0.05)


StartProxy = Callable[..., Tinyproxy]


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[StartProxy]:
    started: list[Tinyproxy] = []

    def start(connect_ports: list[int], basic_auth: str = "") -> Tinyproxy:
        directory = tmp_path / f"proxy{len(started)}"
        directory.mkdir()
        started.append(start_tinyproxy(directory, connect_ports, basic_auth))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


def tls_served() -> ssl.SSLContext:
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(TLS / "localhost.crt", TLS / "localhost.key")
    return served


@pytest.fixture
async def https_fake() -> AsyncIterator[FakeOutbound]:
    """The fake Outbound over https, with the self-signed certificate in tests/tls."""
    outbound = FakeOutbound(tls=tls_served())
    await outbound.start()
    yield outbound
    await outbound.close()


async def send(url: str, times: int, tls: ssl.SSLContext | None = None) -> list[int | None]:
    """Send a call `times` times, one after the other, with one client; the statuses."""
    client = HttpOutbound(url, Secret(KEY), 5.0, tls=tls)
    try:
        return [(await client.send(CALL)).status for _ in range(times)]
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("variable", "credentials"), [("HTTPS_PROXY", ""), ("https_proxy", "relay:proxy-secret")]
)
async def test_https_goes_through_the_https_proxy_in_a_tunnel(
    https_fake: FakeOutbound,
    tinyproxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    credentials: str,
) -> None:
    proxy = tinyproxy(connect_ports=[https_fake.port], basic_auth=credentials.replace(":", " "))
    at = f"//{credentials}@" if credentials else "//"
    monkeypatch.setenv(variable, proxy.url.replace("//", at))
    trusting = ssl.create_default_context(cafile=TLS / "localhost.crt")
    assert await send(https_fake.url, 2, trusting) == [200, 200]
    # The proxy saw one tunnel (kept alive for both calls), never the key; Outbound got the
    # key and never the proxy's credentials.
    assert proxy.requests() == [f"CONNECT 127.0.0.1:{https_fake.port} HTTP/1.1"]
    assert KEY not in proxy.log.read_text()
    assert [r.headers["X-Outbound-Key"] for r in https_fake.received] == [KEY, KEY]
    assert not any("Proxy-Authorization" in r.headers for r in https_fake.received)


async def test_http_goes_through_the_http_proxy_with_its_credentials(
    fake: FakeOutbound,
    tinyproxy: StartProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = tinyproxy(connect_ports=[], basic_auth="relay proxy-secret")
    monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("//", "//relay:proxy-secret@"))
    # One call: tinyproxy closes a client's connection after each answer without saying so,
    # and a second call racing that close would be one failed attempt.
    with caplog.at_level(logging.INFO, logger="collector.outbound"):
        assert await send(fake.url, 1) == [200]
    assert proxy.requests() == [f"POST http://127.0.0.1:{fake.port}/v2/track HTTP/1.1"]
    [received] = fake.received
    assert received.headers["X-Outbound-Key"] == KEY
    assert "Proxy-Authorization" not in received.headers
    assert "tinyproxy" in received.headers["Via"]
    assert f"calls to Outbound go through the proxy {proxy.url}" in caplog.text
    assert "proxy-secret" not in caplog.text


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1:1,127.0.0.1", "*"])
async def test_no_proxy_names_the_hosts_reached_directly(
    fake: FakeOutbound, tinyproxy: StartProxy, monkeypatch: pytest.MonkeyPatch, no_proxy: str
) -> None:
    proxy = tinyproxy(connect_ports=[fake.port])
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy)
    assert await send(fake.url, 2) == [200, 200]
    assert proxy.requests() == []
    assert len(fake.received) == 2


async def test_serve_relays_through_the_proxy_from_its_environment(
    tmp_path: Path, https_fake: FakeOutbound, tinyproxy: StartProxy
) -> None:
    proxy = tinyproxy(connect_ports=[https_fake.port])
    env = {
        "OUTBOUND_API_KEY": KEY,
        "COLLECTOR_OUTBOUND_URL": https_fake.url,
        "HTTPS_PROXY": proxy.url,
        "SSL_CERT_FILE": str(TLS / "localhost.crt"),  # OpenSSL's trust store for the process
    }
    server = await asyncio.to_thread(
        ServeProcess, ["--data-dir", str(tmp_path / "data")], env=env, log=tmp_path / "log"
    )
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(server.base_url + "/e", json=SEED_EVENT) as response,
        ):
            assert response.status == 202
        identify, track = await https_fake.wait_for(2)
    finally:
        code = await asyncio.to_thread(server.stop, signal.SIGTERM)
    assert code == 0
    assert (identify.endpoint, track.endpoint) == ("identify", "track")
    assert track.headers["X-Outbound-Key"] == KEY
    tunnels = proxy.requests()
    assert tunnels
    assert set(tunnels) == {f"CONNECT 127.0.0.1:{https_fake.port} HTTP/1.1"}
    output = server.output()
    assert f"calls to Outbound go through the proxy {proxy.url}" in output
    assert KEY not in output
