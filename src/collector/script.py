"""Script: the browser tracker from static/, served cacheable, compressed and pinnable."""

from __future__ import annotations

import base64
import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

CACHE_CONTROL = "public, max-age=3600, stale-while-revalidate=86400"


@dataclass(frozen=True, slots=True)
class Script:
    """The script's bytes, their gzip form, an ETag and the Subresource Integrity hash."""

    source: bytes
    gzipped: bytes
    etag: str
    integrity: str

    @classmethod
    def packaged(cls, name: str = "s.js") -> Script:
        source = resources.files("collector").joinpath("static", name).read_bytes()
        return cls.of(source)

    @classmethod
    def of(cls, source: bytes) -> Script:
        digest = hashlib.sha384(source).digest()
        return cls(
            source=source,
            gzipped=gzip.compress(source, compresslevel=9, mtime=0),
            etag='"' + hashlib.sha256(source).hexdigest()[:32] + '"',
            integrity="sha384-" + base64.b64encode(digest).decode("ascii"),
        )

    def response(self, request: web.Request) -> web.Response:
        headers = {
            "ETag": self.etag,
            "Cache-Control": CACHE_CONTROL,
            "Vary": "Accept-Encoding",
            # The script is meant to be loaded by other sites' pages.
            "Cross-Origin-Resource-Policy": "cross-origin",
        }
        wanted = _entity_tags(request.headers.get("If-None-Match", ""))
        if self.etag in wanted or "*" in wanted:
            return web.Response(status=304, headers=headers)
        body = self.source
        if "gzip" in request.headers.get("Accept-Encoding", "").lower():
            body = self.gzipped
            headers["Content-Encoding"] = "gzip"
        return web.Response(
            body=body,
            headers=headers,
            content_type="application/javascript",
            charset="utf-8",
        )


def _entity_tags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}
