"""The benchmark harness in smoke mode, so that it cannot rot (figures are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench import OTHER_STAGE, stage_of, stage_shares  # noqa: E402 (bench is not a package)

LOOP = "run (asyncio/runners.py:118)"
HANDLER = [
    LOOP,
    "RequestHandler._handle_request (aiohttp/web_protocol.py:510)",
    "request_ids (collector/logs.py:70)",
    "post_event (collector/ingest.py:497)",
    "_answer (collector/ingest.py:450)",
]


@pytest.mark.parametrize(
    ("frames", "stage"),
    [
        ([LOOP], OTHER_STAGE),
        (HANDLER[:2], "HTTP: aiohttp, middleware, headers"),
        (HANDLER[:3], "HTTP: aiohttp, middleware, headers"),
        (HANDLER, "ingest: the rest (sender, limits, answer, metrics)"),
        # The innermost frame that belongs to a stage decides, not the outermost.
        (
            [*HANDLER, "judge (collector/ingest.py:280)", "enrich (collector/enrich.py:120)"],
            "enrichment",
        ),
        (
            [
                *HANDLER,
                "judge (collector/ingest.py:275)",
                "EventValidator.problems (collector/schema.py:425)",
            ],
            "validation",
        ),
        (
            [*HANDLER, "Counter.inc (prometheus_client/metrics.py:300)"],
            "ingest: the rest (sender, limits, answer, metrics)",
        ),
        ([*HANDLER, "read_body (collector/ingest.py:80)"], "body: read and parse"),
        (
            [LOOP, "SQLiteQueue._write_loop (collector/queue.py:380)"],
            "group commit (SQLite), on the loop",
        ),
        (
            [
                *HANDLER,
                "store (collector/ingest.py:420)",
                "SQLiteQueue.put (collector/queue.py:470)",
            ],
            "records to rows (queue put)",
        ),
        (
            ["Thread._bootstrap (threading.py:1002)", "Checkpointer._run (collector/queue.py:193)"],
            "checkpoints (their own thread)",
        ),
        (
            [
                "Thread._bootstrap (threading.py:1002)",
                "Checkpointer._run (collector/queue.py:188)",
                "Event.wait (threading.py:629)",
                "Condition.wait (threading.py:331)",
            ],
            "idle",
        ),
    ],
)
def test_a_sample_belongs_to_its_innermost_stage(frames: list[str], stage: str) -> None:
    assert stage_of(frames) == stage


def test_stage_shares_count_busy_samples_only() -> None:
    raw = "\n".join(
        [
            f"{';'.join([*HANDLER, 'read_body (collector/ingest.py:80)'])} 30",
            f"{';'.join([LOOP, 'SQLiteQueue._transaction (collector/queue.py:420)'])} 10",
            "Thread._bootstrap (threading.py:1);Event.wait (threading.py:629) 60",
        ]
    )
    assert stage_shares(raw) == {
        "body: read and parse": 0.75,
        "group commit (SQLite), on the loop": 0.25,
    }


def test_bench_smoke_writes_results_and_chart(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| single-event beacon (text/plain) |" in result.stdout
    assert "drain 2,000 events, Outbound answers at once" in result.stdout
    results = (tmp_path / "RESULTS.md").read_text()
    assert "baseline" in results
    assert "Memory with 20,000 queued events" in results
    assert "| browser event, valid |" in results  # validation, both paths
    assert "| target | this run | met |" in results
    assert "| checks | + parse, validate and enrich" in results  # the ladder of rungs
    assert "| group commit (SQLite), on the loop |" in results  # the profile by stage
    # The previous version beside this one: ingest through the CORS layer, and the relay.
    assert "| single-event beacon from another origin | " in results
    assert "| under attack | " in results  # a legitimate client beside the attacks
    assert "| drain 1,000 events, Outbound answers after 50 ms, concurrency 64 | " in results
    # Collectors sharing one queue on Redis, beside SQLite's one collector.
    assert "## Collectors sharing one queue on Redis" in results
    assert "| batch of 20 events | SQLite | 1 | " in results
    assert "| batch of 20 events | Redis | 2 | " in results
    assert "| drain 2,000 events, Outbound answers at once | Redis | 2 | " in results
    assert "| drain 2,000 events, Outbound answers after 50 ms | Redis | 1 | " in results
    assert (tmp_path / "ingest.png").read_bytes().startswith(b"\x89PNG")


def test_a_section_replaces_its_own_and_nothing_else() -> None:
    from bench import REDIS_SECTION, replace_section

    section = f"{REDIS_SECTION}\n\nnew figures\n"
    before = "# Benchmark results\n\nrows\n"
    assert replace_section(before, section) == f"{before}\n{section}"
    old = f"{before}\n{REDIS_SECTION}\n\nold figures\n"
    assert replace_section(old, section) == f"{before}\n{section}"
    later = "## Another section\n\nits figures\n"
    assert replace_section(f"{old}\n{later}", section) == f"{before}\n{section}\n{later}"
    assert replace_section("", section) == section


def test_the_fake_outbound_holds_calls_until_released() -> None:
    from bench import outbound_call, start_outbound

    outbound = start_outbound()
    try:
        outbound_call(outbound.port, "/hold", b"")
        track = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, urllib.request; urllib.request.urlopen(urllib.request.Request("
                f"'http://127.0.0.1:{outbound.port}/v2/track', data=b'{{}}'), timeout=30)",
            ]
        )
        with pytest.raises(subprocess.TimeoutExpired):
            track.wait(1)  # held: no answer
        assert outbound_call(outbound.port, "/count")["tracks"] == 0
        outbound_call(outbound.port, "/release", b"")
        assert track.wait(30) == 0
        count = outbound_call(outbound.port, "/count")
        assert (count["tracks"], count["hold"]) == (1, 0)
    finally:
        outbound.stop()


def test_targets_are_judged_at_their_thresholds() -> None:
    from bench import BATCH, FULL_DURABILITY, SINGLE, Load, Results, Row, targets

    def row(name: str, events: int, rate: float, half_p99: float, ratio: float) -> Row:
        full = Load(rate, 1.0, 20.0, 1000, 0)
        return Row(
            name, events, full, Load(rate / 2, 1.0, half_p99, 500, 0), 1.0, 50.0, ratios=[ratio]
        )

    results = Results(
        rows=[
            row(SINGLE.name, 1, 9_000, 10.0, 0.6),
            row(BATCH.name, 20, 1_999.95, 10.01, 0.3),
            row(FULL_DURABILITY.name, 1, 4_000, 30.0, 0.2),
        ],
        relay=[
            {"limit": None, "users": 1000, "events_per_second": 19_999.0},
            {"limit": 1_280.0, "users": 1000, "events_per_second": 20_000.0},
            {"limit": None, "users": 5, "events_per_second": 10_000.0},
            {"limit": 1_280.0, "users": 5, "events_per_second": 100.0},  # no target
        ],
        memory={"queued": 1_000_000, "peak_rss_mb": 150.5},
        script_gzip_bytes=2_000,
    )
    assert [(what.split(":")[0], met) for what, _, met in targets(results)] == [
        ("single-event ingest ≥ 0.6 of the baseline", True),
        ("batched ingest ≥ 40,000 events/s", False),  # 39,999
        ("p99 at half load ≤ 10 ms", True),
        ("p99 at half load ≤ 10 ms", False),
        ("relay ≥ 20,000 events/s, Outbound at once", False),
        ("relay ≥ 20,000 events/s, slow Outbound (50 ms)", True),
        ("relay ≥ 10,000 events/s, 5 users, Outbound at once", True),
        ("peak RSS ≤ 150 MB, 1,000,000 queued events", False),
        ("script ≤ 2,000 bytes gzipped", True),
    ]


@pytest.mark.parametrize(
    ("ref", "package", "script"),
    [
        # The layout before collector/ at the top, and the one after.
        ("c957d07", "src/collector/__init__.py", "src/collector/static/s.min.js"),
        ("b78824d", "collector/__init__.py", "static/s.min.js"),
    ],
)
def test_checkout_gives_a_path_to_that_versions_collector(
    tmp_path: Path, ref: str, package: str, script: str
) -> None:
    from bench import checkout

    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{script}"], capture_output=True)
    if shown.returncode:
        pytest.skip(f"{ref} is not in this clone (a shallow one)")
    code = checkout(ref, tmp_path)
    assert code is not None
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, importlib.util, collector, collector.script as s; "
            "print(collector.__file__); static = importlib.util.find_spec('collector.static'); "
            "print(static and static.origin); "
            "sys.stdout.flush(); sys.stdout.buffer.write(s.Script.packaged().source)",
        ],
        cwd=code,
        capture_output=True,
        check=True,
    ).stdout
    where, static, served = imported.split(b"\n", 2)
    # That version's package and that version's script, not this tree's.
    [unpacked] = tmp_path.iterdir()
    assert where.decode() == str(unpacked / package)
    assert static.decode() == "None" or static.decode().startswith(str(unpacked))
    assert served == shown.stdout.replace(b"{{EVENT_PATH}}", b"/e").replace(
        b"{{SCRIPT_PATH}}", b"/s.js"
    )
    assert checkout("0" * 40, tmp_path) is None
