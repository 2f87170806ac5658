"""The command line as people run it: real processes, real ports on loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import SEED_EVENT
from fake_outbound import KEY, FakeOutbound
from serve_process import ServeProcess

from collector import __version__
from collector.cli import banner
from collector.config import Settings
from collector.queue import SQLiteQueue


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--port", "http"], {}, "--port: must be a whole number, got 'http'"),
        (["--port", "65536"], {}, "--port: must be from 0 to 65535, got 65536"),
        ([], {"COLLECTOR_ALLOWED_ORIGINS": "shop.example"}, "COLLECTOR_ALLOWED_ORIGINS: "),
        ([], {"COLLECTOR_SCHEMAS_DIR": "/no/such"}, "COLLECTOR_SCHEMAS_DIR: '/no/such' is not a"),
        (["--outbound-url", "api.outbound.io"], {}, "--outbound-url: must be an http"),
    ],
)
def test_wrong_settings_exit_2_with_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    result = run_cli("serve", "--data-dir", str(tmp_path), *args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbound-collector: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_key_in_config_file_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "collector.toml"
    config.write_text('prot = 8080\noutbound_api_key = "k-secret-in-file"\n')
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == f"outbound-collector: error: {config}: unknown setting 'prot'"
    assert "k-secret-in-file" not in result.stderr


def test_invalid_schema_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "signup.json").write_text('{"type": 12}')
    result = run_cli("serve", "--data-dir", str(tmp_path / "d"), "--schemas-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("outbound-collector: error: schemas_dir: signup.json: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_data_dir_that_is_a_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = run_cli("serve", "--data-dir", str(tmp_path / "file" / "sub"))
    assert result.returncode == 2
    assert "data_dir: cannot create" in result.stderr


def test_help_lists_settings_with_their_environment_names() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for text in ("--port", "COLLECTOR_PORT", "--allowed-origins", "--schemas-dir", "--config"):
        assert text in result.stdout
    assert "--outbound-api-key" not in result.stdout  # secrets never go on a command line


async def test_serve_relays_the_seed_example_and_stops_cleanly(
    tmp_path: Path, fake: FakeOutbound
) -> None:
    env = {"OUTBOUND_API_KEY": KEY, "COLLECTOR_OUTBOUND_URL": fake.url}
    server = await asyncio.to_thread(
        ServeProcess, ["--data-dir", str(tmp_path / "data")], env=env, log=tmp_path / "log"
    )
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                server.base_url + "/e",
                data=json.dumps(SEED_EVENT),
                headers={"Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 202
            assert await response.json() == {"accepted": 1, "rejected": []}
        _, track = await fake.wait_for(2)
        assert track.headers["X-Outbound-Key"] == KEY
        assert track.body["event"] == "renewMembership"
        assert track.body["user_id"] == "u123"
    finally:
        code = await asyncio.to_thread(server.stop, signal.SIGTERM)
    assert code == 0
    output = server.output()
    assert "relaying to http://127.0.0.1" in output
    assert "stopped with 0 events queued" in output
    assert KEY not in output


async def test_serve_without_key_runs_dry(tmp_path: Path) -> None:
    server = await asyncio.to_thread(
        ServeProcess, ["--data-dir", str(tmp_path / "data")], env={}, log=tmp_path / "log"
    )
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(server.base_url + "/e", json=SEED_EVENT) as response,
        ):
            assert response.status == 202
        for _ in range(100):
            if "would POST /v2/track 'renewMembership'" in server.output():
                break
            await asyncio.sleep(0.05)
    finally:
        code = await asyncio.to_thread(server.stop, signal.SIGINT)
    assert code == 0
    output = server.output()
    assert "DRY RUN: OUTBOUND_API_KEY is not set" in output
    assert "dry run: would POST /v2/track 'renewMembership'" in output
    assert "u123" not in output


async def test_serve_closes_connections_whose_headers_trickle(tmp_path: Path) -> None:
    server = await asyncio.to_thread(
        ServeProcess,
        ["--data-dir", str(tmp_path / "data"), "--header-timeout", "0.5"],
        env={},
        log=tmp_path / "log",
    )
    host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(SEED_EVENT).encode()
    request = (
        b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    try:
        # Two prompt requests on one keep-alive connection are both answered.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request + request)
        await writer.drain()
        received = b""
        while received.count(b"HTTP/1.1 202") < 2:
            received += await asyncio.wait_for(reader.read(4096), 5)
        # Then a third whose headers trickle: the connection is closed at the deadline.
        writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        closed_at = await _closed_within(reader, 5)
        assert closed_at is not None
        writer.close()

        # A fresh connection that never finishes its first request's headers is closed too.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        await writer.drain()
        assert await _closed_within(reader, 5) is not None
        writer.close()
    finally:
        assert await asyncio.to_thread(server.stop) == 0


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float | None:
    """Seconds until the server closed the connection, or None if it did not in time."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1024):
                pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return loop.time() - started


async def test_json_logs_carry_the_request_id(tmp_path: Path) -> None:
    server = await asyncio.to_thread(
        ServeProcess,
        ["--data-dir", str(tmp_path / "data"), "--log-format", "json"],
        env={},
        log=tmp_path / "log",
    )
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                server.base_url + "/e",
                data=b"{",
                headers={"Content-Type": "text/plain", "X-Request-ID": "req-7"},
            ) as response,
        ):
            assert response.status == 400
            assert response.headers["X-Request-ID"] == "req-7"
    finally:
        assert await asyncio.to_thread(server.stop) == 0
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    refused = [line for line in lines if line["message"].startswith("refused 400")]
    assert refused[0]["request_id"] == "req-7"
    assert refused[0]["level"] == "info"
    assert any(line["message"].startswith("stopped with") for line in lines)


def test_check_prints_effective_settings_with_secrets_redacted(tmp_path: Path) -> None:
    result = run_cli(
        "check",
        "--data-dir",
        str(tmp_path),
        env={
            "OUTBOUND_API_KEY": "key-never-printed",
            "COLLECTOR_ADMIN_TOKEN": "admin-never-printed",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "outbound_api_key      ******** (set)" in result.stdout
    assert "admin_token           ******** (set)" in result.stdout
    assert "key-never-printed" not in result.stdout
    assert "admin-never-printed" not in result.stdout
    assert result.stdout.rstrip().endswith("all is well")
    bad = run_cli("check", "--port", "none")
    assert bad.returncode == 2
    assert bad.stderr.startswith("outbound-collector: error: --port")


def test_schemas_lint(tmp_path: Path) -> None:
    (tmp_path / "renewMembership.json").write_text('{"type": "object"}')
    (tmp_path / "reset.json").write_text('{"x-event": "passwordReset", "x-server-only": true}')
    good = run_cli("schemas", "lint", str(tmp_path))
    assert good.returncode == 0
    assert "ok     passwordReset  (server-only)" in good.stdout
    assert "ok     renewMembership" in good.stdout
    assert "2 usable, 0 with problems" in good.stdout
    (tmp_path / "broken.json").write_text('{"type": "strnig"}')
    (tmp_path / "again.json").write_text('{"x-event": "renewMembership"}')
    bad = run_cli("schemas", "lint", str(tmp_path))
    assert bad.returncode == 1
    assert "error  broken.json: not a valid schema at /type" in bad.stdout
    assert (
        "error  renewMembership.json: a second schema for the event 'renewMembership', "
        "which again.json defines" in bad.stdout
    )
    assert "2 usable, 2 with problems" in bad.stdout


@pytest.mark.parametrize(
    ("base_url", "problem"),
    [
        ("collect.example.com", "must be an http:// or https:// URL, got 'collect.example.com'"),
        ("ftp://c.example", "must be an http:// or https:// URL, got 'ftp://c.example'"),
        (
            "https://c.example/?x=1",
            "must not have a query or fragment, got 'https://c.example/?x=1'",
        ),
    ],
)
def test_script_tag_refuses_a_base_url_that_is_not_one(base_url: str, problem: str) -> None:
    result = run_cli("script-tag", "--base-url", base_url)
    assert result.returncode == 2
    assert result.stdout == ""  # no tag with a relative or broken URL to paste
    assert result.stderr.strip() == f"outbound-collector: error: --base-url: {problem}"


def test_check_warns_of_misspelt_variables(tmp_path: Path) -> None:
    result = run_cli(
        "check",
        "--data-dir",
        str(tmp_path),
        env={"COLLECTOR_PORTT": "9000", "OUTBOUND_APIKEY": "key-never-printed"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "outbound-collector: warning: COLLECTOR_PORTT is not a setting, so it is ignored; "
        "did you mean COLLECTOR_PORT?",
        "outbound-collector: warning: OUTBOUND_APIKEY is not a setting, so it is ignored; "
        "did you mean OUTBOUND_API_KEY?",
    ]
    assert "relay: dry run (no OUTBOUND_API_KEY)" in result.stdout
    assert result.stdout.rstrip().endswith("all is well but for the 2 warnings above")
    assert "key-never-printed" not in result.stdout + result.stderr


async def test_serve_warns_of_misspelt_variables_at_start_up(tmp_path: Path) -> None:
    env = {"COLLECTOR_ALLOWED_ORIGIN": "https://shop.example", "OUTBOUND_KEY": "k-never-shown"}
    server = await asyncio.to_thread(
        ServeProcess, ["--data-dir", str(tmp_path / "data")], env=env, log=tmp_path / "log"
    )
    assert await asyncio.to_thread(server.stop) == 0
    output = server.output()
    assert (
        "COLLECTOR_ALLOWED_ORIGIN is not a setting, so it is ignored; "
        "did you mean COLLECTOR_ALLOWED_ORIGINS?" in output
    )
    assert "OUTBOUND_KEY is not a setting, so it is ignored; did you mean OUTBOUND_API_KEY?" in (
        output
    )
    assert "k-never-shown" not in output


@pytest.mark.parametrize(
    "order",
    [
        ["dead-letters", "--data-dir", "{dir}", "list"],
        ["dead-letters", "list", "--data-dir", "{dir}"],
        ["dead-letters", "list", "--status", "400", "--data-dir", "{dir}"],
    ],
)
async def test_dead_letters_take_the_data_dir_before_and_after_the_action(
    tmp_path: Path, order: list[str]
) -> None:
    queue = SQLiteQueue(tmp_path / "queue.sqlite3")
    await queue.open()
    await queue.close()
    result = run_cli(*(arg.replace("{dir}", str(tmp_path)) for arg in order))
    assert result.returncode == 0, result.stderr
    assert "0 dead letters in all" in result.stdout


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (["dead-letters", "list", "--bogus"], "usage: outbound-collector dead-letters list "),
        (
            ["dead-letters", "--data-dir", "x", "purge", "--everything"],
            "usage: outbound-collector dead-letters purge ",
        ),
        (["stats", "--nope"], "usage: outbound-collector stats "),
        (["schemas", "lint", "d", "--fix"], "usage: outbound-collector schemas lint "),
    ],
)
def test_a_usage_error_prints_the_subcommands_usage(args: list[str], usage: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(usage)
    assert "unrecognized arguments: " + args[-1] in result.stderr
    assert "COMMAND ..." not in result.stderr  # not the top-level usage


def test_a_port_in_use_is_found_before_anything_is_created(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data_dir = tmp_path / "data"
        result = run_cli("serve", "--port", str(port), "--data-dir", str(data_dir))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"outbound-collector: error: cannot listen on 127.0.0.1:{port}: address already in use "
        "(another program has this port; choose another with --port or COLLECTOR_PORT)"
    ]
    # Bound first: nothing was made for a collector that never started, and nothing stopped.
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data-dir", "{tmp}/file/sub"], "data_dir: cannot create "),
        # Root may write anywhere that os.access is asked about; /proc takes no files even so.
        (["--data-dir", "/proc/self"], "data_dir: cannot write in '/proc/self'"),
        (["--host", "no-such-host.invalid"], "the host does not resolve"),
        (["--host", "192.0.2.1"], "cannot assign requested address"),  # not this machine's
    ],
)
def test_check_fails_where_serve_would_with_the_same_line(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    (tmp_path / "file").write_text("")
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(tmp_path / "data")]
    served = run_cli("serve", "--port", "0", *args)
    checked = run_cli("check", "--port", "0", *args)
    assert served.returncode == checked.returncode == 2
    [line] = served.stderr.splitlines()
    assert expected in line
    assert checked.stderr.splitlines() == [line]
    assert "all is well" not in checked.stdout


def test_check_creates_and_writes_the_data_directory_and_leaves_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    result = run_cli("check", "--port", "0", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("all is well")
    assert data_dir.is_dir()
    assert list(data_dir.iterdir()) == []


def test_check_says_when_the_port_is_taken_now_but_passes(tmp_path: Path) -> None:
    # A running collector holds its own port: `check` of its settings is not wrong for that.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("check", "--port", str(port), "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"outbound-collector: warning: 127.0.0.1:{port} is in use now (by a running "
        f"collector?); until it is free, serve stops with: cannot listen on 127.0.0.1:{port}: "
        "address already in use (another program has this port; choose another with --port "
        "or COLLECTOR_PORT)"
    ]
    assert result.stdout.rstrip().endswith("all is well but for the warning above")


async def test_counts_are_worded_for_one_and_for_many(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "queue.sqlite3")
    await queue.open()
    now = time.time()
    await queue.put(
        [
            {"message_id": "m1", "user_id": "u1", "event": "first", "received_at": now},
            {"message_id": "m2", "user_id": "u2", "event": "second", "received_at": now},
        ]
    )
    claimed = await queue.claim(1, now=now, lease=60)
    await queue.dead_letter(
        claimed[0].id, reason="Outbound answered 400", status=400, response="", now=now
    )
    await queue.close()
    data_dir = ["--data-dir", str(tmp_path)]

    stats = run_cli("stats", *data_dir)
    assert "queue:        1 event waiting\n" in stats.stdout
    # The relay notes its circuit only when it opens or closes: no note means it never opened.
    assert "relay:        circuit closed (it has not opened)\n" in stats.stdout
    assert json.loads(run_cli("stats", "--json", *data_dir).stdout)["relay"] == {
        "circuit": "closed",
        "reason": None,
        "since": None,
    }
    assert "\n1 dead letter in all:\n" in run_cli("dead-letters", "list", *data_dir).stdout
    replayed = run_cli("dead-letters", "replay", "--all", *data_dir)
    assert replayed.stdout == "replayed 1 dead letter\n"
    assert "queue:        2 events waiting\n" in run_cli("stats", *data_dir).stdout
    assert "\n0 dead letters in all\n" in run_cli("dead-letters", "list", *data_dir).stdout

    schemas = tmp_path / "schemas"
    schemas.mkdir()
    (schemas / "renewMembership.json").write_text("{}")
    checked = run_cli("check", "--port", "0", "--schemas-dir", str(schemas), *data_dir)
    assert "\nschemas: 1 event schema (renewMembership)\n" in checked.stdout


@pytest.mark.parametrize(
    ("host", "base"),
    [
        ("0.0.0.0", "http://127.0.0.1:8080"),
        ("::", "http://[::1]:8080"),
        ("::1", "http://[::1]:8080"),
        ("127.0.0.1", "http://127.0.0.1:8080"),
    ],
)
def test_banner_prints_urls_that_work(host: str, base: str) -> None:
    # Built, not served: tests listen on loopback only, never on every address.
    text = banner(Settings(host=host), 8080, 0)
    assert text.startswith(f"outbound-collector {__version__} listening on {base}")
    assert f"  script: {base}/s.js\n" in text
    assert "0.0.0.0" not in text
    assert "http://[::]" not in text
    elsewhere = f"(every address of this machine; from others: http://{socket.gethostname()}:8080)"
    assert (elsewhere in text.splitlines()[0]) == (host in {"0.0.0.0", "::"})


def test_script_tag_with_a_wildcard_host_uses_a_url_that_works() -> None:
    result = run_cli("script-tag", "--host", "0.0.0.0", "--port", "8080")
    assert result.returncode == 0, result.stderr
    assert 'src="http://127.0.0.1:8080/s.js"' in result.stdout


async def test_banner_says_how_many_event_schemas_were_loaded(tmp_path: Path) -> None:
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    (schemas / "renewMembership.json").write_text("{}")
    (schemas / "signedUp.json").write_text("{}")
    server = await asyncio.to_thread(
        ServeProcess,
        ["--data-dir", str(tmp_path / "data"), "--schemas-dir", str(schemas)],
        env={},
        log=tmp_path / "log",
    )
    assert await asyncio.to_thread(server.stop) == 0
    assert f"  schemas: 2 event schemas, from {schemas}\n" in server.output()
    bare = await asyncio.to_thread(
        ServeProcess, ["--data-dir", str(tmp_path / "data")], env={}, log=tmp_path / "log2"
    )
    assert await asyncio.to_thread(bare.stop) == 0
    assert (
        "  schemas: none; events are checked against the envelope only (COLLECTOR_SCHEMAS_DIR)\n"
        in bare.output()
    )
