"""Stopping with a body still arriving: a request whose headers came in before SIGTERM may
finish its body within a short grace period, and is answered as usual."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from conftest import SEED_EVENT, eventually
from fake_outbound import KEY, FakeOutbound
from serve_process import ServeProcess


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = await asyncio.wait_for(reader.read(4096), 30)
        if not chunk:
            break
        data += chunk
    return data


async def test_a_body_arriving_when_sigterm_comes_is_taken(
    tmp_path: Path, fake: FakeOutbound
) -> None:
    data_dir = tmp_path / "data"
    env = {"OUTBOUND_API_KEY": KEY, "COLLECTOR_OUTBOUND_URL": fake.url}
    # A body_timeout far longer than the grace: a stop that waits for it shows as a 408.
    args = ["--data-dir", str(data_dir), "--body-timeout", "20"]
    server = await asyncio.to_thread(ServeProcess, args, env=env, log=tmp_path / "serve.log")
    try:
        where = urlsplit(server.base_url)
        assert where.hostname == "127.0.0.1"
        assert where.port is not None
        body = orjson.dumps({**SEED_EVENT, "message_id": "slow-body"})
        reader, writer = await asyncio.open_connection(where.hostname, where.port)
        # Expect: 100-continue: the "100 Continue" says the collector has the headers and
        # waits for the body, so the signal surely comes in the middle of the request.
        writer.write(
            b"POST /e HTTP/1.1\r\nHost: collector\r\nContent-Type: text/plain\r\n"
            b"Expect: 100-continue\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        await writer.drain()
        assert b"100 Continue" in await read_until(reader, b"\r\n\r\n")
        writer.write(body[:10])
        await writer.drain()
        server.process.send_signal(signal.SIGTERM)

        await eventually(lambda: "stopping: no new requests" in server.output())
        writer.write(body[10:])  # the rest, after the stop began
        await writer.drain()
        answer = await read_until(reader, b"}")
        writer.close()
        assert answer.startswith(b"HTTP/1.1 202"), answer
    finally:
        code = await asyncio.to_thread(server.stop)
    assert code == 0, server.output()
    with sqlite3.connect(data_dir / "queue.sqlite3") as db:
        stored = {row[0] for row in db.execute("SELECT message_id FROM events")}
    delivered = {r.headers["X-Outbound-GUID"] for r in fake.tracks()}
    assert "slow-body" in stored | delivered, server.output()
