"""The exception tree. Each HTTP-facing error carries its own status and a stable machine-readable code.

Library exceptions (msgspec, aiokafka, aiohttp client) are translated into these inside the module that
calls the library, so callers only ever handle ``BridgeError``.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final


class BridgeError(Exception):
    """Root of every error raised by the bridge."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(BridgeError):
    """A setting is missing or invalid; raised at start-up only."""

    code = "config_error"


#: Every ``InvalidPayload.reason`` the bridge raises itself (a body it cannot read at all); a decoded body without a
#: usable key adds the ``UndecodableReason`` values of :mod:`bridge.vod.model`. Metrics declare each one at 0.
INVALID_PAYLOAD_REASONS: Final = (
    "invalid_payload",
    "invalid_utf8",
    "malformed_json",
    "not_an_object",
    "too_deep",
    "empty_body",
    "unreadable_body",
)
#: Every ``AuthFailed.reason``.
AUTH_FAILED_REASONS: Final = ("missing_signature", "bad_signature", "expired", "t_too_far_ahead", "bad_token")


class InvalidPayload(BridgeError):
    """The request body is not a VOD event we can publish (bad JSON, wrong shape, missing id)."""

    status = HTTPStatus.BAD_REQUEST
    code = "invalid_payload"

    def __init__(self, message: str, *, reason: str = "invalid_payload") -> None:
        super().__init__(message)
        #: A short, bounded label used for metrics: :data:`INVALID_PAYLOAD_REASONS` or an ``UndecodableReason``.
        self.reason = reason


class PayloadTooLarge(BridgeError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "payload_too_large"


class UnsupportedEncoding(BridgeError):
    """A ``Content-Encoding`` other than identity: VOD does not compress callbacks, and inflating untrusted
    bodies on the event loop is a denial-of-service vector."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_encoding"


class BodyTimeout(BridgeError):
    """The client sent its headers but not its body in time."""

    status = HTTPStatus.REQUEST_TIMEOUT
    code = "request_timeout"


class Unauthorized(BridgeError):
    """A callback signature, token or source address was rejected."""

    status = HTTPStatus.UNAUTHORIZED
    code = "unauthorized"


class AuthFailed(Unauthorized):
    """A callback's signature or token was rejected."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        #: Bounded label for metrics: one of :data:`AUTH_FAILED_REASONS`.
        self.reason = reason


class Forbidden(BridgeError):
    """The source address is not on the allow-list."""

    status = HTTPStatus.FORBIDDEN
    code = "forbidden"


class PublishFailed(BridgeError):
    """Kafka did not acknowledge the record in time; the sender should retry later."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "kafka_unavailable"

    def __init__(
        self, message: str, *, retriable: bool = True, retry_after_s: int = 5, cause: str | None = None
    ) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.retry_after_s = retry_after_s
        #: A bounded label for metrics: ``timeout``, the Kafka error class, ``spool``, ... (default: ``code``).
        self.cause = cause or self.code


class SpoolNoRoom(PublishFailed):
    """Kafka did not take the record and the spool has no room for it (its bound, or the disk's free-space
    floor): not an outage of Kafka alone, so it has its own code and metric cause."""

    code = "spool_full"


#: ``PublishFailed.cause`` of a record failed because its producer failed or was replaced (not because of the record):
#: another producer, or the spool, takes it.
PRODUCER_REPLACED: Final = "producer_replaced"


class RecordTooLarge(PublishFailed):
    """Kafka refuses the record for its size: retrying cannot help, so this is a 413, not a 503."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "record_too_large"


class NotReady(PublishFailed):
    """The Kafka producer has not connected yet."""

    code = "not_ready"


class Overloaded(PublishFailed):
    """Too many publishes are in flight; the sender should back off."""

    code = "overloaded"


class KafkaUnavailable(BridgeError):
    """A one-shot command (``tail``, ``redrive``) could not reach Kafka, or Kafka stopped answering within its
    timeout: nothing was lost; run it again."""

    code = "kafka_unavailable"


class UpstreamError(BridgeError):
    """The VOD API answered with an error or could not be reached."""

    status = HTTPStatus.BAD_GATEWAY
    code = "upstream_error"

    def __init__(self, message: str, *, api_code: str = "", request_id: str = "", retriable: bool = True) -> None:
        super().__init__(message)
        self.api_code = api_code
        self.request_id = request_id
        self.retriable = retriable
