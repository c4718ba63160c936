"""The VOD event model and the sans-I/O decoder that turns one event's JSON into a publishable record.

Decoding happens once per event:

1. the envelope is parsed as ``dict[str, msgspec.Raw]``: every top-level value keeps its original bytes;
2. the payload object named by the explicit ``EVENT_TYPES`` table is decoded into its typed Struct, which
   validates it and yields the Kafka key;
3. the Kafka value is the envelope re-encoded from those raw pieces, minus transport-only fields
   (``EventHandle``, and the callback signature ``Sign``/``T``). A field VOD adds tomorrow therefore still
   reaches Kafka byte for byte, although the Structs below do not know it.

Nothing here does I/O or logging, so every rule is unit-testable without a broker or a server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Final, TypeVar

import msgspec

from bridge.errors import InvalidPayload

# --------------------------------------------------------------------------------------------------------
# Payload Structs. Field names follow the VOD SDK (tencentcloud-sdk-python-vod 3.1.194, models.py).
# Every field has a default: VOD omits null fields, and an absent optional field must not reject an event.
# Unknown fields are ignored by the Structs (they survive in the raw value, see the module docstring).
# --------------------------------------------------------------------------------------------------------


class VodStruct(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of every inbound VOD Struct: keyword-only; absent fields default and are omitted on encode."""


class MediaSourceData(VodStruct):
    SourceType: str | None = None
    SourceContext: str | None = None
    LiveRecordInfo: dict[str, Any] | None = None
    TrtcRecordInfo: dict[str, Any] | None = None
    WebPageRecordInfo: dict[str, Any] | None = None


class MediaBasicInfo(VodStruct):
    Name: str | None = None
    Description: str | None = None
    CreateTime: str | None = None
    UpdateTime: str | None = None
    #: ``9999-12-31T23:59:59Z`` means "never expires".
    ExpireTime: str | None = None
    ClassId: int | None = None
    ClassName: str | None = None
    ClassPath: str | None = None
    CoverUrl: str | None = None
    Type: str | None = None
    MediaUrl: str | None = None
    SourceInfo: MediaSourceData | None = None
    StorageRegion: str | None = None
    StoragePath: str | None = None
    TagSet: list[str] | None = None
    Vid: str | None = None
    Category: str | None = None
    Status: str | None = None
    StorageClass: str | None = None


class MediaMetaData(VodStruct):
    Size: int | None = None
    Container: str | None = None
    Bitrate: int | None = None
    Height: int | None = None
    Width: int | None = None
    Duration: float | None = None
    Rotate: int | None = None
    VideoStreamSet: list[dict[str, Any]] | None = None
    AudioStreamSet: list[dict[str, Any]] | None = None
    VideoDuration: float | None = None
    AudioDuration: float | None = None
    Md5: str | None = None


class TaskEvent(VodStruct):
    """Common shape of the task-completion payloads: the task id plus its outcome."""

    TaskId: str = ""
    Status: str | None = None
    ErrCode: int | None = None
    Message: str | None = None


class PullCompleteEvent(TaskEvent):
    """``PullComplete``: a pull-from-URL upload task finished (SDK class ``PullUploadTask``).

    ``ErrCode``: 0 success, 40000 bad input, 60000 source file error, 70000 internal error (retry advised).
    """

    FileId: str | None = None
    MediaBasicInfo: MediaBasicInfo | None = None
    MetaData: MediaMetaData | None = None
    FileUrl: str | None = None
    ProcedureTaskId: str | None = None
    ReviewAudioVideoTaskId: str | None = None
    SessionContext: str | None = None
    SessionId: str | None = None
    Progress: int | None = None


class ProcedureStateChangeEvent(TaskEvent):
    """``ProcedureStateChanged`` (SDK ``ProcedureTask``); result sets stay in the raw value only."""

    FileId: str | None = None
    FileName: str | None = None
    FileUrl: str | None = None
    MetaData: MediaMetaData | None = None
    TasksPriority: int | None = None
    TasksNotifyMode: str | None = None
    SessionContext: str | None = None
    SessionId: str | None = None
    Operator: str | None = None
    OperationType: str | None = None


class FileUploadEvent(VodStruct):
    """``NewFileUpload`` (SDK ``FileUploadTask``)."""

    FileId: str = ""
    MediaBasicInfo: MediaBasicInfo | None = None
    ProcedureTaskId: str | None = None
    ReviewAudioVideoTaskId: str | None = None
    MetaData: MediaMetaData | None = None


class FileDeleteEvent(VodStruct):
    """``FileDeleted`` (SDK ``FileDeleteTask``)."""

    FileIdSet: list[str] = []
    FileDeleteResultInfo: list[dict[str, Any]] | None = None


class FileIdEvent(VodStruct):
    """Payloads identified by a media file only (``RestoreMediaComplete``, ``PersistenceComplete``)."""

    FileId: str = ""


class MediaCastEvent(VodStruct):
    """``MediaCastStatusChanged`` (SDK ``MediaCastEvent``)."""

    CastId: str = ""
    Status: str | None = None


class OpaqueEvent(VodStruct):
    """A payload we publish without a typed model: only its being a JSON object is checked."""


# --------------------------------------------------------------------------------------------------------
# The explicit EventType table: the payload field name is not derivable from the type by a rule.
# --------------------------------------------------------------------------------------------------------


class EventSpec(msgspec.Struct, frozen=True):
    """How to read one ``EventType``: its payload field, its typed Struct and the field used as Kafka key.

    ``key_field`` is ``None`` when the payload has no natural id; the key is then a content hash (see
    :func:`content_key`).
    """

    payload_field: str
    model: type[VodStruct]
    key_field: str | None


EVENT_TYPES: Final[Mapping[str, EventSpec]] = {
    "PullComplete": EventSpec("PullCompleteEvent", PullCompleteEvent, "TaskId"),
    "NewFileUpload": EventSpec("FileUploadEvent", FileUploadEvent, "FileId"),
    "ProcedureStateChanged": EventSpec("ProcedureStateChangeEvent", ProcedureStateChangeEvent, "TaskId"),
    "FileDeleted": EventSpec("FileDeleteEvent", FileDeleteEvent, "FileIdSet"),
    "EditMediaComplete": EventSpec("EditMediaCompleteEvent", TaskEvent, "TaskId"),
    "SplitMediaComplete": EventSpec("SplitMediaCompleteEvent", TaskEvent, "TaskId"),
    "ComposeMediaComplete": EventSpec("ComposeMediaCompleteEvent", TaskEvent, "TaskId"),
    "ClipComplete": EventSpec("ClipCompleteEvent", TaskEvent, "TaskId"),
    "TranscodeComplete": EventSpec("TranscodeCompleteEvent", TaskEvent, "TaskId"),
    "CreateImageSpriteComplete": EventSpec("CreateImageSpriteCompleteEvent", TaskEvent, "TaskId"),
    "ConcatComplete": EventSpec("ConcatCompleteEvent", TaskEvent, "TaskId"),
    "CreateSnapshotByTimeOffsetComplete": EventSpec("SnapshotByTimeOffsetCompleteEvent", TaskEvent, "TaskId"),
    "WechatPublishComplete": EventSpec("WechatPublishCompleteEvent", TaskEvent, "TaskId"),
    "WechatMiniProgramPublishComplete": EventSpec("WechatMiniProgramPublishCompleteEvent", TaskEvent, "TaskId"),
    "RemoveWatermark": EventSpec("RemoveWatermarkCompleteEvent", TaskEvent, "TaskId"),
    "RestoreMediaComplete": EventSpec("RestoreMediaCompleteEvent", FileIdEvent, "FileId"),
    "RebuildMediaComplete": EventSpec("RebuildMediaCompleteEvent", TaskEvent, "TaskId"),
    "ExtractTraceWatermarkComplete": EventSpec("ExtractTraceWatermarkCompleteEvent", TaskEvent, "TaskId"),
    "ExtractCopyRightWatermarkComplete": EventSpec("ExtractCopyRightWatermarkCompleteEvent", TaskEvent, "TaskId"),
    "ReviewAudioVideoComplete": EventSpec("ReviewAudioVideoCompleteEvent", TaskEvent, "TaskId"),
    "DescribeFileAttributesComplete": EventSpec("DescribeFileAttributesCompleteEvent", TaskEvent, "TaskId"),
    "QualityInspectComplete": EventSpec("QualityInspectCompleteEvent", TaskEvent, "TaskId"),
    "QualityEnhanceComplete": EventSpec("QualityEnhanceCompleteEvent", TaskEvent, "TaskId"),
    "MediaCastStatusChanged": EventSpec("MediaCastStatusChangedEvent", MediaCastEvent, "CastId"),
    "PersistenceComplete": EventSpec("PersistenceCompleteEvent", FileIdEvent, "FileId"),
    "ComplexAdaptiveDynamicStreamingComplete": EventSpec(
        "ComplexAdaptiveDynamicStreamingCompleteEvent", TaskEvent, "TaskId"
    ),
    "ProcessMediaByMPSComplete": EventSpec("ProcessMediaByMPSCompleteEvent", TaskEvent, "TaskId"),
    "AigcImageTaskComplete": EventSpec("AigcImageCompleteEvent", TaskEvent, "TaskId"),
    "AigcVideoTaskComplete": EventSpec("AigcVideoCompleteEvent", TaskEvent, "TaskId"),
    "AigcHunyuan3DTaskComplete": EventSpec("AigcHunyuan3DCompleteEvent", TaskEvent, "TaskId"),
    "ExtractBlindWatermarkComplete": EventSpec("ExtractBlindWatermarkComplete", TaskEvent, "TaskId"),
    "SceneAigcImageCompleteEvent": EventSpec("SceneAigcImageCompleteEvent", TaskEvent, "TaskId"),
    "CreateAigcAdvancedCustomElementCompleteEvent": EventSpec(
        "CreateAigcAdvancedCustomElementCompleteEvent", TaskEvent, "TaskId"
    ),
    "CreateAigcCustomVoiceCompleteEvent": EventSpec("CreateAigcCustomVoiceCompleteEvent", TaskEvent, "TaskId"),
    "DescribeAigcFaceInfoAsyncComplete": EventSpec("DescribeAigcFaceInfoAsyncCompleteEvent", TaskEvent, "TaskId"),
    # The SDK documents no id for this payload: it is keyed by content hash.
    "ProcessImageAsyncCompleteEvent": EventSpec("ProcessImageAsyncCompleteEvent", OpaqueEvent, None),
}

#: Fields that authenticate or transport an event but are not event data; never published.
TRANSPORT_FIELDS: Final = frozenset({"EventHandle", "Sign", "T"})

#: For types missing from ``EVENT_TYPES``: the payload's first present field of these becomes the key.
FALLBACK_KEY_FIELDS: Final = ("TaskId", "FileId")

#: Bound on a natural key (TaskId, FileId, ...): FileDeleted may join many FileIds, real ids are short.
MAX_KEY_LEN: Final = 4096

#: Bound on EventType length; anything longer is not a VOD event type and would bloat headers/metrics.
MAX_EVENT_TYPE_LEN: Final = 128


class VodEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One decoded event, ready to publish.

    ``value`` is the lossless envelope JSON; ``payload`` is the typed view of it (``None`` for event types
    the bridge does not model); ``key`` is the Kafka key as text.
    """

    event_type: str
    key: str
    value: bytes
    payload: VodStruct | None
    #: Set only for events obtained through ``PullEvents``.
    event_handle: str | None = None
    #: Callback authentication fields, kept aside for the signature check and never published.
    sign: str | None = None
    expires_at: int | None = None


_T = TypeVar("_T")

_envelope_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_str_decoder: Final[msgspec.json.Decoder[str | None]] = msgspec.json.Decoder(str | None)
_int_decoder: Final[msgspec.json.Decoder[int | None]] = msgspec.json.Decoder(int | None)
_object_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_payload_decoders: Final[dict[type[VodStruct], msgspec.json.Decoder[VodStruct | None]]] = {
    spec.model: msgspec.json.Decoder(spec.model | None) for spec in EVENT_TYPES.values()
}
_encoder: Final = msgspec.json.Encoder()


def decode_event(body: bytes) -> VodEvent:
    """Decode one VOD event (a callback body or one ``EventSet`` item) into a :class:`VodEvent`.

    Raises :class:`InvalidPayload` naming the problem: malformed JSON, not an object, missing or
    non-string ``EventType``, missing payload object, a payload field of the wrong type, or a missing id.
    """
    try:
        # Raw pieces are copied to Kafka unparsed: check the encoding of all of them here, once.
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload(f"body is not valid UTF-8 (byte {exc.start})", reason="invalid_utf8") from None
    try:
        envelope = _envelope_decoder.decode(body)
        return _decode_envelope(envelope)
    except msgspec.ValidationError as exc:
        raise InvalidPayload(f"body must be a JSON object: {exc}", reason="not_an_object") from exc
    except msgspec.DecodeError as exc:
        raise InvalidPayload(f"malformed JSON: {exc}", reason="malformed_json") from exc
    except RecursionError:
        raise InvalidPayload("JSON nested too deeply", reason="too_deep") from None
    except UnicodeDecodeError as exc:  # a \ud800-style escape msgspec cannot turn into text
        raise InvalidPayload(f"invalid string escape: {exc.reason}", reason="invalid_utf8") from None


def _decode_envelope(envelope: dict[str, msgspec.Raw]) -> VodEvent:

    event_type = _decode_field(envelope, "EventType", _str_decoder, required=True)
    assert event_type is not None
    if not event_type or len(event_type) > MAX_EVENT_TYPE_LEN:
        raise InvalidPayload(
            f"EventType must be a non-empty string of at most {MAX_EVENT_TYPE_LEN} characters",
            reason="invalid_event_type",
        )
    event_handle = _decode_field(envelope, "EventHandle", _str_decoder)
    sign = _decode_field(envelope, "Sign", _str_decoder)
    expires_at = _decode_field(envelope, "T", _int_decoder)

    published = {name: raw for name, raw in envelope.items() if name not in TRANSPORT_FIELDS}
    value = _encoder.encode(published)

    spec = EVENT_TYPES.get(event_type)
    if spec is None:
        payload = None
        key = _fallback_key(envelope) or content_key(value)
    else:
        payload = _decode_payload(envelope, spec)
        key = _natural_key(payload, spec) if spec.key_field is not None else content_key(value)

    return VodEvent(
        event_type=event_type,
        key=key,
        value=value,
        payload=payload,
        event_handle=event_handle,
        sign=sign,
        expires_at=expires_at,
    )


def content_key(value: bytes) -> str:
    """Key for events without a natural id: stable across re-deliveries of the same event."""
    return "sha256:" + hashlib.sha256(value).hexdigest()[:32]


def _decode_field(
    envelope: dict[str, msgspec.Raw],
    name: str,
    decoder: msgspec.json.Decoder[_T | None],
    *,
    required: bool = False,
) -> _T | None:
    raw = envelope.get(name)
    try:
        decoded = None if raw is None else decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidPayload(f"field {name!r}: {exc}", reason="wrong_type") from exc
    if decoded is None and required:
        raise InvalidPayload(f"missing required field {name!r}", reason=f"missing_{name.lower()}")
    return decoded


def _decode_payload(envelope: dict[str, msgspec.Raw], spec: EventSpec) -> VodStruct:
    raw = envelope.get(spec.payload_field)
    try:
        payload = None if raw is None else _payload_decoders[spec.model].decode(raw)
    except msgspec.ValidationError as exc:
        # msgspec's message carries the JSON path inside the payload (e.g. "at `$.ErrCode`").
        raise InvalidPayload(f"{spec.payload_field}: {exc}", reason="wrong_type") from exc
    if payload is None:
        raise InvalidPayload(
            f"EventType requires the object {spec.payload_field!r}, which is missing",
            reason="missing_payload",
        )
    return payload


def _natural_key(payload: VodStruct, spec: EventSpec) -> str:
    assert spec.key_field is not None
    key: object = getattr(payload, spec.key_field)
    if isinstance(key, list):
        key = ",".join(key)
    if not isinstance(key, str) or not key:
        raise InvalidPayload(
            f"{spec.payload_field}.{spec.key_field} is missing or empty; it is the Kafka key",
            reason="missing_key",
        )
    if len(key) > MAX_KEY_LEN:
        # Real ids are tens of characters; a huge one would bloat every log line and index that holds keys.
        raise InvalidPayload(
            f"{spec.payload_field}.{spec.key_field} is longer than {MAX_KEY_LEN} characters", reason="key_too_long"
        )
    return key


def _fallback_key(envelope: dict[str, msgspec.Raw]) -> str | None:
    """For unmodelled event types: ``TaskId`` or ``FileId`` of the (single) payload object, if any."""
    for name, raw in envelope.items():
        if name in TRANSPORT_FIELDS or name == "EventType":
            continue
        try:
            payload = _object_decoder.decode(raw)
        except msgspec.ValidationError:
            continue
        for field in FALLBACK_KEY_FIELDS:
            candidate = payload.get(field)
            if candidate is None:
                continue
            try:
                key = _str_decoder.decode(candidate)
            except msgspec.ValidationError:
                continue
            if key and len(key) <= MAX_KEY_LEN:
                return key
    return None
