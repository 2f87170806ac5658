"""Kill and stop the collector under load: every acknowledged event reaches Outbound (or the
dead letters) at least once. The figures are printed; run with -s to see them."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from conftest import eventually
from fake_outbound import KEY, FakeOutbound
from serve_process import ServeProcess

BATCH = 10
RESTARTS = int(os.environ.get("CRASH_RESTARTS", "6"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Load:
    """A client posting batches at a steady pace and remembering what got a 202."""

    url: str
    acknowledged: set[str] = field(default_factory=set)
    sent: int = 0
    refused: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._stop.is_set():
                ids = [f"k{self.sent + i}" for i in range(BATCH)]
                self.sent += BATCH
                # The id in a property too: a batch call carries one GUID for its events.
                batch = [
                    {
                        "event": "order",
                        "user_id": f"u{int(i[1:]) % 25}",
                        "message_id": i,
                        "properties": {"id": i},
                    }
                    for i in ids
                ]
                try:
                    async with session.post(
                        self.url,
                        data=orjson.dumps({"batch": batch}),
                        headers={"Content-Type": "text/plain"},
                    ) as response:
                        if response.status == 202:
                            self.acknowledged.update(ids)
                        else:
                            self.refused += 1
                except (aiohttp.ClientError, TimeoutError):
                    self.refused += 1
                await asyncio.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()


def dead_letter_ids(data_dir: Path) -> set[str]:
    with sqlite3.connect(data_dir / "queue.sqlite3") as db:
        return {row[0] for row in db.execute("SELECT message_id FROM dead_letters")}


async def interrupt_under_load(
    tmp_path: Path, fake: FakeOutbound, signum: int, seed: int
) -> tuple[Load, list[int], list[str]]:
    """Run the load while stopping the collector `RESTARTS` times with `signum`."""
    chance = random.Random(seed)
    port, data_dir = free_port(), tmp_path / "data"
    env = {"OUTBOUND_API_KEY": KEY, "COLLECTOR_OUTBOUND_URL": fake.url}
    args = ["--port", str(port), "--data-dir", str(data_dir), "--retry-base", "0.1"]
    args += ["--rate-limit-per-ip", "0", "--rate-limit-per-user", "0"]  # one client, heavy load
    fake.latency = 0.02  # calls in flight when the signal comes: the resend window
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(n: int) -> ServeProcess:
        return ServeProcess(args, env=env, log=logs / f"run{n}.log")

    server = await asyncio.to_thread(start, 0)
    load = Load(f"http://127.0.0.1:{port}/e")
    client = asyncio.create_task(load.run())
    codes, outputs = [], []
    for n in range(1, RESTARTS + 1):
        await asyncio.sleep(chance.uniform(0.5, 2.0))
        codes.append(await asyncio.to_thread(server.stop, signum))
        outputs.append(server.output())
        server = await asyncio.to_thread(start, n)
    await asyncio.sleep(1.0)
    load.stop()
    await client

    expected = load.acknowledged

    def settled() -> bool:
        delivered = {r.body["properties"]["id"] for r in fake.tracks()}
        return expected <= delivered | dead_letter_ids(data_dir)

    try:
        await eventually(settled, within=90)
    finally:
        codes.append(await asyncio.to_thread(server.stop, signal.SIGTERM))
        outputs.append(server.output())
    return load, codes, outputs


def report(name: str, load: Load, fake: FakeOutbound, data_dir: Path) -> int:
    guids = Counter(r.body["properties"]["id"] for r in fake.tracks())
    delivered = set(guids) & load.acknowledged
    dead = dead_letter_ids(data_dir) & load.acknowledged
    lost = load.acknowledged - delivered - dead
    duplicated = sum(count - 1 for guid, count in guids.items() if count > 1)
    print(
        f"\n{name}: restarts={RESTARTS} sent={load.sent} acknowledged={len(load.acknowledged)} "
        f"delivered={len(delivered)} dead_lettered={len(dead)} duplicated={duplicated} "
        f"lost={len(lost)} (requests refused while down: {load.refused})"
    )
    return len(lost)


async def test_sigkill_under_load_loses_no_acknowledged_event(
    tmp_path: Path, fake: FakeOutbound
) -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    load, _, outputs = await interrupt_under_load(tmp_path, fake, signal.SIGKILL, seed)
    lost = report(f"SIGKILL (seed {seed})", load, fake, tmp_path / "data")
    assert len(load.acknowledged) >= 1000, "too little load to mean anything"
    assert lost == 0
    assert all("Traceback" not in output for output in outputs)


async def test_sigterm_under_load_exits_0_and_loses_nothing(
    tmp_path: Path, fake: FakeOutbound
) -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    load, codes, outputs = await interrupt_under_load(tmp_path, fake, signal.SIGTERM, seed)
    lost = report(f"SIGTERM (seed {seed})", load, fake, tmp_path / "data")
    assert codes == [0] * (RESTARTS + 1)
    assert lost == 0
    for output in outputs:
        assert "stopping: no new requests" in output
        assert "events queued" in output
        assert "Traceback" not in output
