"""The browser script as served: type, caching, compression, integrity."""

from __future__ import annotations

import base64
import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Collector, StartCollector

from collector.script import STUB, Script

ROOT = Path(__file__).resolve().parent.parent


async def test_script_is_served_with_type_and_cache_headers(collector: Collector) -> None:
    status, body, response = await collector.get("/s.js", headers={"Accept-Encoding": "identity"})
    assert status == 200
    assert response.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert response.headers["Cache-Control"].startswith("public, max-age=")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    assert "Content-Encoding" not in response.headers
    assert body.startswith(b"!function(")


async def test_script_is_gzipped_when_accepted(collector: Collector) -> None:
    assert collector.session is not None
    async with collector.session.get(
        collector.url("/s.js"), headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    ) as response:
        raw = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Vary"] == "Accept-Encoding"
    _, plain, _ = await collector.get("/s.js", headers={"Accept-Encoding": "identity"})
    assert gzip.decompress(raw) == plain
    assert len(raw) < len(plain)


async def test_etag_gives_304(collector: Collector) -> None:
    _, _, response = await collector.get("/s.js")
    etag = response.headers["ETag"]
    status, again, response = await collector.get("/s.js", headers={"If-None-Match": etag})
    assert (status, again) == (304, b"")
    assert response.headers["ETag"] == etag
    status, _, _ = await collector.get("/s.js", headers={"If-None-Match": f'W/{etag}, "other"'})
    assert status == 304
    status, _, _ = await collector.get("/s.js", headers={"If-None-Match": '"stale"'})
    assert status == 200


async def test_integrity_matches_the_bytes_served(collector: Collector) -> None:
    _, body, _ = await collector.get("/s.js", headers={"Accept-Encoding": "identity"})
    assert collector.app is not None
    from collector.keys import SCRIPT

    expected = "sha384-" + base64.b64encode(hashlib.sha384(body).digest()).decode()
    assert collector.app[SCRIPT].integrity == expected


async def test_script_path_is_configurable(start_collector: StartCollector) -> None:
    collector = await start_collector(script_path="/assets/site.js", event_path="/p")
    status, _, _ = await collector.get("/assets/site.js")
    assert status == 200
    status, _, _ = await collector.get("/s.js")
    assert status == 404
    status, answer, _ = await collector.post("/p", {"event": "x", "anonymous_id": "a"})
    assert (status, answer["accepted"]) == (202, 1)


SIZE_BUDGET = 2000  # bytes of the served script, gzipped, with every feature in it


def test_gzipped_script_is_within_budget() -> None:
    script = Script.packaged()
    print(f"s.min.js: {len(script.source)} bytes, {len(script.gzipped)} gzipped")
    assert len(script.gzipped) <= SIZE_BUDGET


def test_minified_build_is_reproducible(tmp_path: Path) -> None:
    rebuilt = tmp_path / "s.min.js"
    subprocess.run([str(ROOT / "scripts" / "build-script"), str(rebuilt)], check=True, timeout=120)
    committed = ROOT / "static" / "s.min.js"
    assert rebuilt.read_bytes() == committed.read_bytes(), "run scripts/build-script and commit"


@pytest.mark.parametrize("name", ["s.js", "s.min.js"])
def test_script_is_es5(name: str) -> None:
    source = ROOT / "static" / name
    check = (
        "const acorn = require('acorn');"
        "acorn.parse(require('fs').readFileSync(process.argv[1], 'utf8'), {ecmaVersion: 5});"
    )
    result = subprocess.run(
        ["node", "-e", check, str(source)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


async def test_script_is_readable_cross_origin_for_integrity_checks(collector: Collector) -> None:
    _, _, response = await collector.get("/s.js", headers={"Origin": "https://shop.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_script_tag_command_pins_the_served_bytes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "collector", "script-tag", "--base-url", "https://c.example/"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    stub, tag = result.stdout.strip().splitlines()
    assert stub == STUB
    integrity = Script.packaged().integrity
    assert tag == (
        f'<script defer src="https://c.example/s.js" integrity="{integrity}" '
        'crossorigin="anonymous"></script>'
    )


async def test_gzip_and_identity_bodies_have_their_own_strong_etags(collector: Collector) -> None:
    assert collector.session is not None

    async def get(encoding: str, if_none_match: str | None = None) -> tuple[int, str, str | None]:
        """Status, ETag, and the body's coding (None for a 304, which has no body)."""
        headers = {"Accept-Encoding": encoding}
        if if_none_match is not None:
            headers["If-None-Match"] = if_none_match
        assert collector.session is not None
        async with collector.session.get(
            collector.url("/s.js"), headers=headers, auto_decompress=False
        ) as response:
            await response.read()
            coding = response.headers.get("Content-Encoding", "identity")
            return (
                response.status,
                response.headers["ETag"],
                (None if response.status == 304 else coding),
            )

    status, plain, coding = await get("identity")
    assert (status, coding) == (200, "identity")
    status, zipped, coding = await get("gzip")
    assert (status, coding) == (200, "gzip")
    assert plain != zipped
    assert not plain.startswith("W/")  # strong: byte for byte
    assert not zipped.startswith("W/")
    # Each representation revalidates with its own tag...
    assert await get("identity", plain) == (304, plain, None)
    assert await get("gzip", zipped) == (304, zipped, None)
    # ...and a tag of the other one gets the full body of the one asked for.
    assert await get("gzip", plain) == (200, zipped, "gzip")
    assert await get("identity", zipped) == (200, plain, "identity")
    assert await get("gzip", f"{plain}, {zipped}") == (304, zipped, None)
