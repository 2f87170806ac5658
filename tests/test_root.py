"""`GET /`: a new user who opens the collector's address finds the demo or what it is."""

from __future__ import annotations

import pytest
from conftest import StartCollector

from collector import __version__


@pytest.mark.parametrize(
    ("overrides", "demo"),
    [
        ({}, True),  # a fresh start: no allowed origins, the demo is on
        ({"allowed_origins": ("https://www.example.com",)}, False),
        ({"demo": "off"}, False),
        ({"allowed_origins": ("https://www.example.com",), "demo": "on"}, True),
    ],
)
async def test_root_leads_to_the_demo_or_names_the_service(
    start_collector: StartCollector, overrides: dict[str, object], demo: bool
) -> None:
    collector = await start_collector(**overrides)
    assert collector.session is not None
    async with collector.session.get(collector.url("/"), allow_redirects=False) as response:
        if demo:
            assert response.status == 302
            assert response.headers["Location"] == "demo"
        else:
            assert response.status == 200
            assert await response.json() == {
                "service": "outbound-collector",
                "version": __version__,
                "health": "healthz",
            }
