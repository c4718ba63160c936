"""The VOD event model: typed payload Structs (field names as in the VOD SDK), and the decoded event.

Field names follow the VOD SDK (tencentcloud-sdk-python-vod 3.1.194, models.py). Every field has a default:
VOD omits null fields, and an absent optional field must not reject an event. Unknown fields are ignored by
the Structs; they survive in the lossless value (see :mod:`bridge.vod.decode`).
"""

from __future__ import annotations

from typing import Any, Final, Literal, get_args

import msgspec

#: How the body was framed: the API 3.0 ``EventContent`` envelope, or the legacy v2.0 callback envelope
#: ``{"version": "4.0", "eventType": ..., "data": {...}}``.
EventFormat = Literal["eventcontent", "legacy-v2"]

#: Labels of :attr:`VodEvent.fallbacks`: how the tolerant reader coped with a body that departs from the
#: documented shape. A closed set, because they become a metric label (schema drift must be countable without
#: letting callers mint label values).
Fallback = Literal[
    # The legacy v2.0 callback envelope; its key comes from ``data`` (``LEGACY_KEY_FIELDS``).
    "legacy_envelope",
    # A known EventType whose payload sits under another field name (``WechatPublishComplete``, another
    # type's field, ...): found as the single object field that carries the type's id.
    "payload_field_alias",
    # No EventType (a PullEvents item in Tencent's examples): named after its payload field, else
    # ``UNKNOWN_EVENT_TYPE``.
    "event_type_inferred",
    # The key field matched case-insensitively (``fileId``, ``taskId``, ``TaskID``).
    "key_field_case",
    # The id was a JSON number: the key is its text as sent, never a float or int round trip.
    "numeric_key",
    # The payload did not validate against its typed Struct (e.g. an int given as a list): published with
    # ``payload=None``.
    "payload_type_mismatch",
    # ``EventHandle``, ``Sign`` or ``T`` had the wrong JSON type and was left unset (``T`` also when it is not
    # UNIX seconds in digits: ``expires_at`` stays unset, ``expires_at_text`` keeps it for the signature check).
    "transport_field_unreadable",
]
FALLBACK_REASONS: Final[frozenset[str]] = frozenset(get_args(Fallback))

#: Values of :attr:`Undecodable.reason`, a closed set for the same reason as :data:`Fallback`.
UndecodableReason = Literal[
    # ``EventType`` (or legacy ``eventType``) is not a non-empty string of at most ``MAX_EVENT_TYPE_LEN`` chars.
    "invalid_event_type",
    # An EventType, but no payload object at all.
    "no_payload",
    # A payload for a type whose key field is known (``EVENT_TYPES``), without that id.
    "missing_key",
    # Two or more object fields carry an id: the reader does not guess which one is the event.
    "ambiguous_payload",
    # The id is longer than ``MAX_KEY_LEN`` characters.
    "key_too_long",
    # No EventType and no object field that carries an id: nothing says what the body is.
    "unrecognised",
]
UNDECODABLE_REASONS: Final[frozenset[str]] = frozenset(get_args(UndecodableReason))


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


class VodEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One decoded event, ready to publish.

    ``value`` is the lossless envelope JSON (for the legacy envelope: the body exactly as sent); ``payload`` is
    the typed view of it (``None`` for event types the bridge does not model, for the legacy envelope, and
    when the payload does not validate, see ``fallbacks``); ``key`` is the Kafka key as text.
    """

    event_type: str
    key: str
    value: bytes
    payload: VodStruct | None
    #: Set only for events obtained through ``PullEvents``.
    event_handle: str | None = None
    #: Callback authentication fields, kept aside for the signature check and never published.
    sign: str | None = None
    #: ``T``'s value (UNIX seconds) when it was sent as digits (a JSON number or a numeric string, at most
    #: ``signing.MAX_T_CHARS`` of them).
    expires_at: int | None = None
    #: ``T`` exactly as sent (a string's content or a number's text): what ``Sign`` covers. Set whenever ``T``
    #: is a string or a number, digits or not (the signature check says why it is unusable).
    expires_at_text: str | None = None
    format: EventFormat = "eventcontent"
    #: How the tolerant reader coped where the body departs from the documented shape (empty for a documented
    #: body); labels from :data:`FALLBACK_REASONS`, for metrics.
    fallbacks: tuple[Fallback, ...] = ()


class Undecodable(msgspec.Struct, frozen=True, kw_only=True):
    """A JSON object that is not a publishable event (no key can be found): it goes to the dead-letter topic.

    ``value`` is what the dead-letter record carries: the body minus transport fields (``EventHandle``,
    ``Sign``, ``T``). ``message`` says the reason for humans. The other fields are read leniently, for
    authentication and headers, when present.
    """

    #: One of :data:`UNDECODABLE_REASONS` from the reader; a caller that dead-letters a body which is not even a
    #: JSON object (an ``EventSet`` item) uses the ``InvalidPayload`` reason instead (see ``read_event``).
    reason: str
    message: str
    value: bytes
    event_type: str | None = None
    event_handle: str | None = None
    sign: str | None = None
    expires_at: int | None = None
    expires_at_text: str | None = None
