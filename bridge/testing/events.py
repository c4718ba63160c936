"""Realistic VOD callback bodies for tests, one for every modelled ``EventType``: :func:`build_event`.

Pure functions, no pytest and no I/O. Each body has the documented shape (``EVENT_TYPES``: the type's payload
field, keyed by its key field), so the bridge's strict decoder reads it with no fallback. ``PullComplete`` is
the seed sample (``bridge/samples/pull-complete.json``) with a fresh ``TaskId``; every other type is generated
from its payload Struct (``bridge/vod/model.py``) with values chosen by field name. Ids (``TaskId``,
``FileId``, ``CastId``) are new on every call, so two bodies are never exact repeats (the bridge's
de-duplication would answer ``duplicate`` and publish nothing).
"""

from __future__ import annotations

import copy
import difflib
import json
import secrets
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final, Union

import msgspec

from bridge.vod.decode import decode_event
from bridge.vod.event_types import EVENT_TYPES
from bridge.vod.model import MediaBasicInfo, MediaCastEvent
from bridge.vod.signing import expected_sign

__all__ = ["ENVELOPE_FIELDS", "OMIT", "build_event", "event_key"]


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


#: An override value that removes the field: ``build_event("PullComplete", MediaBasicInfo=OMIT)``.
OMIT: Final = _Omit()

#: Override names that set the envelope, not the payload.
ENVELOPE_FIELDS: Final = frozenset({"EventType", "EventHandle"})

#: The VOD application (SubAppId) every generated id and URL belongs to.
_APP_ID: Final = "1256768367"
_NEVER_EXPIRES: Final = "9999-12-31T23:59:59Z"


def _new_file_id() -> str:
    """19 decimal digits, as VOD's FileIds."""
    return str(10**18 + secrets.randbelow(9 * 10**18))


@dataclass
class _Ids:
    """Values one body shares between its fields: its media file (FileId, URLs) and the time it was made."""

    event_type: str
    file_id: str = field(default_factory=_new_file_id)
    #: URL path prefixes: the app's storage bucket, the file's folder.
    bucket: str = field(default_factory=lambda: secrets.token_hex(4))
    folder: str = field(default_factory=lambda: secrets.token_hex(4))
    now: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def url(self, name: str) -> str:
        return f"http://{_APP_ID}.vod2.myqcloud.com/{self.bucket}vodcq{_APP_ID}/{self.folder}{self.file_id}/{name}"


_Gen = Callable[[_Ids, dict[str, Any]], Any]

#: Value by field name (``built`` is the object so far, in field order). A field missing here gets a value of
#: its type; ``OMIT`` leaves it out, as VOD omits null fields.
_BY_NAME: Final[dict[str, _Gen]] = {
    "TaskId": lambda ids, built: f"{_APP_ID}-{ids.event_type}-{secrets.token_hex(16)}",
    "Status": lambda ids, built: "FINISH",
    "ErrCode": lambda ids, built: 0,
    "Message": lambda ids, built: "SUCCESS",
    "FileId": lambda ids, built: ids.file_id,
    "FileIdSet": lambda ids, built: [ids.file_id, _new_file_id()],
    "FileDeleteResultInfo": lambda ids, built: [
        {"FileId": file_id, "DeleteParts": [{"Type": "OriginalFiles"}]} for file_id in built.get("FileIdSet", [])
    ],
    "FileUrl": lambda ids, built: ids.url("animal-world.mp4"),
    "MediaUrl": lambda ids, built: ids.url("animal-world.mp4"),
    "CoverUrl": lambda ids, built: ids.url("coverBySnapshot/1_0.jpg"),
    "FileName": lambda ids, built: "Animal World",
    "Name": lambda ids, built: "Animal World",
    "Description": lambda ids, built: "",
    "CreateTime": lambda ids, built: ids.now,
    "UpdateTime": lambda ids, built: ids.now,
    "ExpireTime": lambda ids, built: _NEVER_EXPIRES,
    "ClassId": lambda ids, built: 0,
    "ClassName": lambda ids, built: "Other",
    "ClassPath": lambda ids, built: "Other",
    "Type": lambda ids, built: "mp4",
    "StorageRegion": lambda ids, built: "ap-chongqing",
    "StoragePath": lambda ids, built: OMIT,
    "TagSet": lambda ids, built: [],
    "Vid": lambda ids, built: "",
    "Category": lambda ids, built: "Video",
    "StorageClass": lambda ids, built: "STANDARD",
    "SourceType": lambda ids, built: "Upload",
    "SourceContext": lambda ids, built: "",
    "LiveRecordInfo": lambda ids, built: OMIT,
    "TrtcRecordInfo": lambda ids, built: OMIT,
    "WebPageRecordInfo": lambda ids, built: OMIT,
    "Size": lambda ids, built: 10_485_760,
    "Container": lambda ids, built: "mov,mp4,m4a,3gp,3g2,mj2",
    "Bitrate": lambda ids, built: 1_997_000,
    "Height": lambda ids, built: 720,
    "Width": lambda ids, built: 1280,
    "Duration": lambda ids, built: 42.0,
    "Rotate": lambda ids, built: 0,
    "VideoStreamSet": lambda ids, built: [
        {"Bitrate": 1_869_000, "Height": 720, "Width": 1280, "Codec": "h264", "Fps": 25}
    ],
    "AudioStreamSet": lambda ids, built: [{"Bitrate": 128_000, "SamplingRate": 44100, "Codec": "aac"}],
    "VideoDuration": lambda ids, built: 42.0,
    "AudioDuration": lambda ids, built: 42.0,
    "Md5": lambda ids, built: secrets.token_hex(16),
    "ProcedureTaskId": lambda ids, built: "",
    "ReviewAudioVideoTaskId": lambda ids, built: "",
    "SessionContext": lambda ids, built: "",
    "SessionId": lambda ids, built: "",
    "Progress": lambda ids, built: 100,
    "TasksPriority": lambda ids, built: 0,
    "TasksNotifyMode": lambda ids, built: "Finish",
    "Operator": lambda ids, built: "",
    "OperationType": lambda ids, built: "",
    "CastId": lambda ids, built: f"cast-{secrets.token_hex(8)}",
}

#: Where a field name means something else in one Struct.
_BY_STRUCT_FIELD: Final[dict[tuple[type[msgspec.Struct], str], _Gen]] = {
    (MediaBasicInfo, "Status"): lambda ids, built: "Normal",
    (MediaCastEvent, "Status"): lambda ids, built: "Working",
}

#: Payloads the bridge does not model field by field (``OpaqueEvent``): the shape Tencent's page shows (also in
#: ``tests/vod/bodies/``). Its key is a content hash, so the fresh FileId is what makes each body new.
_UNMODELLED: Final[dict[str, Callable[[_Ids], dict[str, Any]]]] = {
    "ProcessImageAsyncCompleteEvent": lambda ids: {
        "Status": "FINISH",
        "ErrCode": 0,
        "Message": "SUCCESS",
        "Output": {"FileId": ids.file_id, "FileUrl": ids.url("image_enhanced.jpg")},
        "SessionContext": "",
        "SessionId": "",
    },
}

_BY_TYPE: Final[dict[type, Any]] = {str: "", int: 0, float: 0.0, bool: False, list: [], dict: {}}


def build_event(
    event_type: str,
    *,
    signed: bool = False,
    sign_key: str | None = None,
    expires_in_s: int = 600,
    extra: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A new, realistic callback body of ``event_type`` (any key of ``EVENT_TYPES``), as VOD posts it.

    ``overrides`` set fields of the payload object (``TaskId="t-1"``, ``ErrCode=70000``), except
    ``EventType`` and ``EventHandle``, which set the envelope. Nested fields are reached two ways:
    ``MediaBasicInfo__Name="x"`` (path segments joined by ``__``), or a dict value, which is merged into the
    generated object recursively (``MediaBasicInfo={"Name": "x"}`` keeps the other fields). Any other value
    replaces the field; ``None`` sends an explicit JSON null, and :data:`OMIT` removes the field. Field names
    are checked against the payload's model: a name it lacks raises :class:`TypeError` listing the valid
    ones; ``extra`` is merged into the payload unchecked, for fields the model does not know.

    ``signed=True`` adds ``T`` (a JSON number: UNIX seconds ``expires_in_s`` from now, as VOD sends it; a
    negative value makes an expired signature) and ``Sign`` = ``MD5(sign_key + T)``; it needs ``sign_key``.

    Raises :class:`ValueError` for an event type the bridge does not model (listing the modelled ones).
    """
    spec = EVENT_TYPES.get(event_type)
    if spec is None:
        raise ValueError(f"{event_type!r} is not a modelled VOD EventType; modelled: {', '.join(sorted(EVENT_TYPES))}")
    if sign_key is not None and not signed:
        raise ValueError("sign_key is given but signed=False: pass signed=True to add Sign/T")
    if signed and not sign_key:
        raise ValueError("signed=True needs sign_key (the VOD app's SignKey)")

    ids = _Ids(event_type)
    if event_type == "PullComplete":
        body = _seed_sample()
        body[spec.payload_field]["TaskId"] = _BY_NAME["TaskId"](ids, {})
    elif event_type in _UNMODELLED:
        body = {"EventType": event_type, spec.payload_field: _UNMODELLED[event_type](ids)}
    else:
        body = {"EventType": event_type, spec.payload_field: _generate(spec.model, ids)}

    payload = body[spec.payload_field]
    shape = _Shape.of_struct(spec.model) if spec.model.__struct_fields__ else _Shape.of_keys(payload)
    where = f"{event_type} ({spec.payload_field})"
    for name, value in overrides.items():
        if name in ENVELOPE_FIELDS:
            _set(body, name, value)
            continue
        path = name.split("__")
        if not all(path):
            raise TypeError(f"{where}: bad override name {name!r}: nested fields are joined by a double underscore")
        nested: Any = value
        for segment in reversed(path[1:]):
            nested = {segment: nested}
        _merge(payload, shape, {path[0]: nested}, where)
    if extra:
        _merge(payload, _Shape.free(), extra, where)

    if signed:
        assert sign_key is not None
        expires_at = int(time.time()) + expires_in_s
        body["Sign"] = expected_sign(sign_key, expires_at)
        body["T"] = expires_at
    return body


def event_key(event: Mapping[str, Any]) -> str:
    """The Kafka key the bridge gives ``event`` (its TaskId, FileId, ... or, for a type without an id, the
    content hash of the body as :meth:`~bridge.testing.VodBridge.post` encodes it).

    Raises :class:`bridge.errors.InvalidPayload` when the bridge would dead-letter the body instead.
    """
    return decode_event(msgspec.json.encode(event)).key


def _seed_sample() -> dict[str, Any]:
    sample: dict[str, Any] = json.loads(resources.files("bridge").joinpath("samples/pull-complete.json").read_bytes())
    return sample


def _generate(struct: type[msgspec.Struct], ids: _Ids) -> dict[str, Any]:
    """Every field of ``struct`` that has a realistic value, in declaration order."""
    built: dict[str, Any] = {}
    for info in msgspec.structs.fields(struct):
        generate = _BY_STRUCT_FIELD.get((struct, info.name)) or _BY_NAME.get(info.name)
        nested = _struct_in(info.type)
        if generate is not None:
            value = generate(ids, built)
        elif nested is not None:
            value = _generate(nested, ids)
        else:
            # A field added to the model later and not named above: a value of its type, never a crash.
            value = next((copy.copy(_BY_TYPE[t]) for t in _plain_types(info.type) if t in _BY_TYPE), OMIT)
        if value is not OMIT:
            built[info.encode_name] = value
    return built


def _plain_types(annotation: Any) -> list[type]:
    """The runtime classes an annotation allows (``str | None`` -> [str, NoneType]; ``list[str]`` -> [list])."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _plain_types(arg)]
    if origin is not None:
        return [origin]
    return [annotation] if isinstance(annotation, type) else []


def _struct_in(annotation: Any) -> type[msgspec.Struct] | None:
    return next((t for t in _plain_types(annotation) if issubclass(t, msgspec.Struct)), None)


@dataclass(frozen=True)
class _Shape:
    """Which field names an object may have (``None``: any), and the shapes of its nested objects."""

    names: frozenset[str] | None
    children: Mapping[str, _Shape]

    @classmethod
    def free(cls) -> _Shape:
        return cls(None, {})

    @classmethod
    def of_keys(cls, obj: Mapping[str, Any]) -> _Shape:
        return cls(frozenset(obj), {})

    @classmethod
    def of_struct(cls, struct: type[msgspec.Struct]) -> _Shape:
        children = {}
        for info in msgspec.structs.fields(struct):
            nested = _struct_in(info.type)
            if nested is not None:
                children[info.encode_name] = cls.of_struct(nested)
        return cls(frozenset(info.encode_name for info in msgspec.structs.fields(struct)), children)

    def child(self, name: str, where: str) -> _Shape:
        if self.names is not None and name not in self.names:
            close = difflib.get_close_matches(name, self.names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"{where} has no field {name!r}{hint}; its fields: {', '.join(sorted(self.names))}. "
                "Pass fields the model does not know in extra={...}"
            )
        return self.children.get(name, _FREE)


_FREE: Final = _Shape.free()


def _merge(target: dict[str, Any], shape: _Shape, updates: Mapping[str, Any], where: str) -> None:
    for name, value in updates.items():
        child = shape.child(name, where)
        if isinstance(value, Mapping):
            current = target.get(name)
            if not isinstance(current, dict):
                current = target[name] = {}
            _merge(current, child, value, f"{where}.{name}")
        else:
            _set(target, name, value)


def _set(target: dict[str, Any], name: str, value: Any) -> None:
    if value is OMIT:
        target.pop(name, None)
    else:
        target[name] = copy.deepcopy(value)
