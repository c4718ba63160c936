"""schemas/ is generated from the Structs; it must never go stale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import sample_bytes

from bridge.cli import main
from bridge.ops.schema import SCHEMA_NAMES, VALUE_SCHEMA_FILE, build_schemas, render
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


def test_schema_command_prints_one_json_document_the_value_schema_by_default(capsys) -> None:
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["$id"] == VALUE_SCHEMA_FILE
    assert out.encode() == render(build_schemas()[VALUE_SCHEMA_FILE])


def test_schema_list_names_one_per_line_and_each_name_prints_its_file(capsys) -> None:
    assert main(["schema", "--list"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert names == ["value", "headers", "keys", "asyncapi"]
    for name in names:
        assert main(["schema", name]) == 0
        assert capsys.readouterr().out.encode() == (SCHEMAS / SCHEMA_NAMES[name]).read_bytes()


def test_unknown_schema_name_exits_2_with_one_line_naming_the_available_ones(capsys) -> None:
    assert main(["schema", "values"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "vod-bridge: schema: unknown schema 'values'; available: value, headers, keys, asyncapi\n"


@pytest.mark.parametrize("argv", [["schema", "value", "--list"], ["schema", "value", "--write", "out"]])
def test_a_name_with_list_or_write_is_refused(argv: list[str], capsys) -> None:
    assert main(argv) == 2
    assert "not several" in capsys.readouterr().err


def test_schema_write_reproduces_the_committed_directory(tmp_path: Path, capsys) -> None:
    assert main(["schema", "--write", str(tmp_path / "out")]) == 0
    written = sorted(Path(line) for line in capsys.readouterr().out.splitlines())
    assert [p.name for p in written] == sorted(p.name for p in SCHEMAS.glob("*.json"))
    for path in written:
        assert path.read_bytes() == (SCHEMAS / path.name).read_bytes()


def test_the_sub_app_id_header_pattern_is_the_one_callbacks_and_settings_take() -> None:
    """The documented ``vod-sub-app-id`` pattern admits exactly the SubAppIds a callback path or a setting can carry."""
    import re

    from bridge.config import SUB_APP_ID_PATTERN

    schema = build_schemas()["vod-event.headers.schema.json"]
    (pattern,) = {match for match in re.findall(r'"pattern":\s*"([^"]+)"', json.dumps(schema)) if "1-9" in match}
    assert pattern == f"^{SUB_APP_ID_PATTERN}$"
    assert re.match(pattern, "1" * 18) and not re.match(pattern, "1" * 19) and not re.match(pattern, "0123")
