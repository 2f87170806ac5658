"""CLI: `outbound-collector serve` and friends; wrong settings exit 2 with one line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import StreamReader, web

from . import __version__, logs
from .app import create_app
from .config import (
    Settings,
    SettingsError,
    env_name,
    http_url,
    load_settings,
    redact_url,
    settings_fields,
    unknown_variables,
)
from .deadline import AcceptFailures, ConnectionCap, with_header_deadline
from .debug import demo_enabled
from .identity import user_hash
from .logs import counted
from .queue import (
    QUEUE_FILE,
    DeadLetterFilter,
    QueueRefused,
    QueueUnavailable,
    RedisQueue,
    make_queue,
    open_queue,
)
from .schema import SchemaDirError, lint_schemas, load_event_schemas
from .script import Script, snippet

PROG = "outbound-collector"
# Seconds a request whose headers came before the stop may take to finish (its body).
STOP_GRACE = 5.0
log = logging.getLogger("collector")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML file of settings (keys as below, in snake_case)"
    )
    defaults = Settings().redacted()
    for item in settings_fields():
        if not item.metadata["flag"]:
            continue
        shown = defaults[item.name]
        parser.add_argument(
            f"--{item.name.replace('_', '-')}",
            dest=item.name,
            metavar=item.name.upper(),
            help=f"{item.metadata['help']} [env {env_name(item)}; default: {shown!s}]",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="A self-hosted, first-party event collector for Outbound."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the collector",
        description="Run the collector. The Outbound key (OUTBOUND_API_KEY) comes from the "
        "environment or the TOML file only, never from a flag.",
    )
    _add_setting_flags(serve)
    tag = commands.add_parser(
        "script-tag",
        help="print the tags to paste into pages, with the script's integrity hash",
        description="Print the pre-load stub and the script tag, pinned with Subresource "
        "Integrity, for the script this collector serves with these settings.",
    )
    tag.add_argument(
        "--base-url",
        default=None,
        help="the URL pages load the collector from, like https://collect.example.com "
        "(default: http://HOST:PORT)",
    )
    _add_setting_flags(tag)
    _add_dead_letters(commands)
    sign = commands.add_parser(
        "sign",
        help="print the user_hash of a user id, as a site's back-end computes it",
        description="Print hex(HMAC-SHA256(identity secret, USER_ID)), with the secret from "
        "COLLECTOR_IDENTITY_SECRET or the --config file.",
    )
    sign.add_argument("user_id", metavar="USER_ID")
    sign.add_argument("--config", type=Path, help="TOML file of settings")
    check = commands.add_parser(
        "check",
        help="check settings and schemas and print the effective settings, secrets redacted",
        description="Load the settings (flags, environment, --config) and the schemas as "
        "serve would, print every effective setting with secrets redacted, and exit 0 when "
        "all is well, 2 when not.",
    )
    _add_setting_flags(check)
    schemas = commands.add_parser("schemas", help="work with per-event schema files")
    schema_actions = schemas.add_subparsers(dest="action", required=True, metavar="ACTION")
    lint = schema_actions.add_parser(
        "lint",
        help="check every schema file in a directory",
        description="Check each *.json file in DIR as a per-event schema; exit 1 if any is "
        "unusable.",
    )
    lint.add_argument("directory", type=Path, metavar="DIR")
    stats = commands.add_parser(
        "stats",
        help="queue depth, oldest event, dead letters by reason and relay state",
        description="Read the data directory (no running server needed) and print what waits "
        "in it.",
    )
    _add_data_dir_options(stats, default=None)
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    _remember_usage(parser)
    return parser


def _remember_usage(parser: argparse.ArgumentParser) -> None:
    """Let every (sub)command's namespace carry its own parser, for usage errors: the
    deepest one chosen wins, since a subcommand's defaults are set after its parent's."""
    parser.set_defaults(usage_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _remember_usage(sub)


def _add_dead_letters(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    letters = commands.add_parser(
        "dead-letters",
        help="list, show, replay or purge the events Outbound refused",
        description="Work with the dead letters in the data directory; safe while serve runs.",
    )
    _add_data_dir_options(letters, default=None)
    actions = letters.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="dead letters and how many there are per reason")
    show = actions.add_parser("show", help="one dead letter in full, with Outbound's answer")
    show.add_argument("id", type=int)
    replay = actions.add_parser(
        "replay", help="put dead letters back in the queue, with their original message ids"
    )
    purge = actions.add_parser("purge", help="delete dead letters for good")
    for action in (listing, show, replay, purge):
        # Also after the action (`dead-letters list --data-dir X`). Left unset there, they
        # must not overwrite what was given before it, hence no default at all.
        _add_data_dir_options(action, default=argparse.SUPPRESS)
    for action in (listing, replay, purge):
        action.add_argument("--id", type=int, action="append", default=[], help="by id (repeat)")
        action.add_argument("--reason", help="whose reason contains this text")
        action.add_argument("--status", type=int, help="by Outbound's status code")
        action.add_argument("--event", help="by event name")
    for action in (replay, purge):
        action.add_argument("--all", action="store_true", help="every dead letter")


def _add_data_dir_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--config", type=Path, default=default, help="TOML file of settings")
    parser.add_argument("--data-dir", default=default, help="the collector's data directory")


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _settings_from(args: argparse.Namespace) -> Settings:
    flags = {item.name: getattr(args, item.name, None) for item in settings_fields()}
    return load_settings(flags=flags, config_file=args.config)


class StartupError(Exception):
    """What stops `serve` (and fails `check`) before the collector runs: one line."""


class AddressInUse(StartupError):
    """The address is usable, but another socket listens on it now."""


def _listen_problem(settings: Settings, error: OSError) -> str:
    """The line for an address that cannot be listened on, with the setting that changes it."""
    where = f"cannot listen on {settings.host}:{settings.port}"
    if isinstance(error, socket.gaierror):
        return (
            f"{where}: the host does not resolve ({error.strerror}); "
            "set another with --host or COLLECTOR_HOST"
        )
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    if error.errno == errno.EADDRINUSE:
        hint = "another program has this port; choose another with --port or COLLECTOR_PORT"
    elif error.errno == errno.EACCES and 0 < settings.port < 1024:
        hint = "ports below 1024 need privileges; choose another with --port or COLLECTOR_PORT"
    elif error.errno == errno.EADDRNOTAVAIL:
        hint = (
            "this machine has no such address; set one of its own, or 0.0.0.0 for all, "
            "with --host or COLLECTOR_HOST"
        )
    else:
        hint = (
            "the address is set by --host or COLLECTOR_HOST, the port by --port or COLLECTOR_PORT"
        )
    return f"{where}: {reason} ({hint})"


async def _bind(settings: Settings, protocol: Callable[[], asyncio.Protocol]) -> asyncio.Server:
    """Resolve the address and bind it, not yet accepting connections; StartupError if not."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(
            protocol, settings.host, settings.port, reuse_address=True, start_serving=False
        )
    except OSError as error:
        kind = AddressInUse if error.errno == errno.EADDRINUSE else StartupError
        raise kind(_listen_problem(settings, error)) from None


def _prepare_data_dir(path: Path) -> None:
    """Create the data directory and write a file in it, as the queue will; SettingsError if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SettingsError("data_dir", f"cannot create {str(path)!r}: {error.strerror}") from None
    # os.access says yes to root on a read-only mount or in /proc: only a write tells.
    try:
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"probe")
            probe.flush()
    except OSError as error:
        raise SettingsError(
            "data_dir", f"cannot write in {str(path)!r}: {error.strerror}"
        ) from None


def serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from(args)
    except SettingsError as error:
        return _fail(str(error))
    logs.configure(settings.log_level, settings.log_format)
    for warning in unknown_variables(os.environ):
        log.warning(warning)
    try:
        import uvloop  # the `speed` extra: a faster event loop, used when installed

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        log.info("event loop: uvloop")
    except ImportError:
        pass
    try:
        asyncio.run(_serve(settings))
    except (StartupError, SettingsError, QueueRefused) as error:
        return _fail(str(error))
    except SchemaDirError as error:
        return _fail(f"schemas_dir: {error}")
    return 0


async def _serve(settings: Settings) -> None:
    handler: Callable[[], asyncio.Protocol] | None = None

    def protocol() -> asyncio.Protocol:
        assert handler is not None  # connections are accepted only once it is set
        return handler()

    # The address first: a port in use must stop the start before anything is created.
    listener = await _bind(settings, protocol)
    runner: web.AppRunner | None = None
    try:
        _prepare_data_dir(settings.data_dir)
        # Loaded here for the banner's count, and again by create_app, which keeps them
        # inside its validator: a few milliseconds at start-up.
        schemas = len(load_event_schemas(settings.schemas_dir))
        app = create_app(settings)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=settings.keepalive_timeout
        )
        await runner.setup()
        # What startup built (schemas, validators, the app) lives as long as the process:
        # frozen, no collection walks it again. Nearly everything a request allocates is
        # freed by reference counting, so a larger first generation spares most collections.
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        assert runner.server is not None
        arriving = Arriving()
        runner.server.request_handler = arriving.wrap(runner.server.request_handler)
        # Not a web.TCPSite: each connection gets the header deadline that aiohttp lacks.
        cap = ConnectionCap(settings.connections_per_ip, settings.trusted_proxies)
        handler = with_header_deadline(runner.server, settings.header_timeout, cap)
        AcceptFailures(asyncio.get_running_loop())
        try:
            await listener.start_serving()
        except OSError as error:  # another process bound the port too, and listened first
            raise StartupError(_listen_problem(settings, error)) from None
        port = settings.port or int(listener.sockets[0].getsockname()[1])
        print(banner(settings, port, schemas), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping: no new requests; finishing what is in flight")
        listener.close()
        # aiohttp's shutdown drops whatever arrives on a connection from then on, so a body
        # still arriving would end in a 408 after body_timeout: requests whose headers came
        # first get a short grace to finish before it starts.
        if not await arriving.arrived(STOP_GRACE):
            log.warning(
                "%d request bodies were still arriving after %g s; they are cut off",
                arriving.count,
                STOP_GRACE,
            )
    finally:
        listener.close()
        if runner is not None:
            await runner.cleanup()


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Arriving:
    """The requests being handled, so that a stop can wait for the bodies still arriving."""

    def __init__(self) -> None:
        self._bodies: set[StreamReader] = set()  # of the requests being handled

    def wrap(self, handler: Handler) -> Handler:
        """`handler`, with each request known from its headers until its answer."""

        async def known(request: web.BaseRequest) -> web.StreamResponse:
            body = request.content
            self._bodies.add(body)
            try:
                return await handler(request)
            finally:
                self._bodies.discard(body)

        return known

    @property
    def count(self) -> int:
        """Requests whose body has not all arrived (a stream's GET has none to wait for)."""
        return sum(not body.is_eof() for body in self._bodies)

    async def arrived(self, within: float) -> bool:
        """Wait until every body being received is whole, at most `within` seconds."""
        waits = [body.wait_eof() for body in self._bodies if not body.is_eof()]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    # A client that goes away ends its wait too (with an error: no matter).
                    await asyncio.gather(*waits, return_exceptions=True)
        return not self.count


def _url_host(host: str) -> str:
    """The host for URLs to the collector: a wildcard address (0.0.0.0, ::) is none to
    connect to, so loopback stands for it, which works on the machine that reads the banner."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a name
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"[{address}]" if address.version == 6 else str(address)


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def banner(settings: Settings, port: int, schemas: int) -> str:
    """What serve prints once it listens: where to go, what runs, what is missing."""
    base = f"http://{_url_host(settings.host)}:{port}"
    where = ""
    if _wildcard(settings.host):
        # The machine's name as a hint for other machines: it may not resolve over there.
        where = (
            f" (every address of this machine; from others: http://{socket.gethostname()}:{port})"
        )
    relay = (
        "DRY RUN: OUTBOUND_API_KEY is not set; calls are logged, not sent"
        if settings.dry_run
        else f"relaying to {redact_url(settings.outbound_url)}"
    )
    origins = (
        ", ".join(settings.allowed_origins)
        if settings.allowed_origins
        else "none but its own; set COLLECTOR_ALLOWED_ORIGINS to the sites embedding the script"
    )
    loaded = (
        f"{counted(schemas, 'event schema')}, from {settings.schemas_dir}"
        if settings.schemas_dir is not None
        else "none; events are checked against the envelope only (COLLECTOR_SCHEMAS_DIR)"
    )
    pages = ""
    if demo_enabled(settings):
        pages += f"  demo:   {base}/demo  (open it, click, and watch the events)\n"
    if settings.admin_token is not None:
        pages += f"  debug:  {base}/debug  (asks for the admin token)\n"
    return (
        f"{PROG} {__version__} listening on {base}{where}\n"
        f"{pages}"
        f"  script: {base}{settings.script_path}\n"
        f"  events: {base}{settings.event_path}  (and {base}/v2/track, {base}/v2/identify)\n"
        f"  schemas: {loaded}\n"
        f"  queue:  {_queue_where(settings)}\n"
        f"  origins allowed: {origins}\n"
        f"  relay:  {relay}"
    )


def script_tag(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from(args)
    except SettingsError as error:
        return _fail(str(error))
    try:
        base = http_url(args.base_url or f"http://{_url_host(settings.host)}:{settings.port}")
    except ValueError as error:
        return _fail(f"--base-url: {error}")
    script = Script.packaged(settings.event_path, settings.script_path)
    print(snippet(script, base + settings.script_path))
    return 0


def _queue_where(settings: Settings) -> str:
    """Where the queue is, for people: its Redis (without the password) or its file."""
    if settings.queue_url is not None:
        return (
            f"Redis at {redact_url(settings.queue_url.reveal())} (keys {settings.redis_prefix}:*)"
        )
    return str(settings.data_dir / QUEUE_FILE)


def _queue_settings(args: argparse.Namespace) -> Settings:
    """The settings of a tool's queue (data_dir's file, or queue_url's Redis); SettingsError
    when the file is not there."""
    settings = load_settings(flags={"data_dir": args.data_dir}, config_file=args.config)
    path = settings.data_dir / QUEUE_FILE
    if settings.queue_url is None and not path.exists():
        raise SettingsError("data_dir", f"no queue at {str(path)!r}")
    return settings


def dead_letters(args: argparse.Namespace) -> int:
    try:
        settings = _queue_settings(args)
    except SettingsError as error:
        return _fail(str(error))
    which = DeadLetterFilter()
    if args.action != "show":
        which = DeadLetterFilter(tuple(args.id), args.reason, args.status, args.event)
    if args.action in {"replay", "purge"} and which.empty and not args.all:
        return _fail(
            f"{args.action}: name which dead letters (--id, --reason, --status, --event) or --all"
        )
    try:
        return asyncio.run(_dead_letters(args, settings, which))
    except (QueueRefused, QueueUnavailable) as error:  # Redis may refuse a command (ACL)
        return _fail(str(error))


async def _dead_letters(
    args: argparse.Namespace, settings: Settings, which: DeadLetterFilter
) -> int:
    queue = await open_queue(settings, owner=False)
    try:
        if args.action == "show":
            found = await queue.dead_letters(DeadLetterFilter(ids=(args.id,)))
            if not found:
                return _fail(f"no dead letter with id {args.id}")
            print(json.dumps(found[0], indent=2, ensure_ascii=False))
        elif args.action == "list":
            _print_dead_letters(await queue.dead_letters(which), await queue.dead_letter_reasons())
        else:
            verb = "replayed" if args.action == "replay" else "purged"
            operation = (
                queue.replay_dead_letters if args.action == "replay" else queue.purge_dead_letters
            )

            def progress(done: int) -> None:
                print(f"{verb} {done}...", file=sys.stderr, flush=True)

            done = await operation(which, progress=progress)
            print(f"{verb} {counted(done, 'dead letter')}")
    finally:
        await queue.close()
    return 0


def _print_dead_letters(letters: list[dict[str, Any]], reasons: list[tuple[str, int]]) -> None:
    print(f"{'ID':>6}  {'FAILED AT (UTC)':19}  {'STATUS':6}  {'EVENT':24}  REASON")
    for letter in letters:
        failed = datetime.fromtimestamp(letter["failed_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        record = letter["record"]
        name = record.get("event") or record.get("type", "")
        status = "-" if letter["status"] is None else str(letter["status"])
        print(f"{letter['id']:>6}  {failed}  {status:6}  {name[:24]:24}  {letter['reason']}")
    total = sum(count for _, count in reasons)
    print(f"\n{counted(total, 'dead letter')} in all" + (":" if reasons else ""))
    for reason, count in reasons:
        print(f"{count:>8}  {reason}")


def sign(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(config_file=args.config)
    except SettingsError as error:
        return _fail(str(error))
    if settings.identity_secret is None:
        return _fail("identity_secret: not set (COLLECTOR_IDENTITY_SECRET or --config)")
    print(user_hash(settings.identity_secret, args.user_id))
    return 0


def check(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from(args)
    except SettingsError as error:
        return _fail(str(error))
    warnings = unknown_variables(os.environ)
    for warning in warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    # What serve does before it runs, in its order, each failure with serve's own line.
    redis_warnings: list[str] = []
    try:
        taken = asyncio.run(_try_address(settings))
        _prepare_data_dir(settings.data_dir)
        validators = load_event_schemas(settings.schemas_dir)
        if settings.queue_url is not None:
            redis_warnings = asyncio.run(_check_redis(settings))
    except (StartupError, SettingsError, QueueRefused) as error:
        return _fail(str(error))
    except SchemaDirError as error:
        return _fail(f"schemas_dir: {error}")
    for warning in redis_warnings:
        warnings.append(warning)
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if taken is not None:
        # Not a failure: the collector whose settings these are may be the one holding it.
        where = f"{settings.host}:{settings.port}"
        warnings.append(taken)
        print(
            f"{PROG}: warning: {where} is in use now (by a running collector?); until it is "
            f"free, serve stops with: {taken}",
            file=sys.stderr,
        )
    shown = settings.redacted()
    width = max(map(len, shown))
    for name, value in shown.items():
        print(f"{name:<{width}}  {value}")
    print(f"\nschemas: {counted(len(validators), 'event schema')}", end="")
    print(f" ({', '.join(sorted(validators))})" if validators else "")
    print(f"queue: {_queue_where(settings)}")
    print(
        "relay: dry run (no OUTBOUND_API_KEY)" if settings.dry_run else "relay: sends to Outbound"
    )
    if not warnings:
        print("all is well")
    elif len(warnings) == 1:
        print("all is well but for the warning above")
    else:
        print(f"all is well but for the {len(warnings)} warnings above")
    return 0


async def _check_redis(settings: Settings) -> list[str]:
    """Reach the queue's Redis as serve would (QueueRefused when it cannot), and say what of
    `durability` its configuration cannot keep."""
    queue = make_queue(settings, owner=False)
    assert isinstance(queue, RedisQueue)
    await queue.open()
    await queue.close()
    return queue.warnings


async def _try_address(settings: Settings) -> str | None:
    """Resolve and bind the address as serve would, then let go: StartupError when it cannot
    be used, or serve's line when only because it is in use now."""
    try:
        listener = await _bind(settings, asyncio.Protocol)
    except AddressInUse as error:
        return str(error)
    listener.close()
    await listener.wait_closed()
    return None


def schemas_lint(args: argparse.Namespace) -> int:
    if not args.directory.is_dir():
        return _fail(f"{str(args.directory)!r} is not a directory")
    validators, problems = lint_schemas(args.directory)
    for name in sorted(validators):
        server_only = validators[name].schema.get("x-server-only") is True  # type: ignore[union-attr]
        print(f"ok     {name}" + ("  (server-only)" if server_only else ""))
    for problem in problems:
        print(f"error  {problem}")
    print(f"{len(validators)} usable, {len(problems)} with problems")
    return 1 if problems else 0


def stats(args: argparse.Namespace) -> int:
    try:
        settings = _queue_settings(args)
    except SettingsError as error:
        return _fail(str(error))
    try:
        report = asyncio.run(_stats(settings))
    except (QueueRefused, QueueUnavailable) as error:  # Redis may refuse a command (ACL)
        return _fail(str(error))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    oldest = report["oldest_event_age_seconds"]
    print(f"queue:        {counted(report['queued'], 'event')} waiting")
    print(f"oldest event: {'none' if oldest is None else f'{oldest:.0f} s old'}")
    print(f"dead letters: {report['dead_letters']}")
    for reason, count in report["dead_letters_by_reason"].items():
        print(f"{count:>14}  {reason}")
    relay = report["relay"]
    state = f"circuit {relay['circuit']}"
    if relay.get("reason"):
        state += f" ({relay['reason']})"
    elif relay.get("since") is None:
        state += " (it has not opened)"
    print(f"relay:        {state}")
    return 0


async def _stats(settings: Settings) -> dict[str, Any]:
    queue = await open_queue(settings, owner=False)
    try:
        numbers = await queue.stats()
        reasons = await queue.dead_letter_reasons()
        notes = await queue.notes()
    finally:
        await queue.close()
    oldest = numbers.oldest_received_at
    return {
        "queued": numbers.depth,
        "oldest_event_age_seconds": None if oldest is None else max(0.0, time.time() - oldest),
        "dead_letters": numbers.dead_letters,
        "dead_letters_by_reason": dict(reasons),
        # The relay notes its circuit when it opens or closes, not for every delivery: with
        # no note, it has never opened in this data directory.
        "relay": notes.get("relay") or {"circuit": "closed", "reason": None, "since": None},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        # argparse would blame the top-level command and print its usage; the subcommand's
        # usage is the one that shows what it takes.
        args.usage_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        return serve(args)
    if args.command == "script-tag":
        return script_tag(args)
    if args.command == "dead-letters":
        return dead_letters(args)
    if args.command == "sign":
        return sign(args)
    if args.command == "check":
        return check(args)
    if args.command == "schemas":
        return schemas_lint(args)
    if args.command == "stats":
        return stats(args)
    return _fail(f"unknown command {args.command!r}")  # argparse already refuses these
