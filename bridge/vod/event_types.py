"""The explicit EventType table: the payload field name is not derivable from the type by a rule, and neither is
the field that identifies the event (the Kafka key)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec

from bridge.vod.model import (
    FileDeleteEvent,
    FileIdEvent,
    FileUploadEvent,
    MediaCastEvent,
    OpaqueEvent,
    ProcedureStateChangeEvent,
    PullCompleteEvent,
    TaskEvent,
    VodStruct,
)


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

#: For types missing from ``EVENT_TYPES`` (and payload fields that name no known type): the payload's first
#: usable field of these becomes the key.
FALLBACK_KEY_FIELDS: Final = ("TaskId", "FileId")

#: Key fields of the legacy v2.0 envelope's ``data`` object, in priority order: the task id (``vodTaskId``,
#: ``taskId``) where there is one, else the media file (``fileId``; a list for FileDeleted), else the source
#: file of a clip/sprite/snapshot (``srcFileId``). ``vodTaskId`` before ``fileId`` as in the v2.0 docs, where
#: task events carry both. Matched case-insensitively, like every key field.
LEGACY_KEY_FIELDS: Final = ("vodTaskId", "fileId", "taskId", "srcFileId")

#: The EventType given to an event that has none and whose payload field names no known type.
UNKNOWN_EVENT_TYPE: Final = "Unknown"

#: Payload field name -> EventType, to name an event that arrives without ``EventType``: every EventType used as
#: a field name (Tencent's pages show ``WechatPublishComplete``, ``EditMediaComplete``), the aliases seen in
#: Tencent's documentation, and, winning over both, the table's own payload fields.
EVENT_TYPE_BY_FIELD: Final[Mapping[str, str]] = {
    **{event_type: event_type for event_type in EVENT_TYPES},
    "RestoreCompleteEvent": "RestoreMediaComplete",
    **{spec.payload_field: event_type for event_type, spec in EVENT_TYPES.items()},
}

#: Bound on a natural key (TaskId, FileId, ...): FileDeleted may join many FileIds, real ids are short.
MAX_KEY_LEN: Final = 4096

#: Bound on EventType length; anything longer is not a VOD event type and would bloat headers/metrics.
MAX_EVENT_TYPE_LEN: Final = 128
