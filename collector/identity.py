"""Identity: who may speak for a user (HMAC user hashes, server tokens), bots, IP privacy."""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable
from typing import Any, Literal

from .config import Secret
from .schema import Problem

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
