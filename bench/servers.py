"""Processes the benchmark runs beside the collector: the baseline and a fake Outbound.

    python bench/servers.py baseline PORT
    python bench/servers.py outbound PORT DELAY_SECONDS
    python bench/servers.py collector RUNG serve [OPTIONS]

The baseline is the ceiling: a bare aiohttp app in the same Python, one process, access
log off, whose handler reads the body and answers 204. The fake Outbound answers every
call (after DELAY_SECONDS), counts them (and notes when the first and the latest came),
fails on demand (POST /mode with a status), and holds every call unanswered from POST /hold
until POST /release (then they count as arriving at the release).

The collector rungs show where its time goes between the baseline and the whole of it:
`answer` is the collector's app (middleware, headers, routes) whose event handlers read
the body and answer 202 without looking at it; `checks` reads, parses, validates and
enriches each event and answers, but stores nothing; `full` is the collector as it ships.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiohttp import web


def baseline(port: int) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


RUNGS = ("answer", "checks", "full")


def collector(rung: str, argv: list[str]) -> int:
    from collector import cli, ingest
    from collector.ingest import Verdicts, json_response

    if rung not in RUNGS:
        sys.exit(f"servers.py: no rung {rung!r}; one of {', '.join(RUNGS)}")
    if rung == "answer":

        async def answer_only(request: web.Request, *_: object) -> web.Response:
            await request.read()
            return json_response({"accepted": 1, "rejected": []}, 202)

        ingest._handle = answer_only  # type: ignore[assignment]
    elif rung == "checks":

        async def unstored(app: web.Application, verdicts: Verdicts) -> web.Response:
            answer = {"accepted": len(verdicts.records), "rejected": verdicts.rejected}
            return json_response(answer, 202 if verdicts.records else 400)

        ingest.store = unstored
    return cli.main(argv)


class FakeOutbound(asyncio.Protocol):
    """One connection to the fake Outbound: plain HTTP/1.1 with keep-alive, parsed by hand.

    An aiohttp server spends ~150 µs of CPU a request here; with 64 calls arriving
    together that alone delays the answers by several ms, and the fake would measure itself
    rather than the relay. This one answers `delay` after each request arrived.
    """

    def __init__(
        self,
        state: dict[str, float],
        delay: float,
        held: list[tuple[FakeOutbound, str, str, bytes]],
    ) -> None:
        self.state = state
        self.delay = delay
        self.held = held  # calls of every connection waiting for /release
        self.buffer = b""
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport writes

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return  # the body is still on its way
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path = head.split(" ", 2)[:2]
            self.answer(method, path, body)

    def answer(self, method: str, path: str, body: bytes) -> None:
        state, loop = self.state, asyncio.get_running_loop()
        if path == "/count":
            self.send(200, json.dumps(state).encode())
        elif path == "/mode":
            state["status"] = int(body)
            self.send(204)
        elif path == "/hold":
            state["hold"] = 1
            self.send(204)
        elif path == "/release":
            state["hold"] = 0
            held = list(self.held)
            self.held.clear()
            for connection, held_method, held_path, held_body in held:
                connection.answer(held_method, held_path, held_body)
            self.send(204)
        elif state["hold"]:
            self.held.append((self, method, path, body))
        elif state["status"] != 200:
            loop.call_later(self.delay, self.send, int(state["status"]))
        else:
            state["calls"] += 1
            if path == "/v2/track":
                state["tracks"] += 1
            elif path == "/v2/track/batch":  # an array of tracks
                state["tracks"] += len(json.loads(body))
            # When the first and the latest call came: the relay's pace, without its start-up.
            state["first"] = state["first"] or time.time()
            state["last"] = time.time()
            loop.call_later(self.delay, self.send, 200)

    def send(self, status: int, body: bytes = b"") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
        self.transport.write(head.encode() + b"Content-Type: application/json\r\n\r\n" + body)


def outbound(port: int, delay: float) -> None:
    state = {"calls": 0, "tracks": 0, "status": 200, "first": 0.0, "last": 0.0, "hold": 0}
    held: list[tuple[FakeOutbound, str, str, bytes]] = []

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: FakeOutbound(state, delay, held), "127.0.0.1", port
        )
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    try:  # the same event loop as the collector's `serve`: uvloop when installed
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    kind = sys.argv[1]
    if kind == "collector":
        sys.exit(collector(sys.argv[2], sys.argv[3:]))
    port = int(sys.argv[2])
    if kind == "baseline":
        baseline(port)
    else:
        outbound(port, float(sys.argv[3]))
