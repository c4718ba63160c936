"""The sans-I/O decoder: one event's JSON (a callback body or one ``EventSet`` item) into a publishable record.

Decoding happens once per event:

1. the envelope is parsed as ``dict[str, msgspec.Raw]``: every top-level value keeps its original bytes;
2. the payload object named by the explicit ``EVENT_TYPES`` table is decoded into its typed Struct, which
   validates it and yields the Kafka key;
3. the Kafka value is the envelope re-encoded from those raw pieces, minus transport-only fields
   (``EventHandle``, and the callback signature ``Sign``/``T``). A field VOD adds tomorrow therefore still
   reaches Kafka byte for byte, although the Structs do not know it.

Nothing here does I/O or logging, so every rule is unit-testable without a broker or a server.
"""

from __future__ import annotations

import hashlib
from typing import Final, TypeVar

import msgspec

from bridge.errors import InvalidPayload
from bridge.vod.event_types import (
    EVENT_TYPES,
    FALLBACK_KEY_FIELDS,
    MAX_EVENT_TYPE_LEN,
    MAX_KEY_LEN,
    TRANSPORT_FIELDS,
    EventSpec,
)
from bridge.vod.model import Undecodable, VodEvent, VodStruct

_T = TypeVar("_T")

_envelope_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_str_decoder: Final[msgspec.json.Decoder[str | None]] = msgspec.json.Decoder(str | None)
_int_decoder: Final[msgspec.json.Decoder[int | None]] = msgspec.json.Decoder(int | None)
_object_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_payload_decoders: Final[dict[type[VodStruct], msgspec.json.Decoder[VodStruct | None]]] = {
    spec.model: msgspec.json.Decoder(spec.model | None) for spec in EVENT_TYPES.values()
}
_encoder: Final = msgspec.json.Encoder()


#: Reasons that mean "not a JSON object": the body cannot even be stored as an event (a 4xx for callbacks).
NOT_AN_OBJECT_REASONS: Final = frozenset({"invalid_utf8", "not_an_object", "malformed_json", "too_deep"})


def read_event(body: bytes) -> VodEvent | Undecodable:
    """Decode a body that must be a JSON object: an event when a key can be found, else :class:`Undecodable`
    (for the dead-letter topic). Raises :class:`InvalidPayload` only when the body is not a JSON object."""
    try:
        return decode_event(body)
    except InvalidPayload as exc:
        if exc.reason in NOT_AN_OBJECT_REASONS:
            raise
        envelope = _envelope_decoder.decode(body)
        value = _encoder.encode({name: raw for name, raw in envelope.items() if name not in TRANSPORT_FIELDS})
        return Undecodable(
            reason=exc.reason,
            message=exc.message,
            value=value,
            event_type=_lenient(envelope, "EventType", _str_decoder),
            event_handle=_lenient(envelope, "EventHandle", _str_decoder),
            sign=_lenient(envelope, "Sign", _str_decoder),
            expires_at=_lenient(envelope, "T", _int_decoder),
        )


def _lenient(envelope: dict[str, msgspec.Raw], name: str, decoder: msgspec.json.Decoder[_T | None]) -> _T | None:
    raw = envelope.get(name)
    try:
        return None if raw is None else decoder.decode(raw)
    except msgspec.ValidationError:
        return None


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
