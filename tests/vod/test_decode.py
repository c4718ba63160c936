"""Unit tests of the sans-I/O event model: decoding, keys, losslessness, and what each bad input becomes."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from conftest import sample_bytes, sample_event

from bridge.errors import InvalidPayload
from bridge.vod.decode import content_key, decode_event, read_event
from bridge.vod.event_types import EVENT_TYPES
from bridge.vod.model import MediaBasicInfo, PullCompleteEvent, Undecodable, VodEvent


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


class TestSeedPayload:
    def test_decodes_every_field_of_the_seed(self) -> None:
        event = decode_event(sample_bytes())
        assert event.event_type == "PullComplete"
        assert event.key == "125676836723-Pull-f5ac8127b3b6b85cdc13f237c6005d8"
        payload = event.payload
        assert isinstance(payload, PullCompleteEvent)
        assert payload.Status == "FINISH"
        assert payload.ErrCode == 0
        assert payload.Message == "SUCCESS"
        assert payload.FileId == "14508071098244959037"
        assert payload.FileUrl == "http://125676836723.vod2.myqcloud.com/xxx/xxx/xxx.mp4"
        assert (payload.ProcedureTaskId, payload.ReviewAudioVideoTaskId) == ("", "")
        assert (payload.SessionContext, payload.SessionId) == ("", "")
        info = payload.MediaBasicInfo
        assert isinstance(info, MediaBasicInfo)
        assert info.Name == "Animal World"
        assert info.ExpireTime == "9999-12-31T23:59:59Z"
        assert info.ClassId == 0
        assert info.TagSet == []
        assert info.StorageRegion == "ap-chongqing"
        assert info.SourceInfo is not None and info.SourceInfo.SourceType == "Upload"
        assert payload.MetaData is None and payload.Progress is None

    def test_value_round_trips_to_the_same_json(self) -> None:
        event = decode_event(sample_bytes())
        assert msgspec.json.decode(event.value) == json.loads(sample_bytes())

    def test_struct_round_trip(self) -> None:
        payload = decode_event(sample_bytes()).payload
        again = msgspec.json.decode(msgspec.json.encode(payload), type=PullCompleteEvent)
        assert again == payload

    def test_reliable_callback_item_drops_the_event_handle(self) -> None:
        item = json.loads(sample_bytes("pull-events-response.json"))["Response"]["EventSet"][0]
        event = decode_event(encode(item))
        assert event.event_handle == "EventHandleX"
        assert "EventHandle" not in msgspec.json.decode(event.value)
        assert msgspec.json.decode(event.value) == json.loads(sample_bytes())


class TestLossless:
    def test_unknown_fields_survive_at_every_level(self) -> None:
        body = sample_event("t-1")
        body["Tomorrow"] = {"a": [1, 2.5, None, "x"]}
        body["PullCompleteEvent"]["NewField"] = "kept"
        body["PullCompleteEvent"]["MediaBasicInfo"]["SourceInfo"]["Deep"] = {"x": True}
        body["PullCompleteEvent"]["MetaData"] = {"Size": 10, "Duration": 1.5, "Unknown": 1}
        event = decode_event(encode(body))
        assert msgspec.json.decode(event.value) == body

    def test_optional_fields_may_be_absent_or_null(self) -> None:
        event = decode_event(
            encode({"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t", "MediaBasicInfo": None}})
        )
        assert event.key == "t"
        assert isinstance(event.payload, PullCompleteEvent)
        assert event.payload.MediaBasicInfo is None

    def test_unicode_and_escapes_survive(self) -> None:
        body = sample_event("t-ü", Message='动物世界 "quoted" \\ \u2028')
        assert msgspec.json.decode(decode_event(encode(body)).value) == body

    def test_sign_and_expiry_are_kept_aside_not_published(self) -> None:
        body = {**sample_event("t"), "Sign": "abc", "T": 1700000000}
        event = decode_event(encode(body))
        assert (event.sign, event.expires_at) == ("abc", 1700000000)
        value = msgspec.json.decode(event.value)
        assert "Sign" not in value and "T" not in value


class TestKeys:
    @pytest.mark.parametrize(
        ("event_type", "payload_field", "payload", "key"),
        [
            ("NewFileUpload", "FileUploadEvent", {"FileId": "f-1"}, "f-1"),
            ("ProcedureStateChanged", "ProcedureStateChangeEvent", {"TaskId": "p-1", "FileId": "f"}, "p-1"),
            ("FileDeleted", "FileDeleteEvent", {"FileIdSet": ["f-1", "f-2"]}, "f-1,f-2"),
            ("EditMediaComplete", "EditMediaCompleteEvent", {"TaskId": "e-1"}, "e-1"),
            ("CreateSnapshotByTimeOffsetComplete", "SnapshotByTimeOffsetCompleteEvent", {"TaskId": "s"}, "s"),
            ("RemoveWatermark", "RemoveWatermarkCompleteEvent", {"TaskId": "w"}, "w"),
            ("AigcImageTaskComplete", "AigcImageCompleteEvent", {"TaskId": "a"}, "a"),
            ("ExtractBlindWatermarkComplete", "ExtractBlindWatermarkComplete", {"TaskId": "b"}, "b"),
            ("RestoreMediaComplete", "RestoreMediaCompleteEvent", {"FileId": "r"}, "r"),
            ("MediaCastStatusChanged", "MediaCastStatusChangedEvent", {"CastId": "c"}, "c"),
        ],
    )
    def test_natural_id_per_type(self, event_type: str, payload_field: str, payload: Any, key: str) -> None:
        assert EVENT_TYPES[event_type].payload_field == payload_field
        event = decode_event(encode({"EventType": event_type, payload_field: payload}))
        assert event.key == key

    def test_type_without_an_id_is_keyed_by_content_hash(self) -> None:
        body = encode({"EventType": "ProcessImageAsyncCompleteEvent", "ProcessImageAsyncCompleteEvent": {}})
        first, second = decode_event(body), decode_event(body)
        assert first.key == second.key == content_key(first.value)
        assert first.key.startswith("sha256:") and len(first.key) == 7 + 32

    def test_unknown_type_passes_through_keyed_by_its_task_id(self) -> None:
        body = {"EventType": "BrandNewThingComplete", "BrandNewThingCompleteEvent": {"TaskId": "n-1", "X": 1}}
        event = decode_event(encode(body))
        assert (event.event_type, event.key, event.payload) == ("BrandNewThingComplete", "n-1", None)
        assert msgspec.json.decode(event.value) == body

    def test_unknown_type_falls_back_to_file_id_then_hash(self) -> None:
        with_file = decode_event(encode({"EventType": "Z", "ZEvent": {"FileId": "f-9"}}))
        assert with_file.key == "f-9"
        bare = decode_event(encode({"EventType": "Z", "ZEvent": {"Other": 1}}))
        assert bare.key == content_key(bare.value)


#: Not a JSON object: refused by the reader itself (a 400 for callbacks), so by the strict form too.
NOT_AN_OBJECT = [
    (b"", "malformed_json"),
    (b"{", "malformed_json"),
    (b"not json", "malformed_json"),
    (b"\xff\xfe{}", "invalid_utf8"),
    (b'{"EventType": "\xc3"}', "invalid_utf8"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "too_deep"),
    (b"[1, 2]", "not_an_object"),
    (b'"PullComplete"', "not_an_object"),
]

#: JSON objects without a usable key: the reader returns them for the dead-letter topic, the strict form raises.
UNDECODABLE = [
    (b"{}", "unrecognised"),
    (b'{"EventType": null}', "unrecognised"),
    (b'{"EventType": 7}', "invalid_event_type"),
    (b'{"EventType": ""}', "invalid_event_type"),
    (b'{"EventType": "' + b"x" * 200 + b'"}', "invalid_event_type"),
    (b'{"EventType": "PullComplete"}', "no_payload"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": null}', "no_payload"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": []}', "no_payload"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": {}}', "missing_key"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": ""}}', "missing_key"),
    (b'{"EventType": "FileDeleted", "FileDeleteEvent": {"FileIdSet": []}}', "missing_key"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "' + b"t" * 5000 + b'"}}', "key_too_long"),
]

#: Bodies the strict decoder used to refuse (``wrong_type``) that are now published, with a fallback label.
NOW_ACCEPTED = [
    (
        b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": 5}}',
        "5",
        ("payload_type_mismatch", "numeric_key"),
    ),
    (
        b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t", "ErrCode": "0"}}',
        "t",
        ("payload_type_mismatch",),
    ),
    (
        b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t"}, "EventHandle": 1}',
        "t",
        ("transport_field_unreadable",),
    ),
]


@pytest.mark.parametrize(("body", "reason"), NOT_AN_OBJECT)
def test_what_is_not_a_json_object_is_refused_with_a_named_reason(body: bytes, reason: str) -> None:
    for read in (read_event, decode_event):
        with pytest.raises(InvalidPayload) as info:
            read(body)
        assert info.value.reason == reason
        assert info.value.status == 400
        assert info.value.message


@pytest.mark.parametrize(("body", "reason"), UNDECODABLE)
def test_an_object_without_a_key_is_a_dead_letter_with_a_named_reason(body: bytes, reason: str) -> None:
    result = read_event(body)
    assert isinstance(result, Undecodable)
    assert result.reason == reason and result.message
    assert msgspec.json.decode(result.value) == json.loads(body)
    with pytest.raises(InvalidPayload) as info:
        decode_event(body)
    assert (info.value.reason, info.value.message) == (reason, result.message)


@pytest.mark.parametrize(("body", "key", "fallbacks"), NOW_ACCEPTED)
def test_schema_drift_is_published_and_labelled(body: bytes, key: str, fallbacks: tuple[str, ...]) -> None:
    for read in (read_event, decode_event):
        event = read(body)
        assert isinstance(event, VodEvent)
        assert (event.key, event.fallbacks) == (key, fallbacks)


def test_a_wrong_type_deep_in_the_payload_publishes_it_untyped() -> None:
    body = sample_event("t")
    body["PullCompleteEvent"]["MediaBasicInfo"]["ClassId"] = "zero"
    event = read_event(encode(body))
    assert isinstance(event, VodEvent)
    assert (event.key, event.payload, event.fallbacks) == ("t", None, ("payload_type_mismatch",))
    assert msgspec.json.decode(event.value) == body


def test_unknown_type_with_an_absurd_task_id_is_a_dead_letter() -> None:
    # It used to be keyed by content hash; a key over MAX_KEY_LEN is now dead-lettered whatever the type.
    result = read_event(encode({"EventType": "Z", "ZEvent": {"TaskId": "t" * 5000}}))
    assert isinstance(result, Undecodable)
    assert (result.reason, result.event_type) == ("key_too_long", "Z")
