"""Secrets never reach a log line or an exception text (issue 10 §4).

The real ``vod-bridge serve`` process runs at DEBUG with every secret set (callback token, SignKey, SASL
password, VOD SecretId/SecretKey) while the tests drive its error paths, including requests aiohttp cannot
parse (their parser quotes the offending bytes); then every line of its log is searched for each secret and
for long fragments of it. An in-process variant covers what a process cannot be made to do legitimately: an
unhandled exception in a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Kafka, sample_event
from fakevod import FakeVod
from faultkit import BridgeProcess, bridge_env, spawn

from bridge.config import load_settings
from bridge.errors import ConfigError
from bridge.ops.embedded import free_port
from bridge.ops.logs import ParserErrorRedactor, install_redaction
from bridge.vod.api import Credentials

TOKEN = "tokSECRETabcdefgh0123456789"
SIGN_KEY = "SignKEYsecret4242abcd"
SASL_PASSWORD = "saslPASSWORDsecret-0987"
SECRET_ID = "AKIDsecretID000111222333"
SECRET_KEY = "vodSECRETkey999888777666"
SECRETS = {
    "callback token": TOKEN,
    "SignKey": SIGN_KEY,
    "SASL password": SASL_PASSWORD,
    "VOD SecretId": SECRET_ID,
    "VOD SecretKey": SECRET_KEY,
}
#: Long enough not to occur by chance, short enough to catch a truncated or partly masked secret (the masked
#: SecretId shows 4 + 4 characters).
FRAGMENT = 10


def leaks(text: str) -> list[str]:
    """The secrets (or a start or end fragment of one) that occur in ``text``."""
    found = []
    for name, secret in SECRETS.items():
        if any(piece in text for piece in (secret, secret[:FRAGMENT], secret[-FRAGMENT:])):
            found.append(name)
    return found


def vod_sign(t: int | str, key: str = SIGN_KEY) -> str:
    return hashlib.md5(f"{key}{t}".encode()).hexdigest()


def signed(name: str, t: int | str | None = None) -> dict[str, Any]:
    t = int(time.time()) + 300 if t is None else t
    return {**sample_event(name), "Sign": vod_sign(t), "T": t}


#: Requests aiohttp refuses while parsing, with a secret in the part its parser quotes.
MALFORMED_REQUESTS = [
    f"POST /vod/callback/{TOKEN}\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    f"POST /vod/callback?token={TOKEN}\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
    f"POST /vod/callback HTTP/1.1\r\nHost: x\r\nBad Header: {TOKEN}\r\n\r\n",
    f"POST /vod/callback/{TOKEN} HTTP/1.1\r\nHost: x\r\nContent-Length: x{TOKEN}\r\n\r\n",
    f"POST /vod/callback/{TOKEN} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {TOKEN}\r\n\r\n",
    f"POST /vod/callback/{TOKEN} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{TOKEN}\r\n",
    f"{TOKEN} /vod/callback HTTP/1.1\r\n\r\n",
    f"POST /vod/callback/{TOKEN} HTTP/9.{TOKEN}\r\n\r\n",
    f"POST /vod/callback/{TOKEN}{'A' * 9000} HTTP/1.1\r\n\r\n",
    f"POST /vod/callback HTTP/1.1\r\nX-Token: {TOKEN}{'A' * 9000}\r\n\r\n",
]
_CHUNKED = "POST /vod/callback/{} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
#: Bodies that break while the handler reads them (or while aiohttp drains the body of a refused request): sent
#: in two parts, the second once the handler runs.
BROKEN_BODIES = [
    (_CHUNKED.format(TOKEN), f"{TOKEN}\r\n"),
    (_CHUNKED.format(TOKEN), f"5\r\nhelloXX{TOKEN}\r\n"),
    (_CHUNKED.format("wrong-token-0123456789"), f"{TOKEN}\r\n"),
]


async def send_raw(port: int, request: str | Sequence[str]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, part in enumerate((request,) if isinstance(request, str) else request):
            if i:
                await asyncio.sleep(0.2)
            writer.write(part.encode("latin-1"))
            await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class Answers:
    """Every answer of the run: (what was sent, status, body), for assertions and failure messages."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base
        self.seen: list[tuple[str, int, str]] = []

    async def request(self, label: str, method: str, path: str, **kwargs: Any) -> int:
        async with self.session.request(method, self.base + path, **kwargs) as response:
            body = await response.text()
        self.seen.append((label, response.status, body))
        return response.status

    def status(self, label: str) -> int:
        return next(status for seen, status, _ in self.seen if seen == label)


async def drive_error_paths(answers: Answers, *, max_body_bytes: int) -> None:
    """The callback error paths, each with the secrets where a sender would put them."""
    cb = "/vod/callback"
    wrong = TOKEN[:-1] + "X"  # a near miss: must not be logged either (it is most of the real token)
    post = answers.request
    await post("token in path", "POST", f"{cb}/{TOKEN}", json=signed("in-path"))
    await post("token in query", "POST", f"{cb}?token={TOKEN}", json=signed("in-query", str(int(time.time()) + 60)))
    await post("no token", "POST", cb, json=signed("no-token"))
    await post("wrong token in path", "POST", f"{cb}/{wrong}", json=signed("wrong-path"))
    await post("wrong token in query", "POST", f"{cb}?token={wrong}&x={TOKEN}", json=signed("wrong-query"))
    await post("bad signature", "POST", f"{cb}/{TOKEN}", json=signed("bad-sign") | {"Sign": vod_sign(1, "other")})
    await post("expired T", "POST", f"{cb}/{TOKEN}", json=signed("expired", int(time.time()) - 3600))
    await post("T far ahead", "POST", f"{cb}/{TOKEN}", json=signed("ahead", int(time.time()) + 86400))
    await post("unsigned", "POST", f"{cb}/{TOKEN}", json=sample_event("unsigned"))
    await post("Sign is the key", "POST", f"{cb}/{TOKEN}", json=sample_event("k") | {"Sign": SIGN_KEY, "T": SIGN_KEY})
    await post("malformed JSON", "POST", f"{cb}/{TOKEN}", data=b'{"Sign": "' + SIGN_KEY.encode() + b'", x')
    await post("not an object", "POST", f"{cb}/{TOKEN}", data=json.dumps([TOKEN, SIGN_KEY]).encode())
    await post("oversized", "POST", f"{cb}/{TOKEN}", data=b"x" * (max_body_bytes + 1))
    await post(
        "oversized, 100-continue", "POST", f"{cb}?token={TOKEN}", data=b"x" * (max_body_bytes + 1), expect100=True
    )
    await post(
        "gzip",
        "POST",
        f"{cb}/{TOKEN}",
        data=gzip.compress(json.dumps(signed("gz")).encode()),
        headers={"Content-Encoding": "gzip"},
    )
    await post("404", "POST", f"{cb}/{TOKEN}/more?token={TOKEN}", json=signed("nf"))
    await post("404 elsewhere", "GET", f"/{TOKEN}?token={TOKEN}")
    await post("405", "GET", f"{cb}/{TOKEN}?token={TOKEN}")
    await post("405 on the bare path", "PUT", f"{cb}?token={TOKEN}", data=b"{}")
    await post("metrics", "GET", "/metrics")
    await post("readyz", "GET", "/readyz")


def assert_no_leaks(log: str, answers: Answers | None = None) -> None:
    found = leaks(log)
    lines = [line for line in log.splitlines() if leaks(line)]
    assert not found, f"{found} in the log:\n" + "\n".join(lines[:20])
    if answers is not None:
        # The answers may echo what the client itself sent (aiohttp's 400 for a bad request line); they must not
        # carry a secret the client did not send: the SignKey, the SASL password, the VOD keys.
        for label, _, body in answers.seen:
            assert not {"SignKey", "SASL password", "VOD SecretId", "VOD SecretKey"} & set(leaks(body)), (label, body)


def assert_logged(log: str, *needles: str) -> None:
    """The paths were really taken (a test that logs nothing would pass vacuously)."""
    missing = [needle for needle in needles if needle not in log]
    assert not missing, f"expected in the log: {missing}"


def log_tail(logfile: Path) -> str:
    return logfile.read_text()[-3000:]


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], logfile: Path, *, wait_for: str = "/healthz") -> AsyncIterator[BridgeProcess]:
    """``vod-bridge serve`` until the block ends (then SIGTERM); ready when ``wait_for`` answers 200 (``/healthz``
    for a run whose Kafka is meant to stay unreachable)."""
    bridge = BridgeProcess(env, logfile)
    bridge.process = spawn(["serve", "--host", "127.0.0.1", "--port", str(bridge.port)], env, logfile)
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while True:
                assert bridge.process.poll() is None, log_tail(logfile)
                assert time.monotonic() < deadline, f"{wait_for} never answered 200"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{bridge.port}{wait_for}") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield bridge
        assert await bridge.stop() == 0, log_tail(logfile)
    finally:
        bridge.ensure_dead()


@pytest.fixture
def aiohttp_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the process with aiohttp's C parser (llhttp) and with its pure-Python one: their messages differ."""
    if request.param == "python":
        monkeypatch.setenv("AIOHTTP_NO_EXTENSIONS", "1")
    else:
        monkeypatch.delenv("AIOHTTP_NO_EXTENSIONS", raising=False)
    yield request.param


@pytest.mark.parametrize("aiohttp_parser", ["c", "python"], indirect=True)
async def test_kafka_unreachable_with_sasl_and_vod_credentials(aiohttp_parser: str, tmp_path: Path) -> None:
    """Kafka (SASL) at a closed port, the VOD API at another: every callback path, nothing in the log."""
    max_body_bytes = 4096
    env = bridge_env(
        BRIDGE_LOG_LEVEL="DEBUG",
        BRIDGE_CALLBACK_TOKEN=TOKEN,
        BRIDGE_CALLBACK_SIGN_KEY=SIGN_KEY,
        BRIDGE_HTTP_MAX_BODY_BYTES=str(max_body_bytes),
        # llhttp waits for more of a broken chunked body: the body timeout ends those requests (408).
        BRIDGE_HTTP_BODY_TIMEOUT_S="1",
        BRIDGE_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        BRIDGE_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        BRIDGE_KAFKA_SASL_MECHANISM="PLAIN",
        BRIDGE_KAFKA_SASL_USERNAME="bridge",
        BRIDGE_KAFKA_SASL_PASSWORD=SASL_PASSWORD,
        BRIDGE_KAFKA_PUBLISH_TIMEOUT_S="1",
        BRIDGE_PULL_ENABLED="true",
        BRIDGE_VOD_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        TENCENTCLOUD_SECRET_ID=SECRET_ID,
        TENCENTCLOUD_SECRET_KEY=SECRET_KEY,
    )
    logfile = tmp_path / "bridge.log"
    async with serving(env, logfile) as bridge, aiohttp.ClientSession() as session:
        answers = Answers(session, f"http://127.0.0.1:{bridge.port}")
        await drive_error_paths(answers, max_body_bytes=max_body_bytes)
        raw = await asyncio.gather(*(send_raw(bridge.port, r) for r in [*MALFORMED_REQUESTS, *BROKEN_BODIES]))
        await asyncio.sleep(1.5)  # at least one more producer reconnect attempt
    log = logfile.read_text()
    assert_no_leaks(log, answers)
    assert {answers.status("token in path"), answers.status("token in query")} == {503}
    assert (answers.status("wrong token in path"), answers.status("T far ahead"), answers.status("405")) == (
        401,
        401,
        405,
    )
    assert all(answer.startswith(b"HTTP/1.") for answer in raw), raw
    assert_logged(
        log,
        "bad_token",
        "bad_signature",
        "expired",
        "t_too_far_ahead",
        "missing_signature",
        "malformed_json",
        "not_an_object",
        "payload_too_large",
        "unsupported_encoding",
        "/vod/callback/{token} -> 401",
        "aiohttp.server: Error handling request from 127.0.0.1 (",
        "kafka not reachable",
        "poller started",
    )
    assert "Traceback" not in log  # no crash of ours, and none of aiohttp's quoting tracebacks


@pytest.mark.integration
async def test_kafka_up_and_a_vod_api_that_echoes_secrets(kafka: Kafka, topic: str, tmp_path: Path) -> None:
    """Kafka reachable, the poller running against a VOD API whose errors quote the request's key material."""
    async with FakeVod(secret_id=SECRET_ID, secret_key=SECRET_KEY) as vod:
        vod.fail_next(2, "AuthFailure.SignatureFailure", f"signature of {SECRET_KEY} does not match")
        vod.fail_next_http(2, 502, f"<html>upstream said {SECRET_KEY}</html>".encode())
        env = bridge_env(
            BRIDGE_LOG_LEVEL="DEBUG",
            BRIDGE_LOG_FORMAT="json",
            BRIDGE_HTTP_MAX_BODY_BYTES="4096",
            BRIDGE_CALLBACK_TOKEN=TOKEN,
            BRIDGE_CALLBACK_SIGN_KEY=SIGN_KEY,
            BRIDGE_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
            BRIDGE_KAFKA_TOPIC=topic,
            BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=str(kafka.supports_idempotence).lower(),
            BRIDGE_PULL_ENABLED="true",
            BRIDGE_PULL_BACKOFF_INITIAL_S="0.05",
            BRIDGE_PULL_BACKOFF_MAX_S="0.2",
            BRIDGE_VOD_ENDPOINT=vod.endpoint,
            TENCENTCLOUD_SECRET_ID=SECRET_ID,
            TENCENTCLOUD_SECRET_KEY=SECRET_KEY,
        )
        logfile = tmp_path / "bridge.log"
        async with serving(env, logfile, wait_for="/readyz") as bridge, aiohttp.ClientSession() as session:
            answers = Answers(session, f"http://127.0.0.1:{bridge.port}")
            await drive_error_paths(answers, max_body_bytes=4096)
            await vod.wait_for_pulls(3, timeout_s=15)
    log = logfile.read_text()
    assert_no_leaks(log, answers)
    assert answers.status("token in path") == answers.status("token in query") == 200
    assert vod.last_authorization is not None and SECRET_ID in vod.last_authorization  # it was really used
    assert_logged(log, "bad_token", "t_too_far_ahead", "AuthFailure.SignatureFailure", "HTTP status 502")


@pytest.mark.integration
async def test_unhandled_error_in_a_handler(make_settings, make_client, monkeypatch, caplog) -> None:
    """A bug whose exception carries the settings' repr (the worst a careless message could do) is answered 500
    and logged by route, with masked settings, through every logger at DEBUG."""
    caplog.set_level(logging.DEBUG)
    install_redaction()
    settings = make_settings(
        http_token=TOKEN,
        http_sign_key=SIGN_KEY,
        http_body_timeout_s=1.0,
        sasl_username="bridge",
        sasl_password=SASL_PASSWORD,
    )
    credentials = Credentials(secret_id=SECRET_ID, secret_key=SECRET_KEY)
    client = await make_client(settings)

    def buggy_read_event(body: bytes) -> Any:
        raise RuntimeError(f"bug while reading with {settings!r} and {credentials!r}")

    monkeypatch.setattr("bridge.sources.callback.read_event", buggy_read_event)
    for path in (f"/vod/callback/{TOKEN}", f"/vod/callback?token={TOKEN}"):
        response = await client.post(path, json=signed("bug"))
        assert response.status == 500
        assert (await response.json()) == {"error": "internal_error", "message": "internal error"}
    await asyncio.gather(*(send_raw(client.port, r) for r in [*MALFORMED_REQUESTS[:4], *BROKEN_BODIES]))
    assert "unhandled error on POST /vod/callback/{token}" in caplog.text
    assert "RuntimeError: bug while reading with Settings(" in caplog.text  # the traceback is there, masked
    assert "Error handling request from 127.0.0.1 (" in caplog.text
    assert_no_leaks(caplog.text)


def test_parser_error_redactor_keeps_plain_reasons_only() -> None:
    from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, InvalidURLError, LineTooLong

    def redacted(exc: Exception) -> str:
        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s", ("10.0.0.1",), None
        )
        record.exc_info = (type(exc), exc, None)
        assert ParserErrorRedactor().filter(record)
        assert record.exc_info is None
        return logging.Formatter().format(record)

    assert (
        redacted(BadHttpMessage(f"Invalid header token:\n\n  b'X: {TOKEN}'\n     ^"))
        == "Error handling request from 10.0.0.1 (BadHttpMessage 400: Invalid header token)"
    )
    # Messages of the pure-Python parser may be nothing but request bytes: the class only.
    assert redacted(InvalidURLError(TOKEN)).endswith("10.0.0.1 (InvalidURLError 400)")
    assert redacted(InvalidURLError(f"{TOKEN}:80")).endswith("(InvalidURLError 400)")
    assert redacted(BadStatusLine(f"POST /vod/callback/{TOKEN}")).endswith("(BadStatusLine 400)")
    assert redacted(LineTooLong(f"/vod/callback/{TOKEN}", 8190)).endswith("(LineTooLong 400)")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BRIDGE_CALLBACK_SIGN_KEY", f"{SIGN_KEY}!"),
        ("BRIDGE_CALLBACK_TOKEN", f"{TOKEN}/x"),
        ("BRIDGE_KAFKA_SASL_PASSWORD", SASL_PASSWORD),  # without the rest of the SASL settings
    ],
)
def test_configuration_errors_do_not_quote_secrets(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({variable: value, "BRIDGE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"})
    assert not leaks(str(info.value)) and not leaks(repr(info.value))


def test_reprs_are_masked() -> None:
    settings = load_settings(
        {
            "BRIDGE_CALLBACK_TOKEN": TOKEN,
            "BRIDGE_CALLBACK_SIGN_KEY": SIGN_KEY,
            "BRIDGE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "BRIDGE_KAFKA_SASL_MECHANISM": "PLAIN",
            "BRIDGE_KAFKA_SASL_USERNAME": "bridge",
            "BRIDGE_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        }
    )
    credentials = Credentials(secret_id=SECRET_ID, secret_key=SECRET_KEY)
    for text in (repr(settings), str(settings), repr(credentials), str(credentials)):
        assert not leaks(text), text
