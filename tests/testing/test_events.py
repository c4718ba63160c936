"""bridge.testing.build_event (the ``vod_event`` fixture): every modelled type decodes strictly, overrides land
where they say, signed bodies pass the bridge's own check."""

from __future__ import annotations

import json
import re
import time

import msgspec
import pytest
from conftest import sample_event

from bridge.errors import AuthFailed, InvalidPayload
from bridge.testing import OMIT, build_event, event_key
from bridge.vod.decode import content_key, decode_event
from bridge.vod.event_types import EVENT_TYPES
from bridge.vod.signing import verify_sign

MODELLED = sorted(EVENT_TYPES)


def decode(body: dict[str, object]):  # type: ignore[no-untyped-def]
    return decode_event(msgspec.json.encode(body))


@pytest.mark.parametrize("event_type", MODELLED)
def test_every_modelled_type_is_a_documented_body(event_type: str) -> None:
    spec = EVENT_TYPES[event_type]
    body = build_event(event_type)
    assert list(body) == ["EventType", spec.payload_field]
    event = decode(body)  # the strict decoder: raises for anything that would be dead-lettered
    assert event.event_type == event_type
    assert event.fallbacks == (), "read by the EventType table, without any tolerance"
    assert event.payload is not None and isinstance(event.payload, spec.model), "the payload validates"
    payload = body[spec.payload_field]
    assert isinstance(payload, dict)
    if spec.key_field is None:
        assert event.key == content_key(event.value)
    elif spec.key_field == "FileIdSet":
        assert event.key == ",".join(payload["FileIdSet"])
    else:
        assert event.key == payload[spec.key_field]
    assert event_key(body) == event.key


@pytest.mark.parametrize("event_type", MODELLED)
def test_two_bodies_are_two_events(event_type: str) -> None:
    first, second = build_event(event_type), build_event(event_type)
    assert first != second
    assert event_key(first) != event_key(second), "a fresh id per call: never de-duplicated, never one key"


def test_pull_complete_is_the_seed_sample_with_a_fresh_task_id() -> None:
    body = build_event("PullComplete")
    task_id = body["PullCompleteEvent"]["TaskId"]
    assert re.fullmatch(r"\d+-PullComplete-[0-9a-f]{32}", task_id)
    assert body == sample_event(task_id)


def test_generated_values_look_like_vods() -> None:
    payload = build_event("NewFileUpload")["FileUploadEvent"]
    assert re.fullmatch(r"[1-9]\d{18}", payload["FileId"])
    info = payload["MediaBasicInfo"]
    assert re.fullmatch(r"http://\d+\.vod2\.myqcloud\.com/.+\.mp4", info["MediaUrl"])
    assert payload["FileId"] in info["MediaUrl"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", info["CreateTime"])
    assert info["SourceInfo"] == {"SourceType": "Upload", "SourceContext": ""}
    assert payload["MetaData"]["Width"] == 1280
    assert build_event("ProcedureStateChanged")["ProcedureStateChangeEvent"]["Status"] == "FINISH"
    assert build_event("MediaCastStatusChanged")["MediaCastStatusChangedEvent"]["Status"] == "Working"
    deleted = build_event("FileDeleted")["FileDeleteEvent"]
    assert [info["FileId"] for info in deleted["FileDeleteResultInfo"]] == deleted["FileIdSet"]


def test_overrides_land_in_the_payload_and_the_envelope() -> None:
    body = build_event("PullComplete", TaskId="t-1", ErrCode=70000, Message="internal error", EventHandle="h-1")
    assert body["EventHandle"] == "h-1"
    payload = body["PullCompleteEvent"]
    assert (payload["TaskId"], payload["ErrCode"], payload["Message"]) == ("t-1", 70000, "internal error")
    assert decode(body).event_handle == "h-1"


def test_nested_overrides_by_path_and_by_dict_keep_the_other_fields() -> None:
    body = build_event(
        "PullComplete",
        MediaBasicInfo__Name="Ocean",
        MediaBasicInfo__SourceInfo__SourceType="Record",
        MetaData={"Width": 1920, "Height": 1080},
    )
    payload = body["PullCompleteEvent"]
    seed = sample_event()["PullCompleteEvent"]
    assert payload["MediaBasicInfo"] == {
        **seed["MediaBasicInfo"],
        "Name": "Ocean",
        "SourceInfo": {"SourceType": "Record", "SourceContext": ""},
    }
    assert payload["MetaData"] == {"Width": 1920, "Height": 1080}, "created where the seed has none"
    typed = decode(body).payload
    assert typed.MediaBasicInfo.Name == "Ocean" and typed.MetaData.Width == 1920  # type: ignore[union-attr]


def test_none_sends_null_and_omit_removes() -> None:
    payload = build_event("PullComplete", MediaBasicInfo=None, FileUrl=OMIT)["PullCompleteEvent"]
    assert payload["MediaBasicInfo"] is None
    assert "FileUrl" not in payload
    keyless = build_event("PullComplete", TaskId=OMIT)
    with pytest.raises(InvalidPayload) as caught:
        event_key(keyless)
    assert caught.value.reason == "missing_key"


def test_override_values_are_copied() -> None:
    tags = ["a"]
    body = build_event("NewFileUpload", MediaBasicInfo__TagSet=tags)
    tags.append("b")
    assert body["FileUploadEvent"]["MediaBasicInfo"]["TagSet"] == ["a"]


def test_unknown_field_names_are_refused_with_the_valid_ones() -> None:
    with pytest.raises(TypeError) as caught:
        build_event("PullComplete", TaskID="t")
    message = str(caught.value)
    assert "no field 'TaskID'" in message and "did you mean 'TaskId'" in message
    assert "ErrCode, FileId, FileUrl" in message and "extra=" in message
    with pytest.raises(TypeError, match=r"PullComplete \(PullCompleteEvent\)\.MediaBasicInfo has no field 'Nmae'"):
        build_event("PullComplete", MediaBasicInfo__Nmae="x")
    with pytest.raises(TypeError, match="no field 'Nmae'"):
        build_event("PullComplete", MediaBasicInfo={"Nmae": "x"})
    with pytest.raises(TypeError, match="double underscore"):
        build_event("PullComplete", MediaBasicInfo__="x")


def test_extra_adds_what_the_model_lacks_verbatim() -> None:
    body = build_event("TranscodeComplete", extra={"Output": {"Definition": 100030}, "AddedByVodTomorrow": [1, "two"]})
    payload = body["TranscodeCompleteEvent"]
    assert payload["Output"] == {"Definition": 100030} and payload["AddedByVodTomorrow"] == [1, "two"]
    assert decode(body).fallbacks == ()


def test_unmodelled_payload_fields_are_those_of_its_documented_shape() -> None:
    body = build_event("ProcessImageAsyncCompleteEvent", Output__FileUrl="http://x/y.jpg", ErrCode=1)
    payload = body["ProcessImageAsyncCompleteEvent"]
    assert payload["Output"]["FileUrl"] == "http://x/y.jpg" and payload["ErrCode"] == 1
    with pytest.raises(TypeError, match="no field 'Nope'"):
        build_event("ProcessImageAsyncCompleteEvent", Nope=1)


def test_unknown_event_type_lists_the_modelled_ones() -> None:
    with pytest.raises(ValueError, match="'PullCompleted' is not a modelled VOD EventType") as caught:
        build_event("PullCompleted")
    assert all(event_type in str(caught.value) for event_type in MODELLED)


def test_signed_bodies_pass_the_bridges_check() -> None:
    body = build_event("PullComplete", signed=True, sign_key="Key123")
    assert isinstance(body["T"], int), "T travels as a JSON number, as VOD sends it"
    now = time.time()
    assert now + 590 <= body["T"] <= now + 601
    event = decode(body)
    assert event.sign == body["Sign"] and event.expires_at == body["T"]
    verify_sign(event.sign, event.expires_at_text, sign_key="Key123", now_s=now, skew_s=0)
    with pytest.raises(AuthFailed):
        verify_sign(event.sign, event.expires_at_text, sign_key="OtherKey", now_s=now, skew_s=0)
    assert "Sign" not in json.loads(event.value) and "T" not in json.loads(event.value)


def test_expires_in_s_makes_expired_signatures() -> None:
    event = decode(build_event("NewFileUpload", signed=True, sign_key="Key123", expires_in_s=-120))
    with pytest.raises(AuthFailed) as caught:
        verify_sign(event.sign, event.expires_at_text, sign_key="Key123", now_s=time.time(), skew_s=60)
    assert caught.value.reason == "expired"


def test_signing_needs_both_the_flag_and_the_key() -> None:
    with pytest.raises(ValueError, match="needs sign_key"):
        build_event("PullComplete", signed=True)
    with pytest.raises(ValueError, match="signed=False"):
        build_event("PullComplete", sign_key="Key123")
