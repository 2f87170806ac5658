"""Identity: who may speak for a user (HMAC user hashes, server tokens), bots, IP privacy."""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from .config import Secret, SettingsError
from .enrich import Record
from .outbound import guid_safe
from .schema import Problem

log = logging.getLogger("collector.identity")

Verdict = Literal["trusted", "anonymized", "refused"]


def user_hash(secret: Secret, user_id: str) -> str:
    """hex(HMAC-SHA256(secret, user_id)): what a site's back-end renders for its logged-in user."""
    return hmac.new(secret.reveal().encode(), user_id.encode(), hashlib.sha256).hexdigest()


def hash_matches(secret: Secret, user_id: str, claimed: object) -> bool:
    """Whether `claimed` is the user hash of `user_id`, compared in constant time."""
    if not isinstance(claimed, str):
        return False
    return hmac.compare_digest(user_hash(secret, user_id).encode(), claimed.lower().encode())


def token_matches(tokens: Iterable[Secret], presented: str) -> bool:
    """Whether `presented` is one of the server tokens; each comparison in constant time."""
    found = False
    for token in tokens:
        found |= hmac.compare_digest(token.reveal().encode(), presented.encode())
    return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def verify_user(
    event: dict[str, Any], secret: Secret, *, on_failure: str
) -> tuple[Verdict, list[Problem]]:
    """Whether a browser may speak for the event's `user_id`, and what to do when it may not.

    Events without a `user_id` are anonymous and harmless. A `user_id` needs the matching
    `user_hash`; without it the event loses its `user_id` (and keeps its anonymous id) when
    `on_failure` is "anonymize", or is refused. An event with nothing to fall back to is
    refused.
    """
    user_id = event.get("user_id")
    if user_id is None:
        return "trusted", []
    if hash_matches(secret, str(user_id), event.get("user_hash")):
        return "trusted", []
    problem = Problem(
        "/user_hash",
        "is missing" if "user_hash" not in event else "does not match user_id",
    )
    why = f"{problem.message}: a user_id from a browser needs the user_hash from your back-end"
    if on_failure == "anonymize" and event.get("anonymous_id"):
        return "anonymized", [Problem(problem.path, why)]
    return "refused", [Problem(problem.path, why)]


def protected_trait_problems(traits: object, protected: Iterable[str], *, at: str) -> list[Problem]:
    """A problem for each protected trait a sender who is not verified tries to set, at the
    top of `traits` or in its `attributes` (`at`: where the traits are in what was sent)."""
    if not isinstance(traits, dict):
        return []
    places = [(at, traits)]
    if isinstance(traits.get("attributes"), dict):
        places.append((f"{at}/attributes", traits["attributes"]))
    why = (
        "is a protected trait (protected_traits): only a verified user (a user_id with its "
        "user_hash) or a server token may set it, since it changes whom Outbound messages, "
        "what they say or what a group shares"
    )
    return [
        Problem(f"{where}/{name}", why)
        for name in protected
        for where, holder in places
        if name in holder
    ]


# What the ids of a new record are; records queued before this (without the mark
# "anonymous_prefix") are read by `outbound` as they were written.
IDS_KEY_FILE = "ids.key"
_KEY_HEX = 64  # 32 random bytes


def ids_key(data_dir: Path) -> Secret:
    """The server-side key of the ids the collector derives (GUIDs, dedupe scopes): read from
    `ids.key` in the data directory, made there (mode 0600) at the first start."""
    path = data_dir / IDS_KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        descriptor, made = tempfile.mkstemp(dir=data_dir, prefix=".ids.key.")  # mode 0600
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(_KEY_HEX // 2) + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.link(made, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(made)
    try:
        text = path.read_text("ascii").strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError("data_dir", f"{path} cannot be read: {error}") from None
    if len(text) != _KEY_HEX or not all(c in "0123456789abcdef" for c in text):
        raise SettingsError(
            "data_dir", f"{path} is not a key the collector made; move it away to make a new one"
        )
    if mode & 0o077:
        log.warning("%s can be read by other users; chmod 600 it", path)
    return Secret(text)


# What each derived id is for, which its MAC takes in first: ids of one purpose never
# equal those of another, even of the same text.
_PURPOSES = ("server", "scope", "message", "identify")


@functools.lru_cache(maxsize=4)
def _keyed_states(key: str) -> dict[str, hashlib.blake2b]:
    """For each purpose, BLAKE2b keyed with `key` that has taken in `purpose` and a NUL (there
    is one key a process; cached by its text, whose hash Python keeps, not by the Secret).

    Keyed BLAKE2b: under half HMAC-SHA256's cost, and nobody without the key can compute a
    MAC (and so send its id first). A copy of such a state skips hashing the key's block and
    the purpose again for every id: a MAC is then one block of BLAKE2b."""
    states = {}
    for purpose in _PURPOSES:
        state = hashlib.blake2b(key=key.encode(), digest_size=16)
        state.update(f"{purpose}\0".encode())
        states[purpose] = state
    return states


def _mac_hex(state: hashlib.blake2b, text: str) -> str:
    """The hex of a 16-byte MAC of `text` from one of `_keyed_states`."""
    mac = state.copy()
    mac.update(text.encode())
    return mac.hexdigest()


# The variant digit of a UUID for each hex digit it replaces (its top two bits become 10).
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _as_uuid4(hex_: str) -> str:
    """16 bytes' hex as the text of a UUIDv4: the version and variant set by hand (uuid.UUID
    costs more than the MAC itself, a bytearray and its bit arithmetic a quarter more)."""
    return f"{hex_[:8]}-{hex_[8:12]}-4{hex_[13:16]}-{_VARIANT[hex_[16]]}{hex_[17:20]}-{hex_[20:]}"


def stamp_ids(
    record: Record,
    *,
    server: bool,
    key: Secret,
    prefix: str,
    scopes: dict[str, str] | None = None,
) -> None:
    """Give a new record the ids Outbound and the queue will know it by (`scopes`: the scope
    digests of the visitors met so far in one request, which a batch's events share).

    - An anonymous id goes into its own namespace (`prefix`), so that it can never be read
      as a user's id, in an alias's previous_id neither.
    - A browser's message id is deduplicated within its visitor's scope only (the verified
      user, else the anonymous id): `dedupe_key` is the id and a keyed digest of the scope.
      A server token's ids are one scope, the message id itself, which no browser key equals.
    - GUIDs: a browser's message id as it is when a header carries it exactly, else one
      derived with the key; a server token's always derived, so that no browser can send it
      first. The identify before a first track gets one derived from it when the relay
      makes that identify (`identify_guid`).
    """
    anonymous = record.get("anonymous_id")
    if anonymous is not None:
        record["anonymous_id"] = prefix + anonymous
        record["anonymous_prefix"] = prefix
    message_id: str = record["message_id"]
    states = _keyed_states(key.reveal())
    if server:
        guid = _as_uuid4(_mac_hex(states["server"], message_id))
    else:
        user = record.get("user_id")
        visitor = f"user\0{user}" if user is not None else f"anonymous\0{anonymous}"
        scope = scopes.get(visitor) if scopes is not None else None
        if scope is None:
            scope = _mac_hex(states["scope"], visitor)
            if scopes is not None:
                scopes[visitor] = scope
        record["dedupe_key"] = f"{message_id}#{scope}"
        if guid_safe(message_id):
            guid = message_id
        else:
            guid = _as_uuid4(_mac_hex(states["message"], message_id))
    if guid != message_id:
        record["guid"] = guid


def identify_guid(record: Record, key: Secret) -> str:
    """Derive the GUID of the identify sent before a stamped record's first track."""
    # Derived from the record's GUID, as stamp_ids derived it when records carried it: the
    # relay makes it for a user's first track only, about once a user, not ingest for each.
    guid = record.get("guid") or record["message_id"]
    return _as_uuid4(_mac_hex(_keyed_states(key.reveal())["identify"], guid))


def rate_key(record: Record) -> str:
    """The per-user rate bucket of a record: users and anonymous ids never share one."""
    user = record.get("user_id")
    return f"user {user}" if user is not None else f"anonymous {record.get('anonymous_id')}"


def is_bot(user_agent: str | None, pattern: re.Pattern[str] | None) -> bool:
    return bool(pattern and user_agent and pattern.search(user_agent))


@functools.lru_cache(maxsize=4096)
def truncated_ip(address: str | None) -> str | None:
    """The network of an address, not the host: IPv4 /24, IPv6 /48."""
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)
