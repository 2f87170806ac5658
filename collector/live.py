"""Live: what happens to each event, fanned out to whoever watches (debugger, demo)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

CLOSE: dict[str, Any] = {"kind": "close"}


class DebugHub:
    """Fans out what happens to each event to whoever watches; nothing is kept or built
    while nobody does, and a viewer that cannot keep up misses items rather than slowing
    the collector."""

    def __init__(self) -> None:
        self._viewers: set[asyncio.Queue[dict[str, Any]]] = set()

    @property
    def watched(self) -> bool:
        return bool(self._viewers)

    def publish(self, item: dict[str, Any]) -> None:
        for viewer in self._viewers:
            with contextlib.suppress(asyncio.QueueFull):
                viewer.put_nowait(item)

    @contextlib.contextmanager
    def viewer(self, size: int = 1000) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(size)
        self._viewers.add(queue)
        try:
            yield queue
        finally:
            self._viewers.discard(queue)

    def close(self) -> None:
        """End every stream, so that shutting down does not wait on open viewers."""
        for viewer in self._viewers:
            with contextlib.suppress(asyncio.QueueFull):
                viewer.put_nowait(CLOSE)
