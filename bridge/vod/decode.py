"""The sans-I/O tolerant reader: one event's JSON (a callback body or one ``EventSet`` item) into a publishable
record, or into a dead letter.

VOD does not fix its own bodies (Tencent's own pages show payloads under other field names, explicit nulls,
numeric ids, lower-case names, a legacy envelope), and a refused callback is a lost event. So
:func:`read_event` refuses only what is not a JSON object; any JSON object becomes a :class:`VodEvent` (main
topic) or an :class:`Undecodable` (dead-letter topic). The key is looked for in this order:

1. the ``EVENT_TYPES`` table: the payload under the type's documented field, keyed by the type's key field.
   This is the documented shape and the hot path: it does exactly what the strict decoder always did;
2. the legacy v2.0 envelope ``{"version": "4.0", "eventType": ..., "data": {...}}`` (no ``EventType``): the
   first of ``LEGACY_KEY_FIELDS`` in ``data``. Checked before rule 3, which would take ``data`` for a payload;
3. the single non-null object field that carries an id (a payload under another field name, an item without
   ``EventType``). Two such objects are dead-lettered (``ambiguous_payload``), never guessed between.

A known type is always keyed by its own key field (``EventSpec.key_field``), whichever rule found its payload:
keying a PullComplete by a FileId would silently change what the key means. Ids are read from the raw JSON: a
key field matches case-insensitively, and a JSON number id becomes its text as sent (an id above 2**53 would
change through a float). Every departure from the documented shape is labelled in ``VodEvent.fallbacks``.

The value is the envelope re-encoded from the body's raw pieces, minus the transport-only fields
(``EventHandle``, ``Sign``, ``T``): a field VOD adds tomorrow reaches Kafka byte for byte although the Structs
do not know it. Nothing here does I/O or logging, so every rule is unit-testable without a broker or a server.
"""

from __future__ import annotations

import hashlib
from typing import Final

import msgspec

from bridge.errors import InvalidPayload
from bridge.vod.event_types import (
    EVENT_TYPE_BY_FIELD,
    EVENT_TYPES,
    FALLBACK_KEY_FIELDS,
    LEGACY_KEY_FIELDS,
    MAX_EVENT_TYPE_LEN,
    MAX_KEY_LEN,
    TRANSPORT_FIELDS,
    UNKNOWN_EVENT_TYPE,
    EventSpec,
)
from bridge.vod.model import Fallback, Undecodable, UndecodableReason, VodEvent, VodStruct
from bridge.vod.signing import parse_expiry

#: Any JSON object (the envelope, a payload, legacy ``data``), its field values kept as raw bytes.
_object_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_str_decoder: Final[msgspec.json.Decoder[str | None]] = msgspec.json.Decoder(str | None)
_list_decoder: Final = msgspec.json.Decoder(list[msgspec.Raw])
_payload_decoders: Final[dict[type[VodStruct], msgspec.json.Decoder[VodStruct | None]]] = {
    spec.model: msgspec.json.Decoder(spec.model | None) for spec in EVENT_TYPES.values()
}
_encoder: Final = msgspec.json.Encoder()

# First bytes of raw JSON values (a msgspec.Raw starts at its value, never at whitespace).
_OBJECT: Final = ord("{")
_ARRAY: Final = ord("[")
_STRING: Final = ord('"')
_NUMBER: Final = frozenset(b"-0123456789")

_NO_FALLBACKS: Final[tuple[Fallback, ...]] = ()

#: The transport-only fields: (EventHandle, Sign, T's value, T's text as sent, fallback labels).
_Transport = tuple[str | None, str | None, int | None, str | None, tuple[Fallback, ...]]
_NO_TRANSPORT: Final[_Transport] = (None, None, None, None, _NO_FALLBACKS)


def read_event(body: bytes) -> VodEvent | Undecodable:
    """Read one event: a :class:`VodEvent` when a key can be found, else an :class:`Undecodable` for the
    dead-letter topic.

    Raises :class:`InvalidPayload` only when the body is not a JSON object (reason ``invalid_utf8``,
    ``malformed_json``, ``not_an_object`` or ``too_deep``): invalid UTF-8, malformed JSON, another JSON value, or
    nesting deeper than the parser allows. Any other input returns.
    """
    try:
        # Raw pieces are copied to Kafka unparsed: check the encoding of all of them here, once.
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload(f"body is not valid UTF-8 (byte {exc.start})", reason="invalid_utf8") from None
    try:
        envelope = _object_decoder.decode(body)
        return _read(envelope, body)
    except msgspec.ValidationError as exc:  # from the envelope decoder: the reader's own decodes catch theirs
        raise InvalidPayload(f"body must be a JSON object: {exc}", reason="not_an_object") from exc
    except msgspec.DecodeError as exc:
        raise InvalidPayload(f"malformed JSON: {exc}", reason="malformed_json") from exc
    except RecursionError:
        raise InvalidPayload("JSON nested too deeply", reason="too_deep") from None
    except UnicodeDecodeError as exc:  # a \ud800-style escape msgspec cannot turn into text
        raise InvalidPayload(f"invalid string escape: {exc.reason}", reason="invalid_utf8") from None


def decode_event(body: bytes) -> VodEvent:
    """The strict form of :func:`read_event`: the event, or :class:`InvalidPayload` whose ``reason`` is the
    :class:`Undecodable` reason (or a not-a-JSON-object reason). For tests, consumers and re-drives."""
    result = read_event(body)
    if type(result) is VodEvent:  # type(), not isinstance(): that costs ~60 ns on Struct classes
        return result
    assert isinstance(result, Undecodable)
    raise InvalidPayload(result.message, reason=result.reason)


def content_key(value: bytes) -> str:
    """Key for events without a natural id: stable across re-deliveries of the same event."""
    return "sha256:" + hashlib.sha256(value).hexdigest()[:32]


#: What a rule found: (event type, key, typed payload, fallback labels). A plain tuple: it is built once per
#: event on the hot path, where even a Struct costs measurably more.
_Keyed = tuple[str, str, VodStruct | None, tuple[Fallback, ...]]


class _DeadLetter(Exception):
    """Raised inside the reader for a JSON object that cannot be keyed; :func:`_read` turns it into an
    :class:`Undecodable`. An exception keeps the hot path free of result-type checks."""

    def __init__(self, reason: UndecodableReason, message: str, event_type: str | None) -> None:
        super().__init__(message)
        self.reason: UndecodableReason = reason
        self.message = message
        self.event_type = event_type


class _Id(msgspec.Struct, frozen=True, gc=False):
    """An id found in a payload object: its text, the field name as sent, and how it was read."""

    text: str
    name: str
    case_folded: bool
    numeric: bool


def _read(envelope: dict[str, msgspec.Raw], body: bytes) -> VodEvent | Undecodable:
    event_handle, sign, expires_at, expires_at_text, transport_fallbacks = _transport(envelope)
    raw_type = envelope.get("EventType")
    try:
        event_type = None if raw_type is None else _str_decoder.decode(raw_type)
    except msgspec.ValidationError:
        event_type = ""  # not a string: as invalid as an empty one
    legacy = event_type is None and _is_legacy(envelope)
    # The legacy body is published exactly as sent, unless a transport field must come out.
    value = body if legacy and TRANSPORT_FIELDS.isdisjoint(envelope) else _published(envelope)
    try:
        keyed = _read_legacy(envelope, value) if legacy else _read_event_content(envelope, event_type, value)
    except _DeadLetter as dead:
        return Undecodable(
            reason=dead.reason,
            message=dead.message,
            value=value,
            event_type=dead.event_type,
            event_handle=event_handle,
            sign=sign,
            expires_at=expires_at,
            expires_at_text=expires_at_text,
        )
    event_type, key, payload, fallbacks = keyed
    return VodEvent(
        event_type=event_type,
        key=key,
        value=value,
        payload=payload,
        event_handle=event_handle,
        sign=sign,
        expires_at=expires_at,
        expires_at_text=expires_at_text,
        format="legacy-v2" if legacy else "eventcontent",
        fallbacks=fallbacks + transport_fallbacks if transport_fallbacks else fallbacks,
    )


def _read_event_content(envelope: dict[str, msgspec.Raw], event_type: str | None, value: bytes) -> _Keyed:
    """The ``EventContent`` envelope: rule 1, then rule 3."""
    if event_type is None:
        return _read_single_object(envelope, None, value)
    if not event_type or len(event_type) > MAX_EVENT_TYPE_LEN:
        raise _DeadLetter(
            "invalid_event_type",
            f"EventType must be a non-empty string of at most {MAX_EVENT_TYPE_LEN} characters",
            None,
        )
    spec = EVENT_TYPES.get(event_type)
    if spec is not None and (raw_payload := envelope.get(spec.payload_field)) is not None:
        documented = _read_documented(raw_payload, spec, event_type, value)
        if documented is not None:
            return documented
    return _read_single_object(envelope, event_type, value)


def _transport(envelope: dict[str, msgspec.Raw]) -> _Transport:
    """``EventHandle``, ``Sign`` and ``T`` when of their documented types; a wrong type leaves the field unset
    (and is labelled) rather than losing the event: the signature check and ConfirmEvents then see nothing.
    ``T`` is kept as sent whenever it is a string or a number; only its digits form gives ``expires_at``."""
    raw_handle, raw_sign, raw_expiry = envelope.get("EventHandle"), envelope.get("Sign"), envelope.get("T")
    if raw_handle is None and raw_sign is None and raw_expiry is None:
        return _NO_TRANSPORT
    unreadable = False
    event_handle = sign = None
    try:
        event_handle = None if raw_handle is None else _str_decoder.decode(raw_handle)
    except msgspec.ValidationError:
        unreadable = True
    try:
        sign = None if raw_sign is None else _str_decoder.decode(raw_sign)
    except msgspec.ValidationError:
        unreadable = True
    expires_at_text = None if raw_expiry is None else _expiry_text(raw_expiry)
    expires_at = None if expires_at_text is None else parse_expiry(expires_at_text)
    if raw_expiry is not None and expires_at is None and bytes(raw_expiry) != b"null":
        unreadable = True
    fallbacks: tuple[Fallback, ...] = ("transport_field_unreadable",) if unreadable else _NO_FALLBACKS
    return event_handle, sign, expires_at, expires_at_text, fallbacks


def _expiry_text(raw: msgspec.Raw) -> str | None:
    """``T`` as sent: a JSON string's content or a JSON number's text (``Sign`` covers exactly that text, and
    Tencent does not say which of the two VOD sends); ``None`` for any other JSON value. Whether it is usable
    digits is :func:`~bridge.vod.signing.parse_expiry`'s call, so the check can say why it is not."""
    first = memoryview(raw)[0]
    if first == _STRING:
        return _str_decoder.decode(raw)
    if first in _NUMBER:
        return bytes(raw).decode("ascii")
    return None


def _published(envelope: dict[str, msgspec.Raw]) -> bytes:
    return _encoder.encode({name: raw for name, raw in envelope.items() if name not in TRANSPORT_FIELDS})


def _read_documented(raw_payload: msgspec.Raw, spec: EventSpec, event_type: str, value: bytes) -> _Keyed | None:
    """Rule 1: the payload under the table's field. ``None`` when that field holds no object (rule 3 looks at
    the other fields)."""
    fallbacks = _NO_FALLBACKS
    try:
        payload = _payload_decoders[spec.model].decode(raw_payload)
    except msgspec.ValidationError:
        if memoryview(raw_payload)[0] != _OBJECT:
            return None
        # An object with a field of the wrong type (schema drift): publish it untyped.
        payload = None
        fallbacks = ("payload_type_mismatch",)
    else:
        if payload is None:  # an explicit null
            return None
    if spec.key_field is None:
        return event_type, content_key(value), payload, fallbacks
    if payload is not None:
        key = getattr(payload, spec.key_field)
        if isinstance(key, list):
            key = ",".join(key)
        if key:
            if len(key) > MAX_KEY_LEN:
                raise _too_long(spec.payload_field, spec.key_field, event_type)
            return event_type, key, payload, fallbacks
    # Untyped, or absent/empty under its documented name: perhaps sent as ``taskId`` or as a number.
    found = _find_id(_object_decoder.decode(raw_payload), (spec.key_field,))
    if found is None:
        raise _DeadLetter(
            "missing_key",
            f"{spec.payload_field}.{spec.key_field} is missing or empty; it is the Kafka key",
            event_type,
        )
    return _keyed(event_type, payload, found, fallbacks, spec.payload_field)


def _read_single_object(envelope: dict[str, msgspec.Raw], event_type: str | None, value: bytes) -> _Keyed:
    """Rule 3: the single non-null object field that carries an id; ``event_type`` is ``None`` when the body
    has none (the type is then inferred from the payload field's name)."""
    spec = None if event_type is None else EVENT_TYPES.get(event_type)
    objects: list[tuple[str, msgspec.Raw]] = []
    carriers: list[tuple[str, msgspec.Raw, _Id]] = []
    for name, raw in envelope.items():
        if name == "EventType" or name in TRANSPORT_FIELDS:
            continue
        fields = _object_fields(raw)
        if fields is None:
            continue
        objects.append((name, raw))
        found = _find_id(fields, _id_fields(spec if event_type is not None else _spec_of_field(name)))
        if found is not None:
            carriers.append((name, raw, found))

    if len(carriers) > 1:
        raise _DeadLetter(
            "ambiguous_payload",
            f"{len(carriers)} object fields carry an id ({', '.join(repr(_shown(c[0])) for c in carriers[:3])}); "
            "the key is not guessed",
            event_type,
        )
    if carriers:
        name, raw, found = carriers[0]
    else:
        found = None
        # Without EventType, only a single object under a known payload name says what the body is.
        if event_type is None and not (len(objects) == 1 and objects[0][0] in EVENT_TYPE_BY_FIELD):
            raise _DeadLetter(
                "unrecognised", "no EventType, and no object field carries an id: nothing to key the event by", None
            )
        if not objects:
            raise _DeadLetter("no_payload", f"EventType {event_type!r} comes with no payload object", event_type)
        name, raw = objects[0]

    fallbacks = _NO_FALLBACKS
    if event_type is None:
        event_type = EVENT_TYPE_BY_FIELD.get(name, UNKNOWN_EVENT_TYPE)
        spec = EVENT_TYPES.get(event_type)
        fallbacks = ("event_type_inferred",)
    elif spec is not None:
        fallbacks = ("payload_field_alias",)

    if found is None:
        if spec is not None and spec.key_field is not None:
            raise _DeadLetter(
                "missing_key", f"no payload object carries {spec.key_field}, the Kafka key of {event_type}", event_type
            )
        # An unmodelled type, or one without an id in the SDK: a well-formed event, keyed by its content. Which
        # object is "the" payload does not change that key; only a single one is given a typed view.
        payload, mismatch = _typed(raw, spec) if len(objects) == 1 else (None, _NO_FALLBACKS)
        return event_type, content_key(value), payload, fallbacks + mismatch
    payload, mismatch = _typed(raw, spec)
    return _keyed(event_type, payload, found, fallbacks + mismatch, name)


def _is_legacy(envelope: dict[str, msgspec.Raw]) -> bool:
    data = envelope.get("data")
    return "eventType" in envelope and data is not None and memoryview(data)[0] == _OBJECT


def _read_legacy(envelope: dict[str, msgspec.Raw], value: bytes) -> _Keyed:
    """Rule 2: the legacy v2.0 envelope, keyed by the first of ``LEGACY_KEY_FIELDS`` in ``data``; untyped."""
    try:
        event_type = _str_decoder.decode(envelope["eventType"])
    except msgspec.ValidationError:
        event_type = None
    if not event_type or len(event_type) > MAX_EVENT_TYPE_LEN:
        raise _DeadLetter(
            "invalid_event_type",
            f"legacy eventType must be a non-empty string of at most {MAX_EVENT_TYPE_LEN} characters",
            None,
        )
    fallbacks: tuple[Fallback, ...] = ("legacy_envelope",)
    found = _find_id(_object_decoder.decode(envelope["data"]), LEGACY_KEY_FIELDS)  # an object: see _is_legacy
    if found is not None:
        return _keyed(event_type, None, found, fallbacks, "data")
    spec = EVENT_TYPES.get(event_type)
    if spec is not None and spec.key_field is not None:
        raise _DeadLetter(
            "missing_key",
            f"legacy data carries none of {', '.join(LEGACY_KEY_FIELDS)}; one is the Kafka key",
            event_type,
        )
    return event_type, content_key(value), None, fallbacks


def _keyed(
    event_type: str, payload: VodStruct | None, found: _Id, fallbacks: tuple[Fallback, ...], where: str
) -> _Keyed:
    if len(found.text) > MAX_KEY_LEN:
        raise _too_long(where, found.name, event_type)
    if found.case_folded:
        fallbacks += ("key_field_case",)
    if found.numeric:
        fallbacks += ("numeric_key",)
    return event_type, found.text, payload, fallbacks


def _too_long(where: str, name: str, event_type: str) -> _DeadLetter:
    # Real ids are tens of characters; a huge one would bloat every log line and index that holds keys.
    return _DeadLetter(
        "key_too_long", f"{_shown(where)}.{_shown(name)} is longer than {MAX_KEY_LEN} characters", event_type
    )


def _typed(raw: msgspec.Raw, spec: EventSpec | None) -> tuple[VodStruct | None, tuple[Fallback, ...]]:
    """The typed view of a payload found by rule 3 (``None`` for unmodelled types, or when it does not validate)."""
    if spec is None:
        return None, _NO_FALLBACKS
    try:
        return _payload_decoders[spec.model].decode(raw), _NO_FALLBACKS
    except msgspec.ValidationError:
        return None, ("payload_type_mismatch",)


def _spec_of_field(name: str) -> EventSpec | None:
    event_type = EVENT_TYPE_BY_FIELD.get(name)
    return None if event_type is None else EVENT_TYPES[event_type]


def _id_fields(spec: EventSpec | None) -> tuple[str, ...]:
    """The fields that can key a payload of this type: its own key field only (none for a type without an id
    in the SDK, which is keyed by content); ``FALLBACK_KEY_FIELDS`` for an unmodelled type."""
    if spec is None:
        return FALLBACK_KEY_FIELDS
    return () if spec.key_field is None else (spec.key_field,)


def _object_fields(raw: msgspec.Raw) -> dict[str, msgspec.Raw] | None:
    """The fields of a raw JSON object; ``None`` for any other JSON value."""
    return _object_decoder.decode(raw) if memoryview(raw)[0] == _OBJECT else None


def _find_id(fields: dict[str, msgspec.Raw], names: tuple[str, ...]) -> _Id | None:
    """The first usable id among ``names`` (in priority order), by exact field name, else case-insensitively
    (the first such field in body order)."""
    for name in names:
        raw = fields.get(name)
        if raw is not None and (read := _id_text(raw)) is not None:
            return _Id(read[0], name, False, read[1])
        folded = name.casefold()
        for other, raw in fields.items():
            if other != name and other.casefold() == folded and (read := _id_text(raw)) is not None:
                return _Id(read[0], other, True, read[1])
    return None


def _id_text(raw: msgspec.Raw) -> tuple[str, bool] | None:
    """(text, was a number) of an id: a non-empty string, a number's digits as sent, or a non-empty list of
    those joined with "," (FileDeleted's ``FileIdSet``). ``None`` for anything else (null, bool, object, "")."""
    if memoryview(raw)[0] != _ARRAY:
        read = _scalar_text(raw)
        return read if read is not None and read[0] else None
    parts: list[str] = []
    numeric = False
    for item in _list_decoder.decode(raw):
        read = _scalar_text(item)
        if read is None:
            return None
        parts.append(read[0])
        numeric = numeric or read[1]
    key = ",".join(parts)
    return (key, numeric) if key else None


def _scalar_text(raw: msgspec.Raw) -> tuple[str, bool] | None:
    first = memoryview(raw)[0]
    if first == _STRING:
        text = _str_decoder.decode(raw)
        assert text is not None
        return text, False
    if first in _NUMBER:
        # The text as sent: an int or float round trip would rewrite ids above 2**53 (or 1e3 as 1000.0).
        return bytes(raw).decode("ascii"), True
    return None


def _shown(name: str) -> str:
    """A caller-supplied field name for a human message, bounded."""
    return name if len(name) <= 64 else name[:61] + "..."
