"""Validate: the envelope schema, then the event's own properties schema, as located problems."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import jsonschema_rs
import orjson
from jsonschema import Draft202012Validator, SchemaError, ValidationError
from referencing import Registry, Resource

# Each Outbound-shaped kind is checked by the packaged schema of its name; events by envelope.
OutboundKind = Literal[
    "outbound_track",
    "outbound_identify",
    "outbound_register",
    "outbound_disable",
    "outbound_subscription",
    "outbound_campaigns",
]
Kind = Literal["event", OutboundKind]
OUTBOUND_KINDS: tuple[OutboundKind, ...] = get_args(OutboundKind)
_PACKAGED = ("envelope", *OUTBOUND_KINDS)
_JSON_TYPES = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an event: where (a JSON Pointer) and what, in a sentence."""

    path: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class SchemaDirError(Exception):
    """A file in the schemas directory that cannot be used."""


def pointer(parts: Iterator[str | int] | tuple[str | int, ...] | list[str | int]) -> str:
    """RFC 6901 JSON Pointer for a path inside a document."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _type_of(value: object) -> str:
    if isinstance(value, bool):
        return "true or false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return "a whole number"
    for python_type, name in (
        (float, "a number"),
        (str, "a string"),
        (list, "an array"),
        (dict, "an object"),
    ):
        if isinstance(value, python_type):
            return name
    return type(value).__name__


def _quote(name: object) -> str:
    return f"`{name}`"


def describe(error: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[Problem]:
    """jsonschema's error as problems a person understands, each at the path it concerns."""
    where = (*prefix, *error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    instance: Any = error.instance
    expected: Any = error.validator_value
    custom = schema.get("x-message")
    if error.validator == "required" and isinstance(instance, dict):
        return [
            Problem(pointer((*where, name)), f"{_quote(name)} is required")
            for name in expected
            if name not in instance
        ]
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = set(schema.get("properties", {}))
        return [
            Problem(pointer((*where, name)), f"{_quote(name)} is not a known field")
            for name in instance
            if name not in known
        ]
    if error.validator == "anyOf" and all(
        isinstance(option, dict) and set(option) == {"required"} for option in expected
    ):
        names = " or ".join(_quote(name) for option in expected for name in option["required"])
        return [Problem(pointer(where), f"needs {names}")]
    if isinstance(custom, str):
        return [Problem(pointer(where), custom)]
    message = error.message
    if error.validator == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        wanted = " or ".join(_JSON_TYPES.get(t, t) for t in types)
        message = f"must be {wanted}, not {_type_of(instance)}"
    elif error.validator == "minLength":
        message = (
            "must not be empty" if expected == 1 else f"must be at least {expected} characters"
        )
    elif error.validator == "maxLength":
        message = f"must be at most {expected} characters long"
    elif error.validator in {"enum", "const"}:
        options = expected if error.validator == "enum" else [expected]
        message = "must be one of " + ", ".join(json.dumps(option) for option in options)
    elif error.validator in {"minimum", "maximum"}:
        word = "least" if error.validator == "minimum" else "most"
        message = f"must be at {word} {expected}"
    return [Problem(pointer(where), message)]


def _deduplicated(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


@dataclass(frozen=True, slots=True)
class Shape:
    """Limits on what a client may nest inside properties and traits."""

    depth: int = 10
    keys: int = 1000
    string: int = 8192


def shape_problem(value: object, shape: Shape, path: tuple[str | int, ...]) -> Problem | None:
    """The first place where `value` nests too deep, holds too many keys or too long a string."""
    stack: list[tuple[object, tuple[str | int, ...], int]] = [(value, path, 0)]
    keys = 0
    while stack:
        current, where, depth = stack.pop()
        if isinstance(current, str):
            if len(current) > shape.string:
                return Problem(pointer(where), f"is longer than {shape.string} characters")
            continue
        children: list[tuple[str | int, object]]
        if isinstance(current, dict):
            children = list(current.items())
        elif isinstance(current, list):
            children = list(enumerate(current))
        else:
            continue
        if depth >= shape.depth:
            return Problem(pointer(where), f"is nested deeper than {shape.depth} levels")
        keys += len(children)
        if keys > shape.keys:
            return Problem(pointer(path), f"holds more than {shape.keys} keys and items in all")
        stack.extend((child, (*where, key), depth + 1) for key, child in children)
    return None


def plainly_within(encoded: bytes, shape: Shape) -> bool:
    """Whether a document's JSON is too short to break any limit: the common case, decided
    without a walk. No string is longer than the JSON, each key or item takes at least two
    bytes of it, and nesting takes a bracket a level."""
    size = len(encoded)
    return (
        size <= shape.string
        and size <= 2 * shape.keys
        and encoded.count(b"{") + encoded.count(b"[") <= shape.depth
    )


def _packaged_schema(name: str) -> dict[str, Any]:
    text = resources.files("collector").joinpath("schemas", f"{name}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


# Keywords whose meaning leans on a format library or where a pattern decides which
# schema applies: for schemas with these, only jsonschema decides.
_LIBRARY_DEPENDENT = frozenset({"patternProperties", "format"})
# Keywords under which a failing part can make the whole pass (or fail the other way):
# with them, a pattern read more strictly by jsonschema-rs could turn "invalid" into "valid".
_NON_MONOTONE = frozenset({"not", "oneOf", "if", "contains"})
# Outside a character class: escapes that mean the character itself in both dialects.
_LITERAL_ESCAPES = frozenset("\\^$.|?*+()[]{}/-")
_CONTROL_ESCAPES = frozenset("tnrfv")
_QUANTIFIER = re.compile(r"(?:[*+?]|\{[0-9]+(?:,[0-9]*)?\})\??")
_UNICODE_ESCAPE = re.compile(r"u[0-9A-Fa-f]{4}")


def portable_pattern(pattern: str) -> bool:
    """Whether jsonschema-rs (ECMA-262) accepts no string that Python's `re.search` rejects.

    True for a plain subset: literals, escaped punctuation, `.`, `\\d`, `\\w`, classes of
    literals and ranges, groups, alternation, quantifiers, `^` and `$`. In it the two
    dialects agree, except that ECMA's `\\d`, `\\w`, `.` and `$` match less than Python's
    (ASCII digits and word characters; no `\\r` or line separators; only the very end),
    which only ever makes jsonschema-rs say "invalid" first, and jsonschema then decides.
    """
    at, end = 0, len(pattern)
    atom = False  # whether a quantifier may follow
    while at < end:
        char = pattern[at]
        if char == "\\":
            size = _escape_size(pattern, at + 1, negated=False)
            if not size:
                return False
            at, atom = at + 1 + size, True
        elif char == "[":
            size = _class_size(pattern, at)
            if not size:
                return False
            at, atom = at + size, True
        elif char == "(":
            if pattern.startswith("(?", at) and not pattern.startswith("(?:", at):
                return False  # lookarounds, named groups, flags
            at, atom = at + (3 if pattern.startswith("(?:", at) else 1), False
        elif char in "*+?{":
            match = _QUANTIFIER.match(pattern, at)
            if not atom or match is None:
                return False
            at, atom = match.end(), False
            if at < end and pattern[at] in "*+?{":
                return False  # possessive or stacked quantifiers
        elif char in "|^$":
            at, atom = at + 1, False
        elif char == ")":
            at, atom = at + 1, True
        elif char in "]}":
            return False  # a lone bracket: a literal in one dialect, an error in the other
        else:  # a literal character, or "." (any but a newline; ECMA also excludes \r)
            at, atom = at + 1, True
    return True


def _escape_size(pattern: str, at: int, *, negated: bool) -> int:
    """The length of the escape whose backslash ends just before `at`; 0: not portable."""
    if at >= len(pattern):
        return 0
    char = pattern[at]
    if char in _LITERAL_ESCAPES or char in _CONTROL_ESCAPES:
        return 1
    if char in "dw":
        return 0 if negated else 1  # ECMA's ASCII classes are a subset of Python's
    if _UNICODE_ESCAPE.match(pattern, at):
        return 5
    return 0


def _class_size(pattern: str, start: int) -> int:
    """The length of the character class at `start`; 0: not portable."""
    at = start + 1
    negated = pattern.startswith("^", at)
    at += negated
    first = at
    previous_single = False  # whether the last item was one character (a range may start)
    while at < len(pattern):
        char = pattern[at]
        if char == "]":
            return 0 if at == first else at + 1 - start  # "[]" differs between dialects
        if char in "[&~":
            return 0  # nested sets and set operations in one dialect, literals in the other
        if char == "-":
            if at == first or pattern.startswith("]", at + 1):
                at, previous_single = at + 1, True  # a literal "-" at either edge
                continue
            if not previous_single or at + 1 >= len(pattern) or pattern[at + 1] in "\\[-":
                return 0  # a range must join two plain characters
            at, previous_single = at + 2, False
            continue
        if char == "\\":
            size = _escape_size(pattern, at + 1, negated=negated)
            if not size:
                return 0
            previous_single = pattern[at + 1] not in "dw"  # a set cannot start a range
            at += 1 + size
            continue
        at, previous_single = at + 1, True
    return 0


def _members(schema: object) -> Iterator[tuple[str, object]]:
    """Every key and value of every object inside a schema, at any depth."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            yield key, value
            yield from _members(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _members(item)


def _uses(schema: object, keywords: frozenset[str]) -> bool:
    return any(key in keywords for key, _ in _members(schema))


def fast_validator(schema: object) -> Callable[[object], bool] | None:
    """jsonschema-rs' yes/no for a user's schema, unless a "yes" could be wrong."""
    if not isinstance(schema, dict) or _uses(schema, _LIBRARY_DEPENDENT):
        return None
    patterns = [value for key, value in _members(schema) if key == "pattern"]
    if patterns and (
        _uses(schema, _NON_MONOTONE)
        or not all(isinstance(p, str) and portable_pattern(p) for p in patterns)
    ):
        return None
    try:
        validator: Callable[[object], bool] = jsonschema_rs.validator_for(schema).is_valid
    except Exception:  # a schema jsonschema accepts but jsonschema-rs does not: no fast path
        return None
    return validator


def load_schema_file(path: Path) -> tuple[str, Draft202012Validator]:
    """One event's schema file: the event it names (`x-event` or the stem) and its validator."""
    try:
        schema = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SchemaDirError(f"{path.name}: cannot be read as JSON ({error})") from None
    if not isinstance(schema, dict):
        raise SchemaDirError(f"{path.name}: a schema must be a JSON object")
    name = schema.get("x-event", path.stem)
    if not isinstance(name, str) or not name:
        raise SchemaDirError(f"{path.name}: x-event must be a non-empty string")
    if "x-server-only" in schema and not isinstance(schema["x-server-only"], bool):
        raise SchemaDirError(f"{path.name}: x-server-only must be true or false")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        where = pointer(tuple(error.absolute_path)) or "the top level"
        problem = f"{path.name}: not a valid schema at {where}: {error.message}"
        raise SchemaDirError(problem) from None
    return name, Draft202012Validator(schema)


def lint_schemas(directory: Path) -> tuple[dict[str, Draft202012Validator], list[str]]:
    """Every usable schema in a directory, and a sentence for each file that is not."""
    validators: dict[str, Draft202012Validator] = {}
    files: dict[str, str] = {}  # event name -> the file that defines it
    problems: list[str] = []
    for path in sorted(directory.glob("*.json")):
        try:
            name, validator = load_schema_file(path)
        except SchemaDirError as error:
            problems.append(str(error))
            continue
        if name in validators:
            problems.append(
                f"{path.name}: a second schema for the event {name!r}, which {files[name]} defines"
            )
            continue
        validators[name] = validator
        files[name] = path.name
    return validators, problems


def load_event_schemas(directory: Path | None) -> dict[str, Draft202012Validator]:
    """Per-event property validators: one *.json file per event, named by `x-event` or its stem.

    The first unusable file stops the load: a collector must not start half-configured.
    """
    if directory is None:
        return {}
    validators, problems = lint_schemas(directory)
    if problems:
        raise SchemaDirError(problems[0])
    return validators


def _undecided(instance: object) -> bool:
    return False  # no fast answer: jsonschema decides


class EventValidator:
    """Checks events against the packaged envelope and the configured per-event schemas."""

    def __init__(
        self,
        event_schemas: Mapping[str, Draft202012Validator],
        shape: Shape | None = None,
        *,
        fast: bool = True,
        page_event_name: str = "pageView",
    ) -> None:
        """`fast=False` leaves every decision to jsonschema (the bench measures both);
        `page_event_name`: the event pages become, whose schema checks them."""
        self.page_event_name = page_event_name
        packaged = {name: _packaged_schema(name) for name in _PACKAGED}
        registry: Registry[Any] = Registry().with_resources(
            (schema["$id"], Resource.from_contents(schema)) for schema in packaged.values()
        )
        names: dict[Kind, str] = {"event": "envelope", **{kind: kind for kind in OUTBOUND_KINDS}}
        self._envelopes: dict[Kind, Draft202012Validator] = {
            kind: Draft202012Validator(packaged[name], registry=registry)
            for kind, name in names.items()
        }
        # jsonschema-rs answers "valid?" in about a microsecond; jsonschema stays the
        # authority and writes every error, so it runs whenever the fast answer is "no".
        fast_registry = jsonschema_rs.Registry([(s["$id"], s) for s in packaged.values()])
        self._fast: dict[Kind, Callable[[object], bool]] = {
            kind: jsonschema_rs.validator_for(packaged[name], registry=fast_registry).is_valid
            if fast
            else _undecided
            for kind, name in names.items()
        }
        self._event_schemas = dict(event_schemas)
        self._fast_events = {
            name: fast_validator(validator.schema) if fast else None
            for name, validator in self._event_schemas.items()
        }
        self._shape = shape or Shape()
        self.server_only = frozenset(
            name
            for name, v in self._event_schemas.items()
            if isinstance(v.schema, dict) and v.schema.get("x-server-only") is True
        )

    def problems(
        self, event: object, kind: Kind = "event", encoded: bytes | None = None
    ) -> list[Problem]:
        """Every problem with one event; an empty list means it is valid. `encoded`: the
        event as JSON, when the caller has it already."""
        if not isinstance(event, dict):
            return [Problem("", f"an event must be a JSON object, not {_type_of(event)}")]
        found: list[Problem] = []
        if not self._fast[kind](event):
            for error in self._envelopes[kind].iter_errors(event):
                found.extend(describe(error))
        if not plainly_within(orjson.dumps(event) if encoded is None else encoded, self._shape):
            for key in ("properties", "traits", "attributes", "group_attributes", "user"):
                problem = shape_problem(event.get(key), self._shape, (key,))
                if problem is not None:
                    found.append(problem)
        if not found:
            found = fractional_ids(event, kind)
        # The event's own schema as well, so that one answer names every problem: unless the
        # properties themselves were found wrong (not an object, too deep or too wide).
        if not found or not any(
            p.path == "/properties" or p.path.startswith("/properties/") for p in found
        ):
            name = self.outbound_name(event)
            properties = event.get("properties", {})
            validator = self._event_schemas.get(name) if isinstance(name, str) else None
            fast = self._fast_events.get(name) if isinstance(name, str) else None
            if validator is not None and not (fast and fast(properties)):
                for error in validator.iter_errors(properties):
                    found.extend(describe(error, ("properties",)))
        return _deduplicated(found) if found else found

    def outbound_name(self, event: dict[str, Any]) -> str | None:
        """The name of the Outbound event this becomes: a track's own, `page_event_name` for
        a page; None for an identify, which is no named event."""
        kind = event.get("type", "track")
        if kind == "page":
            return self.page_event_name
        name = event.get("event")
        return name if kind == "track" and isinstance(name, str) else None

    def registry_problems(
        self, event: dict[str, Any], *, server: bool, unknown: str
    ) -> list[Problem]:
        """Whether this sender may send the Outbound event this becomes (tracks and pages)."""
        rejects_unknown = unknown == "reject" and bool(self._event_schemas)
        if (server or not self.server_only) and not rejects_unknown:
            return []  # no name would be refused: the name is not worth looking up
        name = self.outbound_name(event)
        if name is None:
            return []
        if name in self.server_only and not server:
            why = "may only be sent with a server token"
        elif rejects_unknown and name not in self._event_schemas:
            why = "is not a known event (no schema in schemas_dir)"
        else:
            return []
        if "event" not in event:
            return [Problem("/type", f"{name!r} (a page view) {why}")]
        return [Problem("/event", f"{name!r} {why}")]


# Ids Outbound stores as text: 42 becomes "42", but 42.0 would become "42.0", another id.
# Each as the key of the body and the key inside that value, if it is nested.
_ID_FIELDS: dict[Kind, tuple[tuple[str, str | None], ...]] = {
    "event": (("user_id", None), ("traits", "group_id")),
    "outbound_track": (("user_id", None), ("user", "group_id")),
    "outbound_identify": (("user_id", None), ("previous_id", None), ("group_id", None)),
    "outbound_register": (("user_id", None),),
    "outbound_disable": (("user_id", None),),
    "outbound_subscription": (("user_id", None),),
    "outbound_campaigns": (("user_id", None),),
}


def fractional_ids(event: dict[str, Any], kind: Kind) -> list[Problem]:
    """A problem for each id sent as a number with a fraction or an exponent (JSON Schema's
    "integer" takes 42.0): refused rather than sent on as "42.0"."""
    problems = []
    for key, inner in _ID_FIELDS[kind]:
        value = event.get(key)
        if inner is not None:
            value = value.get(inner) if isinstance(value, dict) else None
        if isinstance(value, float):
            problems.append(
                Problem(
                    pointer((key,) if inner is None else (key, inner)),
                    f"must be a string or a whole number written without a fraction or an "
                    f"exponent, not {value!r} (Outbound would store it as {str(value)!r})",
                )
            )
    return problems
