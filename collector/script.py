"""Script: the browser tracker from static/, served cacheable, compressed and pinnable.

static/s.js is the readable source; static/s.min.js, built from it by scripts/build-script,
is what browsers get.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

EVENT_PATH_MARK = b"{{EVENT_PATH}}"
SCRIPT_PATH_MARK = b"{{SCRIPT_PATH}}"
CACHE_CONTROL = "public, max-age=3600, stale-while-revalidate=86400"


def static_file(name: str) -> bytes:
    """Read a file of static/: collector/static in the wheel, mapped there by pyproject.toml."""
    return resources.files("collector.static").joinpath(name).read_bytes()


@dataclass(frozen=True, slots=True)
class Script:
    """The script's bytes, their gzip form, an ETag for each and the Subresource Integrity hash."""

    source: bytes
    gzipped: bytes
    etag: str
    gzip_etag: str
    integrity: str

    @classmethod
    def packaged(cls, event_path: str = "/e", script_path: str = "/s.js") -> Script:
        """The built script (static/s.min.js) with the collector's paths filled in."""
        source = static_file("s.min.js")
        for mark, path in ((EVENT_PATH_MARK, event_path), (SCRIPT_PATH_MARK, script_path)):
            if mark not in source:
                raise ValueError(f"static/s.min.js lacks its {mark.decode()} placeholder")
            source = source.replace(mark, path.encode("utf-8"))
        return cls.of(source)

    @classmethod
    def of(cls, source: bytes) -> Script:
        digest = hashlib.sha384(source).digest()
        gzipped = gzip.compress(source, compresslevel=9, mtime=0)
        return cls(
            source=source,
            gzipped=gzipped,
            # A strong ETag promises the same bytes, and the two bodies differ: each its own.
            etag=_strong_etag(source),
            gzip_etag=_strong_etag(gzipped),
            integrity="sha384-" + base64.b64encode(digest).decode("ascii"),
        )

    def response(self, request: web.Request) -> web.Response:
        gzipped = "gzip" in request.headers.get("Accept-Encoding", "").lower()
        etag = self.gzip_etag if gzipped else self.etag
        headers = {
            "ETag": etag,
            "Cache-Control": CACHE_CONTROL,
            "Vary": "Accept-Encoding",
            # The script is meant to be loaded by other sites' pages, with integrity checks,
            # which need a CORS-readable response. It holds no secret and takes no cookie.
            "Cross-Origin-Resource-Policy": "cross-origin",
            "Access-Control-Allow-Origin": "*",
        }
        # Compared with the tag of the body this request would get, so that a 304 tells a
        # cache which of the two bodies it holds is the current one.
        wanted = _entity_tags(request.headers.get("If-None-Match", ""))
        if etag in wanted or "*" in wanted:
            return web.Response(status=304, headers=headers)
        body = self.source
        if gzipped:
            body = self.gzipped
            headers["Content-Encoding"] = "gzip"
        return web.Response(
            body=body,
            headers=headers,
            content_type="application/javascript",
            charset="utf-8",
        )


STUB = (
    "<script>window.outbound=window.outbound||function(){(outbound.q=outbound.q||[])"
    ".push([arguments,location.href,document.title,Date.now()])}</script>"
)


def snippet(script: Script, script_url: str) -> str:
    """What a site pastes into its pages: the pre-load stub and the pinned script tag."""
    return (
        f"{STUB}\n"
        f'<script defer src="{script_url}" integrity="{script.integrity}" '
        'crossorigin="anonymous"></script>'
    )


def _strong_etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _entity_tags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}
