"""schemas/ is generated from the Structs; it must never go stale."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import sample_bytes

from bridge.ops.schema import build_schemas, render
from bridge.vod.event_types import EVENT_TYPES

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_committed_schemas_match_the_structs() -> None:
    generated = build_schemas()
    assert sorted(p.name for p in SCHEMAS.glob("*.json")) == sorted(generated)
    for name, document in generated.items():
        assert (SCHEMAS / name).read_bytes() == render(document), f"{name} is stale: run `make schemas`"


def test_value_schema_covers_every_seed_field_and_type() -> None:
    schema = build_schemas()["vod-event.value.schema.json"]
    defs = schema["$defs"]
    seed = json.loads(sample_bytes())["PullCompleteEvent"]
    assert set(seed) <= set(defs["PullCompleteEvent"]["properties"])
    assert set(seed["MediaBasicInfo"]) <= set(defs["MediaBasicInfo"]["properties"])
    assert len(schema["anyOf"]) == len(EVENT_TYPES) + 2  # one per modelled type, legacy v2.0, pass-through
    # Unknown fields are allowed everywhere: VOD adds fields and the value carries them.
    assert all(d.get("additionalProperties", True) is not False for d in defs.values())


def test_headers_schema_names_the_contract_headers() -> None:
    headers = build_schemas()["vod-event.headers.schema.json"]
    assert set(headers["required"]) == {"event-type", "source", "received-at", "content-type", "event-format"}
    assert "event-handle" in headers["properties"]


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_asyncapi_document_references_resolve() -> None:
    doc = json.loads((SCHEMAS / "asyncapi.json").read_text())
    assert doc["asyncapi"] == "3.0.0"
    assert doc["channels"]["vodEvents"]["address"] == "vod.events"
    refs = _refs(doc)
    assert refs
    for ref in refs:
        if ref.startswith("#/"):
            node = doc
            for part in ref[2:].split("/"):
                node = node[part]
        else:
            assert (SCHEMAS / ref).is_file(), ref
    key = doc["components"]["messages"]["vodEvent"]["bindings"]["kafka"]["key"]
    assert "TaskId" in key["description"]
