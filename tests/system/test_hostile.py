"""Hostile input against the decoder (property tests, pure) and the HTTP endpoint (the real app, a real broker).

The requirement: every hostile input gets a 4xx (the only acceptable 5xx is a 503 for a Kafka outage, and the
broker is up here), nothing crashes, memory stays bounded, and a normal event still gets 200 afterwards.

Bugs these tests found, and that are fixed (each test here guards its fix):

- nesting deeper than Python's recursion limit made msgspec raise ``RecursionError`` (a 500): now a 400;
- invalid UTF-8 inside a string was a 500, or, in an untyped field, published as is (a Kafka value that is not
  JSON): the whole body's encoding is now checked up front (400);
- a body with a ``Content-Encoding`` (bad gzip, a compression bomb inflated on the event loop even after the
  answer): encodings are now refused with 415 before the body is read, and never inflated;
- a valid event just under the HTTP limit was over the producer's ``max_request_size`` (a 503 forever; with the
  spool, a record blocking the ordered forwarder): the producer now allows the body limit plus headroom, and a
  record Kafka refuses for its size is a 413, never spooled;
- no read timeout for a request body: now ``BRIDGE_HTTP_BODY_TIMEOUT_S`` answers 408 and closes; a client that
  disconnects mid-body is counted and logged at INFO, not as an unhandled error.

Set ``BRIDGE_FUZZ_EXAMPLES`` (e.g. 20000) for a longer, randomised fuzz run of the decoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import logging
import os
import random
import resource
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from conftest import (
    BridgeClient,
    Kafka,
    headers_of,
    read_records,
    sample_bytes,
    sample_event,
    selected_brokers,
    wait_until,
)
from faultkit import AckHoldingBroker
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from rawhttp import RawConnection, raw_connection, raw_request
from servekit import Served
from servekit import serve_like_cli as serve_guarded

from bridge.app import COMPONENTS
from bridge.config import SpoolSettings
from bridge.errors import InvalidPayload
from bridge.vod.decode import decode_event, read_event
from bridge.vod.event_types import EVENT_TYPES, TRANSPORT_FIELDS
from bridge.vod.model import PullCompleteEvent, Undecodable, VodEvent

CALLBACK = "/vod/callback"
MiB = 1024 * 1024
integration = pytest.mark.integration

# ============================================================================================================
# The decoder: pure property tests
# ============================================================================================================

#: Deterministic examples for the everyday run (no flaky CI from a lucky draw); random when fuzzing on purpose.
FUZZING = "BRIDGE_FUZZ_EXAMPLES" in os.environ
FUZZ_EXAMPLES = int(os.environ.get("BRIDGE_FUZZ_EXAMPLES", "300"))
PROPERTY = settings(
    max_examples=150, database=None, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: 2**70 is valid JSON, and msgspec reads it back exactly
    | st.floats(allow_nan=False, allow_infinity=False)  # NaN/Infinity are not JSON
    | st.text(max_size=16)
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)

#: Names the decoder looks at, so that random envelopes reach its deeper branches often.
_KNOWN_NAMES = sorted(
    {"EventType", *TRANSPORT_FIELDS, *(spec.payload_field for spec in EVENT_TYPES.values())}
    | {"TaskId", "FileId", "FileIdSet", "CastId", "ErrCode", "Status", "MediaBasicInfo", "MetaData", "TagSet"}
)
_names = st.sampled_from(_KNOWN_NAMES) | st.text(max_size=8)
_event_types = st.sampled_from([*sorted(EVENT_TYPES) * 3, "", "SomethingNew", "x" * 129]) | st.text()
_payload_names = st.sampled_from(["TaskId", "FileId", "FileIdSet", "CastId", "ErrCode", "MetaData"]) | st.text(
    max_size=8
)
_payloads = st.dictionaries(_payload_names, st.text(min_size=1, max_size=8) | json_values, max_size=5)


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly plausible events (a type, its payload object with its id, often of the wrong type), plus random
    extra fields that may override any of it."""
    event_type = draw(_event_types)
    spec = EVENT_TYPES.get(event_type)
    payload_field = spec.payload_field if spec else draw(st.sampled_from([f"{event_type}Event", "Other"]))
    payload = draw(_payloads) if draw(st.integers(0, 3)) else draw(json_values)
    if spec is not None and spec.key_field is not None and isinstance(payload, dict) and draw(st.booleans()):
        ids = st.text(min_size=1, max_size=8)
        payload[spec.key_field] = draw(st.lists(ids, min_size=1, max_size=3) if spec.key_field == "FileIdSet" else ids)
    envelope = {"EventType": event_type, payload_field: payload}
    if draw(st.booleans()):
        envelope.update(draw(st.dictionaries(_names, _event_types | json_values, max_size=3)))
    return envelope


def to_json(value: Any, *, ascii_only: bool = True, indent: int | None = None) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()


def decodes_or_rejects(body: bytes) -> VodEvent | None:
    """The decoder's contract on any input: a VodEvent, or InvalidPayload; any other exception fails the test."""
    try:
        decoded = decode_event(body)
    except InvalidPayload as exc:
        assert exc.reason and exc.message
        event(f"rejected: {exc.reason}")
        return None
    assert isinstance(decoded, VodEvent) and decoded.key and decoded.event_type
    event(f"decoded: {'modelled' if decoded.payload is not None else 'unmodelled'}")
    return decoded


@PROPERTY
@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_are_rejected(body: bytes) -> None:
    decodes_or_rejects(body)


@PROPERTY
@given(json_values | envelopes(), st.booleans())
def test_arbitrary_json_values_decode_or_are_rejected(value: Any, ascii_only: bool) -> None:
    decoded = decodes_or_rejects(to_json(value, ascii_only=ascii_only))
    if decoded is not None:
        # Whatever is accepted is published losslessly, transport fields aside.
        assert isinstance(value, dict)
        assert msgspec.json.decode(decoded.value) == {k: v for k, v in value.items() if k not in TRANSPORT_FIELDS}


_typed_fields = set(PullCompleteEvent.__struct_fields__)


@settings(PROPERTY, max_examples=100)
@given(
    task_id=st.text(min_size=1, max_size=40),
    top_extra=st.dictionaries(
        st.text(max_size=12).filter(lambda k: k not in {*TRANSPORT_FIELDS, "EventType", "PullCompleteEvent"}),
        json_values,
        max_size=4,
    ),
    payload_extra=st.dictionaries(
        st.text(max_size=12).filter(lambda k: k not in _typed_fields), json_values, max_size=4
    ),
    transport=st.fixed_dictionaries(
        {}, optional={"EventHandle": st.text(max_size=40), "Sign": st.text(max_size=40), "T": st.integers(0, 2**63 - 1)}
    ),
    seed=st.integers(0, 2**32),
    ascii_only=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
)
def test_well_formed_pull_complete_is_published_losslessly(
    *,
    task_id: str,
    top_extra: dict[str, Any],
    payload_extra: dict[str, Any],
    transport: dict[str, Any],
    seed: int,
    ascii_only: bool,
    indent: int | None,
) -> None:
    published = sample_event(task_id)
    published["PullCompleteEvent"].update(payload_extra)
    published.update(top_extra)
    items = [*published.items(), *transport.items()]
    random.Random(seed).shuffle(items)
    body = to_json(dict(items), ascii_only=ascii_only, indent=indent)

    decoded = decode_event(body)

    expected = {name: value for name, value in items if name not in TRANSPORT_FIELDS}
    value = msgspec.json.decode(decoded.value)
    assert value == expected and list(value) == list(expected), "same fields, same values, same order"
    assert decoded.key == task_id and decoded.event_type == "PullComplete"
    assert (decoded.event_handle, decoded.sign, decoded.expires_at) == (
        transport.get("EventHandle"),
        transport.get("Sign"),
        transport.get("T"),
    )


# ---- the longer fuzz run -----------------------------------------------------------------------------------


_FRAGMENTS = [
    *(b"{", b"}", b"[", b"]", b":", b",", b'"', b" ", b"\n", b"\\"),
    *(b"null", b"true", b"false", b"0", b"-1", b"-0.0", b"1e999", b"18446744073709551616", b"NaN", b"Infinity"),
    *(b'"EventType"', b'"PullComplete"', b'"PullCompleteEvent"', b'"FileDeleted"', b'"FileDeleteEvent"'),
    *(b'"ProcessImageAsyncCompleteEvent"', b'"SomethingNew"', b'"SomethingNewEvent"', b'"FileIdSet"'),
    *(b'"TaskId"', b'"FileId"', b'"ErrCode"', b'"MetaData"', b'"EventHandle"', b'"Sign"', b'"T"', b'"t-1"'),
    *(b'""', b'"\\u0000"', b'"\\ud800"', b'"\\uDFFF\\uD800"', b'"\\x"', b'"\\u12"'),
    *(b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", "é".encode(), "😀".encode()),
]
_token_soup = st.lists(st.sampled_from(_FRAGMENTS) | st.binary(max_size=4), max_size=60).map(b"".join)


@st.composite
def _mutated_sample(draw: st.DrawFn) -> bytes:
    """The sample event with a few random edits: near-valid input reaches the decoder's inner branches."""
    body = bytearray(sample_bytes())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(body)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "truncate", "duplicate"]))
        if action == "insert":
            body[at:at] = draw(st.sampled_from(_FRAGMENTS) | st.binary(min_size=1, max_size=4))
        elif action == "delete":
            del body[at : at + draw(st.integers(1, 16))]
        elif action == "replace":
            body[at : at + 1] = draw(st.binary(min_size=1, max_size=1))
        elif action == "truncate":
            del body[at:]
        else:
            body[at:at] = body[at : at + draw(st.integers(1, 64))]
    return bytes(body)


@settings(
    max_examples=FUZZ_EXAMPLES,
    database=None,
    deadline=None,
    derandomize=not FUZZING,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_token_soup | _mutated_sample() | envelopes().map(to_json) | st.binary(max_size=2048))
def test_fuzz_decoder(body: bytes) -> None:
    decodes_or_rejects(body)


# ---- decoder-level reproductions of the bugs ---------------------------------------------------------------

_GOOD_PREFIX = b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t-1"}'

DEEP_BODIES = {
    "objects 100k deep": b'{"a":' * 100_000,
    "unknown field 100k deep, well-formed": _GOOD_PREFIX + b',"X":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "typed dict field 5k deep": b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t","MetaData":'
    + b'{"VideoStreamSet":[{"a":' * 5000
    + b"1"
    + b"}]}" * 5000
    + b"}}",
}

BAD_UTF8_BODIES = {
    "in a typed string field": b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t-\xff"}}',
    "in a top-level key": _GOOD_PREFIX + b',"\xff\xfe":1}',
    "in EventType": b'{"EventType":"Pull\xffComplete","PullCompleteEvent":{"TaskId":"t"}}',
}
#: Untyped fields are copied byte for byte, so the whole body's encoding is checked up front.
BAD_UTF8_PUBLISHED = {
    "in a payload extra key": b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t","\xc3":1}}',
    "in a top-level extra value": _GOOD_PREFIX + b',"X":"\xff"}',
    # A UTF-8-encoded surrogate (CESU-8): not valid UTF-8 either.
    "in a payload extra value": b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t","Z":"\xed\xa0\x80"}}',
}

# Fixed (found by these tests): msgspec's RecursionError past ~1000 levels and UnicodeDecodeError escaped
# decode_event as a 500, and invalid UTF-8 in untyped fields was published byte for byte (not JSON).


@pytest.mark.parametrize("body", DEEP_BODIES.values(), ids=DEEP_BODIES.keys())
def test_decoder_rejects_deep_nesting(body: bytes) -> None:
    with pytest.raises(InvalidPayload):
        decode_event(body)


@pytest.mark.parametrize("body", BAD_UTF8_BODIES.values(), ids=BAD_UTF8_BODIES.keys())
def test_decoder_rejects_invalid_utf8(body: bytes) -> None:
    with pytest.raises(InvalidPayload):
        decode_event(body)


@pytest.mark.parametrize("body", BAD_UTF8_PUBLISHED.values(), ids=BAD_UTF8_PUBLISHED.keys())
def test_decoder_rejects_invalid_utf8_in_untyped_fields(body: bytes) -> None:
    with pytest.raises(InvalidPayload):
        decode_event(body)


def test_decoder_accepts_reasonable_nesting() -> None:
    deep = _GOOD_PREFIX + b',"X":' + b"[" * 200 + b"]" * 200 + b"}"
    assert decode_event(deep).value.endswith(b"]" * 200 + b"}")


# ============================================================================================================
# The HTTP endpoint: the real app on a real broker
# ============================================================================================================


async def assert_still_serves(client: BridgeClient, task_id: str | None = None) -> None:
    response = await client.post(CALLBACK, json=sample_event(task_id or f"t-{uuid.uuid4().hex}"))
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] == "published"


async def assert_rejected(response: aiohttp.ClientResponse, status: int, code: str, *, context: object = "") -> None:
    assert response.status == status, (context, response.status, await response.text())
    assert response.content_type == "application/json", context
    body = await response.json()
    assert body["error"] == code and isinstance(body["message"], str), (context, body)


# ---- seeded random bodies ----------------------------------------------------------------------------------


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**31, 2**64, 2**70, 1.5, -0.0, 1e300])
    if kind in (3, 4):
        return "".join(rng.choice('aZ09 _-"\\/\u00e9\u4e2d\U0001f600\u0000\u2028') for _ in range(rng.randrange(12)))
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    names = [*_KNOWN_NAMES, *EVENT_TYPES, "x", ""]
    return {rng.choice(names): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def _random_envelope(rng: random.Random) -> Any:
    event_type = rng.choice([*EVENT_TYPES, "SomethingNew", "", "x" * 200])
    spec = EVENT_TYPES.get(event_type)
    field = spec.payload_field if spec else f"{event_type}Event"
    payload = _random_json(rng, 1) if rng.random() < 0.3 else {}
    if isinstance(payload, dict) and rng.random() < 0.7:
        payload[rng.choice(["TaskId", "FileId", "CastId", "FileIdSet"])] = rng.choice(["id-1", "", 7, ["a", "b"], None])
    return {"EventType": event_type, field: payload}


def _mutate(rng: random.Random, body: bytes) -> bytes:
    """Edits that keep the body valid UTF-8 (invalid UTF-8 has tests of its own)."""
    data = bytearray(body)
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(data) + 1)
        action = rng.randrange(4)
        if action == 0:
            data[at:at] = rng.choice([b"{", b"}", b"[", b"]", b'"', b",", b":", b"null", b"\\", b"\\u0000", b"1e999"])
        elif action == 1:
            del data[at : at + rng.randrange(1, 20)]
        elif action == 2:
            data[at : at + 1] = bytes([rng.randrange(0x20, 0x7F)])
        else:
            del data[at:]
    return bytes(data)


def random_bodies(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    sample = sample_bytes()
    bodies: list[bytes] = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            bodies.append(rng.randbytes(rng.randrange(0, 300)))
        elif kind == 1:
            bodies.append(_mutate(rng, sample))
        elif kind == 2:
            bodies.append(to_json(_random_json(rng), ascii_only=rng.random() < 0.5))
        else:
            bodies.append(to_json(_random_envelope(rng), ascii_only=rng.random() < 0.5))
    return bodies


@integration
async def test_random_bodies_get_400_or_are_kept(make_settings, make_client) -> None:
    """~200 seeded random bodies: the answer is exactly what the decoder says (400 when the body is not a JSON
    object; 200 published or dead-lettered otherwise), never a 5xx; a normal event is still published afterwards."""
    client = await make_client(make_settings())
    content_types = ["application/json", "text/plain", "application/x-www-form-urlencoded", "", "multipart/x; b="]
    outcomes = {"rejected": 0, "published": 0, "dead_lettered": 0}
    for i, body in enumerate(random_bodies(seed=20240613, count=200)):
        expected = _expected_status(body)
        headers = {"Content-Type": content_types[i % len(content_types)]}
        response = await client.post(CALLBACK, data=body, headers=headers)
        if expected is None:
            await assert_rejected(response, 400, "invalid_payload", context=body[:200])
            outcomes["rejected"] += 1
        else:
            assert response.status == 200, (body[:200], await response.text())
            assert (await response.json())["status"] == expected, body[:200]
            outcomes[expected] += 1
    print(f"random bodies: {outcomes}")
    assert min(outcomes.values()) > 5 and outcomes["rejected"] > 100, "the corpus exercises every outcome"
    await assert_still_serves(client)


# ---- shapes: nesting, size, types, duplicates, encodings, NUL -----------------------------------------------


@integration
async def test_deep_and_wide_inputs_that_must_work(make_settings, make_client) -> None:
    client = await make_client(make_settings())
    rejected = await client.post(CALLBACK, data=b"[" * 100_000)  # the top level is not an object: cheap to reject
    await assert_rejected(rejected, 400, "invalid_payload")
    nested = _GOOD_PREFIX + b',"X":' + b"[" * 200 + b"]" * 200 + b"}"
    wide_top = b'{"EventType":"SomethingNew","SomethingNewEvent":{"TaskId":"w"},' + b",".join(
        b'"k%d":%d' % (i, i) for i in range(60_000)
    )
    wide_top += b"}"
    wide_list = to_json(sample_event("t-wide", MediaBasicInfo={"TagSet": ["tag"] * 100_000}))
    for body in (nested, wide_top, wide_list):
        assert len(body) < MiB
        started = time.monotonic()
        response = await client.post(CALLBACK, data=body)
        assert response.status == 200, await response.text()
        assert time.monotonic() - started < 2.0
    await assert_still_serves(client)


@integration
@pytest.mark.parametrize("body", DEEP_BODIES.values(), ids=DEEP_BODIES.keys())
async def test_deep_nesting_gets_400(make_settings, make_client, body: bytes) -> None:
    client = await make_client(make_settings())
    await assert_rejected(await client.post(CALLBACK, data=body), 400, "invalid_payload")
    await assert_still_serves(client)


@integration
async def test_huge_strings_under_and_over_the_limit(make_settings, make_client) -> None:
    client = await make_client(make_settings())
    under = to_json(sample_event("t-900k", Message="x" * (900 * 1024)))
    assert 900 * 1024 < len(under) < MiB
    response = await client.post(CALLBACK, data=under)
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] == "published"

    over = to_json(sample_event("t-2m", Message="x" * (2 * MiB)))
    await assert_rejected(await client.post(CALLBACK, data=io.BytesIO(over)), 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked transfer
        for start in range(0, len(over), 64 * 1024):
            yield over[start : start + 64 * 1024]

    response = await client.post(CALLBACK, data=chunks())
    assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
    await assert_rejected(response, 413, "payload_too_large")
    # Chunked, and one byte over the limit.
    prefix = b'{"EventType":"X","X":"'
    one_over = prefix + b"y" * (MiB + 1 - len(prefix) - 2) + b'"}'
    assert len(one_over) == MiB + 1

    async def one_chunk() -> AsyncIterator[bytes]:
        yield one_over

    await assert_rejected(await client.post(CALLBACK, data=one_chunk()), 413, "payload_too_large")
    await assert_still_serves(client)


def at_limit_body(task_id: str, limit: int = MiB) -> bytes:
    """A PullComplete event of exactly ``limit`` bytes, padded by an unmodelled field."""
    prefix = b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"%s"},"X":"' % task_id.encode()
    body = prefix + b"y" * (limit - len(prefix) - 2) + b'"}'
    assert len(body) == limit
    return body


# What a body of exactly the 1 MiB limit gets: HTTP takes it (the limit is inclusive: aiohttp refuses only bodies
# over client_max_size) and the producer too (its max_request_size is the body limit plus 64 KiB, room for key,
# headers and batch overhead); then it is the broker's call. Neither embedded broker limits message size (tansu
# and librdkafka's mock cluster both take a 32 MiB record), so on them it is published, whole: 200. A Kafka with
# the default message.max.bytes (1 MiB + 12) refuses it, a 413 record_too_large that is never retried nor
# spooled; one configured as README "Kafka requirements" asks takes it.


async def assert_at_limit_outcome(
    kafka: Kafka, topic: str, response: aiohttp.ClientResponse, body: bytes, *, after: list[bytes]
) -> None:
    """``response`` is what a body at the limit got; ``after`` the keys of events published after it (200s).
    Embedded brokers: a 200 ``published``, and the record in Kafka, whole. A real Kafka: whichever its
    ``message.max.bytes`` decides, but nothing in between: 200 and in Kafka, or 413 and not in Kafka."""
    key = json.loads(body)["PullCompleteEvent"]["TaskId"].encode()
    text = await response.text()
    if kafka.embedded:
        assert response.status == 200, text
    elif response.status == 413:
        await assert_rejected(response, 413, "record_too_large")
        records = await read_records(kafka.bootstrap_servers, topic, count=len(after))
        assert [record.key for record in records] == after, "refused for its size: not in Kafka"
        return
    assert response.status == 200, text
    answer = await response.json()
    assert answer["status"] == "published" and answer["topic"] == topic, answer
    records = await read_records(kafka.bootstrap_servers, topic, count=1 + len(after))
    assert sorted(record.key for record in records) == sorted([key, *after])
    (record,) = [record for record in records if record.key == key]
    assert (record.partition, record.offset) == (answer["partition"], answer["offset"])
    assert record.value == body, "published whole"


@integration
@pytest.mark.producer
async def test_event_at_the_size_limit_is_published_whole(kafka: Kafka, make_settings, make_client, topic) -> None:
    client = await make_client(make_settings())
    body = at_limit_body("t-limit")
    response = await client.post(CALLBACK, data=body)
    await assert_still_serves(client, "t-after")
    await assert_at_limit_outcome(kafka, topic, response, body, after=[b"t-after"])


@integration
@pytest.mark.parametrize("broker_name", selected_brokers())
async def test_event_at_the_size_limit_does_not_block_the_spool(
    broker_name: str, make_settings, make_client, topic, tmp_path
) -> None:
    """With a spool, at the limit: published at once while Kafka acks in time; spooled when Kafka holds its acks
    beyond the publish budget (AckHoldingBroker), with the next event queued behind it, and both forwarded once
    the acks come: the spool drains to empty, every event in Kafka, the one at the limit whole."""
    async with AckHoldingBroker(broker_name) as broker:
        base = make_settings(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=broker.supports_idempotence)
        spool = SpoolSettings(dir=str(tmp_path / "spool"), publish_budget_s=0.5)
        client = await make_client(msgspec.structs.replace(base, spool=spool))
        forwarder = client.server.app[COMPONENTS].forwarder
        assert forwarder is not None

        direct = at_limit_body("t-limit")
        response = await client.post(CALLBACK, data=direct)
        assert response.status == 200, await response.text()
        assert (await response.json())["status"] == "published"

        broker.hold()  # Kafka takes records and acks none of them in time
        spooled = at_limit_body("t-limit-spooled")
        answers = [await client.post(CALLBACK, data=spooled), await client.post(CALLBACK, json=sample_event("t-after"))]
        for answer in answers:
            assert answer.status == 200, await answer.text()
            assert (await answer.json())["status"] == "spooled"
        assert forwarder.depth == 2
        broker.release()
        try:
            await wait_until(lambda: forwarder.depth == 0, timeout_s=10)
        except TimeoutError:
            raise AssertionError(f"the spool is stuck with {forwarder.depth} events") from None

        # At least once: the publish that timed out into the spool may have been appended too, when the acks came.
        records = await read_records(broker.bootstrap_servers, topic, count=3)
        assert {record.key for record in records} == {b"t-limit", b"t-limit-spooled", b"t-after"}
        values = {record.key: record.value for record in records}
        assert values[b"t-limit"] == direct and values[b"t-limit-spooled"] == spooled, "published whole"
        await client.close()  # before the broker goes


@integration
async def test_declared_oversized_body_is_refused_before_it_is_sent(make_settings, make_client) -> None:
    client = await make_client(make_settings())
    host, port = client.server.host, client.server.port
    for headers in ({"Content-Length": str(5 * MiB)}, {"Content-Length": str(2**62)}):
        async with raw_connection(host, port) as connection:
            started = time.monotonic()
            await connection.send(raw_request("POST", CALLBACK, headers=headers))  # headers only, no body
            response = await connection.response(timeout_s=1.0)
            assert time.monotonic() - started < 1.0
            assert response.status == 413 and response.json()["error"] == "payload_too_large"
    # With "Expect: 100-continue" the bridge's expect handler checks the size first: no "100 Continue" invites
    # the client to upload a body that would be refused.
    async with raw_connection(host, port) as connection:
        headers = {"Content-Length": str(5 * MiB), "Expect": "100-continue"}
        await connection.send(raw_request("POST", CALLBACK, headers=headers))
        response = await connection.response(timeout_s=1.0)
        assert response.status == 413 and response.interim == []
        assert response.json()["error"] == "payload_too_large"
    await assert_still_serves(client)


WRONG_TYPES = [
    b'{"EventType": 5, "PullCompleteEvent": {"TaskId": "t"}}',
    b'{"EventType": ["PullComplete"], "PullCompleteEvent": {"TaskId": "t"}}',
    b'{"EventType": {"x": 1}}',
    b'{"EventType": null}',
    b'{"EventType": ""}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": "not an object"}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": [{"TaskId": "t"}]}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": 42}}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": ""}}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t", "ErrCode": "0"}}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t", "ErrCode": 1.5}}',
    # msgspec reads any int Python can (10**23 is accepted), up to Python's 4300-digit limit for int(str).
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t", "ErrCode": ' + b"9" * 5000 + b"}}",
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t", "MediaBasicInfo": []}}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t", "MetaData": {"Duration": "1s"}}}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t", "MetaData": {"Duration": 1e999}}}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t", "MediaBasicInfo": {"TagSet": [1]}}}',
    b'{"EventType": "FileDeleted", "FileDeleteEvent": {"FileIdSet": "f-1"}}',
    b'{"EventType": "FileDeleted", "FileDeleteEvent": {"FileIdSet": []}}',
    b'{"EventType": "ProcessImageAsyncCompleteEvent", "ProcessImageAsyncCompleteEvent": 1}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t"}, "T": "soon"}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t"}, "EventHandle": 1}',
    b'{"EventType": "PullComplete", "PullCompleteEvent": {"TaskId": "t"}, "Sign": {}}',
    b"[]",
    b'"PullComplete"',
    b"null",
    b"42",
    b"",
    b" ",
    b"{}",
]


@integration
async def test_wrong_types_and_shapes_are_kept_unless_not_an_object(
    kafka: Kafka, make_settings, make_client, topic
) -> None:
    """Every JSON object reaches Kafka (its topic when a key is found, the dead-letter topic otherwise); only a
    body that is not a JSON object gets a 400."""
    client = await make_client(make_settings())
    kept = {"published": 0, "dead_lettered": 0}
    for body in WRONG_TYPES:
        response = await client.post(CALLBACK, data=body)
        expected = _expected_status(body)
        if expected is None:
            await assert_rejected(response, 400, "invalid_payload", context=body)
            continue
        assert response.status == 200, (body, await response.text())
        assert (await response.json())["status"] == expected, body
        kept[expected] += 1
    assert kept["published"] >= 10 and kept["dead_lettered"] >= 5, kept
    published = await read_records(kafka.bootstrap_servers, topic, count=kept["published"], settle_s=0.3)
    letters = await read_records(kafka.bootstrap_servers, f"{topic}.dlq", count=kept["dead_lettered"], settle_s=0.3)
    assert (len(published), len(letters)) == (kept["published"], kept["dead_lettered"])
    await assert_still_serves(client)


@integration
async def test_duplicate_keys_last_one_wins(kafka: Kafka, make_settings, make_client, topic) -> None:
    """msgspec keeps the last of duplicate keys, at every level; the bridge answers 200 (never 5xx).

    At the top level the earlier duplicates are dropped from the published value (it is re-encoded from the
    decoded envelope). Inside a payload object the raw bytes are published as received, duplicates included:
    the key comes from the *last* ``TaskId``, which is what last-wins parsers (Python's json, Jackson's default,
    JavaScript) also read, while a first-wins or strict parser downstream would disagree or refuse the value.
    """
    client = await make_client(make_settings())
    bodies = [
        # EventType given twice: the second one decides (an unknown type here, so it is published as such).
        b'{"EventType":"PullComplete","EventType":"X","PullCompleteEvent":{"TaskId":"t-dup-1"}}',
        b'{"EventType":"X","EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t-dup-2"}}',
        b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"a"},"PullCompleteEvent":{"TaskId":"t-dup-3"}}',
        b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"a","TaskId":"t-dup-4"}}',
    ]
    for body in bodies:
        response = await client.post(CALLBACK, data=body)
        assert response.status == 200, await response.text()

    records = await read_records(kafka.bootstrap_servers, topic, count=4, settle_s=0.2)
    by_key = {record.key: record for record in records}
    assert sorted(by_key) == [b"t-dup-1", b"t-dup-2", b"t-dup-3", b"t-dup-4"]
    assert headers_of(by_key[b"t-dup-1"])["event-type"] == "X"
    assert by_key[b"t-dup-1"].value == b'{"EventType":"X","PullCompleteEvent":{"TaskId":"t-dup-1"}}'
    assert headers_of(by_key[b"t-dup-2"])["event-type"] == "PullComplete"
    assert by_key[b"t-dup-3"].value == b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t-dup-3"}}'
    assert by_key[b"t-dup-4"].value == bodies[3], "payload duplicates are published as received"
    assert json.loads(by_key[b"t-dup-4"].value)["PullCompleteEvent"]["TaskId"] == "t-dup-4"


@integration
async def test_nul_bytes(kafka: Kafka, make_settings, make_client, topic) -> None:
    """A raw NUL is not allowed in JSON (400); an escaped one (``\\u0000``) is valid JSON and is published, key
    included (Kafka keys are bytes). NUL in the HTTP head is refused by aiohttp's parser (plain-text 400)."""
    client = await make_client(make_settings())
    for body in (
        b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t\x00"}}',
        b"\x00" * 64,
        sample_bytes() + b"\x00",
        b"\x00" + sample_bytes(),
    ):
        await assert_rejected(await client.post(CALLBACK, data=body), 400, "invalid_payload", context=body[:80])
    escaped = b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t\\u0000nul"}}'
    assert (await client.post(CALLBACK, data=escaped)).status == 200
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1, settle_s=0.2)
    assert record.key == b"t\x00nul" and record.value == escaped

    host, port = client.server.host, client.server.port
    for head in (
        b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"POST /vod/\x00callback HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    ):
        async with raw_connection(host, port) as connection:
            await connection.send(head)
            assert (await connection.response()).status == 400
    await assert_still_serves(client)


@integration
async def test_invalid_escapes_and_encodings_get_400(make_settings, make_client) -> None:
    client = await make_client(make_settings())
    for body in (
        # A lone surrogate escape is refused by msgspec, even in an untyped field.
        b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"\\ud800"}}',
        _GOOD_PREFIX + b',"X":"\\udfff"}',
        _GOOD_PREFIX + b',"X":"\\x41"}',
        _GOOD_PREFIX + b',"X":"\\u12"}',
        b"\xef\xbb\xbf" + sample_bytes(),  # a UTF-8 BOM
        sample_bytes().decode().encode("utf-16"),
        sample_bytes().decode().encode("utf-32"),
        b'{"EventType":"PullComplete","PullCompleteEvent":{"TaskId":"t","MetaData":{"Duration":NaN}}}',
    ):
        await assert_rejected(await client.post(CALLBACK, data=body), 400, "invalid_payload", context=body[:80])
    # Content encodings are refused before the body is read (VOD does not compress callbacks, and inflating
    # untrusted input on the event loop is a denial of service): double gzip, bombs, unknown codecs alike.
    twice = gzip.compress(gzip.compress(sample_bytes()))
    bomb = gzip_bomb(16 * MiB)
    assert len(bomb) < 100 * 1024
    for codec, body in (
        ("gzip", twice),
        ("gzip", bomb),
        ("deflate", deflate_bomb(16)),
        ("gzip", gzip.compress(sample_bytes())),
        *((codec, b"xx") for codec in ("br", "zstd", "compress", "nonsense")),
    ):
        response = await client.post(CALLBACK, data=body, headers={"Content-Encoding": codec})
        await assert_rejected(response, 415, "unsupported_encoding", context=codec)
    identity = await client.post(CALLBACK, data=sample_bytes(), headers={"Content-Encoding": "identity"})
    assert identity.status == 200
    await assert_still_serves(client)


@integration
async def test_corrupt_content_encoding_gets_415(make_settings, make_client) -> None:
    client = await make_client(make_settings())
    for codec, body in (
        ("gzip", b"not gzip at all"),
        ("deflate", b"\x00\x01\x02"),
        ("gzip", gzip.compress(b"{}")[:-6]),
    ):
        response = await client.post(CALLBACK, data=body, headers={"Content-Encoding": codec, "Connection": "close"})
        await assert_rejected(response, 415, "unsupported_encoding", context=codec)


@integration
@pytest.mark.parametrize("body", BAD_UTF8_BODIES.values(), ids=BAD_UTF8_BODIES.keys())
async def test_invalid_utf8_gets_400(make_settings, make_client, body: bytes) -> None:
    client = await make_client(make_settings())
    await assert_rejected(await client.post(CALLBACK, data=body), 400, "invalid_payload")


@integration
@pytest.mark.parametrize("body", BAD_UTF8_PUBLISHED.values(), ids=BAD_UTF8_PUBLISHED.keys())
async def test_invalid_utf8_in_untyped_fields_gets_400(make_settings, make_client, body: bytes) -> None:
    client = await make_client(make_settings())
    await assert_rejected(await client.post(CALLBACK, data=body), 400, "invalid_payload")


# ---- methods, paths, broken HTTP ----------------------------------------------------------------------------


@integration
async def test_wrong_methods_get_405_and_unknown_paths_404_as_json(make_settings, make_client) -> None:
    client = await make_client(make_settings())
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"):
        response = await client.request(method, CALLBACK, data=sample_bytes() if method != "GET" else None)
        await assert_rejected(response, 405, "method_not_allowed", context=method)
        assert response.headers["Allow"] == "POST"
    head = await client.head(CALLBACK)
    assert head.status == 405 and head.headers["Allow"] == "POST"
    for method, path in (
        ("POST", "/"),
        ("POST", "/vod/callback/"),
        ("POST", "/VOD/CALLBACK"),
        ("POST", "/vod/callback/../metrics"),
        ("POST", "/vod%2Fcallback"),
        ("GET", "/%00"),
        ("GET", "/" + "a" * 4000),
        ("POST", "/metrics"),
    ):
        response = await client.request(method, path, data=b"{}", skip_auto_headers=())
        if method == "POST" and path == "/metrics":
            await assert_rejected(response, 405, "method_not_allowed")
        else:
            await assert_rejected(response, 404, "not_found", context=path)
    await assert_still_serves(client)


#: Broken HTTP is refused by aiohttp's parser before the app runs: a 400 with a plain-text body (the JSON error
#: middleware never sees these requests).
BROKEN_HTTP = {
    "garbage": b"\x00\xff garbage\r\n\r\n",
    "tls hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    "http2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "http/1.2": b"POST /vod/callback HTTP/1.2\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "unknown method": b"FOO /vod/callback HTTP/1.1\r\nHost: x\r\n\r\n",
    "bare LF": b"POST /vod/callback HTTP/1.1\nHost: x\nContent-Length: 0\n\n",
    "no Host": b"POST /vod/callback HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    "header line 20k": b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
    "url 9k": b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "300 headers": b"POST /vod/callback HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X%d: a\r\n" % i for i in range(300))
    + b"\r\n",
    "header name with space": b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nX A: b\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
    "negative Content-Length": b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "two Content-Lengths": b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
    b"Content-Length: 2\r\n\r\nab",
    "Content-Length and chunked": b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "Transfer-Encoding gzip": b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    "bad chunk size": b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "chunk size overflow": b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"FFFFFFFFFFFFFFFFF\r\n",
    "300 trailers": b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
    + b"X-T: a\r\n" * 300
    + b"\r\n",
}


@integration
async def test_broken_http_gets_4xx(make_settings, make_client) -> None:
    client = await make_client(make_settings())
    host, port = client.server.host, client.server.port
    for name, request in BROKEN_HTTP.items():
        async with raw_connection(host, port) as connection:
            await connection.send(request)
            response = await connection.response()
            assert 400 <= response.status < 500, (name, response.status, response.body[:200])
    await assert_still_serves(client)


# ---- slow clients -------------------------------------------------------------------------------------------


@pytest.fixture
async def serve_like_cli(make_settings) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """Serve ``create_app`` the way ``vod-bridge serve`` does (tests/servekit.py), on 127.0.0.1 and an ephemeral
    port; keep-alive (idle) and header timeouts of 75 s unless given."""
    async with contextlib.AsyncExitStack() as stack:

        async def serve(
            *, keepalive_timeout_s: float = 75.0, body_timeout_s: float = 10.0, header_timeout_s: float = 75.0
        ) -> Served:
            settings = make_settings(
                http_idle_timeout_s=keepalive_timeout_s,
                http_body_timeout_s=body_timeout_s,
                http_header_timeout_s=header_timeout_s,
            )
            return await stack.enter_async_context(serve_guarded(settings))

        yield serve


HEAD_OF_A_POST = b"POST /vod/callback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


async def _trickle(connection: RawConnection, data: bytes, *, interval_s: float) -> None:
    with contextlib.suppress(ConnectionError):
        for byte in data:
            await connection.send(bytes([byte]))
            await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def slow_clients(served: Served, *, each: int = 4) -> AsyncIterator[dict[str, list[RawConnection]]]:
    """Open ``each`` connections of every slow kind; trickling goes on in the background until exit."""
    kinds: dict[str, list[RawConnection]] = {}
    tasks: list[asyncio.Task[None]] = []
    long_header = b"X-Slow: " + b"a" * 4000 + b"\r\n\r\n"
    stalled_body = b"Content-Length: 2000\r\n\r\n" + sample_bytes()[:100]
    trickled_body = b"Content-Length: 900000\r\n\r\n" + b'{"EventType":"PullComplete","X":"' + b"x" * 4000
    for kind in ("idle", "header stalled", "header trickled", "body stalled", "body trickled"):
        kinds[kind] = [await RawConnection.open(served.host, served.port) for _ in range(each)]
        for connection in kinds[kind]:
            if kind == "header stalled":
                await connection.send(HEAD_OF_A_POST)
            elif kind == "header trickled":
                tasks.append(asyncio.create_task(_trickle(connection, HEAD_OF_A_POST + long_header, interval_s=0.05)))
            elif kind == "body stalled":
                await connection.send(HEAD_OF_A_POST + stalled_body)
            elif kind == "body trickled":
                await connection.send(HEAD_OF_A_POST + trickled_body[:40])
                tasks.append(asyncio.create_task(_trickle(connection, trickled_body[40:], interval_s=0.05)))
    try:
        yield kinds
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for connections in kinds.values():
            for connection in connections:
                connection.close()


@integration
async def test_slow_loris_does_not_starve_normal_requests(serve_like_cli) -> None:
    """What protects the service: aiohttp parses every connection in its own protocol object, on the event loop,
    without a thread or worker per connection, so a stalled or trickling client costs a socket, a small buffer
    and (once its headers are complete) an idle handler task awaiting ``request.read()``: it blocks nobody else.
    What such clients could exhaust is file descriptors: the connection bound (tests/sources/test_connections.py)
    keeps them below the file limit.

    Timeouts: ``BRIDGE_HTTP_HEADER_TIMEOUT_S`` closes a connection whose request head is not complete in time
    (bridge.sources.connections); aiohttp's keep-alive timer (``BRIDGE_HTTP_IDLE_TIMEOUT_S``), armed when the
    connection is made and not pushed back by incoming bytes, too. Once the head is complete,
    ``BRIDGE_HTTP_BODY_TIMEOUT_S`` bounds the wait for the body (see the tests below).
    """
    served = await serve_like_cli()
    async with slow_clients(served, each=4) as kinds:
        slow = sum(map(len, kinds.values()))
        # Every slow connection accepted and being parsed (the normal requests below come on top of them).
        await wait_until(lambda: len(served.server.connections) >= slow, timeout_s=5)
        for _ in range(3):
            started = time.monotonic()
            response = await served.session.post(served.url(CALLBACK), json=sample_event(f"t-{uuid.uuid4().hex}"))
            elapsed_s = time.monotonic() - started
            assert response.status == 200, await response.text()
            assert elapsed_s < 2.0, f"a normal request took {elapsed_s:.2f}s among slow clients"
            assert (await served.session.get(served.url("/healthz"))).status == 200
        print(f"normal request among {sum(map(len, kinds.values()))} slow connections: {elapsed_s * 1000:.0f} ms")
        # None of them was answered or dropped meanwhile: they hold their connections.
        for connections in kinds.values():
            for connection in connections:
                assert not await connection.closed_by_server(within_s=0.01)


@integration
async def test_incomplete_request_heads_are_closed_by_the_keepalive_timer(serve_like_cli) -> None:
    served = await serve_like_cli(keepalive_timeout_s=1.0)
    async with slow_clients(served, each=2) as kinds:
        started = time.monotonic()
        for kind in ("idle", "header stalled", "header trickled"):
            for connection in kinds[kind]:
                assert await connection.closed_by_server(within_s=3.0), kind
        closed_after_s = time.monotonic() - started
        print(f"incomplete heads closed after {closed_after_s:.2f}s (keepalive_timeout 1 s)")
        assert closed_after_s < 2.5
        response = await served.session.post(served.url(CALLBACK), json=sample_event(f"t-{uuid.uuid4().hex}"))
        assert response.status == 200


@integration
async def test_stalled_request_bodies_are_eventually_closed(serve_like_cli) -> None:
    served = await serve_like_cli(keepalive_timeout_s=1.0, body_timeout_s=1.0)
    async with slow_clients(served, each=1) as kinds:
        for kind in ("body stalled", "body trickled"):
            for connection in kinds[kind]:
                # Twice the keep-alive timeout: what closes an incomplete head in 1 s leaves a stalled body be.
                assert await connection.closed_by_server(within_s=2.0), f"{kind}: still open after 2 s"


@integration
async def test_client_disconnect_mid_body_is_not_an_internal_error(serve_like_cli, caplog) -> None:
    served = await serve_like_cli()
    with caplog.at_level(logging.INFO, logger="bridge"):
        async with raw_connection(served.host, served.port) as connection:
            await connection.send(HEAD_OF_A_POST + b"Content-Length: 2000\r\n\r\n" + sample_bytes()[:100])
            await wait_until(lambda: served.server.requests_count >= 1, timeout_s=5)  # the head reached a handler
        # The server lists a lost connection until its handler finished: then everything it logs is logged.
        await wait_until(lambda: not served.server.connections, timeout_s=5)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, [record.getMessage() for record in errors]


@integration
async def test_compression_bomb_does_not_stall_other_requests(serve_like_cli) -> None:
    """Two deflate bombs (1000 MiB inflated) sent while normal callbacks go on back to back (one always in
    flight, so any stall of the event loop shows in a latency): the bombs get 415 and their connections are
    closed (nothing inflated, nor read, after the answers), and no normal callback waited meanwhile."""
    served = await serve_like_cli()
    bomb = deflate_bomb(1000)
    assert len(bomb) < MiB, "under the limit: the body is read, not refused by its Content-Length"
    stop = asyncio.Event()
    latencies: list[float] = []

    async def probe() -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = await served.session.post(served.url(CALLBACK), json=sample_event(f"t-{uuid.uuid4().hex}"))
            assert response.status == 200
            latencies.append(time.monotonic() - started)

    async def post_bomb(session: aiohttp.ClientSession) -> int:
        headers = {"Content-Encoding": "deflate"}
        async with session.post(served.url(CALLBACK), data=io.BytesIO(bomb), headers=headers) as response:
            await response.read()
            return response.status

    prober = asyncio.create_task(probe())
    try:
        await wait_until(lambda: len(latencies) >= 3, timeout_s=5)  # normal callbacks flow
        probe_connections = len(served.server.connections)
        before_bombs = len(latencies)
        async with aiohttp.ClientSession() as bomb_session:
            statuses = await asyncio.gather(post_bomb(bomb_session), post_bomb(bomb_session))
            # The server is done with the bombs: both connections closed, only the prober's left.
            await wait_until(lambda: len(served.server.connections) <= probe_connections, timeout_s=5)
    finally:
        stop.set()
        await prober  # the callback in flight when the bombs were done is the last one
    meanwhile = latencies[before_bombs:]
    print(f"bombs answered {statuses}; normal requests meanwhile: max {max(meanwhile):.3f}s over {len(meanwhile)}")
    assert statuses == [415, 415]
    # A normal request takes a few milliseconds here: half a second is already a hundred times that.
    assert max(meanwhile) < 0.5, f"a normal request waited {max(meanwhile):.2f}s behind two compression bombs"


# ---- volume: memory and metrics -----------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise LookupError(field)


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` (Linux >= 4.0), so that the peak of one phase is not hidden by an earlier, higher one."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def gzip_bomb(size: int, byte: bytes = b" ") -> bytes:
    """``size`` bytes of ``byte``, gzipped, without holding them in memory at once."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as compressor:
        chunk = byte * MiB
        for _ in range(size // MiB):
            compressor.write(chunk)
    return out.getvalue()


def deflate_bomb(mebibytes: int) -> bytes:
    """``mebibytes`` MiB of spaces as a raw deflate stream (~1 KiB per MiB), built in microseconds: after a full
    flush the compressor's output for the same input repeats, so one compressed MiB is repeated as is."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b" " * MiB
    first = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + again * (mebibytes - 1) + compressor.flush()


@integration
async def test_memory_stays_bounded_and_metrics_count_rejections(make_settings, make_client) -> None:
    """2000 hostile requests (one in ten heavy: 2 MiB bodies, gzip bombs, 100k-deep arrays, 500 KB strings; the
    rest small broken bodies, wrong methods and paths): every answer a 4xx,
    peak RSS growth well under 100 MiB, the rejections visible in /metrics, and a normal event published after.
    With ``BRIDGE_CALLBACK_INVALID=reject``, so that JSON objects without a key are refused too."""
    client = await make_client(make_settings(delivery_callback_invalid="reject"))
    rng = random.Random(7)
    huge = b"{" + b" " * (2 * MiB) + b"}"
    bomb = deflate_bomb(8)
    Request = tuple[str, str, bytes, dict[str, str], int]
    heavy: list[Request] = [
        ("POST", CALLBACK, huge, {}, 413),
        ("POST", CALLBACK, bomb, {"Content-Encoding": "deflate"}, 415),
        ("POST", CALLBACK, b"[" * 100_000, {}, 400),
        ("POST", CALLBACK, to_json("x" * 500_000), {}, 400),
        ("POST", CALLBACK, b'{"EventType":"' + b"E" * 500_000 + b'"}', {}, 400),
    ]
    light: list[Request] = [
        ("POST", CALLBACK, b"", {}, 400),
        ("GET", CALLBACK, b"", {}, 405),
        ("POST", "/nope", b"{}", {}, 404),
        *(("POST", CALLBACK, body, {}, 400) for body in WRONG_TYPES if body.strip() and _rejected(body)),
        *(("POST", CALLBACK, body, {}, 400) for body in random_bodies(seed=99, count=400) if _rejected(body)),
    ]

    async def one(i: int) -> None:
        method, path, body, headers, expected = heavy[i // 10 % len(heavy)] if i % 10 == 0 else rng.choice(light)
        data = io.BytesIO(body) if len(body) > MiB else body or None  # aiohttp warns on large raw bytes
        response = await client.request(method, path, data=data, headers=headers)
        assert response.status == expected, (method, path, body[:100], response.status, await response.text())
        await response.read()

    for i in range(100):  # warm up: first-use allocations are not growth
        await one(i)
    # ru_maxrss is a high-water mark for the whole process (earlier tests included): reset it where Linux allows,
    # so the peak measured is this phase's own.
    peak_was_reset = _reset_peak_rss()
    rss_before, maxrss_before = _proc_status_kib("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    for batch in range(0, 2000, 20):
        await asyncio.gather(*(one(i) for i in range(batch, batch + 20)))
    elapsed_s = time.monotonic() - started
    rss_after, maxrss_after = _proc_status_kib("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_growth_mib = (maxrss_after - (rss_before if peak_was_reset else maxrss_before)) / 1024
    print(
        f"2000 hostile requests in {elapsed_s:.1f}s: RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB,"
        f" peak during the run {maxrss_after / 1024:.0f} MiB (+{peak_growth_mib:.1f} MiB over the start;"
        f" peak reset: {peak_was_reset})"
    )
    assert peak_growth_mib < 100
    assert (rss_after - rss_before) / 1024 < 50, "what stays resident after the run"

    metrics = await (await client.get("/metrics")).text()
    rejected = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "vod_bridge_events_rejected_total" and sample.labels["source"] == "callback"
    }
    print(f"rejected by reason: {rejected}")
    assert sum(rejected.values()) >= 1500
    assert {"malformed_json", "not_an_object", "missing_key", "empty_body", "payload_too_large"} <= set(rejected)
    await assert_still_serves(client)


def _rejected(body: bytes) -> bool:
    """True when the bridge answers 400 with ``BRIDGE_CALLBACK_INVALID=reject``: not a JSON object, or no key."""
    try:
        return isinstance(read_event(body), Undecodable)
    except InvalidPayload:
        return True


def _expected_status(body: bytes) -> str | None:
    """What the default policy answers: ``None`` for a 400 (not a JSON object), else the 200's ``status``."""
    try:
        item = read_event(body)
    except InvalidPayload:
        return None
    return "dead_lettered" if isinstance(item, Undecodable) else "published"
