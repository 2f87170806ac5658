"""Collectors sharing one queue on Redis (issue 16), with real processes only: three `serve`
processes posted to round robin while one of them at a time is SIGKILLed and restarted, and
then Redis itself (appendfsync always: the AOF is replayed); and one collector taking over a
dead one's partitions within the lease. The figures are printed; run with -s to see them."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from conftest import eventually
from fake_outbound import KEY, FakeOutbound, Fault, Received
from redis_server import RedisServer
from serve_process import ServeProcess

TOKEN = "cluster-server-token-5b1f9e2a"
SECRET = "cluster-identity-secret-0f3c8d1e7a4b6925"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
# Short partition leases, so that a killed collector's users wait seconds, not minutes.
LEASE = 2.0
POSTERS = 4  # each posts for its own users, one request at a time: that is their order
USERS_PER_POSTER = 10
COLLECTORS = 3
KILLS = int(os.environ.get("CLUSTER_KILLS", "3"))
HOLD = 5.0  # seconds the takeover test's first Outbound holds its answers
TAKEOVER_MARGIN = 3.0  # beyond the lease: a renewal turn (lease / 3), a claim, a slow machine


def collector_env(outbound_url: str, queue_url: str) -> dict[str, str]:
    """What every collector of a cluster shares: the queue, Outbound, tokens and identity."""
    return {
        "OUTBOUND_API_KEY": KEY,
        "COLLECTOR_OUTBOUND_URL": outbound_url,
        "COLLECTOR_QUEUE_URL": queue_url,
        "COLLECTOR_REDIS_LEASE": str(LEASE),
        "COLLECTOR_SERVER_TOKENS": TOKEN,
        "COLLECTOR_IDENTITY_SECRET": SECRET,
        "COLLECTOR_RETRY_BASE": "0.1",
        "COLLECTOR_RETRY_CAP": "1",
        # One client sends for everyone here: the per-client limits would refuse it.
        "COLLECTOR_RATE_LIMIT_PER_IP": "0",
        "COLLECTOR_RATE_LIMIT_PER_USER": "0",
    }


@dataclass
class Cluster:
    """Collector processes on one queue, each start with a fresh data_dir: nothing on a
    collector's disk counts (the key of ids is shared in Redis too), as on a machine that
    lost its disk."""

    directory: Path
    env: dict[str, str]
    processes: list[ServeProcess] = field(default_factory=list)

    def start(self, env: dict[str, str] | None = None) -> ServeProcess:
        n = len(self.processes)
        data_dir = self.directory / f"data{n}"
        process = ServeProcess(
            ["--data-dir", str(data_dir)],
            env={**self.env, **(env or {})},
            log=self.directory / f"collector{n}.log",
        )
        self.processes.append(process)
        return process

    def stop_all(self) -> dict[int, int]:
        """SIGTERM every process still running; the exit codes of those it stopped, by pid
        (-9: it did not stop within ServeProcess.stop's timeout and was killed)."""
        running = [p for p in self.processes if p.process.poll() is None]
        return {p.process.pid: p.stop(signal.SIGTERM) for p in running}

    def logs(self, pids: Collection[int]) -> str:
        """The output of these processes, for a failure's message."""
        return "\n".join(p.output() for p in self.processes if p.process.pid in pids)


Event = tuple[str, int]  # (user, its sequence number)


@dataclass
class Tally:
    """What the posters saw: every answer's status and the events a 202 acknowledged."""

    acknowledged: set[Event] = field(default_factory=set)
    refused: set[Event] = field(default_factory=set)  # answered 503
    statuses: Counter[int] = field(default_factory=Counter)
    unreachable: int = 0  # the collector was dead or died during the request
    no_retry_after: int = 0  # 503s without Retry-After
    partly_accepted: int = 0  # 202s that rejected some of their events


async def post_events(
    users: list[str],
    targets: Callable[[], list[str]],
    offset: int,
    tally: Tally,
    stop: asyncio.Event,
) -> None:
    """Post one event per user (the next sequence number) at a time, to the targets in turn."""
    timeout = aiohttp.ClientTimeout(total=10)
    seq = 0
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            seq += 1
            urls = targets()
            url = urls[(offset + seq) % len(urls)]
            batch = [
                {
                    "event": "order",
                    "user_id": user,
                    "message_id": f"{user}-{seq}",
                    "properties": {"seq": seq},
                }
                for user in users
            ]
            try:
                async with session.post(
                    f"{url}/e", data=orjson.dumps({"batch": batch}), headers=AUTH
                ) as response:
                    tally.statuses[response.status] += 1
                    if response.status == 202:
                        answer = await response.json()
                        if answer["accepted"] == len(batch):
                            tally.acknowledged.update((user, seq) for user in users)
                        else:
                            tally.partly_accepted += 1
                    elif response.status == 503:
                        tally.refused.update((user, seq) for user in users)
                        tally.no_retry_after += "Retry-After" not in response.headers
            except aiohttp.ClientConnectionError:
                tally.unreachable += 1
            # A TimeoutError is not caught: an answer that does not come leaves the event's
            # fate open past the next post of its user, and ingest must answer, 503 or not.
            await asyncio.sleep(0.02)


def arrivals(fake: FakeOutbound) -> list[tuple[Event, Received]]:
    """Every track the fake took (a batch's items one by one), in the order it took them."""
    return [((r.body["user_id"], r.body["properties"]["seq"]), r) for r in fake.tracks()]


def first_arrivals_out_of_order(taken: list[tuple[Event, Received]]) -> dict[str, list[int]]:
    """Users whose events' first arrivals are not in increasing sequence: their sequences."""
    seen: set[Event] = set()
    firsts: defaultdict[str, list[int]] = defaultdict(list)
    for event, _ in taken:
        if event not in seen:
            seen.add(event)
            firsts[event[0]].append(event[1])
    return {user: seqs for user, seqs in firsts.items() if seqs != sorted(seqs)}


async def test_three_collectors_killed_at_random_and_redis_killed_lose_no_acknowledged_event(
    tmp_path: Path, fake: FakeOutbound
) -> None:
    seed = int(os.environ.get("CLUSTER_SEED", random.randrange(1 << 30)))
    print(f"\ncluster kill test: seed {seed} (CLUSTER_SEED={seed} repeats it)")
    chance = random.Random(seed)
    redis = RedisServer(tmp_path / "redis", appendfsync="always").start()
    fake.latency = 0.02  # calls in flight when a kill comes: the resend window
    cluster = Cluster(tmp_path, collector_env(fake.url, redis.url))
    tally, stop = Tally(), asyncio.Event()
    try:
        slots = [await asyncio.to_thread(cluster.start) for _ in range(COLLECTORS)]
        users = [f"user{n:02d}" for n in range(POSTERS * USERS_PER_POSTER)]
        posters = [
            asyncio.create_task(
                post_events(
                    users[n * USERS_PER_POSTER : (n + 1) * USERS_PER_POSTER],
                    lambda: [slot.base_url for slot in slots],
                    n,
                    tally,
                    stop,
                )
            )
            for n in range(POSTERS)
        ]
        victims = []
        for _ in range(KILLS):
            await asyncio.sleep(chance.uniform(1.0, 2.5))
            victim = chance.randrange(COLLECTORS)
            victims.append(victim)
            await asyncio.to_thread(slots[victim].stop, signal.SIGKILL)
            slots[victim] = await asyncio.to_thread(cluster.start)
        await asyncio.sleep(chance.uniform(1.0, 2.0))
        before_outage = tally.statuses.copy()
        await asyncio.to_thread(redis.kill)
        await asyncio.sleep(1.5)  # posting goes on: 503s, nothing acknowledged
        in_outage = tally.statuses - before_outage
        await asyncio.to_thread(redis.start)  # same port and directory: the AOF is replayed
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*posters)
        after_outage = tally.statuses - before_outage - in_outage

        def delivered() -> bool:
            return tally.acknowledged <= {event for event, _ in arrivals(fake)}

        try:
            await eventually(delivered, within=40)
        finally:
            taken = arrivals(fake)
            events = {event for event, _ in taken}
            guids: defaultdict[Event, set[str]] = defaultdict(set)
            for event, received in taken:
                guids[event].add(received.headers["X-Outbound-GUID"])
            missing = tally.acknowledged - events
            another_guid = sum(len(g) - 1 for g in guids.values())
            print(
                f"collector kills={KILLS} (slots {victims}) + redis kills=1; "
                f"acknowledged={len(tally.acknowledged)} delivered={len(events)} "
                f"(of them not acknowledged: {len(events - tally.acknowledged)}, "
                f"answered 503: {len(events & tally.refused)}) "
                f"arrivals={len(taken)} duplicates={len(taken) - len(events)} "
                f"(with another GUID: {another_guid}) "
                f"missing={len(missing)}; answers {dict(tally.statuses)}, "
                f"unreachable={tally.unreachable}; during the Redis outage: {dict(in_outage)}, "
                f"after it: {dict(after_outage)}"
            )
        codes = await asyncio.to_thread(cluster.stop_all)
    finally:
        stop.set()
        await asyncio.to_thread(cluster.stop_all)
        redis.kill()

    assert len(tally.acknowledged) >= 2000, "too little load to mean anything"
    assert missing == set()
    assert first_arrivals_out_of_order(taken) == {}
    # A resend (a kill came while its call was in flight) is the same call again, which
    # Outbound's dedupe drops: the same events under the same X-Outbound-GUID.
    assert another_guid == 0
    # The only refusal is Redis being away: 503 with Retry-After, never a 500 or a rejection.
    assert set(before_outage) == {202}
    assert in_outage[503] > 0
    assert after_outage[202] > 0  # ingest carries on by itself once Redis is back
    assert set(tally.statuses) == {202, 503}
    assert tally.no_retry_after == 0
    assert tally.partly_accepted == 0
    failed = {pid: code for pid, code in codes.items() if code != 0}
    assert len(codes) == COLLECTORS  # none died by itself
    assert not failed, cluster.logs(failed)
    outputs = [process.output() for process in cluster.processes]
    assert all("Traceback" not in output for output in outputs)


def order(user: str, seq: int) -> dict[str, object]:
    """The takeover test's event: a user's seq-th order."""
    return {
        "event": "order",
        "user_id": user,
        "message_id": f"{user}-{seq}",
        "properties": {"seq": seq},
    }


async def post(url: str, events: list[dict[str, object]]) -> None:
    """POST a batch with the server token; it must be acknowledged."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/e", data=orjson.dumps({"batch": events}), headers=AUTH) as response,
    ):
        assert response.status == 202, await response.text()


async def test_a_collector_takes_over_a_dead_ones_partitions_within_the_lease(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # Each collector relays to an Outbound of its own: which one a user's events reach says
    # which collector owns the user's partition.
    first_outbound, second_outbound = FakeOutbound(), FakeOutbound()
    await first_outbound.start()
    await second_outbound.start()
    cluster = Cluster(tmp_path, collector_env("", redis_server.url))
    users = [f"user{n:02d}" for n in range(25)]
    events = {(user, seq) for user in users for seq in range(1, 5)}
    try:
        first, _ = [
            await asyncio.to_thread(
                cluster.start,
                # Two events a call: a user's four events are two calls, one after the other.
                {"COLLECTOR_OUTBOUND_URL": outbound.url, "COLLECTOR_RELAY_BATCH_SIZE": "2"},
            )
            for outbound in (first_outbound, second_outbound)
        ]
        with redis_server.client() as client:
            await eventually(lambda: client.zcard("collector:members") == 2)
        await asyncio.sleep(LEASE / 3)  # a turn of leases: each holds its share
        # Users first identified, so that their tracks need no identify before them.
        await post(first.base_url, [{"type": "identify", "user_id": user} for user in users])
        await eventually(lambda: len(first_outbound.received + second_outbound.received) == 25)
        with redis_server.client() as client:
            owners = Counter(
                lease.decode().split(":")[1]
                for lease in client.mget(client.keys("collector:lease:*"))
                if lease is not None
            )
        # From now on the first one's Outbound takes every call and holds its answer for
        # seconds: the first collector's calls are in flight when it dies.
        first_outbound.always = Fault(200, taken=True, delay=HOLD)
        # Every user's first event: the first collector sends its users' alone, and they stay
        # in flight; then the rest of the lines arrive behind them. A taker must send exactly
        # the calls in flight again (the same events, so the same GUID), not those events
        # with the ones that came since, which would be another call to Outbound's dedupe.
        await post(first.base_url, [order(user, 1) for user in users])
        await eventually(lambda: len(first_outbound.tracks()) > 0)
        await asyncio.sleep(0.3)  # it sends its other users' first calls meanwhile
        await post(first.base_url, [order(user, seq) for seq in (2, 3, 4) for user in users])
        await asyncio.to_thread(first.stop, signal.SIGKILL)
        killed_at = time.time()

        def all_delivered_by_the_second() -> bool:
            return {event for event, _ in arrivals(second_outbound)} == events

        await eventually(all_delivered_by_the_second, within=LEASE + TAKEOVER_MARGIN)
    finally:
        await asyncio.to_thread(cluster.stop_all)
        await first_outbound.close()
        await second_outbound.close()

    in_flight = arrivals(first_outbound)
    orphaned = {user for (user, _), _ in in_flight}  # the dead collector's users
    taken_over = [(event, r) for event, r in arrivals(second_outbound) if event[0] in orphaned]
    guids = {r.headers["X-Outbound-GUID"] for _, r in in_flight}
    print(
        f"\ntakeover: partitions held by process {dict(owners)}; the killed collector "
        f"(pid {first.process.pid}) had {len(guids)} calls in flight "
        f"({len(in_flight)} events of {len(orphaned)} of {len(users)} users); the other sent "
        f"the first of them {min(r.at for _, r in taken_over) - killed_at:.2f} s after the "
        f"kill (lease {LEASE} s)"
    )
    assert orphaned, "the first collector relayed no track: nothing to take over"
    assert owners[str(first.process.pid)] > 0
    # Never two relays for one user at once: the second sent nothing of theirs before the kill.
    assert all(r.at > killed_at for _, r in taken_over)
    # What was in flight went again, the same events in the same call (the same GUID).
    sent_again = {event: r.headers["X-Outbound-GUID"] for event, r in taken_over}
    assert {event: r.headers["X-Outbound-GUID"] for event, r in in_flight} == {
        event: sent_again[event] for event, _ in in_flight
    }
    # And in order, each user's events once (the second collector's own users too).
    by_user: defaultdict[str, list[int]] = defaultdict(list)
    for (user, seq), _ in arrivals(second_outbound):
        by_user[user].append(seq)
    assert by_user == {user: [1, 2, 3, 4] for user in users}
