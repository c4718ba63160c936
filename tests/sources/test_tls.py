"""HTTPS: the real app behind its TLS context, the certificate replaced while serving (reload, file watch,
SIGHUP through ``--workers``), mutual TLS, and refusing to start on files that cannot serve.

Certificates come from ``trustme`` CAs made in each test; clients are real aiohttp clients (or plain asyncio
TLS streams) and the server is the real ``create_app`` on a TCPSite, or the real ``vod-bridge`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from conftest import Kafka, read_records, sample_event, wait_until
from faultkit import bridge_env, spawn
from servekit import Served as GuardedServer
from servekit import serve_like_cli
from yarl import URL

from bridge.app import COMPONENTS
from bridge.cli import EXIT_CONFIG, main
from bridge.config import Settings
from bridge.ops.embedded import free_port
from bridge.ops.metrics import Metrics
from bridge.sources.tls import ServerTls


@dataclass
class CertFiles:
    """The certificate and key files the bridge is configured with, rewritten by :meth:`install`."""

    cert: Path
    key: Path

    def install(self, leaf: trustme.LeafCert) -> str:
        """Write ``leaf``'s chain and key in place; return the SHA-256 of its certificate."""
        self.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(self.key))
        return fingerprint(leaf)


def fingerprint(leaf: trustme.LeafCert) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())).hexdigest()


def issue(ca: trustme.CA) -> trustme.LeafCert:
    """A server certificate for 127.0.0.1: each call has a new key and serial."""
    return ca.issue_cert("127.0.0.1", "localhost")


def client_context(ca: trustme.CA | None = None, *, client_cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    """A verifying client context trusting ``ca`` (none: only the system CAs), presenting ``client_cert``."""
    context = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(context)
    if client_cert is not None:
        client_cert.configure_cert(context)
    return context


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(tmp_path: Path) -> CertFiles:
    return CertFiles(tmp_path / "tls.crt", tmp_path / "tls.key")


@dataclass
class Served:
    url: str
    tls: ServerTls
    metrics: Metrics
    server: GuardedServer


@pytest.fixture
async def serve_tls() -> AsyncIterator[Callable[..., Any]]:
    """Factory: the real app on 127.0.0.1 with its own TLS context, as ``vod-bridge serve`` binds it
    (tests/servekit.py: through the connection guard)."""
    async with contextlib.AsyncExitStack() as stack:

        async def serve(settings: Settings) -> Served:
            served = await stack.enter_async_context(serve_like_cli(settings))
            tls = served.app[COMPONENTS].tls
            assert tls is not None
            return Served(served.url("").rstrip("/"), tls, served.metrics, served)

        yield serve


def tls_settings(make_settings: Callable[..., Settings], files: CertFiles, **http: Any) -> Settings:
    return make_settings(http_tls_cert_file=str(files.cert), http_tls_key_file=str(files.key), **http)


async def served_certificate(url: str, client: ssl.SSLContext) -> tuple[str, str]:
    """On a new connection: the SHA-256 of the certificate the server presents and the TLS version, after
    ``GET /healthz`` answered 200 on it."""
    target = URL(url)
    assert target.host is not None and target.port is not None
    reader, writer = await asyncio.open_connection(target.host, target.port, ssl=client)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.compression() is None
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
        return hashlib.sha256(ssl_object.getpeercert(binary_form=True)).hexdigest(), ssl_object.version()
    finally:
        await close(writer)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.wait_closed()


async def wait_until_ready(url: str, client: ssl.SSLContext) -> None:
    """Until ``GET /readyz`` answers 200 over https (the listener is up and Kafka connected)."""
    async with asyncio.timeout(15), aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(f"{url}/readyz", ssl=client) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)


def reloads(served: Served, outcome: str) -> float:
    value = served.metrics.registry.get_sample_value("vod_bridge_tls_reloads_total", {"outcome": outcome})
    return value or 0.0


async def test_https_callback_is_published_after_the_kafka_ack(
    *, kafka: Kafka, make_settings, serve_tls, ca, files, topic
) -> None:
    expected = files.install(issue(ca))
    served = await serve_tls(tls_settings(make_settings, files))
    trusting = client_context(ca)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{served.url}/vod/callback", json=sample_event("tls-1"), ssl=trusting) as response,
    ):
        assert response.status == 200, await response.text()
        assert (await response.json())["status"] == "published"
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert record.key == b"tls-1"
    assert await served_certificate(served.url, trusting) == (expected, "TLSv1.3")


async def test_tls_clients_are_held_to_the_header_deadline(make_settings, serve_tls, ca, files) -> None:
    """A client that connects and never completes its handshake is closed after the header deadline (the
    handshake's own timeout); so is one that drips a request head over TLS."""
    files.install(issue(ca))
    served = await serve_tls(tls_settings(make_settings, files, http_header_timeout_s=1.0))
    host, port = served.server.host, served.server.port
    reader, writer = await asyncio.open_connection(host, port)  # no handshake
    tls_reader, tls_writer = await asyncio.open_connection(host, port, ssl=client_context(ca))
    try:
        started = asyncio.get_running_loop().time()
        tls_writer.write(b"POST /vod/callback HTTP/1.1\r\nHost: x\r\n")
        for stream in (reader, tls_reader):
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    while await stream.read(65536):
                        pass
        assert asyncio.get_running_loop().time() - started >= 0.9
        assert served.server.closed("header_timeout") == 1, "the head over TLS; the handshake by asyncio's timeout"
    finally:
        writer.transport.abort()
        tls_writer.transport.abort()


async def test_a_client_that_does_not_trust_the_ca_fails_verification(make_settings, serve_tls, ca, files) -> None:
    files.install(issue(ca))
    served = await serve_tls(tls_settings(make_settings, files))
    async with aiohttp.ClientSession() as session:
        for untrusting in (client_context(), client_context(trustme.CA())):
            with pytest.raises(aiohttp.ClientConnectorCertificateError, match="CERTIFICATE_VERIFY_FAILED"):
                await session.get(f"{served.url}/healthz", ssl=untrusting)
        # Plain HTTP to the HTTPS port gets no answer either.
        with pytest.raises(aiohttp.ClientError):
            await session.get(served.url.replace("https:", "http:") + "/healthz")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="alive")


def tls_1_1_client(ca: trustme.CA) -> ssl.SSLContext:
    """A client that speaks TLS 1.1 only (OpenSSL 3 needs security level 0 for its ciphers)."""
    context = client_context(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl deprecates naming TLSv1_1
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


async def test_tls_1_1_is_refused_and_tls_1_2_accepted(make_settings, serve_tls, ca, files) -> None:
    leaf = issue(ca)
    files.install(leaf)
    served = await serve_tls(tls_settings(make_settings, files))
    old_client = tls_1_1_client(ca)

    # The control: this client does speak TLS 1.1, to a server that allows it.
    lenient = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(lenient)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lenient.minimum_version = ssl.TLSVersion.TLSv1_1
    lenient.set_ciphers("DEFAULT:@SECLEVEL=0")
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=lenient).start()
        host, port = runner.addresses[0][:2]
        assert (await served_certificate(f"https://{host}:{port}", old_client))[1] == "TLSv1.1"
    finally:
        await runner.cleanup()

    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{served.url}/healthz", ssl=old_client)
    tls_1_2 = client_context(ca)
    tls_1_2.maximum_version = ssl.TLSVersion.TLSv1_2
    assert (await served_certificate(served.url, tls_1_2))[1] == "TLSv1.2"


async def test_reload_serves_the_new_certificate_to_new_connections_only(
    make_settings, serve_tls, ca, files, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sources.tls")
    first = files.install(issue(ca))
    served = await serve_tls(tls_settings(make_settings, files, http_tls_reload_interval_s=0))
    trusting = client_context(ca)
    assert (await served_certificate(served.url, trusting))[0] == first

    # A connection made before the rotation, kept open across it.
    target = URL(served.url)
    reader, writer = await asyncio.open_connection(target.host, target.port, ssl=trusting)
    try:
        second = files.install(issue(ca))
        assert second != first
        assert (await served_certificate(served.url, trusting))[0] == first, "no reload yet: still the first"
        assert served.tls.reload("test") is True
        assert (await served_certificate(served.url, trusting))[0] == second
        # The old connection keeps its certificate and still serves requests.
        assert hashlib.sha256(writer.get_extra_info("ssl_object").getpeercert(True)).hexdigest() == first
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    finally:
        await close(writer)
    assert reloads(served, "ok") == 1
    assert f"TLS certificate reloaded (test): sha256 {second}, was {first}" in caplog.text


async def test_a_broken_rotation_keeps_the_old_certificate(make_settings, serve_tls, ca, files, caplog) -> None:
    first = files.install(issue(ca))
    served = await serve_tls(tls_settings(make_settings, files, http_tls_reload_interval_s=0))
    trusting = client_context(ca)
    old_key = files.key.read_bytes()
    new = issue(ca)
    new_cert = b"".join(blob.bytes() for blob in new.cert_chain_pems)
    broken = [
        # A new certificate next to the old key: the key has not been written yet.
        (new_cert, old_key, "does not match the certificate"),
        # Half of the certificate written.
        (new_cert[: len(new_cert) // 2], old_key, "is not a PEM certificate chain"),
        # The new certificate with half of its key.
        (new_cert, new.private_key_pem.bytes()[:100], "is not a PEM private key"),
        (new_cert, b"", "is empty"),
    ]
    for cert, key, reason in broken:
        caplog.clear()
        files.cert.write_bytes(cert)
        files.key.write_bytes(key)
        assert served.tls.reload("test") is False
        assert (await served_certificate(served.url, trusting))[0] == first
        (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert f"still serving sha256 {first}" in line and reason in line, line
        # Never the key material, whatever went wrong.
        for secret in (old_key, new.private_key_pem.bytes()):
            assert secret.splitlines()[1].decode() not in caplog.text
    assert reloads(served, "failed") == len(broken)
    # Once the files are right, the next reload takes them.
    second = files.install(new)
    assert served.tls.reload("test") is True
    assert (await served_certificate(served.url, trusting))[0] == second


def kubernetes_secret_volume(directory: Path, leaf: trustme.LeafCert, version: int) -> None:
    """Lay out ``directory`` like a Kubernetes Secret volume, with ``leaf`` as version ``version``:
    ``tls.crt -> ..data/tls.crt``, ``..data -> ..v<version>``; the ``..data`` link is swapped atomically."""
    data = directory / f"..v{version}"
    data.mkdir()
    CertFiles(data / "tls.crt", data / "tls.key").install(leaf)
    link = directory / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, directory / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


async def test_the_watcher_reloads_after_a_secret_volume_swap(make_settings, serve_tls, ca, tmp_path) -> None:
    volume = tmp_path / "secret"
    volume.mkdir()
    first, second = issue(ca), issue(ca)
    kubernetes_secret_volume(volume, first, 1)
    files = CertFiles(volume / "tls.crt", volume / "tls.key")
    served = await serve_tls(tls_settings(make_settings, files, http_tls_reload_interval_s=0.05))
    trusting = client_context(ca)
    assert (await served_certificate(served.url, trusting))[0] == fingerprint(first)

    kubernetes_secret_volume(volume, second, 2)
    await wait_until(lambda: served.tls.fingerprint == fingerprint(second), timeout_s=5)
    assert (await served_certificate(served.url, trusting))[0] == fingerprint(second)
    assert reloads(served, "ok") == 1 and reloads(served, "failed") == 0


async def test_client_certificates_are_required_with_a_client_ca(make_settings, serve_tls, ca, files, tmp_path) -> None:
    files.install(issue(ca))
    client_ca = trustme.CA()
    client_ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    served = await serve_tls(tls_settings(make_settings, files, http_tls_client_ca_file=str(tmp_path / "clients.pem")))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for refused in (client_context(ca), client_context(ca, client_cert=trustme.CA().issue_cert("stranger"))):
            # TLS 1.3: the server checks the client's certificate after the client's side of the handshake, so
            # the refusal arrives as the connection closing before any answer.
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"{served.url}/healthz", ssl=refused)
        accepted = client_context(ca, client_cert=client_ca.issue_cert("vod-callbacks"))
        async with session.get(f"{served.url}/healthz", ssl=accepted) as response:
            assert response.status == 200


@pytest.mark.parametrize(
    ("case", "named", "detail"),
    [
        ("missing_cert", "BRIDGE_HTTP_TLS_CERT_FILE", "cannot read"),
        ("unreadable_key", "BRIDGE_HTTP_TLS_KEY_FILE", "cannot read"),
        ("cert_only", "BRIDGE_HTTP_TLS_KEY_FILE", "set both or neither"),
        ("key_only", "BRIDGE_HTTP_TLS_CERT_FILE", "set both or neither"),
        ("key_as_cert", "BRIDGE_HTTP_TLS_CERT_FILE", "is not a PEM certificate chain"),
        ("other_key", "BRIDGE_HTTP_TLS_KEY_FILE", "does not match the certificate"),
        ("encrypted_key", "BRIDGE_HTTP_TLS_KEY_FILE", "is encrypted"),
        ("missing_client_ca", "BRIDGE_HTTP_TLS_CLIENT_CA_FILE", "cannot read"),
        ("client_ca_not_pem", "BRIDGE_HTTP_TLS_CLIENT_CA_FILE", "is not a PEM CA certificate bundle"),
    ],
)
def test_start_refuses_files_that_cannot_serve(
    case: str, named: str, detail: str, *, ca, files, tmp_path, capsys
) -> None:
    leaf = issue(ca)
    files.install(leaf)
    env = {"BRIDGE_HTTP_TLS_CERT_FILE": str(files.cert), "BRIDGE_HTTP_TLS_KEY_FILE": str(files.key)}
    named_path = {"BRIDGE_HTTP_TLS_CERT_FILE": files.cert, "BRIDGE_HTTP_TLS_KEY_FILE": files.key}.get(named)
    match case:
        case "missing_cert":
            files.cert.unlink()
        case "unreadable_key":
            files.key.unlink()
            files.key.mkdir()  # read fails even for root, unlike chmod 000
        case "cert_only":
            del env["BRIDGE_HTTP_TLS_KEY_FILE"]
        case "key_only":
            del env["BRIDGE_HTTP_TLS_CERT_FILE"]
        case "key_as_cert":
            files.cert.write_bytes(files.key.read_bytes())
        case "other_key":
            issue(ca).private_key_pem.write_to_path(str(files.key))
        case "encrypted_key":
            from cryptography.hazmat.primitives import serialization

            key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
            encryption = serialization.BestAvailableEncryption(b"passphrase")
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
            files.key.write_bytes(pem)
        case "missing_client_ca":
            env[named] = str(tmp_path / "nowhere.pem")
            named_path = tmp_path / "nowhere.pem"
        case "client_ca_not_pem":
            env[named] = str(files.key)
            named_path = files.key
    key_material = files.key.read_bytes().splitlines()[1].decode() if files.key.is_file() else None
    assert main(["serve"], environ=env) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("vod-bridge: configuration error: ") and named in err and detail in err, err
    if "set both" not in detail:
        assert repr(str(named_path)) in err, "the message names the file"
    if key_material is not None:
        assert key_material not in err


async def test_sighup_reloads_every_worker(kafka: Kafka, ca, files, tmp_path, topic) -> None:
    """The supervisor of ``--workers 2`` forwards SIGHUP; each worker reloads the files (the watcher is off, so
    SIGHUP is the only trigger). ``vod-bridge send --cafile`` posts over https to the local bridge."""
    first = files.install(issue(ca))
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    port = free_port()
    env = bridge_env(
        BRIDGE_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
        BRIDGE_KAFKA_TOPIC=topic,
        BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=str(kafka.supports_idempotence).lower(),
        BRIDGE_HTTP_TLS_CERT_FILE=str(files.cert),
        BRIDGE_HTTP_TLS_KEY_FILE=str(files.key),
        BRIDGE_HTTP_TLS_RELOAD_INTERVAL_S="0",
        BRIDGE_WORKERS="2",
    )
    logfile = tmp_path / "bridge.log"
    supervisor = spawn(["serve", "--host", "127.0.0.1", "--port", str(port)], env, logfile)
    url = f"https://127.0.0.1:{port}"
    trusting = client_context(ca)
    try:
        # Each worker handles SIGHUP from before its producer starts connecting.
        await wait_until(lambda: logfile.read_text().count("kafka producer connected") == 2, timeout_s=20)
        await wait_until_ready(url, trusting)
        assert (await served_certificate(url, trusting))[0] == first

        second = files.install(issue(ca))
        supervisor.send_signal(signal.SIGHUP)
        await wait_until(lambda: logfile.read_text().count("TLS certificate reloaded (SIGHUP)") == 2, timeout_s=10)
        # One connection each: the kernel spreads them over both workers.
        assert {(await served_certificate(url, trusting))[0] for _ in range(8)} == {second}

        command = [sys.executable, "-m", "bridge", "send", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--task-id", "sent-over-tls", "--cafile", str(tmp_path / "ca.pem")]
        result = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and result.stdout.startswith("200 "), result
        assert supervisor.poll() is None, "SIGHUP must not stop the supervisor"
    finally:
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(supervisor.wait, 20)
    assert code == 0, logfile.read_text()
    (record,) = await read_records(kafka.bootstrap_servers, topic, count=1)
    assert record.key == b"sent-over-tls"
