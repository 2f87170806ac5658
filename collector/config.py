"""Settings: read once from flags, environment variables and an optional TOML file."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Secret:
    """A string that never shows itself in a repr, a log line or a settings printout."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class SettingsError(Exception):
    """A setting that cannot be used; the message names the setting and the problem."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


Parser = Callable[[object], Any]


def _text(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be a string, got {raw!r}")
    return raw.strip()


def _nonempty(raw: object) -> str:
    value = _text(raw)
    if not value:
        raise ValueError("must not be empty")
    return value


def _integer(low: int, high: int | None = None) -> Parser:
    def parse(raw: object) -> int:
        if isinstance(raw, bool):
            raise ValueError(f"must be a whole number, got {raw!r}")
        try:
            value = int(raw) if isinstance(raw, int) else int(_text(raw))
        except ValueError:
            raise ValueError(f"must be a whole number, got {raw!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bound}, got {value}")
        return value

    return parse


def _float(raw: object) -> float:
    """The number a setting's value spells (a number, or text of one); nan when it spells
    none, a boolean included, so that every range check refuses it."""
    if isinstance(raw, bool):
        return float("nan")
    try:
        return float(raw) if isinstance(raw, int | float) else float(_text(raw))
    except ValueError:
        return float("nan")


def _number_of_seconds(raw: object, *, zero: bool) -> float:
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw) if isinstance(raw, int | float) else float(_text(raw))
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {raw!r}") from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        kind = "zero or more" if zero else "a positive number of"
        raise ValueError(f"must be {kind} seconds, got {raw!r}")
    return value


def _seconds(raw: object) -> float:
    return _number_of_seconds(raw, zero=False)


def _non_negative_seconds(raw: object) -> float:
    return _number_of_seconds(raw, zero=True)


def _choice(*choices: str) -> Parser:
    def parse(raw: object) -> str:
        value = _text(raw).lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {raw!r}")
        return value

    return parse


def _items(raw: object) -> list[str]:
    if isinstance(raw, list):
        return [_text(item) for item in raw if _text(item)]
    return [item.strip() for item in _text(raw).split(",") if item.strip()]


def _url_path(raw: object) -> str:
    value = _nonempty(raw)
    if not value.startswith("/") or any(c in value for c in "?#* "):
        raise ValueError(f"must be a URL path starting with '/', got {raw!r}")
    return value


def http_url(raw: object) -> str:
    """An absolute http(s) URL without a query or fragment, its trailing slash removed."""
    value = _nonempty(raw).rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {raw!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or fragment, got {raw!r}")
    return value


def _outbound_url(raw: object) -> str:
    """Outbound's base URL: the relay adds /v2/track itself, so a /v2 in it is refused."""
    value = http_url(raw)
    parts = urlsplit(value)
    segments = parts.path.split("/")
    lowered = [segment.lower() for segment in segments]
    if "v2" in lowered:
        # Refused rather than cut off: a URL that is silently rewritten hides what is wrong
        # with the setting, like an origin with a trailing slash, which is refused too.
        base = parts._replace(path="/".join(segments[: lowered.index("v2")])).geturl()
        raise ValueError(
            "must be the base URL without /v2 (the collector adds /v2/track and /v2/identify "
            f"itself): use {base!r}, got {raw!r}"
        )
    return value


def parse_origin(raw: str) -> str:
    """One browser origin as a browser sends it: scheme://host[:port], nothing more."""
    if raw == "*":
        return raw
    parts = urlsplit(raw)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{raw!r} has an invalid port") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{raw!r} is not an origin like https://www.example.com")
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{raw!r} must be scheme://host[:port] only, without a path or slash")
    if raw != raw.lower():
        raise ValueError(f"{raw!r} must be lower case, as browsers send origins")
    default_port = {"http": 80, "https": 443}[parts.scheme]
    if port == default_port:
        raise ValueError(f"{raw!r} names the default port, which browsers leave out")
    return raw


def redact_url(url: str) -> str:
    """The URL with its user:password@ (if any) replaced, for printing."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="********@" + parts.netloc.rpartition("@")[2]).geturl()


def _queue_url(raw: object) -> Secret | None:
    """Where the queue is: unset for SQLite in data_dir, else redis:// or rediss:// with an
    optional user:password@, a host, a port and a database number. A Secret, since it may
    hold Redis's password; errors show it redacted."""
    value = _text(raw)
    if not value:
        return None
    shown = redact_url(value)
    parts = urlsplit(value)
    if parts.scheme not in {"redis", "rediss"}:
        raise ValueError(
            "must be redis://[user:password@]host:port/db or rediss://… (unset: SQLite in"
            f" data_dir), got {shown!r}"
        )
    try:
        parts.port  # noqa: B018 (urlsplit checks the port when it is read)
    except ValueError:
        raise ValueError(f"has an invalid port, got {shown!r}") from None
    if not parts.hostname:
        raise ValueError(f"must name a host, got {shown!r}")
    if parts.path not in {"", "/"} and not parts.path[1:].isdigit():
        raise ValueError(f"must end with a database number like /0, got {shown!r}")
    if parts.fragment:
        raise ValueError(f"must not have a fragment, got {shown!r}")
    return Secret(value)


def _prefix(raw: object) -> str:
    value = _nonempty(raw)
    if not all(char.isascii() and char.isprintable() and char not in " {}" for char in value):
        raise ValueError(f"must be printable ASCII without spaces or braces, got {raw!r}")
    return value


def _public_url(raw: object) -> str:
    """The collector's own URL as browsers reach it; its origin is the collector's own."""
    if not _text(raw):
        return ""
    value = http_url(raw)
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"must not hold credentials, got {redact_url(value)!r}")
    return value


def _anonymous_id_prefix(raw: object) -> str:
    value = _text(raw)
    if not value:
        raise ValueError(
            "must not be empty: without a prefix an anonymous id a browser chooses could be "
            "read at Outbound as the id of one of your users"
        )
    return value


def _names(raw: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_items(raw)))


def _origins(raw: object) -> tuple[str, ...]:
    origins = tuple(parse_origin(item) for item in _items(raw))
    if "*" in origins and len(origins) > 1:
        raise ValueError("'*' allows every origin and cannot be combined with others")
    return origins


def _networks(raw: object) -> tuple[IPNetwork, ...]:
    networks = []
    for item in _items(raw):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def _secret(raw: object) -> Secret | None:
    value = _text(raw)
    return Secret(value) if value else None


IDENTITY_SECRET_MIN = 32


def _identity_secret(raw: object) -> Secret | None:
    """The HMAC key of user hashes: long enough that nobody can guess it."""
    value = _text(raw)
    if value and len(value) < IDENTITY_SECRET_MIN:
        raise ValueError(
            f"must be at least {IDENTITY_SECRET_MIN} characters long, this one has "
            f"{len(value)}: it is the HMAC key that proves a user_hash came from your "
            "back-end; a short or guessable key lets anyone compute hashes and send events as "
            "any of your users (make one with: python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')"
        )
    return Secret(value) if value else None


def _header_secret(raw: object) -> Secret | None:
    """A secret sent in an HTTP header: printable ASCII only."""
    value = _text(raw)
    if value and not (value.isascii() and value.isprintable()):
        raise ValueError("must be printable ASCII (it is sent in an HTTP header)")
    return Secret(value) if value else None


TOKEN_MIN = 16


def _token(raw: object) -> Secret | None:
    """A bearer token people type or paste: long enough that guessing it is hopeless."""
    value = _text(raw)
    if value and len(value) < TOKEN_MIN:
        raise ValueError(
            f"must be at least {TOKEN_MIN} characters long, this one has {len(value)} (make "
            "one with: python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
        )
    return Secret(value) if value else None


def _secrets(raw: object) -> tuple[Secret, ...]:
    values = _items(raw)
    if any(len(value) < 16 for value in values):
        raise ValueError("each token must be at least 16 characters long")
    return tuple(Secret(value) for value in values)


def _share(raw: object) -> float:
    """A share of a limit: more than 0, at most 1."""
    value = _float(raw)
    if not 0 < value <= 1:  # also refuses nan
        raise ValueError(f"must be a share above 0 and at most 1 (like 0.1), got {raw!r}")
    return value


def _days(raw: object) -> float:
    """A number of days; 0 turns the retention off."""
    value = _float(raw)
    if not 0 <= value < float("inf"):  # also refuses nan
        raise ValueError(f"must be a number of days (0: kept until purged), got {raw!r}")
    return value


def _rate(raw: object) -> float:
    """Events per second; 0 turns the limit off."""
    value = _float(raw)
    if not 0 <= value < float("inf"):  # also refuses nan
        raise ValueError(f"must be a number of events per second (0: no limit), got {raw!r}")
    return value


def _pattern(raw: object) -> re.Pattern[str] | None:
    text = _text(raw)
    if not text:
        return None
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as error:
        raise ValueError(f"is not a valid regular expression: {error}") from None


def _directory(raw: object) -> Path:
    return Path(_nonempty(raw)).expanduser()


def _readable_directory(raw: object) -> Path | None:
    if not _text(raw):
        return None
    path = _directory(raw)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"{str(path)!r} is not readable")
    return path


def _context_property(raw: object) -> str:
    return _text(raw)


def setting(default: Any, parse: Parser, help: str, *, env: str = "", flag: bool = True) -> Any:
    """A settings field with how to parse it, what it means, and where it may come from."""
    metadata = {"parse": parse, "help": help, "env": env, "flag": flag}
    if isinstance(default, list | dict):
        raise TypeError("mutable defaults are not allowed in frozen settings")
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the collector, validated; built by `load_settings`."""

    host: str = setting("127.0.0.1", _nonempty, "Address to listen on.")
    port: int = setting(8080, _integer(0, 65535), "Port to listen on (0: any free port).")
    data_dir: Path = setting(
        Path("collector-data"), _directory, "Directory of the queue database (created if missing)."
    )
    outbound_api_key: Secret | None = setting(
        None,
        _header_secret,
        "Outbound's private API key. Unset: dry run, calls are logged instead of sent.",
        env="OUTBOUND_API_KEY",
        flag=False,
    )
    outbound_url: str = setting(
        "https://api.outbound.io",
        _outbound_url,
        "Base URL of Outbound's API, without /v2 (the collector adds /v2/track itself).",
    )
    allowed_origins: tuple[str, ...] = setting(
        (),
        _origins,
        "Comma-separated browser origins allowed by CORS, like https://www.example.com; "
        "'*' allows any.",
    )
    identity_secret: Secret | None = setting(
        None,
        _identity_secret,
        "HMAC key of user hashes: with it, a user_id from a browser needs its user_hash.",
        flag=False,
    )
    unverified_users: str = setting(
        "anonymize",
        _choice("anonymize", "reject"),
        "What happens to a browser event whose user_id lacks a valid user_hash: anonymize "
        "keeps it under its anonymous id, reject refuses it.",
    )
    anonymous_id_prefix: str = setting(
        "anon:",
        _anonymous_id_prefix,
        "Prefix of anonymous ids at Outbound (anonymous_id a1 becomes user anon:a1), so that "
        "no anonymous id can be taken for one of your users' ids; must not be empty.",
    )
    protected_traits: tuple[str, ...] = setting(
        (
            "email",
            "phone_number",
            "group_id",
            "group_attributes",
            "first_name",
            "last_name",
            "apns",
            "gcm",
        ),
        _names,
        "Comma-separated traits that, with identity_secret set, only verified users and "
        "server tokens may set (where Outbound sends messages, what a group shares, what "
        "messages say); empty: none.",
    )
    public_url: str = setting(
        "",
        _public_url,
        "The collector's URL as browsers reach it (behind a reverse proxy: the proxy's), like "
        "https://collect.example.com; its origin may always send. Unset: only the address "
        "the collector was reached on (and its loopback names).",
    )
    server_tokens: tuple[Secret, ...] = setting(
        (),
        _secrets,
        "Comma-separated bearer tokens of trusted back-ends, which may send any user_id.",
        flag=False,
    )
    schemas_dir: Path | None = setting(
        None,
        _readable_directory,
        "Directory of per-event JSON Schemas for properties (one *.json file per event).",
    )
    unknown_events: str = setting(
        "accept",
        _choice("accept", "reject"),
        "With a schemas_dir: accept or reject events that have no schema there.",
    )
    script_path: str = setting("/s.js", _url_path, "URL path of the browser script.")
    event_path: str = setting("/e", _url_path, "URL path that takes events from browsers.")
    max_body_bytes: int = setting(
        512 * 1024, _integer(1024), "Largest request body, after decompression (413 above)."
    )
    max_event_bytes: int = setting(
        32 * 1024, _integer(256), "Largest single event as JSON (rejected above)."
    )
    max_batch_events: int = setting(100, _integer(1), "Most events in one batch (413 above).")
    max_property_depth: int = setting(
        10, _integer(1, 64), "Deepest nesting of objects and arrays inside properties and traits."
    )
    max_property_keys: int = setting(
        1000, _integer(1), "Most keys and array items, at every depth, in properties or traits."
    )
    max_string_length: int = setting(
        8192, _integer(16), "Longest string value inside properties or traits."
    )
    max_gzip_ratio: int = setting(
        100, _integer(1), "Most a compressed body may grow when decompressed (413 above)."
    )
    header_timeout: float = setting(
        10.0, _seconds, "Seconds a request's headers may take to arrive (the connection closes)."
    )
    body_timeout: float = setting(
        10.0, _seconds, "Seconds a request body may take to arrive (408 after)."
    )
    keepalive_timeout: float = setting(
        75.0, _seconds, "Seconds an idle keep-alive connection stays open."
    )
    connections_per_ip: int = setting(
        256,
        _integer(1),
        "Most connections open at once from one client address (beyond, they are closed at "
        "once); trusted_proxies are not capped.",
    )
    rate_limit_per_ip: float = setting(
        100.0, _rate, "Events per second from one client IP, on average; 0: no limit."
    )
    rate_burst_per_ip: int = setting(
        1000, _integer(1), "Events one client IP may send at once before its rate applies."
    )
    rate_limit_per_user: float = setting(
        10.0, _rate, "Events per second for one user or anonymous id, on average; 0: no limit."
    )
    rate_burst_per_user: int = setting(
        100, _integer(1), "Events one user may send at once before the rate applies."
    )
    rate_bytes_per_event: int = setting(
        4096,
        _integer(64),
        "Bytes of request body that cost one event in the per-IP bucket when a request's "
        "body is larger than its events (charged before validation, refused bodies too).",
    )
    ipv6_bucket_prefix: int = setting(
        64,
        _integer(1, 128),
        "IPv6 clients share a per-IP rate bucket per network of this prefix length "
        "(64: one subscriber's /64; 128: each address).",
    )
    bot_user_agents: re.Pattern[str] | None = setting(
        re.compile(
            r"bot\b|crawl|spider|slurp|headlesschrome|phantomjs|lighthouse|facebookexternalhit",
            re.IGNORECASE,
        ),
        _pattern,
        "Regular expression (case-insensitive) of user agents whose events are dropped; "
        "empty: none.",
    )
    forward_ip: str = setting(
        "off",
        _choice("off", "truncated", "full"),
        "Whether the client IP goes to Outbound in the context property: off, truncated "
        "(IPv4 /24, IPv6 /48; also how it is stored), or full.",
    )
    trusted_proxies: tuple[IPNetwork, ...] = setting(
        (),
        _networks,
        "Comma-separated addresses or networks of reverse proxies whose X-Forwarded-For "
        "is believed.",
    )
    clock_skew_tolerance: float = setting(
        60.0, _seconds, "Seconds an event time may lie in the future before it is clamped."
    )
    page_event_name: str = setting(
        "pageView", _nonempty, "Outbound event name that page views are tracked under."
    )
    context_property: str = setting(
        "collector",
        _context_property,
        "Property key under which server context (page, locale, user agent) is forwarded "
        "to Outbound; empty turns forwarding off.",
    )
    dedupe_window: float = setting(
        3600.0,
        _non_negative_seconds,
        "Seconds a message_id is remembered, so that a resent event is stored once; 0: off.",
    )
    durability: str = setting(
        "normal",
        _choice("normal", "full"),
        "What an acknowledged event survives: normal a process crash, full also a power loss "
        "(SQLite's synchronous mode; on Redis, checked against appendonly yes and, for full, "
        "appendfsync always).",
    )
    queue_url: Secret | None = setting(
        None,
        _queue_url,
        "Where the queue is: unset keeps it in SQLite in data_dir; "
        "redis://[user:password@]host:port/db (or rediss://) shares one Redis between "
        "collectors.",
        flag=False,  # it may hold Redis's password, which a command line would show to `ps`
    )
    redis_partitions: int = setting(
        16,
        _integer(1, 1024),
        "Partitions of the Redis queue, the most relays that can share it; used when the "
        "queue is first made, later the count recorded in Redis wins.",
    )
    redis_prefix: str = setting(
        "collector", _prefix, "Prefix of the Redis queue's keys (several queues on one Redis)."
    )
    redis_lease: float = setting(
        10.0,
        _seconds,
        "Seconds a collector holds a Redis partition without renewing it (renewed every third "
        "of it): how long a dead collector's events wait before another takes them over.",
    )
    relay_concurrency: int = setting(16, _integer(1, 1024), "Outbound calls in flight at once.")
    relay_timeout: float = setting(10.0, _seconds, "Seconds before an Outbound call is abandoned.")
    relay_batch_size: int = setting(
        100,
        _integer(1, 100),
        "Most events in one /v2/track/batch or /v2/identify/batch call; 1 turns batching off.",
    )
    retry_base: float = setting(1.0, _seconds, "First retry delay in seconds, doubled each time.")
    retry_cap: float = setting(300.0, _seconds, "Longest retry delay in seconds.")
    retry_window: float = setting(
        72 * 3600.0, _seconds, "Seconds an event keeps being retried before it is dead-lettered."
    )
    lease_seconds: float = setting(
        60.0, _seconds, "Seconds a claimed event stays reserved before another attempt may take it."
    )
    probe_interval: float = setting(
        30.0, _seconds, "Seconds between probes while the relay's circuit is open."
    )
    breaker_threshold: int = setting(
        10, _integer(1), "Failed Outbound calls in a row that open the relay's circuit."
    )
    queue_max_events: int = setting(
        2_000_000, _integer(1), "Most events waiting in the queue; beyond, ingest answers 503."
    )
    queue_max_bytes: int = setting(
        1 << 30,
        _integer(1024),
        "Most bytes the queue's files hold on disk (events, dedupe rows, dead letters, its "
        "log); beyond, 503.",
    )
    queue_share_per_ip: float = setting(
        0.1,
        _share,
        "Share of queue_max_events and queue_max_bytes one browser client (IP bucket) may "
        "hold; beyond, 503 for that client only.",
    )
    queue_browser_share: float = setting(
        0.9,
        _share,
        "Share of queue_max_events and queue_max_bytes browsers together may fill; the rest "
        "is kept for server tokens.",
    )
    dead_letters_max: int = setting(
        100_000, _integer(1), "Most dead letters kept; beyond, the oldest are dropped."
    )
    dead_letter_days: float = setting(
        30.0, _days, "Days a dead letter is kept before it is dropped; 0: kept until purged."
    )
    cors_max_age: int = setting(86400, _integer(0), "Seconds browsers may cache a preflight.")
    log_level: str = setting("info", _choice("debug", "info", "warning", "error"), "Log level.")
    log_format: str = setting(
        "text", _choice("text", "json"), "Log lines for people (text) or as JSON lines (json)."
    )
    metrics_token: Secret | None = setting(
        None,
        _token,
        "Bearer token for GET /metrics; unset: /metrics answers only loopback clients.",
        flag=False,
    )
    admin_token: Secret | None = setting(
        None,
        _token,
        "Token that opens the live debugger at /debug; unset: no debugger.",
        flag=False,
    )
    demo: str = setting(
        "auto",
        _choice("auto", "on", "off"),
        "The demo page at /demo: auto is on while no allowed_origins are set, for loopback "
        "clients only; on shows it to anyone.",
    )
    max_live_viewers: int = setting(
        16,
        _integer(1, 1000),
        "Most live views open at once, each of /debug and /demo (503 beyond).",
    )

    @property
    def dry_run(self) -> bool:
        return self.outbound_api_key is None

    def redacted(self) -> dict[str, str]:
        """Every setting as text, with secrets replaced, for printing."""
        shown: dict[str, str] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "queue_url" and isinstance(value, Secret):
                shown[item.name] = redact_url(value.reveal())
            elif isinstance(value, Secret) or (
                isinstance(value, tuple) and value and isinstance(value[0], Secret)
            ):
                shown[item.name] = "******** (set)"
            elif isinstance(value, re.Pattern):
                shown[item.name] = value.pattern
            elif item.name == "outbound_url":
                shown[item.name] = redact_url(value)
            elif value is None:
                shown[item.name] = "(unset)"
            elif isinstance(value, tuple):
                shown[item.name] = ",".join(str(v) for v in value)
            else:
                shown[item.name] = str(value)
        return shown


def env_name(item: dataclasses.Field[Any]) -> str:
    return str(item.metadata["env"] or f"COLLECTOR_{item.name.upper()}")


def settings_fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(Settings)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each COLLECTOR_* variable that is not a setting and each near-miss of
    OUTBOUND_API_KEY, with the closest real name; values are never read."""
    known = {env_name(item) for item in settings_fields()}
    # Compared without the shared prefix, which would otherwise make every name look alike.
    stems = {name.removeprefix("COLLECTOR_"): name for name in known}
    warnings = []
    for variable in sorted(environ):
        upper = variable.upper()
        if variable in known or not (
            upper.startswith(("COLLECTOR_", "OUTBOUND"))
            or difflib.SequenceMatcher(None, upper, "OUTBOUND_API_KEY").ratio() >= 0.8
        ):
            continue
        closest = difflib.get_close_matches(upper.removeprefix("COLLECTOR_"), stems, n=1)
        hint = (
            f"; did you mean {stems[closest[0]]}?"
            if closest
            else " (`outbound-collector serve --help` lists them)"
        )
        warnings.append(f"{variable} is not a setting, so it is ignored{hint}")
    return warnings


def load_settings(
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Flags win over environment variables, which win over the TOML file, then defaults."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    from_file = _read_toml(config_file) if config_file else {}
    known = {item.name for item in settings_fields()}
    for key in from_file:
        if key not in known:
            raise SettingsError(f"{config_file}", f"unknown setting {key!r}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # setting -> where its value came from, for error lines
    for item in settings_fields():
        if item.name in flags:
            source, raw = f"--{item.name.replace('_', '-')}", flags[item.name]
        elif env_name(item) in environ:
            source, raw = env_name(item), environ[env_name(item)]
        elif item.name in from_file:
            source, raw = f"{item.name} in {config_file}", from_file[item.name]
        else:
            continue
        try:
            values[item.name] = item.metadata["parse"](raw)
        except ValueError as error:
            raise SettingsError(source, str(error)) from None
        sources[item.name] = source
    settings = Settings(**values)
    _check_pairs(settings, sources)
    return settings


def _check_pairs(settings: Settings, sources: Mapping[str, str]) -> None:
    """Settings that must agree with each other; the error names both, where each came from
    and its value, under the name that changes the first (its variable when it was unset)."""

    def name(setting: str) -> str:
        return sources.get(setting) or f"COLLECTOR_{setting.upper()}"

    def origin(setting: str) -> str:
        return f", from {sources[setting]}" if setting in sources else " by default"

    def got(setting: str) -> str:
        return f"got {getattr(settings, setting):g}" + (
            "" if setting in sources else ", its default"
        )

    if settings.retry_base > settings.retry_cap:
        raise SettingsError(
            name("retry_base"),
            f"must not be more than retry_cap ({settings.retry_cap:g} s{origin('retry_cap')}); "
            + got("retry_base"),
        )
    if settings.lease_seconds <= 2 * settings.relay_timeout:
        # An event may take an identify and a track call; its lease must outlast both.
        timeout = settings.relay_timeout
        raise SettingsError(
            name("lease_seconds"),
            f"must be more than twice relay_timeout ({timeout:g} s{origin('relay_timeout')}), "
            f"so more than {2 * timeout:g} seconds; " + got("lease_seconds"),
        )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as error:
        raise SettingsError("--config", f"cannot read {str(path)!r}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError("--config", f"{str(path)!r} is not valid TOML: {error}") from None
