"""JSON Schemas of the Kafka record contract, generated from the Structs in ``bridge.vod.model``.

``schemas/`` in the repository is this module's output (``vod-bridge schema --write schemas``); a test
fails when the committed files are stale. ``vod-bridge schema NAME`` prints one of them (:data:`SCHEMA_NAMES`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from bridge import __version__
from bridge.config import SUB_APP_ID_PATTERN
from bridge.delivery import records
from bridge.errors import ConfigError
from bridge.vod.event_types import EVENT_TYPES, EventSpec

VALUE_SCHEMA_FILE: Final = "vod-event.value.schema.json"
HEADERS_SCHEMA_FILE: Final = "vod-event.headers.schema.json"
KEYS_FILE: Final = "vod-event.keys.json"
ASYNCAPI_FILE: Final = "asyncapi.json"
_SCHEMA_FORMAT: Final = "application/schema+json;version=2020-12"
#: A ``vod-sub-app-id`` header value: a SubAppId in decimal, as the configuration and the callback path take it.
_SUB_APP_ID_TEXT: Final = f"^{SUB_APP_ID_PATTERN}$"
#: The names ``vod-bridge schema NAME`` takes, each for one file of ``schemas/``; the first is the default.
SCHEMA_NAMES: Final = {
    "value": VALUE_SCHEMA_FILE,
    "headers": HEADERS_SCHEMA_FILE,
    "keys": KEYS_FILE,
    "asyncapi": ASYNCAPI_FILE,
}
DEFAULT_SCHEMA: Final = "value"


class UnknownSchema(ConfigError):
    """``vod-bridge schema NAME`` with a name not in :data:`SCHEMA_NAMES`."""


class RecordHeaders(msgspec.Struct, kw_only=True):
    """Kafka headers of every event record (UTF-8 values)."""

    event_type: str = msgspec.field(name=records.EVENT_TYPE)
    source: Literal["callback", "pull"] = msgspec.field(name=records.SOURCE)
    #: RFC 3339 UTC with milliseconds, e.g. ``2026-11-26T11:30:31.123Z``: when the bridge received it.
    received_at: str = msgspec.field(name=records.RECEIVED_AT)
    content_type: Literal["application/json"] = msgspec.field(name=records.CONTENT_TYPE)
    #: ``eventcontent``: the API 3.0 EventContent object. ``legacy-v2``: the v2.0 callback envelope
    #: ``{"version", "eventType", "data"}``, published exactly as VOD sent it.
    event_format: Literal["eventcontent", "legacy-v2"] = msgspec.field(name=records.EVENT_FORMAT)
    #: Only on records from the reliable (PullEvents) source.
    event_handle: str | None = msgspec.field(name=records.EVENT_HANDLE, default=None)
    #: The VOD application (``SubAppId``, decimal digits): the poller loop's, or the one in the callback path; absent
    #: when neither names one (the default application).
    sub_app_id: Annotated[str, msgspec.Meta(pattern=_SUB_APP_ID_TEXT)] | None = msgspec.field(
        name=records.SUB_APP_ID, default=None
    )
    #: Only on records re-published by ``vod-bridge redrive``: ``<topic>:<partition>:<offset>`` of the dead letter.
    redriven_from: str | None = msgspec.field(name=records.REDRIVEN_FROM, default=None)


def _envelope(event_type: str, spec: EventSpec) -> type[msgspec.Struct]:
    return msgspec.defstruct(
        f"{event_type}Record",
        [("EventType", Literal[event_type]), (spec.payload_field, spec.model)],
        kw_only=True,
    )


class OtherEventRecord(msgspec.Struct, kw_only=True):
    """Any other EventType VOD sends, or a body of another shape: passed through untouched."""

    EventType: str | None = None


class LegacyEventRecord(msgspec.Struct, kw_only=True):
    """The v2.0 callback envelope (header ``event-format: legacy-v2``), published exactly as sent."""

    version: str | None = None
    eventType: str
    data: dict[str, Any] | None = None


def build_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON document, deterministic (sorted keys when written)."""
    envelopes = [_envelope(event_type, spec) for event_type, spec in EVENT_TYPES.items()]
    (schemas, components) = msgspec.json.schema_components(
        [*envelopes, LegacyEventRecord, OtherEventRecord], ref_template="#/$defs/{name}"
    )
    value_schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": VALUE_SCHEMA_FILE,
        "title": "VOD event (Kafka record value)",
        "description": (
            "The VOD EventContent object as received, minus EventHandle/Sign/T. Unknown fields are kept "
            "verbatim; consumers must ignore fields they do not know. VOD's own documentation shows bodies that "
            "do not match the SDK (another payload field name, ids as numbers, lower-case names, explicit nulls): "
            "they are published as received, so a payload may not validate against its typed schema below. "
            "Records with the header event-format=legacy-v2 carry the v2.0 envelope "
            '{"version", "eventType", "data"} exactly as sent.'
        ),
        "anyOf": schemas,
        "$defs": components,
    }
    _, header_components = msgspec.json.schema_components([RecordHeaders], ref_template="#/$defs/{name}")
    headers_doc: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": HEADERS_SCHEMA_FILE,
        "title": "VOD event (Kafka record headers)",
        **header_components["RecordHeaders"],
    }
    keys_doc: dict[str, Any] = {
        "description": (
            "Kafka record key per EventType (UTF-8). key_field null: 'sha256:' + first 32 hex digits of "
            "SHA-256 of the value. Unlisted types: the payload's TaskId, else FileId, else the hash."
        ),
        "keys": {
            event_type: {"payload_field": spec.payload_field, "key_field": spec.key_field}
            for event_type, spec in EVENT_TYPES.items()
        },
    }
    return {
        VALUE_SCHEMA_FILE: value_schema,
        HEADERS_SCHEMA_FILE: headers_doc,
        KEYS_FILE: keys_doc,
        ASYNCAPI_FILE: asyncapi_document(),
    }


def asyncapi_document() -> dict[str, Any]:
    """AsyncAPI 3.0: the topics, key, headers and value the bridge sends (schemas by reference)."""
    key_description = (
        "UTF-8 natural id of the event: TaskId for PullComplete and most task events, FileId, FileIdSet joined "
        f"with ',' or CastId for others (see {KEYS_FILE}); 'sha256:' + 32 hex digits of the value's SHA-256 "
        "when the payload has no id."
    )
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "vod-kafka-bridge",
            "version": __version__,
            "description": (
                "Tencent Cloud VOD event notifications (normal callbacks and PullEvents) published to Kafka, one "
                "record per event, at least once. The producer uses acks=all; consumers de-duplicate by key and "
                "Status."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "kafka": {
                "host": "localhost:9092",
                "protocol": "kafka",
                "description": "BRIDGE_KAFKA_BOOTSTRAP_SERVERS",
            }
        },
        "channels": {
            "vodEvents": {
                "address": "vod.events",
                "description": "BRIDGE_KAFKA_TOPIC; BRIDGE_KAFKA_TOPIC_ROUTES may move event types to other topics.",
                "messages": {"vodEvent": {"$ref": "#/components/messages/vodEvent"}},
            },
            "deadLetters": {
                "address": "vod.events.dlq",
                "description": (
                    "BRIDGE_KAFKA_DEAD_LETTER_TOPIC: JSON objects without a usable key (from either source), and "
                    "spooled records Kafka refused for good; `vod-bridge redrive` moves them back once they decode."
                ),
                "messages": {"deadLetter": {"$ref": "#/components/messages/deadLetter"}},
            },
        },
        "operations": {
            "publishVodEvent": {
                "action": "send",
                "channel": {"$ref": "#/channels/vodEvents"},
                "messages": [{"$ref": "#/channels/vodEvents/messages/vodEvent"}],
            },
            "publishDeadLetter": {
                "action": "send",
                "channel": {"$ref": "#/channels/deadLetters"},
                "messages": [{"$ref": "#/channels/deadLetters/messages/deadLetter"}],
            },
        },
        "components": {
            "messages": {
                "vodEvent": {
                    "name": "VodEvent",
                    "title": "A VOD event",
                    "contentType": "application/json",
                    "headers": {"schemaFormat": _SCHEMA_FORMAT, "schema": {"$ref": HEADERS_SCHEMA_FILE}},
                    "payload": {"schemaFormat": _SCHEMA_FORMAT, "schema": {"$ref": VALUE_SCHEMA_FILE}},
                    "bindings": {
                        "kafka": {"key": {"type": "string", "description": key_description}, "bindingVersion": "0.5.0"}
                    },
                },
                "deadLetter": {
                    "name": "DeadLetter",
                    "title": "A body that could not be published as an event",
                    "contentType": "application/json",
                    "headers": {
                        "type": "object",
                        "properties": {
                            records.SOURCE: {"enum": ["pull", "callback"]},
                            records.RECEIVED_AT: {"type": "string"},
                            records.CONTENT_TYPE: {"const": "application/json"},
                            records.ERROR_REASON: {
                                "type": "string",
                                "description": "bounded label: missing_key, ambiguous_payload, kafka_refused, ...",
                            },
                            records.ERROR: {"type": "string", "maxLength": records.MAX_ERROR_BYTES},
                            records.EVENT_TYPE: {"type": "string", "description": "when the body names one"},
                            records.EVENT_HANDLE: {"type": "string"},
                            records.SUB_APP_ID: {
                                "type": "string",
                                "pattern": _SUB_APP_ID_TEXT,
                                "description": "the VOD application (SubAppId), when known",
                            },
                        },
                        "required": [records.SOURCE, records.RECEIVED_AT, records.ERROR_REASON, records.ERROR],
                    },
                    "payload": {
                        "description": (
                            "the body as received minus EventHandle/Sign/T (a JSON object), or, for an EventSet item "
                            "or spool record that is not one, its bytes as they were"
                        )
                    },
                    "bindings": {
                        "kafka": {
                            "key": {"type": "string", "description": "the EventHandle, if any (else no key)"},
                            "bindingVersion": "0.5.0",
                        }
                    },
                },
            }
        },
    }


def schema_document(name: str = DEFAULT_SCHEMA) -> dict[str, Any]:
    """The one document ``name`` stands for (see :data:`SCHEMA_NAMES`); :class:`UnknownSchema` otherwise."""
    file_name = SCHEMA_NAMES.get(name)
    if file_name is None:
        raise UnknownSchema(f"unknown schema {name!r}; available: {', '.join(SCHEMA_NAMES)}")
    return build_schemas()[file_name]


def render(document: dict[str, Any]) -> bytes:
    return msgspec.json.format(msgspec.json.encode(document, order="sorted"), indent=2) + b"\n"


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in build_schemas().items():
        path = directory / name
        path.write_bytes(render(document))
        written.append(path)
    return written
