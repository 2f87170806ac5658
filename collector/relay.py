"""Relay: claims queued events, sends them to Outbound in order per user, retries, dead-letters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import Secret, Settings
from .live import DebugHub
from .logs import Repeats
from .metrics import Metrics
from .outbound import BATCH_ENDPOINTS, Answer, Call, Outbound, batch_call, calls_for, subject
from .queue import Claimed, Queue, QueueUnavailable, user_key

log = logging.getLogger("collector.relay")

RETRYABLE_STATUSES = frozenset({408, 429})
AUTH_STATUSES = frozenset({401, 403})
# "No such endpoint": for one event, Outbound refusing it; for every event, a wrong outbound_url.
ENDPOINT_STATUSES = frozenset({404, 405})
# Different events answered 404/405 one after another, with no 2xx since: the relay pauses.
ENDPOINT_RUN = 3
# A Retry-After longer than this is treated as this: a bad header must not park events for days.
MAX_RETRY_AFTER = 3600.0
IDLE_POLL = 1.0
IDENTIFIED_MEMORY = 100_000
# Seconds of single calls after a batch endpoint answered 404/405 (an Outbound without it).
BATCH_FALLBACK = 600.0
# Seconds a stop waits for a claim under way (a shared queue may be slow to answer) before
# it cancels it: what the claim leased goes again after its lease, with the same GUIDs.
CLAIM_STOP_GRACE = 1.0


@dataclass(frozen=True, slots=True)
class Sent:
    """One call's outcome: the events it carried, in the line's order, and its answer."""

    items: Sequence[Claimed]
    answer: Answer
    identified: bool = False  # an identify of their user went through (the ack keeps it)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with an event after an attempt."""

    action: Literal["ack", "retry", "dead", "pause"]
    delay: float = 0.0
    reason: str = ""


ACK = Decision("ack")


def relay_outcome(answer: Answer) -> str:
    """The `outcome` label of a call: its status class, `network`, or `dry_run` (not sent)."""
    if answer.dry_run:
        return "dry_run"
    return "network" if answer.status is None else f"{answer.status // 100}xx"


def decide(
    answer: Answer,
    *,
    attempts: int,
    age: float,
    base: float,
    cap: float,
    window: float,
    jitter: float,
) -> Decision:
    """The retry policy. `attempts` counts earlier failures; `jitter` is uniform in [0, 1).

    Network errors, timeouts, 408, 429 and 5xx are retried with capped exponential
    backoff and full jitter, Retry-After as a floor; other answers are permanent. A bad
    key (401/403) pauses the relay instead of failing every event.
    """
    status = answer.status
    if answer.ok:
        return Decision("ack")
    if status in AUTH_STATUSES:
        return Decision("pause", reason=f"Outbound rejected the API key ({status})")
    described = f"Outbound answered {status}" if status is not None else answer.detail
    if status is not None and status not in RETRYABLE_STATUSES and status < 500:
        return Decision("dead", reason=described)
    if age >= window:
        return Decision("dead", reason=f"still failing after {age:.0f} s: {described}")
    floor = min(answer.retry_after or 0.0, MAX_RETRY_AFTER)
    return Decision(
        "retry", delay=max(backoff(attempts, base, cap, jitter), floor), reason=described
    )


def backoff(attempts: int, base: float, cap: float, jitter: float) -> float:
    """Capped exponential backoff with full jitter; `attempts` counts earlier failures."""
    return jitter * min(cap, base * 2.0**attempts)


@dataclass
class EndpointWatch:
    """Tells a 404/405 that Outbound gives one event from the same answer to every event,
    which means that `outbound_url` is wrong (and dead-letters the whole queue if believed).

    A 404/405 right after a 2xx is that event's own: it stands. Otherwise the event is held
    for another try, and `run` different events in a row, with no 2xx between, pause the
    relay like a rejected key, until a probe goes through.
    """

    run: int = ENDPOINT_RUN
    answered_ok: bool = False  # the latest answer with a status was a 2xx
    missing: set[str] = field(default_factory=set)  # events in the current run

    def judge(
        self, decision: Decision, answer: Answer, message_id: str, *, held: Decision
    ) -> Decision:
        """The decision to act on: `decision` as the policy made it, `held` to try again."""
        if answer.ok:
            self.answered_ok = True
            self.missing.clear()
            return decision
        if answer.status is None:
            return decision  # no answer says nothing about the endpoint
        if answer.status not in ENDPOINT_STATUSES:
            self.answered_ok = False
            self.missing.clear()
            return decision
        stands, self.answered_ok = self.answered_ok, False
        if stands:
            return decision
        self.missing.add(message_id)
        if len(self.missing) < self.run:
            return held
        return Decision(
            "pause",
            reason=f"Outbound answered {answer.status} to {len(self.missing)} different events "
            "in a row: check outbound_url",
        )


@dataclass
class Breaker:
    """The relay's circuit: open after sustained failures or at once for a rejected key.

    While open nothing is sent but one probe event per `probe_interval`; the first
    success closes it.
    """

    threshold: int
    probe_interval: float
    failures: int = 0
    reason: str | None = None
    probe_at: float = 0.0

    @property
    def is_open(self) -> bool:
        return self.reason is not None

    def capacity(self, free: int, *, in_flight: int, now: float) -> int:
        """How many events may be claimed now."""
        if not self.is_open:
            return free
        return 1 if now >= self.probe_at and in_flight == 0 and free > 0 else 0

    def probing(self, now: float) -> None:
        self.probe_at = now + self.probe_interval

    def succeeded(self) -> bool:
        """Outbound answered; True when that closed the circuit."""
        was_open = self.is_open
        self.failures, self.reason = 0, None
        return was_open

    def failed(self, reason: str, *, now: float, wait: float = 0.0) -> bool:
        """A retryable failure (`wait`: Outbound's Retry-After); True when it opened."""
        self.failures += 1
        if self.is_open:
            self.reason = reason
            self.probe_at = max(self.probe_at, now + max(self.probe_interval, wait))
            return False
        if self.failures < self.threshold:
            return False
        return self.trip(reason, now=now, wait=wait)

    def trip(self, reason: str, *, now: float, wait: float = 0.0) -> bool:
        """Open at once (a rejected key); True when it was closed before."""
        was_open = self.is_open
        self.reason = reason
        self.probe_at = now + max(self.probe_interval, wait)
        return not was_open


def refused(answer: Answer) -> bool:
    """Outbound refused what was sent (a 4xx about the events, not the key nor the rate)."""
    status = answer.status
    return (
        status is not None
        and 400 <= status < 500
        and status not in RETRYABLE_STATUSES | AUTH_STATUSES | ENDPOINT_STATUSES
    )


def lines(claimed: list[Claimed]) -> list[list[Claimed]]:
    """The claimed events by line: a claim hands each user's events out together, in order."""
    found: list[list[Claimed]] = []
    previous = None
    for item in claimed:
        key = user_key(item.record)
        if key != previous or not found:
            found.append([])
            previous = key
        found[-1].append(item)
    return found


class Relay:
    """The background worker between the queue and Outbound (start, wake, close, healthy)."""

    def __init__(
        self,
        queue: Queue,
        outbound: Outbound,
        settings: Settings,
        *,
        ids_key: Secret,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
        hub: DebugHub | None = None,
    ) -> None:
        self._queue = queue
        self._metrics = metrics or Metrics()
        self._hub = hub or DebugHub()
        self._outbound = outbound
        self._settings = settings
        self._ids_key = ids_key  # identity.ids_key: the identify's GUID is derived with it
        self._clock = clock
        self._jitter = jitter
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._calling = 0  # deliveries whose calls are not done; the rest record outcomes
        self._identified: OrderedDict[str, None] = OrderedDict()
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        self.breaker = Breaker(settings.breaker_threshold, settings.probe_interval)
        self.endpoints = EndpointWatch()
        self._singles_until = 0.0  # batch endpoints answered 404/405: single calls till then
        self._told_singles = False
        # Per user line, how many events its last failed call carried, while the line waits:
        # a probe claims as deep as the largest (every event claimed costs a write), and a
        # probe whose claim may have stopped inside such a call claims deeper the next time.
        self._failed_calls: OrderedDict[str, int] = OrderedDict()
        self._deep_probe = False
        self._repeats = Repeats(log)  # lines a full disk would repeat every poll

    @property
    def healthy(self) -> bool:
        running = self._runner is not None and not self._runner.done()
        return running and not self.breaker.is_open

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="relay")

    def wake(self) -> None:
        """New events are queued: look now rather than at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        """Stop claiming; give calls in flight up to the relay timeout, then leave them queued."""
        self._closing = True
        self._wake.set()
        if self._runner is not None:
            _, running = await asyncio.wait({self._runner}, timeout=CLAIM_STOP_GRACE)
            for task in running:
                task.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight, timeout=self._settings.relay_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self) -> None:
        settings, breaker = self._settings, self.breaker
        while not self._closing:
            self._wake.clear()
            now = self._clock()
            free = breaker.capacity(
                settings.relay_concurrency - self._calling, in_flight=self._calling, now=now
            )
            claimed: list[Claimed] = []
            if free > 0:
                # A line several events deep under one lease: a user with many events
                # goes as batches, one call at a time, in order. While the circuit is open
                # the probe is one line (free is 1), deep enough for the call that failed
                # before to go again whole (see _send_line).
                depth = settings.relay_batch_size
                if breaker.is_open and not self._deep_probe:
                    depth = min(depth, max(self._failed_calls.values(), default=1))
                try:
                    claimed = await self._queue.claim(
                        free, now=now, lease=settings.lease_seconds, depth=depth
                    )
                except QueueUnavailable as error:
                    self._repeats.log(
                        logging.ERROR,
                        "claim",
                        "relay cannot claim events (%s); trying again shortly",
                        error,
                    )
            if breaker.is_open and claimed:
                breaker.probing(now)
                self._deep_probe = False
                if self._claimed_too_short(claimed, depth):
                    self._deep_probe = True  # the next probe: this line, as deep as it goes
                    with contextlib.suppress(QueueUnavailable):
                        await asyncio.gather(*(self._queue.release(c.id) for c in claimed))
                    claimed = []
            for line in lines(claimed):
                self._calling += 1
                task = asyncio.create_task(self._deliver(line))
                self._inflight.add(task)
                task.add_done_callback(self._finished)
            if not claimed:
                timeout = IDLE_POLL
                if breaker.is_open and now < breaker.probe_at:
                    timeout = min(IDLE_POLL, breaker.probe_at - now)
                # A timeout around the wait rather than wait_for, which makes a task of it:
                # every stored request wakes the relay, and each wake ends such a wait.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()

    def _claimed_too_short(self, claimed: list[Claimed], depth: int) -> bool:
        """Whether a probe's claim may have stopped inside the call its events failed in
        (a call this process did not see fail): sent, they would form another batch."""
        head = claimed[0]
        if head.attempts == 0 or len(claimed) < depth or depth >= self._settings.relay_batch_size:
            return False
        if any(item.attempts != head.attempts for item in claimed):
            return False
        return self._failed_calls.get(user_key(head.record)) != len(claimed)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("relay delivery failed unexpectedly", exc_info=task.exception())

    async def _deliver(self, line: list[Claimed]) -> None:
        settings = self._settings
        sent: list[Sent] = []
        try:
            sent = await self._send_line(line)
        finally:
            # The calls are done: the next events may start while these outcomes are recorded
            # (in the same commit as the claim that fetches them, as like as not).
            self._calling -= 1
            self._wake.set()
        now = self._clock()
        jitter = self._jitter()
        change: str | None = None
        outcomes = []
        acked: list[tuple[int, bool]] = []
        for call in sent:
            # A call's events share its fate, under its first event's backoff and window:
            # those of a batch that failed go again together, and so as the same batch.
            first, answer = call.items[0], call.answer
            decision = held = ACK
            if not answer.ok:
                decision = decide(
                    answer,
                    attempts=first.attempts,
                    age=now - first.received_at,
                    base=settings.retry_base,
                    cap=settings.retry_cap,
                    window=settings.retry_window,
                    jitter=jitter,
                )
                held = Decision(
                    "retry",
                    delay=backoff(first.attempts, settings.retry_base, settings.retry_cap, jitter),
                    reason=f"Outbound answered {answer.status}; held until other events show "
                    "whether the endpoint is there",
                )
            decision = self.endpoints.judge(decision, answer, first.record["message_id"], held=held)
            change = self._update_breaker(decision, now, answer) or change
            self._note_call(user_key(first.record), decision, len(call.items))
            if decision.action == "ack":
                acked += [(item.id, call.identified and not item.identified) for item in call.items]
            else:
                outcomes.append(self._record_outcome(call.items, decision, answer, now))
        outcomes.append(self._queue.ack_all(acked))
        # Events behind a call that failed were not sent: they go again after it, in order.
        carried = sum(len(call.items) for call in sent)
        outcomes += [self._queue.release(item.id) for item in line[carried:]]
        try:
            # Together, so that the line's outcomes share a commit.
            for result in await asyncio.gather(*outcomes, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result
            if change is not None:
                # Backoffs set before would hold the backlog back: when the circuit opens,
                # the probes pace the attempts; when it closes, everything waiting is due.
                await self._queue.reset_backoff(now)
                self._wake.set()
                await self._queue.note(
                    "relay", {"circuit": change, "reason": self.breaker.reason, "since": now}
                )
        except QueueUnavailable as error:
            self._repeats.log(
                logging.ERROR,
                "outcome",
                "could not record the outcome for event %s (%s); it goes again, with the same"
                " X-Outbound-GUID, unless the queue records it once it can",
                line[0].record["message_id"],
                error,
            )

    def _calls(self, item: Claimed) -> list[Call]:
        settings = self._settings
        return calls_for(
            item.record,
            key=self._ids_key,
            identified=item.identified or subject(item.record) in self._identified,
            page_event_name=settings.page_event_name,
            context_property=settings.context_property,
            forward_ip=settings.forward_ip != "off",
        )

    async def _send_line(self, line: list[Claimed]) -> list[Sent]:
        """Send one user's events in order, consecutive calls to one endpoint as one batch;
        the calls made, up to the first that failed (the events after it were not sent).

        A batch holds events tried as often as its first, and no others. Its items carry no
        GUID of their own (outbound.batch_call), so Outbound knows a batch sent again by its
        events alone: if its answer was lost after Outbound had it, the next try must carry
        the same events, not the events that arrived meanwhile, nor fewer. The events of a
        call that failed are retried together (one more attempt each, see _deliver), so the
        line's next claim starts with exactly them, and the events behind, never tried, go in
        a later call. (The line's first event may also have been tried alone, for the
        identify before it: it then goes alone once, which costs a call, not a duplicate.)
        """
        sent: list[Sent] = []
        index = 0
        while index < len(line):
            item = line[index]
            calls = self._calls(item)
            identified = False
            if len(calls) == 2:  # Outbound wants an identify before this user's first track
                answer = await self._send_one(calls[0], item)
                if not answer.ok:
                    return [*sent, Sent([item], answer)]
                self._remember(subject(item.record))
                identified = True
            run = [(item, calls[-1])]
            index += 1
            endpoint = run[0][1].endpoint
            batches = endpoint in BATCH_ENDPOINTS  # others have no batch form
            while batches and index < len(line) and len(run) < self._settings.relay_batch_size:
                if line[index].attempts != item.attempts:
                    break
                following = self._calls(line[index])
                if len(following) != 1 or following[0].endpoint != endpoint:
                    break
                run.append((line[index], following[0]))
                index += 1
            start = 0
            for count, answer in await self._send_run(run):
                items = [carried for carried, _ in run[start : start + count]]
                if answer.ok and endpoint == "/v2/identify":
                    self._remember(subject(item.record))
                    sent.append(Sent(items, answer, identified=True))
                else:
                    sent.append(Sent(items, answer, identified=identified and start == 0))
                start += count
                if not answer.ok:
                    return sent
        return sent

    async def _send_run(self, run: list[tuple[Claimed, Call]]) -> list[tuple[int, Answer]]:
        """Send calls to one endpoint, as one batch when there are several: each call made,
        as how many of the run's events it carried (in order) and its answer, up to the first
        that is not a success. A batch refused with a 4xx is split in halves until the events
        Outbound refuses are found."""
        if len(run) == 1:
            return [(1, await self._send_one(run[0][1], run[0][0]))]
        if self._clock() < self._singles_until:
            replies: list[tuple[int, Answer]] = []
            for item, single in run:
                replies.append((1, await self._send_one(single, item)))
                if not replies[-1][1].ok:
                    break
            return replies
        call = batch_call([single for _, single in run])
        answer = await self._send(call, [(item, single.body) for item, single in run])
        if answer.ok:
            return [(len(run), answer)]
        if answer.status in ENDPOINT_STATUSES:
            self._singles_until = self._clock() + BATCH_FALLBACK
            if not self._told_singles:
                self._told_singles = True
                log.warning(
                    "Outbound answered %s to %s: sending single calls instead for %g s",
                    answer.status,
                    call.endpoint,
                    BATCH_FALLBACK,
                )
            return await self._send_run(run)
        if refused(answer):
            half = len(run) // 2
            left = await self._send_run(run[:half])
            if not left[-1][1].ok:
                return left
            return left + await self._send_run(run[half:])
        return [(len(run), answer)]  # the whole batch goes again, after its first's backoff

    async def _send_one(self, call: Call, item: Claimed) -> Answer:
        return await self._send(call, [(item, call.body)])

    async def _send(self, call: Call, events: list[tuple[Claimed, Any]]) -> Answer:
        """Make the call; `events`: each event it carries, with its part of the body."""
        started = time.perf_counter()
        answer = await self._outbound.send(call)
        self._observe(call, answer, events, time.perf_counter() - started)
        return answer

    def _observe(
        self,
        call: Call,
        answer: Answer,
        events: list[tuple[Claimed, Any]],
        seconds: float,
    ) -> None:
        outcome = relay_outcome(answer)
        self._metrics.relayed.labels(call.endpoint, outcome).inc()
        self._metrics.relayed_events.labels(call.endpoint, outcome).inc(len(events))
        self._metrics.relay_latency.labels(call.endpoint).observe(seconds)
        if self._hub.watched:
            for item, body in events:
                self._hub.publish(
                    {
                        "kind": "call",
                        "message_id": item.record["message_id"],
                        "anonymous_id": item.record.get("anonymous_id"),
                        "endpoint": call.endpoint,
                        "body": body,
                        "outcome": "dry_run"
                        if answer.dry_run
                        else "sent"
                        if answer.ok
                        else "failed",
                        "status": answer.status,
                        "detail": answer.detail[:200],
                    }
                )

    async def _record_outcome(
        self, items: Sequence[Claimed], decision: Decision, answer: Answer, now: float
    ) -> None:
        """Retry, dead-letter or release the events of one call that failed, in one line."""
        first = items[0].record["message_id"]
        named = f"event {first}" if len(items) == 1 else f"{len(items)} events from {first} on"
        if decision.action == "retry":
            self._metrics.retries.inc(len(items))
            # While the circuit is open the probes pace the attempts, not each event's backoff.
            delay = 0.0 if self.breaker.is_open else decision.delay
            await asyncio.gather(
                *(
                    self._queue.retry(item.id, available_at=now + delay, error=decision.reason)
                    for item in items
                )
            )
            log.info(
                "%s to retry in %.1f s (attempt %d): %s",
                named,
                delay,
                items[0].attempts + 1,
                decision.reason,
            )
        elif decision.action == "dead":
            await asyncio.gather(
                *(
                    self._queue.dead_letter(
                        item.id,
                        reason=decision.reason,
                        status=answer.status,
                        response=answer.detail,
                        now=now,
                    )
                    for item in items
                )
            )
            self._metrics.dead_lettered.inc(len(items))
            log.warning("%s dead-lettered: %s", named, decision.reason)
        else:  # a rejected key is no fault of the events
            await asyncio.gather(*(self._queue.release(item.id) for item in items))

    def _update_breaker(self, decision: Decision, now: float, answer: Answer) -> str | None:
        """Feed the outcome to the breaker; says "opened" or "closed" when that changed."""
        wait = min(answer.retry_after or 0.0, MAX_RETRY_AFTER)
        change = self._breaker_change(decision, now, wait, answer.status)
        self._metrics.breaker_open.set(1 if self.breaker.is_open else 0)
        return change

    def _breaker_change(
        self, decision: Decision, now: float, wait: float, status: int | None
    ) -> str | None:
        breaker, interval = self.breaker, self._settings.probe_interval
        if decision.action in {"ack", "dead"}:  # Outbound answered: it is up
            if breaker.succeeded():
                log.warning("relay circuit CLOSED: Outbound answers again; sending the backlog")
                return "closed"
        elif decision.action == "pause":
            if breaker.trip(decision.reason, now=now):
                fix = (
                    "set outbound_url (COLLECTOR_OUTBOUND_URL) to Outbound's API"
                    if status in ENDPOINT_STATUSES
                    else "set a valid OUTBOUND_API_KEY"
                )
                log.error(
                    "%s: relay PAUSED, every event stays queued; %s. Probing every %g s.",
                    decision.reason,
                    fix,
                    interval,
                )
                return "opened"
        elif breaker.failed(decision.reason, now=now, wait=wait):
            log.error(
                "relay circuit OPEN after %d failures in a row (%s): events stay queued; "
                "probing every %g s",
                breaker.failures,
                decision.reason,
                interval,
            )
            return "opened"
        return None

    def _note_call(self, line: str, decision: Decision, events: int) -> None:
        """Keep how many events a line's call that failed carried, until the line goes on."""
        if decision.action == "retry":
            self._failed_calls[line] = events
            self._failed_calls.move_to_end(line)
            while len(self._failed_calls) > IDENTIFIED_MEMORY:
                self._failed_calls.popitem(last=False)  # a line forgotten: its probe goes deep
        elif decision.action in {"ack", "dead"}:
            self._failed_calls.pop(line, None)

    def _remember(self, who: str) -> None:
        self._identified[who] = None
        self._identified.move_to_end(who)
        while len(self._identified) > IDENTIFIED_MEMORY:
            self._identified.popitem(last=False)
