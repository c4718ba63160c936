"""Logging set-up: human-readable on a terminal, one JSON object per line otherwise (or when asked)."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from bridge.config import LogFormat, LogLevel
from bridge.ops.repeats import RepeatGate
from bridge.timefmt import rfc3339_utc

#: ``extra=`` fields the bridge attaches to log records (bounded, never payloads or secrets).
_STRUCTURED_FIELDS = ("reason", "key", "event_type")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": rfc3339_utc(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _STRUCTURED_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: LogLevel, fmt: LogFormat) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if use_json else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    # While Kafka is down aiokafka logs every failed connection to every broker: one line per condition, then
    # summaries (bridge.ops.repeats). At DEBUG every line is kept.
    handler.addFilter(RepeatGate())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(max(logging.getLevelName(level), logging.WARNING))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    install_redaction()


#: Loggers that record exceptions raised while a request is read: aiohttp's server, and the bridge's error
#: middleware (a parse error escaping a handler).
_REDACTED_LOGGERS = ("aiohttp.server", "bridge.sources.http")


def install_redaction() -> None:
    """Attach :class:`ParserErrorRedactor` to the loggers that see request parse errors (once).
    ``configure_logging`` calls it; a program that embeds the app with its own logging set-up calls it too."""
    for name in _REDACTED_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, ParserErrorRedactor) for f in target.filters):
            target.addFilter(ParserErrorRedactor())


#: llhttp's error messages read ``<reason>:\n\n  <quoted bytes>\n  <pointer>``, the reason one of its fixed texts
#: ("Invalid header token"). Only that reason is kept; every other message (the pure-Python parser's) may be
#: nothing but request bytes (``TransferEncodingError(<chunk-size line>)``), so only the error's class is shown.
_LLHTTP_REASON = re.compile(r"([A-Za-z][A-Za-z0-9 ,-]{0,79}):\n\n")


def describe_parse_error(exc: BaseException) -> str | None:
    """``"BadHttpMessage 400: Invalid header token"`` for an aiohttp HTTP parse error, or for an exception caused
    by one (``RequestPayloadError``): its class, status and llhttp's fixed reason, never the request bytes its
    message quotes (a URL token, a header value). ``None`` when no parse error is involved."""
    cause: BaseException | None = exc
    for _ in range(8):  # a cause chain is short; the bound guards against a cycle
        if cause is None or isinstance(cause, HttpProcessingError):
            break
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, HttpProcessingError):
        return None
    match = _LLHTTP_REASON.match(str(cause.message))
    described = f"{type(cause).__name__} {cause.code}" + (f": {match.group(1)}" if match else "")
    return described if cause is exc else f"{type(exc).__name__} from {described}"


class ParserErrorRedactor(logging.Filter):
    """aiohttp logs a request it cannot parse (at ERROR) with the parser's exception, whose message quotes the
    offending bytes: the request line with a URL token, a header with its value, a chunk of the body. Keep
    :func:`describe_parse_error`'s summary; drop the exception and its traceback (aiohttp's own frames, of no
    use to an operator). Other records pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        described = describe_parse_error(exc) if exc is not None else None
        if described is not None:
            record.msg = f"{record.msg} (%s)"
            record.args = (*_args_tuple(record.args), described)
            record.exc_info = None
            record.exc_text = None
        return True


def _args_tuple(args: object) -> tuple[object, ...]:
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


class RedactingAccessLogger(AbstractAccessLogger):
    """One DEBUG line per request, without the query string or a path token (both may carry the secret
    callback token)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s %s -> %d in %.1fms", request.remote, request.method, _route(request), response.status, time * 1000
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


def _route(request: web.BaseRequest) -> str:
    """The route pattern (``/vod/callback/{token}``), or ``-`` for a request that matched none or was never
    routed (aiohttp refused it while parsing: its ``match_info`` is unset and asserting)."""
    if not isinstance(request, web.Request):
        return "-"
    try:
        resource = request.match_info.route.resource
    except (AssertionError, AttributeError):  # AttributeError: the same under ``python -O``
        return "-"
    return resource.canonical if resource is not None else "-"
