"""Hostile clients and the log (issue 17, item 8), against a real `serve` process: what a
client sends is escaped and cut short in log lines, a request writes a bounded amount of
log, and max_gzip_ratio holds for chunked bodies too."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from serve_process import ServeProcess

from collector import logs

FORGED = "ERROR collector.relay [-] relay PAUSED: Outbound refused the API key"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServeProcess]:
    process = await asyncio.to_thread(
        ServeProcess,
        ["--data-dir", str(tmp_path / "data"), "--rate-limit-per-ip", "0"],
        env={},
        log=tmp_path / "log",
    )
    yield process
    await asyncio.to_thread(process.stop)


async def raw_post(base_url: str, path: str, head: bytes, body: bytes) -> bytes:
    """POST over a socket, so that the framing (chunked, no length) is exactly as written."""
    address = urlsplit(base_url)
    assert address.hostname is not None
    assert address.port is not None
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head + body
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def chunked(body: bytes, size: int = 64) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def bomb(key_bytes: int) -> bytes:
    """A few hundred bytes of gzip that decode to a batch with one key of `key_bytes`."""
    return gzip.compress(b'{"batch": [], "' + b"k" * key_bytes + b'": 1}', 9)


TEXT = {"Content-Type": "text/plain"}
GZIP_CHUNKED = (
    b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


@pytest.mark.parametrize("path", ["/e", "/v2/track", "/v2/identify"])
async def test_max_gzip_ratio_holds_for_chunked_bodies(server: ServeProcess, path: str) -> None:
    body = bomb(500_000)
    assert len(body) < 1000  # 500 KB from under 1 KB: a ratio far above 100
    answer = await raw_post(server.base_url, path, GZIP_CHUNKED, chunked(body))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"max_gzip_ratio" in answer
    # A body within the ratio is taken, chunked or not.
    fine = gzip.compress(orjson.dumps({"event": "x", "user_id": "u", "anonymous_id": "a"}))
    answer = await raw_post(server.base_url, path, GZIP_CHUNKED, chunked(fine, 8))
    assert answer.startswith(b"HTTP/1.1 202") or answer.startswith(b"HTTP/1.1 400"), answer


async def test_a_client_cannot_forge_a_log_line(server: ServeProcess) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("/e", "/v2/track"):
            batch = {"batch": [{"event": "x"}], f"k\n{FORGED}\r\n\x1b[2J": 1}
            async with session.post(
                server.base_url + path, data=orjson.dumps(batch), headers=TEXT
            ) as answer:
                assert answer.status == 400
    await asyncio.sleep(0.3)
    lines = server.output().splitlines()
    assert not [line for line in lines if line.startswith("ERROR")]
    assert any("\\nERROR collector.relay" in line for line in lines)  # shown, escaped
    assert "\x1b" not in server.output()


async def test_log_volume_per_request_is_bounded(server: ServeProcess) -> None:
    before = len(server.output())
    for _ in range(20):
        for path in ("/e", "/v2/track", "/v2/identify"):
            # 500 KB keys: one within the ratio (plain), one far beyond it (chunked gzip).
            plain = b'{"batch": [], "' + b"k" * 500_000 + b'": 1}'
            await raw_post(
                server.base_url,
                path,
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(plain),
                plain,
            )
            await raw_post(server.base_url, path, GZIP_CHUNKED, chunked(bomb(500_000)))
    await asyncio.sleep(0.3)
    written = server.output()[before:]
    lines = written.splitlines()
    # /e refuses the plain bodies as a whole (a batch with a stray key), /v2/* per event;
    # the bombs are refused everywhere. Each kind of line is written once, then counted
    # (within the minute, the count is still to come): 80 requests, 3 lines, each short.
    messages = sorted(line.split("] ", 1)[1] for line in lines)
    assert [message[:20] for message in messages] == [
        "refused 400: a batch",
        "refused 413: the bod",
        "rejected every event",
    ]
    assert max(len(line) for line in lines) < 600
    assert len(written) < 80 * 600  # 10 MB before: 500 KB a line


def test_clip() -> None:
    assert logs.clip("plain") == "plain"
    assert logs.clip("a\nb\r\x1b\u2028") == "a\\nb\\r\\x1b\\u2028"
    assert logs.clip("x" * 1000, 10) == "xxxxxxxxxx… (1000 characters)"
    assert logs.clip(zlib).startswith("<module")  # anything, as text
