"""The collector's speed and memory beside a bare aiohttp baseline, measured in one run.

Run it with `bench/run` (which installs wrk and what this needs); `--smoke` makes every
step last a second or so, for CI. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import timeit
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))  # the collector's code, imported where it is measured
sys.path.insert(1, str(ROOT / "tests"))  # the tests' redis-server, which the bench starts too
from redis_server import REDIS_SERVER, RedisServer  # noqa: E402 (after the path)

PYTHON = sys.executable
CONNECTIONS = 32
# The last commit before aiohttp-cors and aiohttp's client replaced the hand-written CORS
# headers and HTTP client: `--previous` measures against another one.
PREVIOUS = "c957d07"
# The last commit whose claim walked the events table (before the heads table): the skewed
# drains run on it too, with `--skew-before`.
SKEW_BEFORE = "4911d0d"
TICKS = os.sysconf("SC_CLK_TCK")

EVENT = {
    "type": "track",
    "event": "renewMembership",
    "properties": {"plan": "gold", "total": "45.00", "membership": {"valid": True}},
    "anonymous_id": "8c6f0c52-5d5e-4a4e-9d1f-6f2b1f9f2a10",
    "timestamp": 1764187200.123,
    "context": {
        "url": "https://www.example.com/account/renew?ref=mail",
        "path": "/account/renew",
        "title": "Renew your membership",
        "referrer": "https://www.example.com/account",
        "locale": "en-GB",
        "screen": "1440x900",
    },
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "plan": {"enum": ["bronze", "silver", "gold"]},
        "total": {"type": "string", "pattern": "^[0-9]+\\.[0-9]{2}$"},
        "membership": {"type": "object", "properties": {"valid": {"type": "boolean"}}},
    },
    "required": ["plan"],
}
SEED = {
    "event": "renewMembership",
    "user_id": "u123",
    "properties": {
        "membership_valid": True,
        "membership_renewalDate": "2018-06-12",
        "plan": "gold",
    },
    "timestamp": 1529366403,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@dataclass
class Process:
    """A server under test, with its CPU time and peak memory read from /proc."""

    popen: subprocess.Popen[bytes]
    port: int

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def memory(self, field_name: str) -> float:
        """VmRSS (now) or VmHWM (peak) in MB."""
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()


def start(
    command: list[str],
    port: int,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    log: Path | None = None,
) -> Process:
    """Start a server and wait until it listens; its output goes to `log` (else nowhere)."""
    with contextlib.ExitStack() as files:
        output = files.enter_context(log.open("ab")) if log else subprocess.DEVNULL
        popen = subprocess.Popen(
            command, env={**os.environ, **(env or {})}, cwd=cwd, stdout=output, stderr=output
        )
    wait_for_port(port)
    return Process(popen, port)


def start_outbound(delay: float = 0.0) -> Process:
    port = free_port()
    return start([PYTHON, str(BENCH / "servers.py"), "outbound", str(port), str(delay)], port)


def outbound_call(port: int, path: str, body: bytes | None = None) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body)
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        raw = response.read()
        return json.loads(raw) if raw else None


def start_collector(
    data_dir: Path,
    schemas: Path,
    outbound_port: int,
    extra: list[str] | None = None,
    rung: str = "full",
    code: Path | None = None,
    queue_url: str | None = None,
    log: Path | None = None,
) -> Process:
    """The collector as it ships, or one of the lower rungs of `servers.py`; `code`: the
    collector of another version (a `checkout`) instead of this one; `queue_url`: its queue
    in Redis rather than in SQLite in `data_dir`; `log`: where its warnings and errors go."""
    port = free_port()
    env = {
        "OUTBOUND_API_KEY": "bench-key",
        "COLLECTOR_OUTBOUND_URL": f"http://127.0.0.1:{outbound_port}",
        "COLLECTOR_LOG_LEVEL": "warning",
        # Every load here comes from one address, which the share of the queue one client
        # may hold would refuse once Outbound has refused long enough: these rows measure
        # capacity, not that policy. Variables rather than flags: older versions ignore them.
        "COLLECTOR_QUEUE_SHARE_PER_IP": "1",
        "COLLECTOR_QUEUE_BROWSER_SHARE": "1",
    }
    if queue_url is not None:
        env["COLLECTOR_QUEUE_URL"] = queue_url
    if code is not None:
        # `python -m` puts the working directory first on the path: there, the other version.
        env["PYTHONPATH"] = str(code)
    command = [PYTHON, "-m", "collector"]
    if rung != "full":
        command = [PYTHON, str(BENCH / "servers.py"), "collector", rung]
    command += ["serve", "--port", str(port)]
    command += ["--data-dir", str(data_dir), "--schemas-dir", str(schemas)]
    command += ["--rate-limit-per-ip", "0", "--rate-limit-per-user", "0", *(extra or [])]
    return start(command, port, env, cwd=code, log=log)


def checkout(ref: str, work: Path) -> Path | None:
    """The collector's code at `ref`, a commit of this repository, unpacked for Python's path;
    None when this clone does not have it (a shallow one)."""
    known = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{ref}^{{commit}}"], capture_output=True
    )
    if known.returncode:
        print(f"bench: {ref} is not in this clone; no rows against the previous version")
        return None
    target = Path(tempfile.mkdtemp(prefix="collector-at-", dir=work))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    if (target / "src" / "collector").is_dir():  # the layout before collector/ at the top
        return target / "src"
    # static/ is installed as collector.static; beside its package, the checkout finds its own
    # rather than this tree's through the editable install.
    (target / "collector" / "static").symlink_to(target / "static")
    return target


VISITORS = 10_000


def lua(
    body: bytes,
    path: str,
    content_type: str,
    unique: bool,
    rate: float | None,
    headers: tuple[tuple[str, str], ...] = (),
    spread: bool = False,
) -> str:
    """A wrk script posting `body`. When `unique`, each request has fresh message ids (time
    first, then random, like the script's; wrk's clock has whole seconds only) and comes
    from one of `VISITORS` browsers, so that the queue keeps many users' lines, as live."""
    text = body.decode()
    lines = [
        'wrk.method = "POST"',
        f'wrk.path = "{path}"',
        f'wrk.headers["Content-Type"] = "{content_type}"',
        *(f'wrk.headers["{name}"] = "{value}"' for name, value in headers),
    ]
    if unique:
        lines += [
            f"local body = [==[{text}]==]",
            "local counter = 0",
            "local headers = {}",
            "for name, value in pairs(wrk.headers) do headers[name] = value end",
            "request = function()",
            "  counter = counter + 1",
            '  local id = string.format("%012x%010x%010x", os.time() * 1000,',
            "    math.random(0, 2147483647), counter)",
            '  local visitor = string.format("%08x-5d5e-4a4e-9d1f-6f2b1f9f2a10",',
            f"    math.random(1, {VISITORS}))",
            *(
                # Each request from an address of its own, as browsers behind the proxy
                # that the collector trusts (127.0.0.1) are.
                [
                    '  headers["X-Forwarded-For"] = string.format("198.51.%d.%d",',
                    "    math.random(0, 255), math.random(1, 254))",
                ]
                if spread
                else []
            ),
            "  return wrk.format(nil, nil, headers,",
            '    (body:gsub("MESSAGE_ID", id):gsub("ANONYMOUS_ID", visitor)))',
            "end",
        ]
    else:
        lines.append(f"wrk.body = [==[{text}]==]")
    if rate:
        # wrk keeps every connection busy; a delay between requests paces it at `rate`. The
        # delays are random (exponential, as between independent clients' requests): equal
        # ones keep the 32 connections in step, and they would arrive 32 at a time.
        mean = CONNECTIONS * 1000 / rate
        lines.append(f"delay = function() return -math.log(1 - math.random()) * {mean:.3f} end")
    return "\n".join(lines) + "\n"


@dataclass
class Load:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_command(
    port: int, script: str, seconds: float, directory: Path, connections: int = CONNECTIONS
) -> list[str]:
    path = directory / f"load-{time.monotonic_ns()}.lua"
    path.write_text(script)
    return [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(path),
        f"http://127.0.0.1:{port}",
    ]


def run_wrk(port: int, script: str, seconds: float, directory: Path) -> Load:
    command = wrk_command(port, script, seconds, directory)
    return wrk_load(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def wrk_load(output: str) -> Load:
    """What wrk printed, as a Load."""

    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Load(rps, latency("50"), latency("99"), total, int(bad.group(1)) if bad else 0)


@dataclass
class Row:
    name: str
    events_per_request: int
    full: Load
    half: Load
    cpu_per_10k: float
    peak_rss_mb: float
    baseline: Load | None = None
    ratios: list[float] = field(default_factory=list)  # collector ÷ baseline, turn by turn

    @property
    def events_per_second(self) -> float:
        return self.full.requests_per_second * self.events_per_request

    @property
    def ratio(self) -> float:
        """Collector ÷ baseline: the median of the turns' ratios."""
        if not self.ratios:
            base = self.baseline.requests_per_second if self.baseline else float("nan")
            return self.full.requests_per_second / base
        return median(self.ratios)


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    relay: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    validation: list[dict[str, Any]] = field(default_factory=list)
    stages: list[Stages] = field(default_factory=list)
    versions: list[Versus] = field(default_factory=list)
    attack: Attack | None = None
    previous: str = PREVIOUS
    script_gzip_bytes: int = 0
    skew: list[dict[str, Any]] = field(default_factory=list)
    skew_before: list[dict[str, Any]] = field(default_factory=list)
    shared: Shared | None = None  # collectors sharing one queue on Redis


def beacon(events: int) -> bytes:
    """What the script sends: one browser's batch with a sent_at; each request fills in
    fresh ids and its browser's anonymous id."""
    batch = [
        {**EVENT, "message_id": f"MESSAGE_ID-{i}", "anonymous_id": "ANONYMOUS_ID"}
        for i in range(events)
    ]
    return json.dumps({"batch": batch, "sent_at": 1764187200.5}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Scenario:
    name: str
    events_per_request: int
    body: bytes
    path: str = "/e"
    content_type: str = "text/plain;charset=UTF-8"  # what the script's beacons carry
    unique: bool = True  # fresh message ids and a browser's anonymous id per request
    options: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    spread: bool = False  # each request from another client address (X-Forwarded-For)

    def script(self, rate: float | None = None) -> str:
        return lua(
            self.body, self.path, self.content_type, self.unique, rate, self.headers, self.spread
        )


SINGLE = Scenario("single-event beacon (text/plain)", 1, beacon(1))
BATCH = Scenario("batch of 20 events", 20, beacon(20))
SEED_TRACK = Scenario(
    "seed-shaped /v2/track",
    1,
    json.dumps(SEED).encode(),
    "/v2/track",
    "application/json",
    unique=False,
)
# What an operator pays for `durability = "full"`: an fsync per group commit. No target.
FULL_DURABILITY = Scenario(
    "single-event beacon, durability full", 1, beacon(1), options=("--durability", "full")
)
SCENARIOS = (SINGLE, BATCH, SEED_TRACK, FULL_DURABILITY)
# As a page on another site sends them: the CORS layer answers every one.
PAGE_ORIGIN = "https://www.example.com"
CROSS_ORIGIN = (("Origin", PAGE_ORIGIN),)
CROSS_ORIGIN_OPTIONS = ("--allowed-origins", PAGE_ORIGIN)
CROSS_SINGLE = Scenario(
    "single-event beacon from another origin",
    1,
    beacon(1),
    options=CROSS_ORIGIN_OPTIONS,
    headers=CROSS_ORIGIN,
)
CROSS_BATCH = Scenario(
    "batch of 20 from another origin",
    20,
    beacon(20),
    options=CROSS_ORIGIN_OPTIONS,
    headers=CROSS_ORIGIN,
)

# Outbound refuses while ingest is measured: the relay's circuit opens and stays quiet,
# so these figures are ingest alone. The relay has its own figures.
QUIET_RELAY = ["--breaker-threshold", "1", "--probe-interval", "3600"]


def start_baseline() -> Process:
    port = free_port()
    return start([PYTHON, str(BENCH / "servers.py"), "baseline", str(port)], port)


def start_refused_outbound() -> Process:
    outbound = start_outbound()
    outbound_call(outbound.port, "/mode", b"503")
    return outbound


def measure_ingest(work: Path, schemas: Path, seconds: float, rounds: int) -> list[Row]:
    rows = []
    for scenario in SCENARIOS:
        script = scenario.script()
        baseline, outbound = start_baseline(), start_refused_outbound()
        collector = start_collector(
            Path(tempfile.mkdtemp(dir=work)),
            schemas,
            outbound.port,
            [*QUIET_RELAY, *scenario.options],
        )
        try:
            run_wrk(collector.port, script, 1, work)  # warm-up
            loads, cpu_us = take_turns(
                {"baseline": baseline, "full": collector}, script, seconds, rounds, work
            )
            base_full, full = median_load(loads["baseline"]), median_load(loads["full"])
            half = run_wrk(
                collector.port, scenario.script(full.requests_per_second / 2), seconds * 2, work
            )
            rows.append(
                Row(
                    scenario.name,
                    scenario.events_per_request,
                    full,
                    half,
                    cpu_per_10k=cpu_us["full"] / scenario.events_per_request / 100,
                    peak_rss_mb=collector.memory("VmHWM"),
                    baseline=base_full,
                    ratios=turn_ratios(loads["full"], loads["baseline"]),
                )
            )
        finally:
            collector.stop()
            outbound.stop()
            baseline.stop()
    return rows


def take_turns(
    processes: dict[str, Process], script: str, seconds: float, rounds: int, work: Path
) -> tuple[dict[str, list[Load]], dict[str, float]]:
    """Each process under the same load in turn, `rounds` times over: the machine's speed
    drifts by tens of percent from one minute to the next, so whatever is compared takes
    turns. Each one's loads, and its CPU µs per request over all its turns."""
    loads: dict[str, list[Load]] = {name: [] for name in processes}
    cpu = dict.fromkeys(processes, 0.0)
    for _ in range(rounds):
        for name, process in processes.items():
            cpu_before = process.cpu_seconds()
            loads[name].append(run_wrk(process.port, script, seconds, work))
            cpu[name] += process.cpu_seconds() - cpu_before
    return loads, {
        name: cpu[name] / max(1, sum(load.requests for load in loads[name])) * 1e6
        for name in processes
    }


def turn_ratios(loads: list[Load], bases: list[Load]) -> list[float]:
    """Requests per second against the baseline's, turn by turn."""
    return [
        load.requests_per_second / base.requests_per_second
        for load, base in zip(loads, bases, strict=True)
    ]


def median(values: list[float]) -> float:
    """The middle value (the upper of the two middle ones for an even count)."""
    return sorted(values)[len(values) // 2]


def median_load(loads: list[Load]) -> Load:
    """The turn with the median rate (its latencies come with it)."""
    return sorted(loads, key=lambda load: load.requests_per_second)[len(loads) // 2]


RUNGS = {
    "baseline": "bare aiohttp: reads the body, answers 204",
    "answer": "the collector's app; its handler reads the body, answers 202",
    "checks": "+ parse, validate and enrich each event; nothing stored",
    "full": "+ the durable group commit (SQLite): the collector as it ships",
}
# Where a profiled sample's time goes: the innermost frame that matches decides. A frame
# reads "function (path:line)", as py-spy writes it.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle", ("Condition.wait (threading", "Event.wait (threading")),
    ("checkpoints (their own thread)", ("Checkpointer.",)),
    (
        "group commit (SQLite), on the loop",
        ("SQLiteQueue._write_loop", "SQLiteQueue._on_the_loop", "SQLiteQueue._transaction"),
    ),
    ("records to rows (queue put)", ("SQLiteQueue.put",)),
    ("validation", ("EventValidator.",)),
    ("enrichment", ("(collector/enrich.py", "sender_of (collector/ingest.py")),
    (
        "body: read and parse",
        ("read_body (collector/", "decode (collector/", "split_batch (collector/"),
    ),
    ("ingest: the rest (sender, limits, answer, metrics)", ("(collector/ingest.py",)),
    (
        "HTTP: aiohttp, middleware, headers",
        (
            "(aiohttp/",
            "(multidict/",
            "(yarl/",
            "(collector/deadline.py",
            "(collector/logs.py",
            "(collector/app.py",
        ),
    ),
)
OTHER_STAGE = "event loop and the rest"


def stage_of(frames: list[str]) -> str:
    """The stage a sampled stack (outermost frame first) spends its time in."""
    for frame in reversed(frames):
        for stage, needles in STAGES:
            if any(needle in frame for needle in needles):
                return stage
    return OTHER_STAGE


def stage_shares(raw: str) -> dict[str, float]:
    """Each stage's share of the busy samples in py-spy's raw output (idle waits left out)."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stage = stage_of(stack.split(";"))
            counts[stage] = counts.get(stage, 0) + int(count)
    counts.pop("idle", None)
    total = sum(counts.values()) or 1
    return {stage: count / total for stage, count in counts.items()}


@dataclass
class Stages:
    """One scenario's ladder from the baseline to the whole collector, and a profile."""

    scenario: Scenario
    rates: dict[str, float]  # rung: median req/s
    ratios: dict[str, float]  # rung: median of the turns' ratios to the baseline
    cpu_us: dict[str, float]  # rung: CPU µs per request, the process's threads together
    profile: dict[str, float]  # stage: share of the full collector's busy samples
    profiled_cpu_us: float  # CPU µs per request while py-spy sampled it


def py_spy() -> str:
    beside = Path(PYTHON).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        sys.exit("bench: py-spy is missing (bench/run installs it)")
    return found


def profile(process: Process, script: str, seconds: float, work: Path) -> tuple[str, float]:
    """py-spy's raw stacks of `process` under load, and its CPU µs per request meanwhile."""
    output = work / f"profile-{time.monotonic_ns()}.txt"
    spy = subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(process.popen.pid),
            "--rate",
            "200",
            "--duration",
            str(max(1, round(seconds)) + 1),
            "--format",
            "raw",
            "--nonblocking",  # samples without stopping the process, so it runs as it would
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)  # py-spy attaches
    cpu_before = process.cpu_seconds()
    load = run_wrk(process.port, script, seconds, work)
    cpu = process.cpu_seconds() - cpu_before
    _, errors = spy.communicate(timeout=60)
    if spy.returncode != 0 or not output.exists():
        sys.exit(f"bench: py-spy failed: {errors.decode()[-500:]}")
    return output.read_text(), cpu / max(1, load.requests) * 1e6


def measure_stages(work: Path, schemas: Path, seconds: float, rounds: int) -> list[Stages]:
    """What each step from the baseline to the whole collector costs, taking turns; then a
    profile of the whole collector by stage."""
    found = []
    for scenario in (SINGLE, BATCH):
        script = scenario.script()
        outbound = start_refused_outbound()
        processes = {"baseline": start_baseline()}
        for rung in list(RUNGS)[1:]:  # the collector's, after the baseline
            processes[rung] = start_collector(
                Path(tempfile.mkdtemp(dir=work)), schemas, outbound.port, QUIET_RELAY, rung
            )
        try:
            for process in processes.values():
                run_wrk(process.port, script, 1, work)  # warm-up
            loads, cpu_us = take_turns(processes, script, seconds, rounds, work)
            raw, profiled_cpu_us = profile(processes["full"], script, seconds, work)
        finally:
            for process in [*processes.values(), outbound]:
                process.stop()
        found.append(
            Stages(
                scenario,
                rates={
                    r: median([load.requests_per_second for load in ls]) for r, ls in loads.items()
                },
                ratios={r: median(turn_ratios(ls, loads["baseline"])) for r, ls in loads.items()},
                cpu_us=cpu_us,
                profile=stage_shares(raw),
                profiled_cpu_us=profiled_cpu_us,
            )
        )
    return found


def queued_records(
    first: int, end: int, users: int, prefix: str, now: float
) -> list[dict[str, Any]]:
    """Events `first` to `end` of a prefilled queue, stored as ingest stores a visitor's."""
    return [
        {
            **EVENT,
            "message_id": f"{prefix}-q{n}",
            # As ingest stores a visitor now: in the anonymous namespace. A record without
            # the mark (queued before it) gets an identify before every track, which is the
            # upgrade's cost, not the relay's pace.
            "anonymous_id": f"anon:{prefix}-{n % users}",
            "anonymous_prefix": "anon:",
            "user_id": None,
            "received_at": now,
            "traits": {},
            "ip": "203.0.113.0",
            "user_agent": "Mozilla/5.0",
            "origin": "https://www.example.com",
        }
        for n in range(first, end)
    ]


def prefill(
    data_dir: Path,
    events: int,
    users: int,
    *,
    prefix: str = "user",
    backoff: float = 0.0,
    queue_url: str | None = None,
) -> None:
    """Queue `events` events directly, as if Outbound had been down while they came in: in
    SQLite in `data_dir`, or in the Redis queue at `queue_url`. `backoff`: the first event
    of each user then waits that many seconds for its next try, as after a failed attempt
    (later events of those users wait behind it)."""
    from collector.queue import RedisQueue, SQLiteQueue

    limits: dict[str, Any] = {"dedupe_window": 0, "max_events": 10**8, "max_bytes": 10**12}

    async def fill() -> None:
        queue: SQLiteQueue | RedisQueue
        if queue_url is None:
            queue = SQLiteQueue(data_dir / "queue.sqlite3", **limits)
        else:
            # A tool's connection (it takes no partitions), as the dead-letters command's.
            assert not backoff, "a backoff needs a claim, which needs a partition's lease"
            queue = RedisQueue(queue_url, owner=False, **limits)
        await queue.open()
        now = time.time()
        for first in range(0, events, 5000):
            await queue.put(queued_records(first, min(events, first + 5000), users, prefix, now))
        if backoff:
            for head in await queue.claim(users, now=now, lease=60):
                await queue.retry(
                    head.id, available_at=now + backoff, error="Outbound answered 503"
                )
        await queue.close()

    asyncio.run(fill())


FEW_USERS = 5  # the "few users": 5 users, 20,000 events each


def measure_relay(work: Path, schemas: Path, smoke: bool) -> list[dict[str, Any]]:
    """The relay's rows: many users and few, Outbound answering at once and after 50 ms,
    relay concurrency 64."""
    events = 2_000 if smoke else 100_000
    return [
        drain(work, schemas, events, 0.0, 64),
        drain(work, schemas, events, 0.05, 64),
        drain(work, schemas, events, 0.0, 64, users=FEW_USERS),
        drain(work, schemas, events, 0.05, 64, users=FEW_USERS),
    ]


def drain(
    work: Path,
    schemas: Path,
    events: int,
    delay: float,
    concurrency: int,
    code: Path | None = None,
    *,
    users: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Relay a prefilled queue to the fake Outbound (`code`: another version's collector):
    `users` lines (by default 8 a call in flight, 1,000 at least), batches of `batch_size`
    (by default the collector's own)."""
    data_dir = Path(tempfile.mkdtemp(dir=work))
    few = users is not None
    users = users or max(concurrency * 8, 1000)
    prefill(data_dir, events, users)
    outbound = start_outbound(delay)
    options = ["--relay-concurrency", str(concurrency), "--relay-timeout", "10"]
    options += ["--lease-seconds", "60"]
    if batch_size is not None:
        options += ["--relay-batch-size", str(batch_size)]
    collector = start_collector(data_dir, schemas, outbound.port, options, code=code)
    cpu_before = collector.cpu_seconds()  # after start-up, which is not the relay's work
    try:
        while (count := outbound_call(outbound.port, "/count"))["tracks"] < events:
            time.sleep(0.1)
        # From the first call to the last, not from the process start: the relay's pace.
        elapsed = count["last"] - count["first"]
        calls = count["calls"] - 1  # calls after the first one, within `elapsed`
        cpu = collector.cpu_seconds() - cpu_before
    finally:
        collector.stop()
        outbound.stop()
    limit = concurrency / delay if delay else None
    rate = (events - 1) / elapsed
    name = f"drain {events:,} events, Outbound answers " + (
        "at once" if not delay else f"after {delay * 1000:.0f} ms"
    )
    if few:
        name = f"few users: {users} × {events // users:,} events, Outbound answers " + (
            "at once" if not delay else f"after {delay * 1000:.0f} ms"
        )
    if batch_size is not None:
        name += f", batches of {batch_size}"
    return {
        "name": name,
        "users": users,
        "concurrency": concurrency,
        "events_per_second": rate,
        "calls_per_second": calls / elapsed,
        "limit": limit,
        "ratio_to_limit": (calls / elapsed) / limit if limit else None,
        "cpu_us_per_event": cpu / events * 1e6,
    }


# Collectors sharing one queue on Redis (issue 16): ingest with one and with two collector
# processes on one Redis, and the relay draining a prefilled Redis queue with one and with
# two serve processes, beside the SQLite queue's single process in the same run.
SHARED_INGEST = (SINGLE, BATCH)
PARTITIONS = 16  # redis_partitions' default: the most relays that can share the queue
_SEEDS = itertools.count(1)


def start_redis(work: Path) -> RedisServer:
    """A redis-server of the bench's own on a free loopback port, in the work directory, as
    the tests start theirs: appendonly yes, appendfsync everysec (durability "normal"), no
    RDB snapshots."""
    return RedisServer(Path(tempfile.mkdtemp(prefix="redis-", dir=work))).start()


def redis_process(server: RedisServer) -> Process:
    """The server's process, for its CPU time and memory."""
    assert server.process is not None
    return Process(server.process, server.port)


def run_spread(ports: list[int], script: str, seconds: float, work: Path) -> Load:
    """wrk against every port at once, the CONNECTIONS split between them: their loads
    together (rates and counts summed; latencies the worse of their percentiles)."""
    runs = [
        subprocess.Popen(
            # A seed of its own for each wrk: Lua's generator starts alike in every process,
            # and two wrk runs would send the same message ids, which the shared dedupe
            # window stores once.
            wrk_command(
                port,
                script + f"math.randomseed({next(_SEEDS)})\n",
                seconds,
                work,
                connections=CONNECTIONS // len(ports),
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        for port in ports
    ]
    loads = [wrk_load(run.communicate(timeout=seconds + 60)[0]) for run in runs]
    return Load(
        sum(load.requests_per_second for load in loads),
        max(load.p50_ms for load in loads),
        max(load.p99_ms for load in loads),
        sum(load.requests for load in loads),
        sum(load.non_2xx for load in loads),
    )


@dataclass
class Setup:
    """Collector processes on one queue: SQLite's (one process), or one Redis's."""

    name: str
    collectors: list[Process]
    redis: Process | None = None

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: the collectors' together, and Redis's."""
        return (
            sum(process.cpu_seconds() for process in self.collectors),
            self.redis.cpu_seconds() if self.redis else 0.0,
        )


def quiet_collector(
    work: Path, schemas: Path, outbound_port: int, queue_url: str | None = None
) -> Process:
    """A collector for ingest alone (its relay's circuit open and quiet), in a data
    directory of its own, its queue there (SQLite) or on the Redis at `queue_url`."""
    data_dir = Path(tempfile.mkdtemp(dir=work))
    return start_collector(data_dir, schemas, outbound_port, QUIET_RELAY, queue_url=queue_url)


@dataclass
class SharedIngest:
    """One scenario's ingest in one setup, turn by turn."""

    scenario: Scenario
    setup: str
    collectors: int
    loads: list[Load]
    collector_cpu_us: float  # per event, the collectors together
    redis_cpu_us: float | None  # per event
    ratios: list[float]  # req/s ÷ SQLite's one collector, turn by turn


def measure_shared_ingest(
    work: Path, schemas: Path, seconds: float, rounds: int
) -> list[SharedIngest]:
    """Single events and batches of 20 into SQLite (one collector), one collector on Redis
    and two collectors on another Redis (wrk on both at once), taking turns."""
    found = []
    for scenario in SHARED_INGEST:
        script = scenario.script()
        outbound = start_refused_outbound()
        servers = [start_redis(work), start_redis(work)]
        setups: list[Setup] = []
        try:
            quiet = (work, schemas, outbound.port)
            setups += [
                Setup("SQLite", [quiet_collector(*quiet)]),
                Setup(
                    "Redis", [quiet_collector(*quiet, servers[0].url)], redis_process(servers[0])
                ),
                Setup(
                    "Redis",
                    [quiet_collector(*quiet, servers[1].url) for _ in range(2)],
                    redis_process(servers[1]),
                ),
            ]
            for setup in setups:  # warm-up
                run_spread([p.port for p in setup.collectors], script, 1, work)
            loads: list[list[Load]] = [[] for _ in setups]
            cpu = [[0.0, 0.0] for _ in setups]
            for _ in range(rounds):
                for index, setup in enumerate(setups):
                    before = setup.cpu()
                    ports = [p.port for p in setup.collectors]
                    loads[index].append(run_spread(ports, script, seconds, work))
                    after = setup.cpu()
                    cpu[index][0] += after[0] - before[0]
                    cpu[index][1] += after[1] - before[1]
        finally:
            for setup in setups:
                for process in setup.collectors:
                    process.stop()
            for server in servers:
                server.stop()
            outbound.stop()
        for index, setup in enumerate(setups):
            events = sum(load.requests for load in loads[index]) * scenario.events_per_request
            found.append(
                SharedIngest(
                    scenario,
                    setup.name,
                    len(setup.collectors),
                    loads[index],
                    cpu[index][0] / max(1, events) * 1e6,
                    cpu[index][1] / max(1, events) * 1e6 if setup.redis else None,
                    turn_ratios(loads[index], loads[0]),
                )
            )
    return found


def lease_holders(server: RedisServer, partitions: int = PARTITIONS) -> list[int | None]:
    """The pid of the collector holding each partition's lease (None: free). The lease key's
    value is the holder's fencing token, `host:pid:random:fence` (redis_streams' _TEND)."""
    with server.client() as client:
        tokens = client.mget([f"collector:lease:{n}" for n in range(partitions)])
    return [int(token.decode().rsplit(":", 3)[1]) if token else None for token in tokens]


def wait_balanced(server: RedisServer, relays: list[Process], timeout: float = 60.0) -> None:
    """Wait until the relays hold every partition, an equal share each (a collector that
    joins takes free partitions only; the others let go of their extras in turn)."""
    share = PARTITIONS // len(relays)
    deadline = time.monotonic() + timeout
    while True:
        holders = lease_holders(server)
        if all(holders.count(relay.popen.pid) == share for relay in relays):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: the partitions did not spread over the relays: {holders}")
        time.sleep(0.1)


def paced(outbound: Process, events: int, started: float) -> tuple[float, float]:
    """Poll the fake Outbound until it has `events` tracks: the pace (events/s) between 20 %
    and 90 % of them, where every relay is busy (neither the calls held until `started`
    nor the last lines' tail), and when the last call came."""
    samples: list[tuple[float, int]] = [(started, 0)]
    while (count := outbound_call(outbound.port, "/count"))["tracks"] < events:
        samples.append((time.time(), count["tracks"]))
        time.sleep(0.05)
    samples.append((count["last"], count["tracks"]))

    def crossing(share: float) -> tuple[float, int]:
        return next((at, n) for at, n in samples if n >= share * events)

    (begin, low), (end, high) = crossing(0.2), crossing(0.9)
    if end - begin < 0.5:  # too short to sample (a smoke run): the whole drain
        (begin, low), (end, high) = samples[0], samples[-1]
    return (high - low) / (end - begin), count["last"]


def drain_shared(
    work: Path,
    schemas: Path,
    events: int,
    delay: float,
    relays: int,
    *,
    redis: bool,
    concurrency: int = 64,
) -> dict[str, Any]:
    """Relay a prefilled queue to the fake Outbound: SQLite's (one serve process, started on
    the prefilled file), or Redis's with `relays` serve processes. Those start on the empty
    Redis queue and wait until the partitions are spread over them; then the fake Outbound
    holds its calls while the queue is filled, and lets them go."""
    users = max(concurrency * 8, 1000)
    outbound = start_outbound(delay)
    options = ["--relay-concurrency", str(concurrency)]
    # A fill holds the first calls unanswered for seconds: they must not time out.
    options += ["--relay-timeout", "30", "--lease-seconds", "61"]
    data_dir = Path(tempfile.mkdtemp(dir=work))  # with Redis, the collectors share nothing there
    logs = [Path(tempfile.mkstemp(".log", "collector-", dir=work)[1]) for _ in range(relays)]
    server = start_redis(work) if redis else None
    collectors: list[Process] = []
    memory_per_event = None
    try:
        if server is None:
            prefill(data_dir, events, users)
            collectors.append(
                start_collector(data_dir, schemas, outbound.port, options, log=logs[0])
            )
            setup = Setup("SQLite", collectors)
            split_before = [process.cpu_seconds() for process in collectors]
            cpu_before, started = setup.cpu(), time.time()
        else:
            for log in logs:
                collectors.append(
                    start_collector(
                        data_dir, schemas, outbound.port, options, queue_url=server.url, log=log
                    )
                )
            wait_balanced(server, collectors)
            setup = Setup("Redis", collectors, redis_process(server))
            with server.client() as client:
                used_before = int(client.info("memory")["used_memory"])
                outbound_call(outbound.port, "/hold", b"")
                prefill(data_dir, events, users, queue_url=server.url)
                memory_per_event = (
                    int(client.info("memory")["used_memory"]) - used_before
                ) / events
                client.config_resetstat()  # commandstats from here: the drain's alone
            split_before = [process.cpu_seconds() for process in collectors]
            cpu_before, started = setup.cpu(), time.time()
            outbound_call(outbound.port, "/release", b"")
        rate, last = paced(outbound, events, started)
        cpu_after = setup.cpu()
        commands = redis_commands(server, events) if server else {}
        split = [p.cpu_seconds() - b for p, b in zip(collectors, split_before, strict=True)]
    finally:
        for process in collectors:
            process.stop()
        if server is not None:
            server.stop()
        outbound.stop()
    limit = relays * concurrency / delay if delay else None
    return {
        "setup": setup.name,
        "relays": relays,
        "delay": delay,
        "events": events,
        "events_per_second": rate,
        "limit": limit,
        "collector_cpu_us": (cpu_after[0] - cpu_before[0]) / events * 1e6,
        "redis_cpu_us": (cpu_after[1] - cpu_before[1]) / events * 1e6 if server else None,
        "cpu_split": [cpu / max(1e-9, sum(split)) for cpu in split],
        "redis_bytes_per_event": memory_per_event,
        "elapsed": last - started,
        # Lines like "could not record the outcome ...; it goes again after its lease": a
        # drain that stalls for a lease says why.
        "errors": sum(log.read_text(errors="replace").count(" ERROR ") for log in logs),
        "redis_commands": commands,
    }


def redis_commands(server: RedisServer, events: int) -> dict[str, float]:
    """Redis's time per event by command since its statistics were reset (INFO
    commandstats), most first: `evalsha` is the scripts in all, the others what they ran."""
    with server.client() as client:
        stats = client.info("commandstats")
    spent = {
        name.removeprefix("cmdstat_"): int(figures["usec"]) / events
        for name, figures in stats.items()
    }
    return dict(sorted(spent.items(), key=lambda item: -item[1]))


def measure_shared_relay(work: Path, schemas: Path, smoke: bool) -> list[dict[str, Any]]:
    """The drains: SQLite with one relay, Redis with one and with two; Outbound answering at
    once and after 50 ms."""
    events = 2_000 if smoke else 100_000
    return [
        drain_shared(work, schemas, events, delay, relays, redis=redis)
        for delay in (0.0, 0.05)
        for redis, relays in ((False, 1), (True, 1), (True, 2))
    ]


@dataclass
class Shared:
    """The Redis section's figures."""

    ingest: list[SharedIngest]
    relay: list[dict[str, Any]]
    redis_version: str
    commit: str
    command: str
    measured: str


def measure_shared(work: Path, schemas: Path, seconds: float, rounds: int, smoke: bool) -> Shared:
    version = subprocess.run(
        [REDIS_SERVER, "--version"], capture_output=True, text=True, check=True
    ).stdout.split()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return Shared(
        measure_shared_ingest(work, schemas, seconds, rounds),
        measure_shared_relay(work, schemas, smoke),
        next((word[2:] for word in version if word.startswith("v=")), "?"),
        commit or "unknown",
        "bench/run " + " ".join(sys.argv[1:]),
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )


REDIS_SECTION = "## Collectors sharing one queue on Redis"


def shared_table(shared: Shared) -> str:
    """The Redis section of RESULTS.md: its own header, the ingest and the relay tables."""
    first = next((row for row in shared.relay if row["redis_bytes_per_event"] is not None), None)
    memory = (
        f"Redis held {first['redis_bytes_per_event']:,.0f} bytes of memory per queued event "
        f"(used_memory over the fill of {first['events']:,} events of about "
        f"{len(json.dumps(queued_records(0, 1, 1, 'user', 0.0)[0])):,} bytes of JSON)."
        if first
        else ""
    )
    out = [
        REDIS_SECTION,
        "",
        f"Measured {shared.measured} with `{shared.command}` at commit {shared.commit}.",
        "",
        f"- Redis {shared.redis_version}: a redis-server of the bench's own on 127.0.0.1, in "
        'its work directory: appendonly yes, appendfsync everysec (durability "normal": '
        "nothing acknowledged is lost when a process is killed; a power loss may lose the "
        "last second), no RDB snapshots. One Redis per setup.",
        "- Everything runs on this one machine: wrk, the collectors and Redis share its "
        f"{os.cpu_count()} cores, so a second collector adds no core of its own here. The "
        "CPU columns say what each part costs per event, which is what adds up on machines "
        "of their own.",
        f"- Ingest: wrk, {CONNECTIONS} connections in all (two collectors: two wrk at once, "
        f"{CONNECTIONS // 2} connections each; rates summed, latencies the worse of the "
        "two), Outbound refusing so that the relays are quiet; the setups take turns, "
        f"{len(shared.ingest[0].loads) if shared.ingest else 0} turns of each; the median turn, "
        "and each turn's ratio to SQLite's one collector.",
        "- Relay: a prefilled queue of visitors (1,000 users) drained into the fake Outbound "
        "at relay concurrency 64 a process; the pace is taken between 20 % and 90 % of the "
        "events delivered. SQLite's collector starts on the prefilled file; Redis's start on "
        "the empty queue, wait until the 16 partitions are spread over them (8 each for two), "
        "and the fake Outbound holds their calls while the queue is filled (relay_timeout 30 "
        "and lease_seconds 61 for that). Errors logged: the collectors' ERROR lines, such as "
        "an outcome Redis did not record in time, whose events then wait out their lease.",
        "",
        "| ingest | queue | collectors | req/s | events/s | ratio to SQLite (per turn) "
        "| p50 / p99 (ms) | non-2xx | collector CPU µs / event | Redis CPU µs / event |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in shared.ingest:
        load = median_load(row.loads)
        turns = ", ".join(f"{ratio:.2f}" for ratio in row.ratios)
        redis_cpu = f"{row.redis_cpu_us:.0f}" if row.redis_cpu_us is not None else "-"
        out.append(
            f"| {row.scenario.name} | {row.setup} | {row.collectors} | "
            f"{load.requests_per_second:,.0f} | "
            f"{load.requests_per_second * row.scenario.events_per_request:,.0f} | "
            f"{median(row.ratios):.2f} ({turns}) | {load.p50_ms:.2f} / {load.p99_ms:.2f} | "
            f"{sum(turn.non_2xx for turn in row.loads)} | {row.collector_cpu_us:.0f} | "
            f"{redis_cpu} |"
        )
    out += [
        "",
        "| relay | queue | relays | events/s | limit (relays × 64 ÷ latency) "
        "| collector CPU µs / event | CPU split over relays | Redis CPU µs / event "
        "| errors logged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for drain in shared.relay:
        when = "at once" if not drain["delay"] else f"after {drain['delay'] * 1000:.0f} ms"
        limit = f"{drain['limit']:,.0f} calls/s" if drain["limit"] else "-"
        split = " / ".join(f"{share:.0%}" for share in drain["cpu_split"])
        redis_cpu = f"{drain['redis_cpu_us']:.0f}" if drain["redis_cpu_us"] is not None else "-"
        out.append(
            f"| drain {drain['events']:,} events, Outbound answers {when} | {drain['setup']} | "
            f"{drain['relays']} | {drain['events_per_second']:,.0f} | {limit} | "
            f"{drain['collector_cpu_us']:.0f} | {split} | {redis_cpu} | {drain['errors']} |"
        )
    if memory:
        out += ["", memory]
    profiled = next((drain for drain in shared.relay if drain["redis_commands"]), None)
    if profiled:
        spent = list(profiled["redis_commands"].items())
        out += [
            "",
            f"Where Redis's time went in the drain by {profiled['relays']} relay "
            f"(Outbound {'at once' if not profiled['delay'] else 'at 50 ms'}), wall-clock µs "
            "per event relayed (INFO commandstats, which on a busy machine include the time "
            "Redis waited for a core; the scripts in all, then the commands they ran): "
            + ", ".join(f"{name} {usec:.1f}" for name, usec in spent[:8])
            + ".",
        ]
    return "\n".join(out)


def replace_section(text: str, section: str) -> str:
    """`text` (RESULTS.md) with its section under the same `## ` heading replaced by
    `section`, up to the next `## ` heading; appended when it has none."""
    heading = section.split("\n", 1)[0]
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        return (
            pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1).rstrip("\n") + "\n"
        )
    head = text.rstrip("\n")
    return (head + "\n\n" if head else "") + section.rstrip("\n") + "\n"


# Ingest by other clients while a skewed queue drains: single-event beacons at this fixed,
# modest rate, for this long, once the drain has begun; then the same on the drained queue.
# They are identifies, which the fake Outbound does not count as tracks: the tracks it
# counts are the skewed queue's.
OTHER_CLIENTS = Scenario(
    "identify beacon",
    1,
    json.dumps(
        {
            "batch": [
                {
                    "type": "identify",
                    "anonymous_id": "ANONYMOUS_ID",
                    "message_id": "MESSAGE_ID",
                    "traits": {"plan": "gold"},
                    "timestamp": 1764187200.1,
                }
            ],
            "sent_at": 1764187200.5,
        },
        separators=(",", ":"),
    ).encode(),
)
SKEW_INGEST_RATE = 200.0
SKEW_INGEST_SECONDS = 5.0
SKEW_CUTOFF = 60.0  # seconds: a drain still going then is measured over what it sent so far


@dataclass(frozen=True)
class Skew:
    """A queue whose events belong to few lines, or wait behind one line in backoff."""

    name: str
    users: int  # whose events are drained
    events: int
    heavy_events: int = 0  # of one more user, whose first event is in backoff throughout


SKEWS = (
    Skew("few users: 5 users × 20,000 events", 5, 100_000),
    Skew("1 heavy user in backoff (50,000 events) + 1,000 light users × 50", 1000, 50_000, 50_000),
)


def drain_skewed(
    work: Path, schemas: Path, skew: Skew, *, cutoff: float = SKEW_CUTOFF, code: Path | None = None
) -> dict[str, Any]:
    """Relay a skewed prefilled queue to the fake Outbound (answering at once) while other
    clients post at a modest fixed rate: the drain's pace (over `cutoff` seconds at most),
    the CPU per event, and those clients' latency during the drain and once it is over."""
    data_dir = Path(tempfile.mkdtemp(dir=work))
    if skew.heavy_events:
        prefill(data_dir, skew.heavy_events, 1, prefix="heavy", backoff=86_400)
    prefill(data_dir, skew.events, skew.users, prefix="light")
    outbound = start_outbound()
    collector = start_collector(
        data_dir,
        schemas,
        outbound.port,
        ["--relay-concurrency", "16", "--relay-timeout", "10", "--lease-seconds", "60"],
        code=code,
    )
    script = OTHER_CLIENTS.script(SKEW_INGEST_RATE)
    cpu_before = collector.cpu_seconds()
    started = time.monotonic()
    try:
        while outbound_call(outbound.port, "/count")["tracks"] == 0:
            time.sleep(0.05)
        during = run_wrk(collector.port, script, SKEW_INGEST_SECONDS, work)
        while True:
            count = outbound_call(outbound.port, "/count")
            drained = count["tracks"]
            if drained >= skew.events or time.monotonic() - started > cutoff:
                break
            time.sleep(0.2)
        cpu = collector.cpu_seconds() - cpu_before
        elapsed = count["last"] - count["first"]
        after = run_wrk(collector.port, script, SKEW_INGEST_SECONDS, work)
    finally:
        collector.stop()
        outbound.stop()
    return {
        "name": skew.name,
        "drained": drained,
        "of": skew.events,
        "events_per_second": drained / elapsed,
        "cpu_us_per_event": cpu / max(1, drained) * 1e6,
        "during": during,
        "after": after,
    }


def skew_table(found: list[dict[str, Any]], before: list[dict[str, Any]] | None) -> str:
    """The skewed drains, and the same on the version before the heads table when measured."""
    out = [
        f"Skewed queues, Outbound answering at once, relay concurrency 16; meanwhile other "
        f"clients post single-event identify beacons at {SKEW_INGEST_RATE:.0f} req/s (wrk, "
        f"{SKEW_INGEST_SECONDS:.0f} s from the drain's first call), and again on the drained "
        f"queue. A drain is cut off after {SKEW_CUTOFF:.0f} s.",
        "",
        "| queue | version | drained | events/s | CPU µs / event | ingest p50 / p99 during "
        "(ms) | ingest p50 / p99 after (ms) | ingest answers not 2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    versions = [("this", found)] + ([("before", before)] if before else [])
    for index in range(len(found)):
        for version, rows in versions:
            r = rows[index]
            during, after = r["during"], r["after"]
            out.append(
                f"| {r['name']} | {version} | {r['drained']:,} of {r['of']:,} | "
                f"{r['events_per_second']:,.0f} | {r['cpu_us_per_event']:.0f} | "
                f"{during.p50_ms:.2f} / {during.p99_ms:.2f} | "
                f"{after.p50_ms:.2f} / {after.p99_ms:.2f} | {during.non_2xx + after.non_2xx} |"
            )
    return "\n".join(out)


# Under attack (issue 17, findings 4 and 5): a legitimate load of single-event beacons, each
# from a browser of its own behind the proxy the collector trusts, alone and then while one
# address posts 100-event batches of 300 unknown keys an event on 3 connections and 200 live
# viewers that match nothing stay open, taking turns.
LEGITIMATE = Scenario("single-event beacons from many browsers", 1, beacon(1), spread=True)
ATTACKER = "203.0.113.66"
INVALID_BATCH = json.dumps(
    {"batch": [{"event": "x", **{f"unknown{k}": k for k in range(300)}} for _ in range(100)]},
    separators=(",", ":"),
).encode()
IDLE_VIEWERS = 200
ATTACKED_OPTIONS = [
    *("--trusted-proxies", "127.0.0.1"),
    # The defaults, which start_collector turns off for the other rows.
    *("--rate-limit-per-ip", "100", "--rate-limit-per-user", "10"),
]


@dataclass
class Attack:
    """The legitimate client alone and under attack, turn by turn."""

    alone: list[Load]
    attacked: list[Load]
    attacker_requests: int  # over all turns
    attacker_refused: int  # answered 400 (invalid) or 429 (its bucket empty): not 2xx
    viewers_refused: int  # of IDLE_VIEWERS a turn, answered 503 at once (the viewer cap)


def idle_viewers(port: int, count: int) -> tuple[list[socket.socket], int]:
    """Open `count` live views of a visitor that sends nothing: (the sockets, how many were
    refused at once)."""
    views = []
    for _ in range(count):
        view = socket.create_connection(("127.0.0.1", port))
        view.sendall(b"GET /demo/events?aid=nobody HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        views.append(view)
    refused = 0
    for view in views:
        view.settimeout(0.5)
        with contextlib.suppress(TimeoutError):  # no answer yet: the view was taken
            refused += view.recv(64).startswith(b"HTTP/1.1 503")
    return views, refused


def measure_attack(work: Path, schemas: Path, seconds: float, rounds: int) -> Attack:
    outbound = start_refused_outbound()
    collector = start_collector(
        Path(tempfile.mkdtemp(dir=work)), schemas, outbound.port, [*QUIET_RELAY, *ATTACKED_OPTIONS]
    )
    legitimate = LEGITIMATE.script()
    invalid = lua(INVALID_BATCH, "/e", "text/plain", False, None, (("X-Forwarded-For", ATTACKER),))
    found = Attack([], [], 0, 0, 0)
    try:
        run_wrk(collector.port, legitimate, 1, work)  # warm-up
        for _ in range(rounds):
            found.alone.append(run_wrk(collector.port, legitimate, seconds, work))
            views, refused = idle_viewers(collector.port, IDLE_VIEWERS)
            attacker = subprocess.Popen(
                wrk_command(collector.port, invalid, seconds + 1, work, connections=3),
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                found.attacked.append(run_wrk(collector.port, legitimate, seconds, work))
            finally:
                attack = wrk_load(attacker.communicate(timeout=60)[0])
                for view in views:
                    view.close()
            found.attacker_requests += attack.requests
            found.attacker_refused += attack.non_2xx
            found.viewers_refused += refused
    finally:
        collector.stop()
        outbound.stop()
    return found


def attack_table(attack: Attack) -> str:
    alone, attacked = median_load(attack.alone), median_load(attack.attacked)
    ratios = turn_ratios(attack.attacked, attack.alone)
    turns = ", ".join(f"{ratio:.2f}" for ratio in ratios)
    rounds = len(attack.alone)
    return "\n".join(
        [
            f"Under attack: {LEGITIMATE.name} (wrk, {CONNECTIONS} connections), alone and while "
            f"one address posts 100-event batches of 300 unknown keys an event on 3 "
            f"connections and {IDLE_VIEWERS} live views that match nothing stay open; taking "
            "turns, the collector at its default rate limits behind a trusted proxy.",
            "",
            "| legitimate client | req/s | p50 / p99 (ms) | non-2xx | ratio (per turn) |",
            "|---|---|---|---|---|",
            f"| alone | {alone.requests_per_second:,.0f} | {alone.p50_ms:.2f} / "
            f"{alone.p99_ms:.2f} | {alone.non_2xx} | |",
            f"| under attack | {attacked.requests_per_second:,.0f} | {attacked.p50_ms:.2f} / "
            f"{attacked.p99_ms:.2f} | {attacked.non_2xx} | {median(ratios):.2f} ({turns}) |",
            "",
            f"The attacker: {attack.attacker_requests:,} batches, {attack.attacker_refused:,} "
            f"of them refused (400 while its address's bucket pays for judging them, then "
            "429 before their bodies are read); "
            f"{attack.viewers_refused:,} of {IDLE_VIEWERS * rounds:,} live views refused at once "
            "(503: the viewer cap).",
        ]
    )


@dataclass
class Versus:
    """One load on the previous version and on this one, taking turns."""

    name: str
    unit: str  # of the rates: "req/s" or "events/s"
    previous: list[float]  # the rate of each turn
    current: list[float]
    previous_cpu_us: float  # per request or per event, as the unit says
    current_cpu_us: float

    @property
    def ratios(self) -> list[float]:
        """This version ÷ the previous one, turn by turn."""
        return [c / p for c, p in zip(self.current, self.previous, strict=True)]


def measure_versions(
    work: Path, schemas: Path, code: Path, seconds: float, rounds: int, relay_events: int
) -> list[Versus]:
    """Ingest from another origin (the CORS layer) and the relay (the HTTP client), on the
    previous version (`code`) and on this one, taking turns."""
    found = []
    for scenario in (CROSS_SINGLE, CROSS_BATCH):
        script = scenario.script()
        outbound = start_refused_outbound()
        options = [*QUIET_RELAY, *scenario.options]
        processes = {
            version: start_collector(
                Path(tempfile.mkdtemp(dir=work)), schemas, outbound.port, options, code=source
            )
            for version, source in (("previous", code), ("current", None))
        }
        try:
            for process in processes.values():
                run_wrk(process.port, script, 1, work)  # warm-up
            loads, cpu_us = take_turns(processes, script, seconds, rounds, work)
        finally:
            for process in [*processes.values(), outbound]:
                process.stop()
        found.append(
            Versus(
                scenario.name,
                "req/s",
                [load.requests_per_second for load in loads["previous"]],
                [load.requests_per_second for load in loads["current"]],
                cpu_us["previous"],
                cpu_us["current"],
            )
        )
    for delay, concurrency in ((0.0, 16), (0.05, 64)):
        turns: dict[str, list[dict[str, Any]]] = {"previous": [], "current": []}
        for _ in range(rounds):
            for version, source in (("previous", code), ("current", None)):
                turns[version].append(
                    drain(work, schemas, relay_events, delay, concurrency, code=source)
                )
        found.append(
            Versus(
                f"{turns['current'][0]['name']}, concurrency {concurrency}",
                "events/s",
                [turn["events_per_second"] for turn in turns["previous"]],
                [turn["events_per_second"] for turn in turns["current"]],
                median([turn["cpu_us_per_event"] for turn in turns["previous"]]),
                median([turn["cpu_us_per_event"] for turn in turns["current"]]),
            )
        )
    return found


def versions_table(found: list[Versus], ref: str) -> str:
    """The previous version beside this one."""
    known = " (before aiohttp-cors and aiohttp's client)" if ref == PREVIOUS else ""
    out = [
        f"This version against `{ref}`{known}, taking turns in the same run: ingest with an "
        "allowed `Origin` on every request (req/s, CPU µs per request), and the relay draining "
        "a prefilled queue (events/s, CPU µs per event).",
        "",
        "| load | previous | this version | ratio (per turn) | CPU µs previous → this |",
        "|---|---|---|---|---|",
    ]
    for v in found:
        turns = ", ".join(f"{ratio:.2f}" for ratio in v.ratios)
        out.append(
            f"| {v.name} | {median(v.previous):,.0f} {v.unit} | {median(v.current):,.0f} {v.unit} "
            f"| {median(v.ratios):.2f} ({turns}) | {v.previous_cpu_us:.0f} → "
            f"{v.current_cpu_us:.0f} |"
        )
    return "\n".join(out)


def memory_flat(work: Path, schemas: Path, events: int, seconds: float) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(dir=work))
    prefill(data_dir, events, 5000)
    outbound = start_outbound()
    outbound_call(outbound.port, "/mode", b"503")
    collector = start_collector(
        data_dir, schemas, outbound.port, ["--breaker-threshold", "3", "--probe-interval", "1"]
    )
    waiting, draining = [], []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            waiting.append(collector.memory("VmRSS"))
            time.sleep(0.5)
        outbound_call(outbound.port, "/mode", b"200")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            draining.append(collector.memory("VmRSS"))
            time.sleep(0.5)
        drained = outbound_call(outbound.port, "/count")["tracks"]
        peak = collector.memory("VmHWM")
    finally:
        collector.stop()
        outbound.stop()
    return {
        "queued": events,
        "rss_waiting_mb": (min(waiting), max(waiting)),
        "rss_draining_mb": (min(draining), max(draining)),
        "drained_while_sampled": drained,
        "peak_rss_mb": peak,
    }


FAST, AUTHORITY = "jsonschema-rs first", "jsonschema alone"


def measure_validation(turns: int) -> list[dict[str, Any]]:
    """Microseconds per event in the collector's validation (envelope, limits, per-event
    schema), with jsonschema-rs answering "valid" first, and with jsonschema deciding alone."""
    import orjson
    from jsonschema import Draft202012Validator

    from collector.schema import EventValidator

    schemas = {"renewMembership": Draft202012Validator(SCHEMA)}
    paths = {FAST: EventValidator(schemas), AUTHORITY: EventValidator(schemas, fast=False)}
    platinum = json.loads(json.dumps(EVENT))
    platinum["properties"]["plan"] = "platinum"
    cases: list[tuple[str, dict[str, Any], Any]] = [
        ("browser event, valid", EVENT, "event"),
        ("seed-shaped /v2/track, valid", SEED, "outbound_track"),
        ("browser event, invalid (`plan` not in the enum)", platinum, "event"),
    ]
    rows = []
    for name, event, kind in cases:
        encoded = orjson.dumps(event)  # as ingest hands it over
        timings: dict[str, list[float]] = {path: [] for path in paths}
        for _ in range(turns):  # the paths take turns, as baseline and collector do
            for path, validator in paths.items():
                check = functools.partial(validator.problems, event, kind, encoded)
                number, seconds = timeit.Timer(check).autorange()
                timings[path].append(seconds / number * 1e6)
        rows.append({"name": name, **{p: median(t) for p, t in timings.items()}})
    return rows


def script_size() -> int:
    from collector.script import Script

    return len(Script.packaged().gzipped)


SCRIPT_BUDGET = 2_000  # bytes gzipped; tests/test_script.py holds the script to it


def targets(results: Results) -> list[tuple[str, str, bool]]:
    """Each of the issue's targets: what it asks, what this run measured, whether it holds."""
    found: list[tuple[str, str, bool]] = []
    rows = {row.name: row for row in results.rows}
    if SINGLE.name in rows:
        ratio = rows[SINGLE.name].ratio
        found.append(("single-event ingest ≥ 0.6 of the baseline", f"{ratio:.2f}", ratio >= 0.6))
    if BATCH.name in rows:
        rate = rows[BATCH.name].events_per_second
        found.append(("batched ingest ≥ 40,000 events/s", f"{rate:,.0f}", rate >= 40_000))
    for row in results.rows:
        if row.name == FULL_DURABILITY.name:
            continue  # it shows what an option costs
        p99 = row.half.p99_ms
        found.append((f"p99 at half load ≤ 10 ms: {row.name}", f"{p99:.2f} ms", p99 <= 10))
    for relay in results.relay:
        rate = relay["events_per_second"]
        if relay.get("users", 1000) <= FEW_USERS:
            if not relay["limit"]:
                what = f"relay ≥ 10,000 events/s, {FEW_USERS} users, Outbound at once"
                found.append((what, f"{rate:,.0f}", rate >= 10_000))
            continue
        when = "slow Outbound (50 ms)" if relay["limit"] else "Outbound at once"
        found.append((f"relay ≥ 20,000 events/s, {when}", f"{rate:,.0f}", rate >= 20_000))
    if results.memory:
        peak = results.memory["peak_rss_mb"]
        found.append(
            (
                f"peak RSS ≤ 150 MB, {results.memory['queued']:,} queued events",
                f"{peak:.0f} MB",
                peak <= 150,
            )
        )
    size = results.script_gzip_bytes
    found.append((f"script ≤ {SCRIPT_BUDGET:,} bytes gzipped", f"{size:,}", size <= SCRIPT_BUDGET))
    return found


def relay_table(relays: list[dict[str, Any]]) -> str:
    """The relay's drains: events and calls a second (a batch call carries up to 100)."""
    out = [
        "| relay | concurrency | events/s | calls/s | limit (concurrency ÷ latency) | ratio "
        "| CPU µs / event |",
        "|---|---|---|---|---|---|---|",
    ]
    for relay in relays:
        limit = f"{relay['limit']:,.0f} calls/s" if relay["limit"] else "-"
        ratio = f"{relay['ratio_to_limit']:.2f}" if relay["ratio_to_limit"] else "-"
        out.append(
            f"| {relay['name']} | {relay['concurrency']} | {relay['events_per_second']:,.0f} | "
            f"{relay['calls_per_second']:,.0f} | {limit} | {ratio} "
            f"| {relay['cpu_us_per_event']:.0f} |"
        )
    return "\n".join(out)


def table(results: Results) -> str:
    out = [
        "| scenario | req/s | events/s | baseline req/s | ratio (per turn) | p50 / p99 full (ms) "
        "| p50 / p99 half (ms), at req/s | CPU s / 10k events | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results.rows:
        base = row.baseline.requests_per_second if row.baseline else float("nan")
        full, half = row.full, row.half
        turns = ", ".join(f"{ratio:.2f}" for ratio in row.ratios)
        out.append(
            f"| {row.name} | {full.requests_per_second:,.0f} | {row.events_per_second:,.0f} | "
            f"{base:,.0f} | {row.ratio:.2f} ({turns}) | "
            f"{full.p50_ms:.2f} / {full.p99_ms:.2f} | {half.p50_ms:.2f} / {half.p99_ms:.2f}, "
            f"at {half.requests_per_second:,.0f} | "
            f"{row.cpu_per_10k:.2f} | {row.peak_rss_mb:.0f} |"
        )
    out += ["", relay_table(results.relay)]
    m = results.memory
    if m:
        waiting, draining = m["rss_waiting_mb"], m["rss_draining_mb"]
        out += [
            "",
            f"Memory with {m['queued']:,} queued events: RSS {waiting[0]:.0f}–{waiting[1]:.0f} MB"
            f" while they wait, {draining[0]:.0f}–{draining[1]:.0f} MB while they drain"
            f" ({m['drained_while_sampled']:,} sent meanwhile); peak {m['peak_rss_mb']:.0f} MB.",
        ]
    if results.validation:
        out += [
            "",
            f"| validation of one event | {FAST}, µs (the default) | {AUTHORITY}, µs "
            "| alone ÷ first |",
            "|---|---|---|---|",
        ]
        for v in results.validation:
            out.append(
                f"| {v['name']} | {v[FAST]:.1f} | {v[AUTHORITY]:.1f} | "
                f"{v[AUTHORITY] / v[FAST]:.0f}× |"
            )
    out += ["", "| target | this run | met |", "|---|---|---|"]
    out += [
        f"| {what} | {got} | {'yes' if met else '**no**'} |" for what, got, met in targets(results)
    ]
    if results.skew:
        out += ["", skew_table(results.skew, results.skew_before)]
    if results.versions:
        out += ["", versions_table(results.versions, results.previous)]
    if results.attack is not None:
        out += ["", attack_table(results.attack)]
    if results.stages:
        out += ["", stages_table(results.stages)]
    if results.shared is not None:
        out += ["", shared_table(results.shared)]
    return "\n".join(out)


def stages_table(found: list[Stages]) -> str:
    """The ladder from the baseline to the whole collector, then the whole one's profile."""
    names = " | ".join(f"{s.scenario.name}: req/s | ratio | CPU µs / request" for s in found)
    out = [
        "Where the time goes: the rungs from the baseline to the whole collector take turns "
        "under the same load (CPU is the process's, all its threads).",
        "",
        f"| rung | what it does | {names} |",
        "|---|---|" + "---|---|---|" * len(found),
    ]
    for rung, what in RUNGS.items():
        cells = " | ".join(
            f"{s.rates[rung]:,.0f} | {s.ratios[rung]:.2f} | {s.cpu_us[rung]:.0f}" for s in found
        )
        out.append(f"| {rung} | {what} | {cells} |")
    order = sorted(
        {stage for s in found for stage in s.profile},
        key=lambda stage: -max(s.profile.get(stage, 0.0) for s in found),
    )
    names = " | ".join(f"{s.scenario.name}: share | µs / request" for s in found)
    out += [
        "",
        "The whole collector under the same load, profiled with py-spy (200 samples a second, "
        "not stopping it): each stage's share of the busy samples, and that share of the "
        "CPU per request measured meanwhile ("
        + ", ".join(f"{s.profiled_cpu_us:.0f} µs {s.scenario.name}" for s in found)
        + ").",
        "",
        f"| stage | {names} |",
        "|---|" + "---|---|" * len(found),
    ]
    for stage in order:
        cells = " | ".join(
            f"{s.profile.get(stage, 0.0):.0%} | {s.profile.get(stage, 0.0) * s.profiled_cpu_us:.0f}"
            for s in found
        )
        out.append(f"| {stage} | {cells} |")
    return "\n".join(out)


def chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.name for row in results.rows]
    collector = [row.full.requests_per_second for row in results.rows]
    baseline = [row.baseline.requests_per_second if row.baseline else 0 for row in results.rows]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    positions = range(len(names))
    axis.bar(
        [p - 0.2 for p in positions], baseline, 0.4, label="bare aiohttp baseline (read body, 204)"
    )
    axis.bar(
        [p + 0.2 for p in positions],
        collector,
        0.4,
        label="collector (validate, enrich, durable commit)",
    )
    for p, (c, row) in enumerate(zip(collector, results.rows, strict=True)):
        axis.text(p + 0.2, c, f"{row.ratio:.2f}×", ha="center", va="bottom")
    axis.set_xticks(list(positions), [textwrap.fill(name, 20) for name in names])
    axis.set_ylabel("requests per second (wrk, 1 thread, 32 connections)")
    axis.set_title("Ingest against the baseline, same machine, same run")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_results(results: Results, path: Path, smoke: bool) -> None:
    versions = subprocess.run(
        [
            PYTHON,
            "-c",
            "import aiohttp as a, jsonschema as j, orjson as o; "
            "print(a.__version__, j.__version__, o.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = [
        "# Benchmark results",
        "",
        f"Measured {when} with `bench/run`"
        + (" --smoke (a smoke run: the figures mean nothing)." if smoke else "."),
        "",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        f"- Python {platform.python_version()}, aiohttp {versions[0]}, jsonschema {versions[1]}, "
        f"orjson {versions[2]}; {wrk.splitlines()[0].strip() if wrk else 'wrk'}",
        f"- Load: wrk, 1 thread, {CONNECTIONS} connections, on 127.0.0.1; half load is wrk "
        "paced at half the measured maximum, each connection waiting a random (exponential) "
        "time between requests, as independent clients do.",
        "- The machine's speed drifts by tens of percent from minute to minute, so baseline "
        "and collector take turns (three of 5 s each): figures are the median turn's, the "
        "ratio the median of the turns' ratios (each turn's in brackets).",
        "- Ingest runs with a per-event schema in force and Outbound refusing, so the relay's "
        "circuit is open and quiet: the figures are ingest alone. The relay is measured by "
        "draining a prefilled queue.",
        "- Validation is timed in-process (timeit, the two paths taking turns three times; "
        "medians), on the ingest scenarios' events and on one made invalid.",
        "",
        "![ingest against the baseline](ingest.png)",
        "",
        "",
    ]
    path.write_text("\n".join(header) + table(results) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few seconds in all, for CI")
    parser.add_argument(
        "--out", type=Path, default=BENCH, help="where RESULTS.md and ingest.png go"
    )
    parser.add_argument(
        "--previous",
        default=PREVIOUS,
        metavar="COMMIT",
        help=f"the version this one is measured against (default {PREVIOUS})",
    )
    parser.add_argument(
        "--skew-before",
        metavar="COMMIT",
        help=f"also drain the skewed queues on this version (like {SKEW_BEFORE}, before the "
        "heads table)",
    )
    parser.add_argument(
        "--only-skew", action="store_true", help="only the skewed drains (no RESULTS.md)"
    )
    parser.add_argument(
        "--only-relay", action="store_true", help="only the relay's drains (no RESULTS.md)"
    )
    parser.add_argument(
        "--only-attack", action="store_true", help="only the row under attack (no RESULTS.md)"
    )
    parser.add_argument(
        "--only-versions",
        action="store_true",
        help="only this version beside --previous, taking turns (no RESULTS.md)",
    )
    parser.add_argument(
        "--only-redis",
        action="store_true",
        help="only the rows of collectors sharing a queue on Redis, beside SQLite's; they "
        "replace their section of RESULTS.md",
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench: wrk is missing (bench/run installs it)")
    seconds, rounds = (1.0, 1) if args.smoke else (5.0, 3)
    with tempfile.TemporaryDirectory(prefix="collector-bench-") as temp:
        work = Path(temp)
        schemas = work / "schemas"
        schemas.mkdir()
        (schemas / "renewMembership.json").write_text(json.dumps(SCHEMA))
        results = Results(script_gzip_bytes=script_size(), previous=args.previous)
        if args.only_redis:
            section = shared_table(measure_shared(work, schemas, seconds, rounds, args.smoke))
            print(section)
            path = args.out / "RESULTS.md"
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(replace_section(path.read_text() if path.exists() else "", section))
            print(f"\nwrote its section into {path}")
            return
        if args.only_versions:
            previous = checkout(args.previous, work)
            if previous is None:
                return
            print(
                versions_table(
                    measure_versions(
                        work, schemas, previous, seconds, rounds, 1_000 if args.smoke else 20_000
                    ),
                    args.previous,
                )
            )
            return
        if args.only_relay:
            results.relay = measure_relay(work, schemas, args.smoke)
            print(relay_table(results.relay))
            for what, measured, met in targets(results):
                print(f"{what}: {measured} ({'met' if met else 'NOT met'})")
            return
        results.attack = measure_attack(work, schemas, seconds, rounds)
        if args.only_attack:
            print(attack_table(results.attack))
            return
        cutoff = 5.0 if args.smoke else SKEW_CUTOFF
        results.skew = [drain_skewed(work, schemas, skew, cutoff=cutoff) for skew in SKEWS]
        before = checkout(args.skew_before, work) if args.skew_before else None
        if before is not None:
            results.skew_before = [
                drain_skewed(work, schemas, skew, cutoff=cutoff, code=before) for skew in SKEWS
            ]
        if args.only_skew:
            print(skew_table(results.skew, results.skew_before))
            return
        results.validation = measure_validation(1 if args.smoke else 3)
        results.rows = measure_ingest(work, schemas, seconds, rounds)
        previous = checkout(args.previous, work)
        if previous is not None:
            results.versions = measure_versions(
                work, schemas, previous, seconds, rounds, 1_000 if args.smoke else 20_000
            )
        results.stages = measure_stages(work, schemas, seconds, rounds)
        results.relay = measure_relay(work, schemas, args.smoke)
        results.memory = memory_flat(
            work, schemas, 20_000 if args.smoke else 1_000_000, 2 if args.smoke else 15
        )
        results.shared = measure_shared(work, schemas, seconds, rounds, args.smoke)
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(results, args.out / "RESULTS.md", args.smoke)
    chart(results, args.out / "ingest.png")
    print(f"\nwrote {args.out / 'RESULTS.md'} and {args.out / 'ingest.png'}")


if __name__ == "__main__":
    main()
