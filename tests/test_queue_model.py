"""Both queues against a simple model: random put, claim, ack, retry, dead-letter, lease
expiry and reopen-after-crash sequences (hypothesis' stateful testing), on a SQLite file
and on a real redis-server (one of its own for each example)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)
from redis_server import RedisServer
from test_queue_contract import ContractQueue, redis_queue_class

from collector.queue import Claimed, DeadLetterFilter, SQLiteQueue

LEASE = 30.0
PARTITION_LEASE = 3600.0  # RedisQueue's, in seconds of the real clock


@dataclass
class ModelEvent:
    message_id: str
    user: str
    available_at: float = 0.0
    lease_until: float = 0.0
    attempts: int = 0


@dataclass
class Model:
    """What the queue should hold: events in arrival order, dead letters, the clock."""

    events: list[ModelEvent] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    now: float = 1_000_000.0
    # Per line, the last event leased when the queue was reopened after a crash: its next
    # claim goes no further (the same batches go again).
    redo: dict[str, str] = field(default_factory=dict)
    # Lines reopened twice or more since their last claim: the SQLite queue forgets their
    # redo at the second reopen, Redis keeps it; deep claims wait until they are claimed.
    unsettled: set[str] = field(default_factory=set)

    def claimable(self, limit: int, depth: int = 1) -> list[str]:
        """The heads of the users' lines that are due, in the order they became due (the
        later of backoff and lease), then in arrival order; each followed by the events
        behind it, `depth` in all at most (leased or not: a line is leased by its head)."""
        heads: dict[str, ModelEvent] = {}
        for event in self.events:
            heads.setdefault(event.user, event)
        order = {e.message_id: position for position, e in enumerate(self.events)}
        due = sorted(
            (e for e in heads.values() if max(e.available_at, e.lease_until) <= self.now),
            key=lambda e: (max(e.available_at, e.lease_until), order[e.message_id]),
        )
        claimed = []
        for head in due[:limit]:
            line = [e.message_id for e in self.events if e.user == head.user][:depth]
            if head.user in self.redo and self.redo[head.user] in line:
                line = line[: line.index(self.redo[head.user]) + 1]
            claimed += line
        return claimed

    def find(self, message_id: str) -> ModelEvent:
        return next(e for e in self.events if e.message_id == message_id)


class QueueMachine(RuleBasedStateMachine):
    """The SQLite queue's machine; RedisQueueMachine runs the same rules on Redis."""

    claimed = Bundle("claimed")
    kind = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = tempfile.TemporaryDirectory()
        self.path = Path(self.directory.name) / "queue.sqlite3"
        self.redis: RedisServer | None = None
        if self.kind == "redis":
            self.redis = RedisServer(Path(self.directory.name) / "redis").start()
        self.queue = self._open()
        self.model = Model()
        self.serial = 0
        self.held: dict[str, Claimed] = {}  # claims the model says are still valid

    def _make(self, *, owner: bool = True) -> ContractQueue:
        """A queue on this machine's store (not opened); owner=False is a tool's."""
        if self.redis is None:
            return SQLiteQueue(self.path, dedupe_window=0, owner=owner)
        # The partition lease is renewed by a task of the queue, which runs only while a rule
        # runs the loop: long enough that the time between rules (hypothesis, a restart of
        # Redis, a loaded machine) never lets it run out.
        queue: ContractQueue = redis_queue_class()(
            self.redis.url, dedupe_window=0, owner=owner, lease=PARTITION_LEASE
        )
        return queue

    def _open(self) -> ContractQueue:
        queue = self._make()
        self.loop.run_until_complete(queue.open())
        return queue

    def run(self, awaitable: object) -> object:
        return self.loop.run_until_complete(awaitable)  # type: ignore[arg-type]

    @rule(users=st.lists(st.sampled_from("abc"), min_size=1, max_size=4))
    def put(self, users: list[str]) -> None:
        records = []
        for user in users:
            self.serial += 1
            message_id = f"{user}-{self.serial}"
            records.append({"message_id": message_id, "user_id": user, "received_at": 0.0})
            self.model.events.append(ModelEvent(message_id, user))
        self.run(self.queue.put(records))

    @rule(target=claimed, limit=st.integers(1, 5), depth=st.sampled_from([1, 2, 3, 3]))
    def claim(self, limit: int, depth: int) -> object:
        if self.model.unsettled:
            depth = 1
        expected = self.model.claimable(limit, depth)
        got = self.run(self.queue.claim(limit, now=self.model.now, lease=LEASE, depth=depth))
        assert isinstance(got, list)
        assert [c.record["message_id"] for c in got] == expected
        for item in got:
            model_event = self.model.find(item.record["message_id"])
            assert item.attempts == model_event.attempts
            model_event.lease_until = self.model.now + LEASE
            self.held[item.record["message_id"]] = item
            self.model.redo.pop(model_event.user, None)
            self.model.unsettled.discard(model_event.user)
        return multiple(*expected)

    def _valid(self, message_id: str) -> Claimed | None:
        """A claim still ours: not expired, not taken again, not finished."""
        item = self.held.get(message_id)
        if item is None:
            return None
        event = next((e for e in self.model.events if e.message_id == message_id), None)
        if event is None or event.lease_until <= self.model.now:
            return None
        return item

    @rule(message_id=consumes(claimed))
    def ack(self, message_id: str) -> None:
        item = self._valid(message_id)
        if item is None:
            return
        self.run(self.queue.ack(item.id))
        self.model.events.remove(self.model.find(message_id))
        del self.held[message_id]

    @rule(message_id=consumes(claimed), delay=st.floats(0, 100))
    def retry(self, message_id: str, delay: float) -> None:
        item = self._valid(message_id)
        if item is None:
            return
        self.run(self.queue.retry(item.id, available_at=self.model.now + delay, error="503"))
        event = self.model.find(message_id)
        event.available_at, event.lease_until = self.model.now + delay, 0.0
        event.attempts += 1
        del self.held[message_id]

    @rule(message_id=consumes(claimed))
    def release(self, message_id: str) -> None:
        item = self._valid(message_id)
        if item is None:
            return
        self.run(self.queue.release(item.id))
        self.model.find(message_id).lease_until = 0.0
        del self.held[message_id]

    @rule()
    def reset_backoff(self) -> None:
        self.run(self.queue.reset_backoff(self.model.now))
        # Every line is due now: its head's backoff goes (received_at). An event behind the
        # head keeps its own, which only a batch that failed gives it: the next claim several
        # deep takes it with its head whatever its backoff, as the same batch.
        heads: dict[str, ModelEvent] = {}
        for event in self.model.events:
            heads.setdefault(event.user, event)
        for head in heads.values():
            if head.available_at > self.model.now:
                head.available_at = 0.0

    @rule(message_id=consumes(claimed))
    def dead_letter(self, message_id: str) -> None:
        item = self._valid(message_id)
        if item is None:
            return
        self.run(
            self.queue.dead_letter(
                item.id, reason="Outbound answered 400", status=400, response="", now=self.model.now
            )
        )
        self.model.events.remove(self.model.find(message_id))
        self.model.dead.append(message_id)
        del self.held[message_id]

    @rule(seconds=st.sampled_from([1.0, 29.0, 31.0, 120.0]))
    def time_passes(self, seconds: float) -> None:
        self.model.now += seconds  # leases expire, backoffs run out

    @rule()
    def replay_dead_letters(self) -> None:
        """What `dead-letters replay` does from another process: back at the end of the line."""
        tool = self._make(owner=False)
        self.run(tool.open())
        try:
            self.run(tool.replay_dead_letters(DeadLetterFilter()))
        finally:
            self.run(tool.close())
        for message_id in self.model.dead:
            self.model.events.append(ModelEvent(message_id, message_id.split("-")[0]))
        self.model.dead.clear()
        self.run(self.queue.stats())  # the serving queue recounts

    @rule()
    def reopen_after_crash(self) -> None:
        self.run(self.queue.close())
        if self.redis is not None:
            # Redis too is stopped and started: what the queue kept must be in its AOF. By
            # SIGTERM, which writes the AOF out: with appendfsync everysec, a SIGKILL may lose
            # what Redis acknowledged in its last second or two (its documented promise).
            self.redis.restart(kill=False)
        self.queue = self._open()
        self.model.unsettled |= set(self.model.redo)
        self.model.redo = {}
        for event in self.model.events:
            if event.lease_until > 0:
                self.model.redo[event.user] = event.message_id  # the last leased of its line
            event.lease_until = 0.0  # a new owner voids the dead process's leases
        self.held.clear()

    @invariant()
    def counts_agree(self) -> None:
        stats = self.run(self.queue.stats())
        assert stats.depth == len(self.model.events)  # type: ignore[attr-defined]
        assert stats.dead_letters == len(self.model.dead)  # type: ignore[attr-defined]
        assert self.queue.depth == len(self.model.events)

    def teardown(self) -> None:
        letters = self.run(self.queue.dead_letters())
        assert [d["message_id"] for d in letters] == self.model.dead  # type: ignore[attr-defined]
        self.run(self.queue.close())
        self.loop.close()
        if self.redis is not None:
            self.redis.kill()
        self.directory.cleanup()


class RedisQueueMachine(QueueMachine):
    kind = "redis"


MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("QUEUE_MODEL_EXAMPLES", "60")),
    stateful_step_count=30,
    deadline=None,
)
QueueMachine.TestCase.settings = MODEL_SETTINGS
RedisQueueMachine.TestCase.settings = MODEL_SETTINGS
TestQueueModel = QueueMachine.TestCase
TestRedisQueueModel = RedisQueueMachine.TestCase
