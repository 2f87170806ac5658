"""The Redis queue when Redis misbehaves (issue 16's faults): pooled connections after a
restart, commands refused by an ACL, and a stop while Redis does not answer. A real
redis-server each (tests/redis_server.py), no mocks."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer
from serve_process import ServeProcess

from collector import cli
from collector.queue import QueueUnavailable, RedisQueue
from collector.queue.redis_streams import SOCKET_TIMEOUT

POOL = 8  # connections the pool holds when Redis goes away


def record(n: int, user: str = "u1") -> dict[str, Any]:
    """A server-token event with message id m{n}."""
    return {
        "type": "track",
        "event": "e",
        "user_id": user,
        "message_id": f"m{n}",
        "received_at": time.time(),
        "source": "server",
    }


async def failures(puts: list[Any]) -> int:
    """How many of these puts Redis refused (QueueUnavailable)."""
    answers = await asyncio.gather(*puts, return_exceptions=True)
    unexpected = [a for a in answers if isinstance(a, BaseException)]
    assert all(isinstance(a, QueueUnavailable) for a in unexpected), unexpected
    return len(unexpected)


async def test_after_redis_restarts_one_put_fails_not_one_per_pooled_connection(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    # A long partition lease: the lease task stays asleep and uses no connection meanwhile.
    queue = RedisQueue(server.url, lease=60.0)
    try:
        await queue.open()
        # POOL puts at once leave POOL connections idle in the pool.
        await asyncio.gather(*(queue.put([record(n, f"u{n}")]) for n in range(POOL)))
        server.kill()
        server.start()  # same port: the pooled connections are to the dead process
        refused = await failures([queue.put([record(100)])])
        # Then as many puts at once as the pool has connections: none may be a stale one.
        refused += await failures([queue.put([record(200 + n, f"u{n}")]) for n in range(POOL)])
        assert refused <= 1
        assert queue.healthy
    finally:
        await queue.close()
        server.kill()


def test_stats_and_dead_letters_say_in_one_line_when_redis_refuses_a_command(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
) -> None:
    password = "acl-password-7d1e"
    with redis_server.client() as client:
        # Connecting and the queue's first reads are allowed; reading streams and running
        # scripts are not (a tool's user with too few rights).
        client.execute_command(
            "ACL", "SETUSER", "reader", "on", f">{password}", "~*", "+@all", "-xrange", "-zrange"
        )
    monkeypatch.setenv(
        "COLLECTOR_QUEUE_URL", f"redis://reader:{password}@127.0.0.1:{redis_server.port}/0"
    )
    data_dir = str(tmp_path / "no-such-dir")
    for command in (["stats", "--json"], ["stats"], ["dead-letters", "list"]):
        code = cli.main([*command, "--data-dir", data_dir])
        out, err = capsys.readouterr()
        assert code == 2, (command, out, err)
        assert "NOPERM" in err or "permission" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
        assert password not in out + err


async def test_close_does_not_wait_on_a_stalled_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    # A short lease: the lease task renews every 0.1 s, so it is in a command when Redis stalls.
    queue = RedisQueue(server.url, lease=0.3)
    await queue.open()
    assert queue.held
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)  # Redis takes connections, answers nothing
    try:
        await asyncio.sleep(0.3)
        # close() gives up on the release and the disconnects well within a command's
        # timeout: a SIGTERM's stop has several such steps and a bound of its own.
        await asyncio.wait_for(queue.close(), SOCKET_TIMEOUT)
    finally:
        os.kill(pid, signal.SIGCONT)
        server.kill()
    assert not queue.held


def test_a_stop_does_not_wait_a_command_timeout_a_step_on_a_stalled_redis(tmp_path: Path) -> None:
    # Redis stalls (SIGSTOP: it takes connections and answers nothing) while the relay polls it.
    # Each step of the stop that talks to Redis (the relay's claim under way, the last line's
    # figures, the partitions' release) gives up after about a second, not SOCKET_TIMEOUT each
    # (those added up to about 16 s under load, past a supervisor's patience).
    server = RedisServer(tmp_path / "redis").start()
    assert server.process is not None
    collector = ServeProcess(
        ["--data-dir", str(tmp_path / "data")],
        env={"COLLECTOR_QUEUE_URL": server.url},
        log=tmp_path / "collector.log",
    )
    pid = server.process.pid
    try:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(1.5)  # the relay's next poll (a second apart) is now a claim Redis holds
        code = collector.stop(signal.SIGTERM, timeout=2 * SOCKET_TIMEOUT - 1)
    finally:
        os.kill(pid, signal.SIGCONT)
        server.kill()
    output = collector.output()
    assert code == 0, output
    assert "the queue did not give its figures" in output
