"""Unit tests of the sans-I/O event model: decoding, keys, losslessness, and every bad input's error."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from conftest import sample_bytes, sample_event

from bridge.errors import InvalidPayload
from bridge.vod.decode import content_key, decode_event
from bridge.vod.event_types import EVENT_TYPES
from bridge.vod.model import MediaBasicInfo, PullCompleteEvent


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


BAD_INPUTS = [
    (b"", "malformed_json"),
    (b"{", "malformed_json"),
    (b"not json", "malformed_json"),
    (b"\xff\xfe{}", "invalid_utf8"),
    (b'{"EventType": "\xc3"}', "invalid_utf8"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "too_deep"),
    (b"[1, 2]", "not_an_object"),
    (b'"PullComplete"', "not_an_object"),
    (b"{}", "missing_eventtype"),
    (b'{"EventType": null}', "missing_eventtype"),
    (b'{"EventType": 7}', "wrong_type"),
    (b'{"EventType": ""}', "invalid_event_type"),
    (b'{"EventType": "' + b"x" * 200 + b'"}', "invalid_event_type"),
    (b'{"EventType": "PullComplete"}', "missing_payload"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": null}', "missing_payload"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": []}', "wrong_type"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": {}}', "missing_key"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": ""}}', "missing_key"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": 5}}', "wrong_type"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t", "ErrCode": "0"}}', "wrong_type"),
    (b'{"EventType": "FileDeleted", "FileDeleteEvent": {"FileIdSet": []}}', "missing_key"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "' + b"t" * 5000 + b'"}}', "key_too_long"),
    (b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t"}, "EventHandle": 1}', "wrong_type"),
]


@pytest.mark.parametrize(("body", "reason"), BAD_INPUTS)
def test_bad_input_is_rejected_with_a_named_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidPayload) as info:
        decode_event(body)
    assert info.value.reason == reason
    assert info.value.status == 400
    assert info.value.message


def test_wrong_type_names_the_json_path() -> None:
    body = sample_event("t")
    body["PullCompleteEvent"]["MediaBasicInfo"]["ClassId"] = "zero"
    with pytest.raises(InvalidPayload, match=r"PullCompleteEvent: .*\$\.MediaBasicInfo\.ClassId"):
        decode_event(encode(body))


def test_unknown_type_with_an_absurd_task_id_is_keyed_by_hash() -> None:
    event = decode_event(encode({"EventType": "Z", "ZEvent": {"TaskId": "t" * 5000}}))
    assert event.key == content_key(event.value)
