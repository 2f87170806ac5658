"""Ingest's log lines for refused and wholly rejected requests: said once, then counted, so that
a client sending nothing but bad requests cannot fill the log; never the payload."""

from __future__ import annotations

import logging

import pytest
from conftest import Collector

SECRET_VALUE = "the-payload-must-not-be-logged"


async def test_a_request_whose_every_event_is_rejected_is_logged_once_then_counted(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="collector.ingest")
    bad = {"batch": [{"event": 5, "note": SECRET_VALUE}, {"event": "", "user_id": 4.5}]}
    for _ in range(20):
        status, answer, _ = await collector.post("/e", bad)
        assert status == 400
        assert answer["accepted"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "collector.ingest"]
    rejected = [line for line in lines if line.startswith("rejected every event")]
    assert rejected == ["rejected every event of a request (2 invalid); the first at /event"]
    assert not any(SECRET_VALUE in line for line in lines)


async def test_whole_request_refusals_are_logged_once_per_status_then_counted(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="collector.ingest")
    for _ in range(20):
        assert (await collector.post("/e", data=b"{not json"))[0] == 400
        assert (await collector.post("/e", data=b"[]", headers={"Content-Type": "image/png"}))[
            0
        ] == 415
    lines = [r.getMessage() for r in caplog.records if r.name == "collector.ingest"]
    assert [line.split(":")[0] for line in lines] == ["refused 400", "refused 415"]
