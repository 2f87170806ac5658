"""jsonschema-rs may answer "valid" before jsonschema: the two must never disagree on the
shipped schemas, over the whole test corpus and over generated events."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema_rs
import orjson
import pytest
from conftest import SEED_EVENT
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from test_fuzz import events, values
from test_ingest import HOSTILE

from collector.schema import fast_validator

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
        ({"properties": {"total": {"type": "string", "pattern": "^[0-9]+$"}}}, False),
        ({"properties": {"email": {"format": "email"}}}, False),
        ({"patternProperties": {"^x": {}}}, False),
    ],
)
def test_fast_path_only_for_schemas_without_library_dependent_keywords(
    schema: dict[str, Any], fast: bool
) -> None:
    assert (fast_validator(schema) is not None) is fast
