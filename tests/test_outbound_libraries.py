"""Issue 14, inbound: Outbound's own server libraries work unchanged against the collector.

Each test replays a library's exact request (headers, endpoint and body, as built by its
published source, cited where it is used) against a real collector on loopback with an
identity secret, and checks what the collector answers and what the fake Outbound gets.

The libraries cannot run here: `outbound` 1.2.1 on PyPI is Python 2 only (`print __HEADERS`
in `__subscription`, a SyntaxError on Python 3), and the Node, Ruby and PHP ones need their
runtimes' packages. So their requests are rebuilt from the source, byte for byte for Python
(`json.dumps` with its default separators).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import orjson
import pytest
from conftest import Collector, StartCollector, eventually
from fake_outbound import FakeOutbound, Fault

from collector.config import Secret

TOKEN = "server-token-for-the-libraries-0123456789"
SECRET = "identity-secret-for-the-libraries-0123456789"
SHOP = "https://shop.example"

# outboundio/lib-python, outbound/__init__.py (v1.2.1), `init`: every call's headers.
PYTHON_HEADERS = {
    "content-type": "application/json",
    "X-Outbound-Client": "Python/1.2.1",
    "X-Outbound-Key": TOKEN,
}
# zendesk/connect_node_sdk (was outboundio/lib-node), outbound.js (v1.3.0), `headers()`.
NODE_HEADERS = {
    "Content-type": "application/json",
    "X-Outbound-Client": "Javascript-Node/1.3.0",
    "X-Outbound-Key": TOKEN,
}
# outboundio/lib-ruby, lib/outbound.rb (v1.2.0), `Defaults::HEADERS` and `post`.
RUBY_HEADERS = {
    "Content-type": "application/json",
    "X-Outbound-Client": "Ruby/1.2.0",
    "X-Outbound-Key": TOKEN,
}
# outboundio/lib-php, lib/outbound.php (v2.2.0), `_execute`.
PHP_HEADERS = {
    "Content-type": "application/json",
    "X-Outbound-Key": TOKEN,
    "X-Outbound-Client": "PHP/2.2.0",
}


@pytest.fixture
async def guarded(start_collector: StartCollector) -> Collector:
    """A collector as the README sets one up for back-ends and pages together."""
    return await start_collector(
        identity_secret=Secret(SECRET), server_tokens=(Secret(TOKEN),), allowed_origins=(SHOP,)
    )


async def python_post(collector: Collector, endpoint: str, data: dict[str, Any]) -> tuple[int, Any]:
    """What `outbound` 1.2.1 sends: `requests.post(url, data=json.dumps(data), headers=...)`."""
    status, answer, _ = await collector.post(
        f"/v2{endpoint}", data=json.dumps(data).encode(), headers=PYTHON_HEADERS
    )
    return status, answer


def stored_records(collector: Collector) -> list[dict[str, Any]]:
    """The records waiting in the queue's file, oldest first."""
    with sqlite3.connect(collector.queue.path) as db:
        rows = db.execute("SELECT body FROM events ORDER BY id").fetchall()
    return [orjson.loads(body) for (body,) in rows]


# -- X-Outbound-Key is a server credential ----------------------------------------------------


async def test_the_libraries_key_header_is_a_server_credential(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """With identity_secret set, a user id without a user_hash is a browser's claim; with
    the server token in X-Outbound-Key it is a back-end's, as with Authorization: Bearer."""
    status, answer = await python_post(guarded, "/identify", {"user_id": "u-7"})
    assert status == 202, answer
    status, answer = await python_post(
        guarded, "/track", {"user_id": "u-7", "event": "signedUp", "timestamp": 1529366403}
    )
    assert status == 202, answer
    identify, track = await fake.wait_for(2)
    assert identify.endpoint == "identify"
    assert identify.body == {"user_id": "u-7"}
    assert track.body["user_id"] == "u-7"
    assert track.body["event"] == "signedUp"


async def test_a_wrong_key_header_is_refused_and_stores_nothing(guarded: Collector) -> None:
    for headers in (
        {**PYTHON_HEADERS, "X-Outbound-Key": "not-the-token"},
        # Both headers: each must hold a server token.
        {**PYTHON_HEADERS, "X-Outbound-Key": "not-the-token", "Authorization": f"Bearer {TOKEN}"},
        {**PYTHON_HEADERS, "Authorization": "Bearer not-the-token"},
    ):
        status, answer, _ = await guarded.post(
            "/v2/identify", data=b'{"user_id": "u-7"}', headers=headers
        )
        assert (status, answer) == (401, {"error": "the server token is not valid"})
    assert guarded.queue.depth == 0


async def test_the_key_header_without_server_tokens_is_refused(
    start_collector: StartCollector,
) -> None:
    """A collector with no server tokens has no key to match: a library's key is refused,
    never taken for a browser's request."""
    collector = await start_collector(identity_secret=Secret(SECRET))
    status, answer = await python_post(collector, "/identify", {"user_id": "u-7"})
    assert (status, answer) == (401, {"error": "the server token is not valid"})


async def test_the_client_header_is_kept_in_the_record(
    guarded: Collector, fake: FakeOutbound
) -> None:
    fake.always = Fault(503)  # keep the records queued to read them
    await python_post(guarded, "/identify", {"user_id": "u-1"})
    await guarded.post(
        "/v2/identify", data=b'{"user_id": "u-2"}', headers={"Authorization": f"Bearer {TOKEN}"}
    )
    await eventually(lambda: guarded.queue.depth == 2)
    first, second = stored_records(guarded)
    assert first["client"] == "Python/1.2.1"
    assert "client" not in second
