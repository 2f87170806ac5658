"""The retry policy as a table of cases."""

from __future__ import annotations

import pytest

from collector.outbound import Answer
from collector.relay import (
    MAX_RETRY_AFTER,
    Breaker,
    Decision,
    EndpointWatch,
    decide,
    relay_outcome,
)

POLICY = {"base": 1.0, "cap": 300.0, "window": 3600.0}


@pytest.mark.parametrize(
    ("answer", "attempts", "age", "jitter", "expected"),
    [
        (Answer(200), 0, 0, 0.5, Decision("ack")),
        (Answer(202), 5, 99999, 0.5, Decision("ack")),
        (Answer(204), 0, 0, 0.5, Decision("ack")),
        (Answer(503), 0, 0, 0.5, Decision("retry", 0.5, "Outbound answered 503")),
        (Answer(500), 3, 0, 1.0, Decision("retry", 8.0, "Outbound answered 500")),
        (Answer(502), 20, 0, 1.0, Decision("retry", 300.0, "Outbound answered 502")),  # capped
        (Answer(502), 20, 0, 0.0, Decision("retry", 0.0, "Outbound answered 502")),  # full jitter
        (Answer(408), 1, 0, 0.5, Decision("retry", 1.0, "Outbound answered 408")),
        (Answer(429, retry_after=30), 0, 0, 0.5, Decision("retry", 30.0, "Outbound answered 429")),
        # Retry-After is a floor, not a replacement for a longer backoff.
        (Answer(429, retry_after=2), 6, 0, 1.0, Decision("retry", 64.0, "Outbound answered 429")),
        (
            Answer(503, retry_after=10**9),
            0,
            0,
            0.5,
            Decision("retry", MAX_RETRY_AFTER, "Outbound answered 503"),
        ),
        (
            Answer(None, "ClientConnectorError: refused"),
            0,
            0,
            1.0,
            Decision("retry", 1.0, "ClientConnectorError: refused"),
        ),
        (
            Answer(None, "no answer within 10 s"),
            2,
            0,
            0.25,
            Decision("retry", 1.0, "no answer within 10 s"),
        ),
        (Answer(400, "bad"), 0, 0, 0.5, Decision("dead", reason="Outbound answered 400")),
        (Answer(404), 0, 0, 0.5, Decision("dead", reason="Outbound answered 404")),
        (Answer(422), 0, 0, 0.5, Decision("dead", reason="Outbound answered 422")),
        (Answer(301), 0, 0, 0.5, Decision("dead", reason="Outbound answered 301")),
        (Answer(401), 0, 0, 0.5, Decision("pause", reason="Outbound rejected the API key (401)")),
        (
            Answer(403),
            9,
            99999,
            0.5,
            Decision("pause", reason="Outbound rejected the API key (403)"),
        ),
        # Past the retry window a retryable failure is dead-lettered with its last error.
        (
            Answer(503),
            40,
            3600,
            0.5,
            Decision("dead", reason="still failing after 3600 s: Outbound answered 503"),
        ),
        (
            Answer(None, "timeout"),
            40,
            7200,
            0.5,
            Decision("dead", reason="still failing after 7200 s: timeout"),
        ),
    ],
)
def test_decide(
    answer: Answer, attempts: int, age: float, jitter: float, expected: Decision
) -> None:
    assert decide(answer, attempts=attempts, age=age, jitter=jitter, **POLICY) == expected


def test_breaker_opens_after_the_threshold_and_probes_once_per_interval() -> None:
    breaker = Breaker(threshold=3, probe_interval=10.0)
    assert breaker.capacity(16, in_flight=0, now=0) == 16
    assert not breaker.failed("503", now=0)
    assert not breaker.failed("503", now=1)
    assert breaker.failed("503", now=2)  # the third in a row opens it
    assert breaker.is_open
    assert breaker.reason == "503"
    assert breaker.capacity(16, in_flight=0, now=5) == 0  # waiting for the probe time
    assert breaker.capacity(16, in_flight=0, now=12) == 1  # one probe
    assert breaker.capacity(16, in_flight=1, now=12) == 0  # ... and only while none is out
    breaker.probing(now=12)
    assert breaker.capacity(16, in_flight=0, now=13) == 0
    assert not breaker.failed("timeout", now=13)  # a failed probe keeps it open
    assert breaker.reason == "timeout"
    assert breaker.capacity(16, in_flight=0, now=22) == 0
    assert breaker.capacity(16, in_flight=0, now=23) == 1
    assert breaker.succeeded()  # the probe went through: closed
    assert breaker.capacity(16, in_flight=0, now=23) == 16
    assert not breaker.succeeded()  # closing twice says so once


def test_breaker_success_resets_the_count() -> None:
    breaker = Breaker(threshold=2, probe_interval=1.0)
    breaker.failed("503", now=0)
    breaker.succeeded()
    assert not breaker.failed("503", now=1)
    assert not breaker.is_open


def test_breaker_trips_at_once_for_a_rejected_key() -> None:
    breaker = Breaker(threshold=10, probe_interval=30.0)
    assert breaker.trip("key rejected (401)", now=100)
    assert breaker.is_open
    assert breaker.capacity(4, in_flight=0, now=129) == 0
    assert breaker.capacity(4, in_flight=0, now=130) == 1
    assert not breaker.trip("key rejected (401)", now=130)  # already open


def test_breaker_probes_no_sooner_than_retry_after() -> None:
    breaker = Breaker(threshold=1, probe_interval=1.0)
    assert breaker.failed("429", now=0, wait=5.0)
    assert breaker.capacity(1, in_flight=0, now=4.9) == 0
    assert breaker.capacity(1, in_flight=0, now=5.0) == 1
    breaker.probing(now=5.0)
    assert not breaker.failed("429", now=5.1, wait=3.0)
    assert breaker.capacity(1, in_flight=0, now=8.0) == 0
    assert breaker.capacity(1, in_flight=0, now=8.1) == 1


HELD = Decision("retry", 1.0, "held")
DEAD_404 = Decision("dead", reason="Outbound answered 404")


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        # A wrong outbound_url: every event gets 404; held, then the third in a row pauses.
        (
            [(404, "a"), (404, "b"), (404, "c")],
            ["retry", "retry", "pause"],
        ),
        # The same event refused again is not a run across events.
        ([(404, "a"), (404, "a"), (404, "a"), (404, "b")], ["retry"] * 4),
        # Right after a 2xx a 404 is that event's own: it is dead-lettered.
        ([(200, "a"), (404, "b")], ["ack", "dead"]),
        # ... but only the first: a second one in a row starts a run.
        (
            [(200, "a"), (404, "b"), (404, "c"), (405, "d"), (404, "e")],
            ["ack", "dead", "retry", "retry", "pause"],
        ),
        # A 2xx between ends the run.
        ([(404, "a"), (404, "b"), (200, "c"), (404, "d")], ["retry", "retry", "ack", "dead"]),
        # No answer at all says nothing about the endpoint; another status ends the run.
        (
            [(404, "a"), (None, "b"), (404, "c"), (503, "d"), (404, "e")],
            ["retry", "retry", "retry", "retry", "retry"],
        ),
    ],
)
def test_a_run_of_404_across_events_pauses_and_a_404_after_a_success_stands(
    answers: list[tuple[int | None, str]], expected: list[str]
) -> None:
    watch = EndpointWatch()
    got = []
    for status, message_id in answers:
        answer = Answer(status) if status is not None else Answer(None, "reset")
        decision = decide(answer, attempts=0, age=0, jitter=0.5, **POLICY)
        got.append(watch.judge(decision, answer, message_id, held=HELD).action)
    assert got == expected


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (Answer(200), "2xx"),
        (Answer(202, "dry run", dry_run=True), "dry_run"),
        (Answer(404), "4xx"),
        (Answer(503), "5xx"),
        (Answer(None, "timeout"), "network"),
    ],
)
def test_relay_outcome(answer: Answer, outcome: str) -> None:
    assert relay_outcome(answer) == outcome
