"""The retry policy as a table of cases."""

from __future__ import annotations

import pytest

from collector.outbound import Answer
from collector.relay import MAX_RETRY_AFTER, Decision, decide

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
