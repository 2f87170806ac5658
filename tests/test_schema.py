"""Validation: the packaged envelope, per-event schemas from a directory, readable problems."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from conftest import SEED_EVENT
from hypothesis import example, given, settings
from hypothesis import strategies as st

from collector.schema import (
    EventValidator,
    Problem,
    SchemaDirError,
    Shape,
    load_event_schemas,
    plainly_within,
    pointer,
    shape_problem,
)

RENEW_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "total": {"type": "string", "pattern": "^[0-9]+\\.[0-9]{2}$"},
        "membership": {
            "type": "object",
            "properties": {"valid": {"type": "boolean"}},
            "required": ["valid"],
        },
    },
    "required": ["total"],
}


@pytest.fixture
def schemas_dir(tmp_path: Path) -> Path:
    (tmp_path / "renewMembership.json").write_text(json.dumps(RENEW_SCHEMA))
    named = {**RENEW_SCHEMA, "x-event": "Signed up / trial", "required": []}
    (tmp_path / "signed-up.json").write_text(json.dumps(named))
    (tmp_path / "README.txt").write_text("not a schema")
    return tmp_path


def test_seed_example_is_valid_without_schemas() -> None:
    assert EventValidator({}).problems(SEED_EVENT) == []


def test_event_schemas_are_named_by_file_or_x_event(schemas_dir: Path) -> None:
    validators = load_event_schemas(schemas_dir)
    assert set(validators) == {"renewMembership", "Signed up / trial"}


def test_properties_checked_against_the_events_schema(schemas_dir: Path) -> None:
    validator = EventValidator(load_event_schemas(schemas_dir))
    good = {**SEED_EVENT, "properties": {"total": "45.00", "membership": {"valid": True}}}
    assert validator.problems(good) == []
    bad = {**SEED_EVENT, "properties": {"total": 45, "membership": {}}}
    assert validator.problems(bad) == [
        Problem("/properties/total", "must be a string, not a whole number"),
        Problem("/properties/membership/valid", "`valid` is required"),
    ]
    missing = {**SEED_EVENT, "properties": {}}
    assert validator.problems(missing) == [Problem("/properties/total", "`total` is required")]
    # No properties at all are checked as an empty object.
    bare = {"event": "renewMembership", "user_id": "u1"}
    assert validator.problems(bare) == [Problem("/properties/total", "`total` is required")]
    # Events without a schema are not checked beyond the envelope.
    assert validator.problems({**SEED_EVENT, "event": "other", "properties": {"total": 1}}) == []


def test_pattern_errors_keep_jsonschemas_sentence(schemas_dir: Path) -> None:
    validator = EventValidator(load_event_schemas(schemas_dir))
    [problem] = validator.problems({**SEED_EVENT, "properties": {"total": "45"}})
    assert problem.path == "/properties/total"
    assert "does not match" in problem.message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot be read as JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"type": "strnig"}', "not a valid schema at /type"),
        ('{"x-event": ""}', "x-event must be a non-empty string"),
    ],
)
def test_broken_schema_files_are_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "broken.json").write_text(content)
    with pytest.raises(SchemaDirError, match=message) as raised:
        load_event_schemas(tmp_path)
    assert str(raised.value).startswith("broken.json: ")


def test_two_schemas_for_one_event(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"x-event": "b"}')
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(SchemaDirError) as raised:
        load_event_schemas(tmp_path)
    # Both files are named, so that the user knows which two to reconcile.
    assert str(raised.value) == "b.json: a second schema for the event 'b', which a.json defines"


@pytest.mark.parametrize(
    ("parts", "expected"),
    [((), ""), (("properties", "total"), "/properties/total"), (("a/b", "c~d", 0), "/a~1b/c~0d/0")],
)
def test_pointer(parts: tuple[str | int, ...], expected: str) -> None:
    assert pointer(parts) == expected


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"type": "identify", "user_id": "u1", "traits": {"email": "a@b.c"}}, []),
        ({"type": "page", "anonymous_id": "a1"}, []),
        ({"type": "page"}, [Problem("", "needs `user_id` or `anonymous_id`")]),
        ({"event": "x", "user_id": 12}, []),
        (
            {"event": "x", "user_id": True},
            [
                Problem(
                    "/user_id",
                    "must be a non-empty string (or a whole number) of at most 256 characters",
                )
            ],
        ),
        ({"event": "x", "anonymous_id": "a", "traits": {"a": {"b": {"c": 1}}}}, []),
        (
            {"event": "x", "anonymous_id": "a", "extra": 1, "more": 2},
            [
                Problem("/extra", "`extra` is not a known field"),
                Problem("/more", "`more` is not a known field"),
            ],
        ),
        (
            {"event": "x", "anonymous_id": "a", "type": "screen"},
            [Problem("/type", 'must be one of "track", "identify", "page"')],
        ),
        (
            {"event": "x" * 300, "anonymous_id": "a"},
            [Problem("/event", "must be at most 256 characters long")],
        ),
    ],
)
def test_envelope_cases(event: dict[str, object], expected: list[Problem]) -> None:
    assert EventValidator({}).problems(event) == expected


def test_depth_limit_applies_to_traits_too() -> None:
    deep: dict[str, object] = {"x": 1}
    for _ in range(3):
        deep = {"k": deep}
    validator = EventValidator({}, Shape(depth=3))
    [problem] = validator.problems({"type": "identify", "user_id": "u", "traits": deep})
    assert problem == Problem("/traits/k/k/k", "is nested deeper than 3 levels")
    assert (
        EventValidator({}, Shape(depth=4)).problems(
            {"type": "identify", "user_id": "u", "traits": deep}
        )
        == []
    )


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=40,
)


@settings(max_examples=1000, deadline=None)
@given(JSON_VALUES, st.integers(1, 6), st.integers(1, 30), st.integers(0, 40))
@example([0, 0, 0, 0], 6, 3, 40)  # each bound at its tightest: one key too many
@example([[[]]], 2, 30, 40)  # one level too deep
@example(["abcd"], 6, 30, 3)  # one character too long
def test_a_document_plainly_within_the_limits_breaks_none(
    value: object, depth: int, keys: int, string: int
) -> None:
    """The shortcut that skips the walk for short documents never skips a real problem."""
    shape = Shape(depth, keys, string)
    if plainly_within(orjson.dumps(value), shape):
        assert shape_problem(value, shape, ()) is None
