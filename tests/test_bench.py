"""The benchmark harness in smoke mode, so that it cannot rot (figures are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
    assert (tmp_path / "ingest.png").read_bytes().startswith(b"\x89PNG")
