"""The Kafka record contract (README "Record contract"): header names, and the headers of event and dead-letter
records. Every module that writes or reads these headers takes the names from here."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final, Literal, get_args

from bridge.timefmt import rfc3339_utc_bytes
from bridge.vod.event_types import EVENT_TYPES
from bridge.vod.model import EventFormat, Undecodable, VodEvent

#: Where an event came from: the normal callback (HTTP POST) or the reliable callback (PullEvents).
Source = Literal["callback", "pull"]
Headers = list[tuple[str, bytes]]

EVENT_TYPE: Final = "event-type"
SOURCE: Final = "source"
RECEIVED_AT: Final = "received-at"
CONTENT_TYPE: Final = "content-type"
#: Only on records from the reliable (PullEvents) source.
EVENT_HANDLE: Final = "event-handle"
#: The VOD application (``SubAppId``, decimal) the event came from: the poller loop's SubAppId, or the one in the
#: callback path (``<callback path>/<SubAppId>``). Absent when neither names one (the default application).
SUB_APP_ID: Final = "vod-sub-app-id"
#: ``eventcontent`` (the API 3.0 ``EventContent`` envelope) or ``legacy-v2`` (the v2.0 callback envelope).
EVENT_FORMAT: Final = "event-format"
#: Dead-letter records: a bounded reason label, and the human-readable error.
ERROR_REASON: Final = "error-reason"
ERROR: Final = "error"
#: Records re-published by ``vod-bridge redrive``: ``<topic>:<partition>:<offset>`` of the dead letter.
REDRIVEN_FROM: Final = "redriven-from"

CONTENT_TYPE_JSON: Final = b"application/json"
#: Bound on the ``error`` header: enough to explain, never a payload dump.
MAX_ERROR_BYTES: Final = 1000

_SOURCE_BYTES: Final = {"callback": b"callback", "pull": b"pull"}

# Every event record carries these: the constant (name, value) pairs are built once, not per record.
_SOURCE_HEADERS: Final = {source: (SOURCE, value) for source, value in _SOURCE_BYTES.items()}
_FORMAT_HEADERS: Final = {name: (EVENT_FORMAT, name.encode()) for name in get_args(EventFormat)}
_CONTENT_TYPE_HEADER: Final = (CONTENT_TYPE, CONTENT_TYPE_JSON)
#: Known types only (a bounded set); any other EventType is encoded per record.
_EVENT_TYPE_HEADERS: Final = {name: (EVENT_TYPE, name.encode()) for name in EVENT_TYPES}


def event_headers(
    event: VodEvent,
    *,
    source: Source,
    received_at: datetime,
    sub_app_id: int | None = None,
    extra: Sequence[tuple[str, bytes]] = (),
) -> Headers:
    """The headers of an event record on its main topic."""
    event_type = event.event_type
    headers = [
        _EVENT_TYPE_HEADERS.get(event_type) or (EVENT_TYPE, event_type.encode()),
        _SOURCE_HEADERS[source],
        (RECEIVED_AT, rfc3339_utc_bytes(received_at)),
        _CONTENT_TYPE_HEADER,
        _FORMAT_HEADERS[event.format],
    ]
    if event.event_handle is not None:
        headers.append((EVENT_HANDLE, event.event_handle.encode()))
    if sub_app_id is not None:
        headers.append(sub_app_id_header(sub_app_id))
    headers.extend(extra)
    return headers


def sub_app_id_header(sub_app_id: int) -> tuple[str, bytes]:
    """The ``vod-sub-app-id`` header of a record from VOD application ``sub_app_id``."""
    return (SUB_APP_ID, str(sub_app_id).encode())


def dead_letter_headers(
    *,
    source: Source,
    received_at: datetime,
    reason: str,
    error: str,
    event_type: str | None = None,
    event_handle: str | None = None,
    sub_app_id: int | None = None,
    extra: Sequence[tuple[str, bytes]] = (),
) -> Headers:
    """The headers of a dead-letter record: where and when it came from, and why it is not on the main topic."""
    headers = [
        _SOURCE_HEADERS[source],
        (RECEIVED_AT, rfc3339_utc_bytes(received_at)),
        _CONTENT_TYPE_HEADER,
        (ERROR_REASON, reason.encode()),
        (ERROR, error.encode()[:MAX_ERROR_BYTES]),
    ]
    if event_type is not None:
        headers.append((EVENT_TYPE, event_type.encode()))
    if event_handle is not None:
        headers.append((EVENT_HANDLE, event_handle.encode()))
    if sub_app_id is not None:
        headers.append(sub_app_id_header(sub_app_id))
    headers.extend(extra)
    return headers


def undecodable_headers(
    item: Undecodable,
    *,
    source: Source,
    received_at: datetime,
    sub_app_id: int | None = None,
    extra: Sequence[tuple[str, bytes]] = (),
) -> Headers:
    """The headers of the dead-letter record of a body without a usable key."""
    return dead_letter_headers(
        source=source,
        received_at=received_at,
        reason=item.reason,
        error=item.message,
        event_type=item.event_type,
        event_handle=item.event_handle,
        sub_app_id=sub_app_id,
        extra=extra,
    )


def header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    """The first value of header ``name`` as text (``None`` when absent)."""
    for key, value in headers or ():
        if key == name:
            return value.decode(errors="replace")
    return None
