"""Repeated log lines: the first is written, then one count an interval (logs.Repeats)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import eventually

from collector.logs import Repeats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def written(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.repeats"]


def test_first_line_then_one_count_an_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    repeats = Repeats(logging.getLogger("test.repeats"), 60.0, clock=clock)
    for i in range(100):  # outside an event loop: the next line after the interval counts
        repeats.log(logging.ERROR, "disk", "refused %d events: disk full", i)
        clock.now += 0.5  # 50 s in all
    assert written(caplog) == ["refused 0 events: disk full"]
    clock.now += 10.0
    repeats.log(logging.ERROR, "disk", "refused %d events: disk full", 100)
    assert written(caplog)[1:] == [
        "refused 99 events: disk full (and 99 more like it in the last 60 s)"
    ]
    # Still repeating: one count an interval, never the line itself again.
    clock.now += 61.0
    repeats.log(logging.ERROR, "disk", "refused %d events: disk full", 101)
    assert written(caplog)[2:] == [
        "refused 100 events: disk full (and 1 more like it in the last 60 s)"
    ]
    assert [r.levelno for r in caplog.records] == [logging.ERROR] * 3


def test_a_quiet_interval_ends_it_and_keys_are_apart(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    repeats = Repeats(logging.getLogger("test.repeats"), 60.0, clock=clock)
    repeats.log(logging.ERROR, "claim", "cannot claim")
    repeats.log(logging.WARNING, "full", "queue full")  # another key: written too
    clock.now += 120.0  # nothing held back: no count, and the next one is written whole
    repeats.log(logging.ERROR, "claim", "cannot claim")
    assert written(caplog) == ["cannot claim", "queue full", "cannot claim"]


async def test_the_count_comes_without_another_line(caplog: pytest.LogCaptureFixture) -> None:
    # On the event loop a timer writes the count when the interval ends, even when the
    # repeats have stopped (the disk was freed, say).
    caplog.set_level(logging.INFO)
    repeats = Repeats(logging.getLogger("test.repeats"), 0.05)
    for _ in range(5):
        repeats.log(logging.ERROR, "disk", "refused: disk full")
    assert written(caplog) == ["refused: disk full"]
    await eventually(lambda: len(written(caplog)) == 2)
    assert written(caplog)[1] == "refused: disk full (and 4 more like it in the last 0.05 s)"
    await asyncio.sleep(0.15)  # two more intervals: nothing held back, nothing written
    assert len(written(caplog)) == 2
