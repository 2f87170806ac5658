"""jsonschema-rs may answer "valid" before jsonschema: the two must never disagree on the
shipped schemas, over the whole test corpus and over generated events."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

import jsonschema_rs
import orjson
import pytest
from conftest import SEED_EVENT
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, SchemaError
from referencing import Registry, Resource
from test_fuzz import events, values
from test_ingest import HOSTILE
from test_schema import RENEW_SCHEMA

from collector.schema import EventValidator, Kind, fast_validator, portable_pattern

NAMES = ("envelope", "outbound_track", "outbound_identify")
SCHEMAS = {
    name: json.loads(resources.files("collector").joinpath("schemas", f"{name}.json").read_text())
    for name in NAMES
}
REGISTRY: Registry[Any] = Registry().with_resources(
    (s["$id"], Resource.from_contents(s)) for s in SCHEMAS.values()
)
FAST_REGISTRY = jsonschema_rs.Registry([(s["$id"], s) for s in SCHEMAS.values()])
PAIRS = {
    name: (
        Draft202012Validator(schema, registry=REGISTRY).is_valid,
        jsonschema_rs.validator_for(schema, registry=FAST_REGISTRY).is_valid,
    )
    for name, schema in SCHEMAS.items()
}


def corpus() -> list[object]:
    """Every JSON body the other tests send, and each event inside a batch."""
    documents: list[object] = [SEED_EVENT, {"user_id": 42, "email": "a@b.c"}]
    for case in HOSTILE:
        try:
            documents.append(orjson.loads(case.data))
        except orjson.JSONDecodeError:
            continue
    found = []
    for document in documents:
        found.append(document)
        if isinstance(document, dict) and isinstance(document.get("batch"), list):
            found.extend(document["batch"])
    return found


def agree(instance: object) -> None:
    for name, (python, rust) in PAIRS.items():
        assert python(instance) == rust(instance), (name, instance)


@pytest.mark.parametrize("instance", corpus())
def test_corpus(instance: object) -> None:
    agree(instance)


@settings(max_examples=500, deadline=None)
@given(st.one_of(events, values, st.fixed_dictionaries({"user_id": values, "event": values})))
def test_generated(instance: object) -> None:
    agree(instance)


@pytest.mark.parametrize(
    ("schema", "fast"),
    [
        ({"type": "object", "properties": {"plan": {"enum": ["gold"]}}}, True),
        ({"properties": {"total": {"type": "string", "pattern": "^[0-9]+$"}}}, True),
        ({"properties": {"total": {"pattern": "^\\d+(?:\\.\\d{2})?$"}}}, True),
        ({"properties": {"code": {"pattern": "^\\s+$"}}}, False),  # ECMA's \s is wider
        ({"properties": {"code": {"pattern": "^(?=x)"}}}, False),  # lookahead
        ({"not": {"properties": {"total": {"pattern": "^[0-9]+$"}}}}, False),
        ({"oneOf": [{"pattern": "^a"}, {"pattern": "b$"}]}, False),
        ({"if": {"pattern": "^a"}, "then": {"minLength": 2}}, False),
        ({"not": {"required": ["x"]}}, True),  # negation without a pattern is exact
        ({"properties": {"email": {"format": "email"}}}, False),
        ({"patternProperties": {"^x": {}}}, False),
    ],
)
def test_fast_path_only_where_a_fast_yes_cannot_be_wrong(
    schema: dict[str, Any], fast: bool
) -> None:
    assert (fast_validator(schema) is not None) is fast


@pytest.mark.parametrize(
    ("pattern", "portable"),
    [
        ("^[0-9]+\\.[0-9]{2}$", True),
        ("^[A-Z]{2}-\\d{3,}$", True),
        ("^(?:gold|silver|bronze)$", True),
        ("[\\w.+-]+@[\\w-]+\\.[a-z]{2,}", True),
        ("^caf\\u00e9 .*?$", True),
        ("[-a][a-]", True),
        ("\\s", False),
        ("\\S", False),
        ("\\D", False),
        ("\\bword", False),
        ("[^\\d]", False),
        ("[]a]", False),
        ("[a-z&&[^aeiou]]", False),
        ("[a-\\d]", False),
        ("a{", False),
        ("a{,3}", False),
        ("x*+", False),
        ("(?i)abc", False),
        ("(?P<name>a)", False),
        ("(a)\\1", False),
        ("a]", False),
    ],
)
def test_portable_patterns(pattern: str, portable: bool) -> None:
    assert portable_pattern(pattern) is portable


# Pieces of patterns, portable or not, and characters on which the dialects differ.
PATTERN_PIECES = st.sampled_from(
    [
        "a", "b", "é", "0", "9", " ", "-", ".", "\\.", "\\d", "\\w", "\\s", "\\D", "\\n",
        "\\u00e9", "[a-c]", "[^a]", "[^\\n]", "[\\d.]", "[0-9]", "(", ")", "(?:", "|",
        "*", "+", "?", "{2}", "{1,3}", "*?", "^", "$",
    ]
)  # fmt: skip
TRICKY_TEXT = st.text(
    alphabet=st.sampled_from(list("ab09é٣_- .\n\r\t\u2028\ufeff\x0b")), max_size=8
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(PATTERN_PIECES, min_size=1, max_size=8).map("".join), st.data())
def test_a_portable_pattern_never_passes_in_jsonschema_rs_alone(
    pattern: str, data: st.DataObject
) -> None:
    """Where the fast path is taken, jsonschema-rs' "valid" implies jsonschema's."""
    schema = {"type": "object", "properties": {"p": {"type": "string", "pattern": pattern}}}
    try:
        python = Draft202012Validator(schema).is_valid
        re.compile(pattern)
    except (re.error, SchemaError):
        return
    fast = fast_validator(schema)
    if fast is None:
        assert not portable_pattern(pattern) or not _compiles_in_rust(schema)
        return
    for text in data.draw(st.lists(TRICKY_TEXT, min_size=1, max_size=10)):
        instance = {"p": text}
        if fast(instance):
            assert python(instance), (pattern, text)


def _compiles_in_rust(schema: dict[str, Any]) -> bool:
    try:
        jsonschema_rs.validator_for(schema)
    except Exception:
        return False
    return True


WITH_FAST_PATH = EventValidator({"renewMembership": Draft202012Validator(RENEW_SCHEMA)})
AUTHORITY_ONLY = EventValidator({"renewMembership": Draft202012Validator(RENEW_SCHEMA)}, fast=False)
KINDS: tuple[Kind, ...] = ("event", "outbound_track", "outbound_identify")


def same_answers(instance: object) -> None:
    for kind in KINDS:
        with_fast_path = WITH_FAST_PATH.problems(instance, kind)
        assert with_fast_path == AUTHORITY_ONLY.problems(instance, kind), (kind, instance)


@pytest.mark.parametrize("instance", corpus())
def test_the_fast_path_changes_no_answer_on_the_corpus(instance: object) -> None:
    same_answers(instance)


MEMBERSHIP_EVENTS = st.fixed_dictionaries(
    {"event": st.just("renewMembership")},
    optional={
        "properties": st.fixed_dictionaries(
            {},
            optional={
                "total": st.one_of(TRICKY_TEXT, st.sampled_from(["45.00", "45.0", "٣.00"])),
                "membership": st.one_of(values, st.fixed_dictionaries({"valid": values})),
            },
        ),
        "anonymous_id": st.sampled_from(["a-1", "", None]),
        "user_id": values,
    },
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(events, values, MEMBERSHIP_EVENTS))
def test_the_fast_path_changes_no_answer_on_generated_events(instance: object) -> None:
    """The collector's whole verdict, errors included, with and without jsonschema-rs."""
    try:  # only what a body can hold: orjson decodes no integer beyond 64 bits
        orjson.dumps(instance)
    except TypeError:
        assume(False)
    same_answers(instance)
