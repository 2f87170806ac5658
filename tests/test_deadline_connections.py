"""Hostile clients and connections (issue 17, item 7), against real `serve` processes: the
header deadline runs from accept, one address holds a capped number of connections, the
systemd unit raises the descriptor limit, and a failed accept is logged once an interval."""

from __future__ import annotations

import asyncio
import configparser
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from serve_process import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
# serve in a process whose soft limit of descriptors is 64, so that it runs out quickly.
FEW_DESCRIPTORS = (
    sys.executable,
    "-c",
    "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
    "from collector.cli import main; sys.exit(main(sys.argv[1:]))",
)

Start = Callable[..., Awaitable[ServeProcess]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Start]:
    running: list[ServeProcess] = []

    async def start(*args: str, command: tuple[str, ...] | None = None) -> ServeProcess:
        extra = {"command": command} if command else {}
        process = await asyncio.to_thread(
            ServeProcess,
            ["--data-dir", str(tmp_path / f"data{len(running)}"), *args],
            env={},
            log=tmp_path / f"log{len(running)}",
            **extra,
        )
        running.append(process)
        return process

    yield start
    for process in running:
        await asyncio.to_thread(process.stop)


def address(process: ServeProcess) -> tuple[str, int]:
    parts = urlsplit(process.base_url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection within `seconds` (nothing sent by us)."""
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_a_silent_connection_is_closed_at_the_header_deadline(serve: Start) -> None:
    server: ServeProcess = await serve("--header-timeout", "0.5")
    reader, writer = await asyncio.open_connection(*address(server))
    # keepalive_timeout is 75 s: the deadline from accept is what closes it.
    assert await closed_within(reader, 3)
    writer.close()


async def test_connections_per_address_are_capped(serve: Start) -> None:
    server: ServeProcess = await serve("--connections-per-ip", "5")
    host, port = address(server)
    held = [await asyncio.open_connection(host, port) for _ in range(5)]
    await asyncio.sleep(0.2)
    reader, writer = await asyncio.open_connection(host, port)
    assert await closed_within(reader, 2)  # the sixth is closed at once
    writer.close()
    for _, held_writer in held:
        held_writer.close()
    await asyncio.sleep(0.3)
    # Once they are gone, the address may connect again, and is answered.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    await asyncio.sleep(0.2)
    assert server.output().count("over the cap of 5") == 1


async def test_running_out_of_descriptors_is_logged_once_an_interval(serve: Start) -> None:
    server: ServeProcess = await serve("--connections-per-ip", "1000", command=FEW_DESCRIPTORS)
    host, port = address(server)
    held = []
    for _ in range(100):  # more than 64 descriptors' worth
        try:
            held.append(await asyncio.wait_for(asyncio.open_connection(host, port), 2))
        except (OSError, TimeoutError):
            break
    await asyncio.sleep(3)  # asyncio tries to accept again every second
    output = server.output()
    assert output.count("cannot accept connections") == 1
    assert "Traceback" not in output
    for _, writer in held:
        writer.close()


def test_the_systemd_unit_raises_the_descriptor_limit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "deploy" / "outbound-collector.service")
    assert int(unit["Service"]["LimitNOFILE"]) >= 65536
