"""Live: what happens to each event, fanned out to whoever watches (debugger, demo)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

CLOSE: dict[str, Any] = {"kind": "close"}
Wanted = Callable[[dict[str, Any]], bool]


def everything(item: dict[str, Any]) -> bool:
    return True


class ViewersFull(Exception):
    """As many viewers of this kind watch as may; the next must come back later."""


class DebugHub:
    """Fans out what happens to each event to whoever watches; nothing is kept or built
    while nobody does, and a viewer that cannot keep up misses items rather than slowing
    the collector.

    Each viewer says what it wants, and only that is queued for it: a viewer whose filter
    matches nothing costs a call per item, not a queue of items it will drop. At most
    `max_viewers` of each kind (the debugger, the demo) watch at once, so that one kind
    cannot crowd out the other.
    """

    def __init__(self, max_viewers: int = 16) -> None:
        self.max_viewers = max_viewers
        self._viewers: dict[asyncio.Queue[dict[str, Any]], Wanted] = {}
        self._kinds: Counter[str] = Counter()

    @property
    def watched(self) -> bool:
        return bool(self._viewers)

    def count(self, kind: str) -> int:
        """How many viewers of `kind` watch now."""
        return self._kinds[kind]

    def publish(self, item: dict[str, Any]) -> None:
        for viewer, wanted in self._viewers.items():
            if wanted(item):
                with contextlib.suppress(asyncio.QueueFull):
                    viewer.put_nowait(item)

    @contextlib.contextmanager
    def viewer(
        self, wanted: Wanted = everything, *, kind: str = "debug", size: int = 1000
    ) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of the items `wanted` says yes to, while the block runs; ViewersFull
        when `max_viewers` of `kind` watch already."""
        if self._kinds[kind] >= self.max_viewers:
            raise ViewersFull(kind)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(size)
        self._viewers[queue] = wanted
        self._kinds[kind] += 1
        try:
            yield queue
        finally:
            del self._viewers[queue]
            self._kinds[kind] -= 1

    def close(self) -> None:
        """End every stream, so that shutting down does not wait on open viewers."""
        for viewer in self._viewers:
            if viewer.full():  # one item fewer for a viewer that fell behind: it is closing
                viewer.get_nowait()
            viewer.put_nowait(CLOSE)
