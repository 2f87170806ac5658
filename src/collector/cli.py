"""CLI: `outbound-collector serve` and friends; wrong settings exit 2 with one line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from . import __version__
from .app import create_app
from .config import Settings, SettingsError, env_name, load_settings, settings_fields
from .schema import SchemaDirError
from .script import Script, snippet

PROG = "outbound-collector"
log = logging.getLogger("collector")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML file of settings (keys as below, in snake_case)"
    )
    for item in settings_fields():
        if not item.metadata["flag"]:
            continue
        default = item.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
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
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _settings_from(args: argparse.Namespace) -> Settings:
    flags = {item.name: getattr(args, item.name, None) for item in settings_fields()}
    return load_settings(flags=flags, config_file=args.config)


def _check_data_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SettingsError("data_dir", f"cannot create {str(path)!r}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SettingsError("data_dir", f"{str(path)!r} is not writable")


def serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from(args)
        _check_data_dir(settings.data_dir)
        app = create_app(settings)
    except SettingsError as error:
        return _fail(str(error))
    except SchemaDirError as error:
        return _fail(f"schemas_dir: {error}")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(app, settings))
    except OSError as error:
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {error.strerror}")
    return 0


async def _serve(app: web.Application, settings: Settings) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        _print_banner(settings, runner.addresses)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping: no new requests; finishing what is in flight")
    finally:
        await runner.cleanup()


def _print_banner(settings: Settings, addresses: Sequence[object]) -> None:
    host, port = settings.host, settings.port
    for address in addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            port = int(address[1])
            break
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    relay = (
        "DRY RUN: OUTBOUND_API_KEY is not set; calls are logged, not sent"
        if settings.dry_run
        else f"relaying to {settings.outbound_url}"
    )
    origins = (
        ", ".join(settings.allowed_origins)
        if settings.allowed_origins
        else "none but its own; set COLLECTOR_ALLOWED_ORIGINS to the sites embedding the script"
    )
    print(
        f"{PROG} {__version__} listening on {base}\n"
        f"  script: {base}{settings.script_path}\n"
        f"  events: {base}{settings.event_path}  (and {base}/v2/track, {base}/v2/identify)\n"
        f"  queue:  {settings.data_dir / 'queue.sqlite3'}\n"
        f"  origins allowed: {origins}\n"
        f"  relay:  {relay}",
        flush=True,
    )


def script_tag(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from(args)
    except SettingsError as error:
        return _fail(str(error))
    base = (args.base_url or f"http://{settings.host}:{settings.port}").rstrip("/")
    print(snippet(Script.packaged(settings.event_path), base + settings.script_path))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "script-tag":
        return script_tag(args)
    return _fail(f"unknown command {args.command!r}")  # argparse already refuses these
