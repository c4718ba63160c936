"""The tolerant reader: every body shape in Tencent's own documentation is published or dead-lettered, never
refused. The corpus in ``bodies/`` (one file per shape, outcomes in ``bodies/expected.json``) is also replayed
against a real broker through the HTTP receiver and the poller, so the manifest must stay exact."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest
from conftest import sample_bytes, sample_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import InvalidPayload
from bridge.vod.decode import content_key, decode_event, read_event
from bridge.vod.event_types import (
    EVENT_TYPES,
    LEGACY_KEY_FIELDS,
    MAX_EVENT_TYPE_LEN,
    MAX_KEY_LEN,
    TRANSPORT_FIELDS,
    UNKNOWN_EVENT_TYPE,
)
from bridge.vod.model import (
    FALLBACK_REASONS,
    UNDECODABLE_REASONS,
    Fallback,
    FileUploadEvent,
    PullCompleteEvent,
    TaskEvent,
    Undecodable,
    UndecodableReason,
    VodEvent,
)

BODIES = Path(__file__).resolve().parent / "bodies"
EXPECTED: dict[str, dict[str, Any]] = json.loads((BODIES / "expected.json").read_text())


def body_of(name: str) -> bytes:
    return (BODIES / name).read_bytes()


def outcome_of(result: VodEvent | Undecodable) -> dict[str, Any]:
    """The manifest entry a result corresponds to."""
    if isinstance(result, VodEvent):
        return {
            "outcome": "event",
            "event_type": result.event_type,
            "key": result.key,
            "format": result.format,
            "fallbacks": list(result.fallbacks),
        }
    return {"outcome": "dead-letter", "event_type": result.event_type, "reason": result.reason}


def without_transport(body: bytes) -> dict[str, Any]:
    return {name: value for name, value in json.loads(body).items() if name not in TRANSPORT_FIELDS}


# ---- the corpus ---------------------------------------------------------------------------------------------


def test_the_manifest_lists_exactly_the_corpus() -> None:
    assert sorted(EXPECTED) == sorted(path.name for path in BODIES.glob("*.json") if path.name != "expected.json")


def test_the_manifest_uses_only_the_documented_labels() -> None:
    for name, expected in EXPECTED.items():
        if expected["outcome"] == "event":
            assert set(expected["fallbacks"]) <= FALLBACK_REASONS, name
            assert expected["format"] in ("eventcontent", "legacy-v2"), name
        else:
            assert expected["outcome"] == "dead-letter", name
            assert expected["reason"] in UNDECODABLE_REASONS, name


def test_the_corpus_covers_every_label_and_reason() -> None:
    seen_fallbacks = {label for e in EXPECTED.values() if e["outcome"] == "event" for label in e["fallbacks"]}
    seen_reasons = {e["reason"] for e in EXPECTED.values() if e["outcome"] == "dead-letter"}
    # Transport fields of the wrong type are not in the corpus: a replay through the receiver would meet them
    # at the signature check, not at the reader. They are tested below.
    assert seen_fallbacks == FALLBACK_REASONS - {"transport_field_unreadable"}
    assert seen_reasons == UNDECODABLE_REASONS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_body_reads_as_the_manifest_says(name: str) -> None:
    body = body_of(name)
    result = read_event(body)
    assert outcome_of(result) == EXPECTED[name]
    if isinstance(result, VodEvent) and result.format == "legacy-v2":
        assert result.value == body
    else:
        assert json.loads(result.value) == without_transport(body)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_decode_event_is_the_strict_form_over_the_corpus(name: str) -> None:
    body, expected = body_of(name), EXPECTED[name]
    if expected["outcome"] == "event":
        assert decode_event(body) == read_event(body)
    else:
        with pytest.raises(InvalidPayload) as info:
            decode_event(body)
        assert info.value.reason == expected["reason"]


def test_the_corpus_holds_the_shapes_it_claims() -> None:
    """The sizes, depths and texts named by the files are really in them."""
    assert 7_500 <= len(body_of("large-8kb.json")) <= 8_500

    def depth(value: Any) -> int:
        if isinstance(value, dict):
            return 1 + max(map(depth, value.values()), default=0)
        if isinstance(value, list):
            return 1 + max(map(depth, value), default=0)
        return 0

    assert depth(json.loads(body_of("nested-12-levels.json"))) == 12
    cjk = body_of("cjk-text.json").decode()
    assert "动物世界" in cjk and "日本語" in cjk and "한국어" in cjk, "CJK as raw UTF-8, not \\u escapes"
    nulls = [v for v in json.loads(body_of("explicit-null-payload-fields.json")).values() if v is None]
    assert len(nulls) == 25
    assert b"528589****273533167" in body_of("masked-id.json")


# ---- focused ------------------------------------------------------------------------------------------------


def test_the_seed_reads_exactly_as_before() -> None:
    seed = sample_bytes()
    event = read_event(seed)
    assert isinstance(event, VodEvent)
    assert event.key == "125676836723-Pull-f5ac8127b3b6b85cdc13f237c6005d8"
    # The envelope is re-encoded compactly; the payload object keeps its bytes as sent.
    payload_bytes = seed[seed.index(b'{"TaskId"') : -1]
    assert event.value == b'{"EventType":"PullComplete","PullCompleteEvent":' + payload_bytes + b"}"
    assert event.payload == msgspec.json.decode(payload_bytes, type=PullCompleteEvent)
    assert (event.format, event.fallbacks, event.event_handle, event.sign, event.expires_at) == (
        "eventcontent",
        (),
        None,
        None,
        None,
    )
    assert decode_event(seed) == event


@pytest.mark.parametrize(
    ("name", "digits"),
    [
        ("numeric-id.json", b"5285890784246869"),
        ("numeric-id-above-2-53.json", b"5285890799887766554"),
        ("legacy-v2-numeric-file-id.json", b"5285890799887766554"),
    ],
)
def test_a_numeric_id_is_keyed_by_its_digits_as_sent(name: str, digits: bytes) -> None:
    body = body_of(name)
    assert re.search(rb'"(FileId|fileId)": ' + digits + rb"[,}]", body), "the corpus sends a JSON number"
    event = read_event(body)
    assert isinstance(event, VodEvent)
    assert event.key.encode() == digits
    assert digits in event.value, "the value keeps the number as sent"
    if int(digits) > 2**53:
        assert str(int(float(digits))) != event.key, "a float round trip would have changed this id"


def test_numeric_ids_in_a_set_are_joined_as_sent() -> None:
    event = read_event(body_of("numeric-id-set-above-2-63.json"))
    assert isinstance(event, VodEvent)
    assert event.key == "14508071098244959037,5285890799887766554"
    # Digits that no float and no int64 hold: only the raw text keeps them.
    assert int("14508071098244959037") > 2**63


@pytest.mark.parametrize("exponent", [b"1e3", b"-0.5", b"12345678901234567890123456789"])
def test_any_json_number_id_keeps_its_text(exponent: bytes) -> None:
    event = read_event(b'{"EventType":"Z","ZEvent":{"TaskId":' + exponent + b"}}")
    assert isinstance(event, VodEvent)
    assert (event.key, event.fallbacks) == (exponent.decode(), ("numeric_key",))


def test_numbers_past_the_int_conversion_limit_are_never_converted() -> None:
    # Python refuses int(str) past 4300 digits; the reader neither converts ids nor crashes on typed fields.
    huge = b"9" * 5000
    drift = read_event(b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t","ErrCode":' + huge + b"}}")
    assert isinstance(drift, VodEvent) and drift.key == "t"
    too_long = read_event(b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":' + huge + b"}}")
    assert isinstance(too_long, Undecodable) and too_long.reason == "key_too_long"
    expiry = read_event(b'{"EventType":"Z","ZEvent":{"TaskId":"z"},"T":' + huge + b"}")
    assert isinstance(expiry, VodEvent) and expiry.fallbacks == ("transport_field_unreadable",)


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if e.get("format") == "legacy-v2"))
def test_a_legacy_body_is_published_byte_for_byte(name: str) -> None:
    body = body_of(name)
    event = read_event(body)
    assert isinstance(event, VodEvent)
    assert event.value is body or event.value == body
    assert event.payload is None
    assert event.event_type == json.loads(body)["eventType"]


def test_legacy_whitespace_survives_but_transport_fields_do_not() -> None:
    body = b'{ "version" : "4.0",\n "eventType": "NewFileUpload", "data": {"fileId": "f-1"} }'
    event = read_event(body)
    assert isinstance(event, VodEvent) and event.value == body
    signed = read_event(b'{"version": "4.0", "eventType": "NewFileUpload", "data": {"fileId": "f-1"}, "Sign": "s"}')
    assert isinstance(signed, VodEvent)
    assert (signed.key, signed.sign) == ("f-1", "s")
    assert json.loads(signed.value) == {"version": "4.0", "eventType": "NewFileUpload", "data": {"fileId": "f-1"}}


def test_legacy_key_fields_are_tried_in_order() -> None:
    assert LEGACY_KEY_FIELDS[:2] == ("vodTaskId", "fileId")
    data = {"srcFileId": "s", "taskId": "t", "fileId": "f", "vodTaskId": "v"}
    keys = []
    for field in LEGACY_KEY_FIELDS:
        event = read_event(json.dumps({"version": "4.0", "eventType": "X", "data": data}).encode())
        assert isinstance(event, VodEvent)
        keys.append(event.key)
        data = {name: value for name, value in data.items() if name != field}
    assert keys == ["v", "f", "t", "s"]


def test_a_legacy_unknown_type_without_id_is_keyed_by_content() -> None:
    body = b'{"version": "4.0", "eventType": "SomethingOld", "data": {"status": 0}}'
    event = read_event(body)
    assert isinstance(event, VodEvent)
    assert event.key == content_key(body) and event.fallbacks == ("legacy_envelope",)


def test_an_envelope_with_event_type_is_never_legacy() -> None:
    body = encode({"EventType": "NewFileUpload", "eventType": "PullComplete", "data": {"vodTaskId": "v"}})
    result = read_event(body)
    assert isinstance(result, Undecodable) and result.reason == "missing_key"


def test_content_key_is_a_hash_of_the_published_value() -> None:
    event = read_event(body_of("unknown-event-type-without-id.json"))
    assert isinstance(event, VodEvent)
    assert event.key == "sha256:" + hashlib.sha256(event.value).hexdigest()[:32]


def test_a_known_type_is_keyed_by_its_own_key_field_only() -> None:
    # Keying a PullComplete by a FileId would change what the key means: dead-letter it instead.
    alias = read_event(encode({"EventType": "PullComplete", "PullComplete": {"FileId": "f"}}))
    assert isinstance(alias, Undecodable) and alias.reason == "missing_key"
    documented = read_event(encode({"EventType": "NewFileUpload", "ProcedureStateChangeEvent": {"TaskId": "t"}}))
    assert isinstance(documented, Undecodable) and documented.reason == "missing_key"
    # ...and the documented payload decides even when another object carries the id.
    beside = read_event(
        encode({"EventType": "PullComplete", "PullCompleteEvent": {"Status": "FINISH"}, "X": {"TaskId": "t"}})
    )
    assert isinstance(beside, Undecodable) and beside.reason == "missing_key"


def test_a_payload_under_another_name_is_typed_with_its_event_type() -> None:
    event = read_event(encode({"EventType": "EditMediaComplete", "EditMediaComplete": {"TaskId": "e", "ErrCode": 0}}))
    assert isinstance(event, VodEvent)
    assert event.payload == TaskEvent(TaskId="e", ErrCode=0)
    assert event.fallbacks == ("payload_field_alias",)


def test_an_event_without_event_type_is_named_after_its_payload_field() -> None:
    inferred = read_event(encode({"FileUploadEvent": {"FileId": "f"}, "PullCompleteEvent": None}))
    assert isinstance(inferred, VodEvent)
    assert (inferred.event_type, inferred.payload) == ("NewFileUpload", FileUploadEvent(FileId="f"))
    unknown = read_event(encode({"BrandNewEvent": {"TaskId": "n"}}))
    assert isinstance(unknown, VodEvent)
    assert (unknown.event_type, unknown.payload, unknown.fallbacks) == (
        UNKNOWN_EVENT_TYPE,
        None,
        ("event_type_inferred",),
    )
    no_id = read_event(encode({"ProcessImageAsyncCompleteEvent": {"Status": "FINISH"}}))
    assert isinstance(no_id, VodEvent) and no_id.key == content_key(no_id.value)
    without_id = read_event(encode({"PullCompleteEvent": {"Status": "FINISH"}}))
    assert isinstance(without_id, Undecodable)
    assert (without_id.reason, without_id.event_type) == ("missing_key", "PullComplete")


def test_key_fields_match_case_insensitively_but_the_exact_name_wins() -> None:
    for name in ("taskId", "TaskID", "taskid", "TASKID"):
        event = read_event(encode({"EventType": "PullComplete", "PullCompleteEvent": {name: "t"}}))
        assert isinstance(event, VodEvent)
        assert (event.key, event.fallbacks) == ("t", ("key_field_case",))
    both = read_event(encode({"EventType": "PullComplete", "PullCompleteEvent": {"taskId": "lower", "TaskId": "t"}}))
    assert isinstance(both, VodEvent) and (both.key, both.fallbacks) == ("t", ())
    empty = read_event(encode({"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "", "taskId": "t"}}))
    assert isinstance(empty, VodEvent) and (empty.key, empty.fallbacks) == ("t", ("key_field_case",))


def test_ids_that_are_not_ids_do_not_key_an_event() -> None:
    for value in (None, True, {}, {"TaskId": "t"}, [], [None], [["t"]], ""):
        result = read_event(encode({"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": value}}))
        assert isinstance(result, Undecodable), value
        assert result.reason == "missing_key"


def test_ambiguity_is_dead_lettered_not_guessed() -> None:
    body = {"EventHandle": "h", "PullCompleteEvent": {"TaskId": "a"}, "FileUploadEvent": {"FileId": "b"}}
    result = read_event(encode(body))
    assert isinstance(result, Undecodable)
    assert (result.reason, result.event_type, result.event_handle) == ("ambiguous_payload", None, "h")
    assert "PullCompleteEvent" in result.message and "FileUploadEvent" in result.message
    # Objects without an id do not make a body ambiguous.
    event = read_event(encode({"EventType": "Z", "ZEvent": {"TaskId": "z"}, "Extra": {"Note": 1}}))
    assert isinstance(event, VodEvent) and event.key == "z"


def test_an_unknown_type_without_an_id_keeps_its_content_key() -> None:
    body = encode({"EventType": "Z", "ZEvent": {"Other": 1}, "Meta": {"Region": "ap-guangzhou"}})
    event = read_event(body)
    assert isinstance(event, VodEvent)
    assert (event.key, event.payload, event.fallbacks) == (content_key(event.value), None, ())


def test_transport_fields_are_kept_aside_on_both_results() -> None:
    transport = {"EventHandle": "h-1", "Sign": "0f1e", "T": 1700000600}
    event = read_event(encode({**sample_event("t"), **transport}))
    assert isinstance(event, VodEvent)
    assert (event.event_handle, event.sign, event.expires_at) == ("h-1", "0f1e", 1700000600)
    assert not TRANSPORT_FIELDS & set(json.loads(event.value))
    dead = read_event(encode({"EventType": "PullComplete", **transport}))
    assert isinstance(dead, Undecodable)
    assert (dead.event_handle, dead.sign, dead.expires_at, dead.event_type) == (
        "h-1",
        "0f1e",
        1700000600,
        "PullComplete",
    )
    assert json.loads(dead.value) == {"EventType": "PullComplete"}


def test_unreadable_transport_fields_are_unset_and_labelled() -> None:
    body = {**sample_event("t"), "EventHandle": 17, "Sign": ["x"], "T": True}
    event = read_event(encode(body))
    assert isinstance(event, VodEvent)
    assert (event.event_handle, event.sign, event.expires_at) == (None, None, None)
    assert event.fallbacks == ("transport_field_unreadable",)
    assert isinstance(event.payload, PullCompleteEvent)
    assert json.loads(event.value) == sample_event("t")


def test_the_label_sets_are_the_literal_types() -> None:
    assert frozenset(get_args(Fallback)) == FALLBACK_REASONS
    assert frozenset(get_args(UndecodableReason)) == UNDECODABLE_REASONS
    assert all(re.fullmatch(r"[a-z_]{3,32}", label) for label in FALLBACK_REASONS | UNDECODABLE_REASONS)


def test_messages_bound_caller_supplied_field_names() -> None:
    huge = "N" * 10_000
    result = read_event(encode({"EventType": "Z", huge: {"TaskId": "a"}, "Other": {"TaskId": "b"}}))
    assert isinstance(result, Undecodable) and result.reason == "ambiguous_payload"
    assert len(result.message) < 300


# ---- property: any JSON object is read, never refused -------------------------------------------------------


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


_NAMES = sorted(
    {"EventType", "eventType", "data", "version", *TRANSPORT_FIELDS, UNKNOWN_EVENT_TYPE}
    | {spec.payload_field for spec in EVENT_TYPES.values()}
    | {"TaskId", "taskId", "TASKID", "FileId", "fileId", "FileIdSet", "CastId", *LEGACY_KEY_FIELDS, "ErrCode"}
)
_names = st.sampled_from(_NAMES) | st.text(max_size=8)
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from([*EVENT_TYPES, "", "x" * (MAX_EVENT_TYPE_LEN + 1), "t" * (MAX_KEY_LEN + 1)])
)
_values = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_names, children, max_size=5),
    max_leaves=16,
)


@st.composite
def _plausible(draw: st.DrawFn) -> dict[str, Any]:
    """An envelope near a real one (a type, a payload under some field, an id of some JSON type), plus noise."""
    event_type = draw(st.sampled_from([*EVENT_TYPES, "Novel"]) | _leaves)
    field = draw(st.sampled_from([spec.payload_field for spec in EVENT_TYPES.values()]) | _names)
    payload = draw(st.dictionaries(_names, _values, max_size=4))
    if draw(st.booleans()):
        payload[draw(st.sampled_from(["TaskId", "taskId", "FileId", "FileIdSet", "CastId"]))] = draw(_values)
    body: dict[str, Any] = {field: payload}
    if draw(st.booleans()):
        body["EventType"] = event_type
    if draw(st.booleans()):
        body = {"version": "4.0", "eventType": event_type, "data": payload}
    body.update(draw(st.dictionaries(_names, _values, max_size=3)))
    return body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_names, _values, max_size=6) | _plausible(), st.booleans())
def test_any_json_object_is_read_never_refused(obj: dict[str, Any], ascii_only: bool) -> None:
    body = json.dumps(obj, ensure_ascii=ascii_only).encode()
    result = read_event(body)
    published = {name: value for name, value in obj.items() if name not in TRANSPORT_FIELDS}
    if isinstance(result, VodEvent):
        assert result.key and len(result.key) <= MAX_KEY_LEN
        assert result.event_type and len(result.event_type) <= MAX_EVENT_TYPE_LEN
        assert set(result.fallbacks) <= FALLBACK_REASONS and len(set(result.fallbacks)) == len(result.fallbacks)
        if result.format == "legacy-v2" and published == obj:
            assert result.value == body
        assert json.loads(result.value) == published
        assert decode_event(body) == result
        # A consumer (or a re-drive) reading the published value finds the same event.
        again = read_event(result.value)
        assert isinstance(again, VodEvent)
        assert (again.event_type, again.key, again.format) == (result.event_type, result.key, result.format)
    else:
        assert isinstance(result, Undecodable)
        assert result.reason in UNDECODABLE_REASONS and result.message
        assert json.loads(result.value) == published
        with pytest.raises(InvalidPayload):
            decode_event(body)
        again = read_event(result.value)
        assert isinstance(again, Undecodable) and again.reason == result.reason
