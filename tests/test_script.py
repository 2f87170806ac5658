"""The browser script as served: type, caching, compression, integrity."""

from __future__ import annotations

import base64
import gzip
import hashlib

from conftest import Collector, StartCollector


async def test_script_is_served_with_type_and_cache_headers(collector: Collector) -> None:
    status, body, response = await collector.get("/s.js", headers={"Accept-Encoding": "identity"})
    assert status == 200
    assert response.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert response.headers["Cache-Control"].startswith("public, max-age=")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    assert "Content-Encoding" not in response.headers
    assert body.startswith(b"/* Outbound collector")


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
