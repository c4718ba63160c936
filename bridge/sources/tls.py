"""HTTPS for the bridge's server: the TLS context, checked at start-up, whose certificate is replaced while serving.

A reload calls ``load_cert_chain`` again on the *same* SSLContext the listening socket was given: handshakes
after it present the new chain, established connections keep theirs (tests/sources/test_tls.py checks both).
A ``load_cert_chain`` that fails leaves its context without a usable certificate (every handshake then fails),
so a new chain is first loaded into a scratch context, and only a chain that loads there reaches the serving
one. Both loads read one in-memory snapshot of the files, so a file rewritten in between cannot slip past the
check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bridge.config import HttpSettings
from bridge.errors import ConfigError
from bridge.ops.metrics import Metrics

logger = logging.getLogger(__name__)

CERT_FILE_VAR: Final = "BRIDGE_HTTP_TLS_CERT_FILE"
KEY_FILE_VAR: Final = "BRIDGE_HTTP_TLS_KEY_FILE"
CLIENT_CA_FILE_VAR: Final = "BRIDGE_HTTP_TLS_CLIENT_CA_FILE"

_FIRST_CERT: Final = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)

#: What ``os.stat`` says about a file: a rotation changes at least one of device, inode, size, mtime.
FileStamp = tuple[int, int, int, int]
_Stamps = tuple[FileStamp | None, ...]


class _EncryptedKey(Exception):
    """Raised by the password callback: OpenSSL only asks for a password when the key is encrypted."""


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, blocking the event loop of a service.
    raise _EncryptedKey


@dataclass(frozen=True)
class _Chain:
    """The bytes of the certificate and key files, read once."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf certificate (the first in the file), hex: what ``openssl x509 -fingerprint
        -sha256`` prints, without the colons. Public information, safe to log."""
        match = _FIRST_CERT.search(self.cert_pem)
        assert match is not None  # _load_checked refused a file without one
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(match.group().decode("ascii"))).hexdigest()


def new_server_context() -> ssl.SSLContext:
    """A server context with modern defaults and no certificate yet: TLS 1.2 or later, no compression, no
    renegotiation, HTTP/1.1 over ALPN (the only protocol aiohttp's server speaks)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    return context


class ServerTls:
    """The server's SSLContext and the files behind it.

    :meth:`load` refuses files that are missing, unreadable or do not belong together (:class:`ConfigError`
    naming the setting and the path, never file contents). :meth:`reload` replaces the certificate and key
    while serving; a pair that does not load is logged, counted and ignored: the previous one keeps serving.
    The client CA file (mutual TLS) is read at start-up only.
    """

    def __init__(
        self, context: ssl.SSLContext, http: HttpSettings, metrics: Metrics, *, fingerprint: str, stamps: _Stamps
    ) -> None:
        assert http.tls_cert_file is not None and http.tls_key_file is not None
        #: Give this to the server once; :meth:`reload` changes it in place.
        self.context = context
        self.cert_path = http.tls_cert_file
        self.key_path = http.tls_key_file
        self.client_ca_path = http.tls_client_ca_file
        #: SHA-256 of the leaf certificate being served (hex).
        self.fingerprint = fingerprint
        self._metrics = metrics
        self._stamps = stamps
        self._client_ca_stamp = _stamp(self.client_ca_path) if self.client_ca_path else None

    @classmethod
    def load(cls, http: HttpSettings, metrics: Metrics) -> ServerTls:
        """Build the context from ``http.tls_*``; raises :class:`ConfigError` for a file that cannot serve."""
        context, chain, stamps = _build(http)
        tls = cls(context, http, metrics, fingerprint=chain.fingerprint, stamps=stamps)
        logger.info(
            "TLS on: certificate %s (sha256 %s)%s",
            tls.cert_path,
            tls.fingerprint,
            f", client certificates signed by {tls.client_ca_path} required" if tls.client_ca_path else "",
        )
        return tls

    def reload(self, trigger: str) -> bool:
        """Load the certificate and key files again; new handshakes use them. Returns False (and keeps the
        previous certificate) when they do not load. ``trigger`` says why, for the log line."""
        stamps = _stamps(self.cert_path, self.key_path)
        # Remembered whatever the outcome: a broken pair is reported once, and tried again when a file changes.
        self._stamps = stamps
        try:
            chain = _read_chain(self.cert_path, self.key_path)
            _load_checked(self.context, chain, self.cert_path, self.key_path)
        except ConfigError as exc:
            self._metrics.tls_reloads.labels("failed").inc()
            logger.error(
                "TLS certificate reload (%s) failed; still serving sha256 %s: %s",
                trigger,
                self.fingerprint,
                exc.message,
            )
            return False
        self._metrics.tls_reloads.labels("ok").inc()
        previous, self.fingerprint = self.fingerprint, chain.fingerprint
        logger.info(
            "TLS certificate reloaded (%s): sha256 %s%s",
            trigger,
            self.fingerprint,
            " (unchanged)" if previous == self.fingerprint else f", was {previous}",
        )
        return True

    def files_changed(self) -> bool:
        """Whether the certificate or key file changed since the last (re)load; cheap (two ``stat`` calls).

        ``stat`` follows symbolic links, so the atomic ``..data`` link swap of a Kubernetes Secret volume
        counts as a change. A changed client CA file is only logged: it is applied at the next start.
        """
        if self.client_ca_path is not None and (stamp := _stamp(self.client_ca_path)) != self._client_ca_stamp:
            self._client_ca_stamp = stamp
            logger.warning("%s %s changed; restart to apply it", CLIENT_CA_FILE_VAR, self.client_ca_path)
        return _stamps(self.cert_path, self.key_path) != self._stamps

    async def watch(self, interval_s: float) -> None:
        """Reload whenever :meth:`files_changed`, checking every ``interval_s``; runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            if self.files_changed():
                self.reload("file changed")


def check_files(http: HttpSettings) -> None:
    """Raise :class:`ConfigError` as :meth:`ServerTls.load` would, without keeping anything: for the CLI to
    refuse a start before it starts anything (the ``--workers`` supervisor, the embedded broker of ``dev``)."""
    _build(http)


def _build(http: HttpSettings) -> tuple[ssl.SSLContext, _Chain, _Stamps]:
    if http.tls_cert_file is None or http.tls_key_file is None:
        raise ConfigError(f"{CERT_FILE_VAR} and {KEY_FILE_VAR}: set both or neither")
    context = new_server_context()
    # Taken before reading: a file rewritten after the read is seen as changed at the next check.
    stamps = _stamps(http.tls_cert_file, http.tls_key_file)
    chain = _read_chain(http.tls_cert_file, http.tls_key_file)
    _load_checked(context, chain, http.tls_cert_file, http.tls_key_file)
    if http.tls_client_ca_file is not None:
        _load_client_ca(context, http.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context, chain, stamps


def _stamp(path: str) -> FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # mid-swap, or removed: a change like any other
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _stamps(*paths: str) -> _Stamps:
    return tuple(_stamp(path) for path in paths)


def _read(var: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var}: cannot read {path!r}: {exc.strerror or type(exc).__name__}") from None
    if not data.strip():
        raise ConfigError(f"{var}: {path!r} is empty")
    return data


def _read_chain(cert_path: str, key_path: str) -> _Chain:
    return _Chain(_read(CERT_FILE_VAR, cert_path), _read(KEY_FILE_VAR, key_path))


def _load_checked(context: ssl.SSLContext, chain: _Chain, cert_path: str, key_path: str) -> None:
    """Load ``chain`` into ``context`` if it loads into a scratch context; else ConfigError, ``context``
    untouched. The messages name the file at fault without quoting it."""
    not_a_cert = ConfigError(f"{CERT_FILE_VAR}: {cert_path!r} is not a PEM certificate chain")
    if _FIRST_CERT.search(chain.cert_pem) is None:
        raise not_a_cert
    try:
        # Parses every certificate of the file, so a broken chain is blamed on the certificate file.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=chain.cert_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError):
        raise not_a_cert from None
    try:
        _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain)
    except _EncryptedKey:
        raise ConfigError(f"{KEY_FILE_VAR}: the key in {key_path!r} is encrypted; give it unencrypted") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"{KEY_FILE_VAR}: the key in {key_path!r} does not match the certificate in {cert_path!r}"
            ) from None
        raise ConfigError(f"{KEY_FILE_VAR}: {key_path!r} is not a PEM private key") from None
    _load_chain(context, chain)


def _load_chain(context: ssl.SSLContext, chain: _Chain) -> None:
    try:
        with _snapshot_paths(chain.cert_pem, chain.key_pem) as (cert_path, key_path):
            context.load_cert_chain(cert_path, key_path, password=_refuse_password)
    except ssl.SSLError:
        raise  # an OSError too, but about the files: _load_checked names the one at fault
    except OSError as exc:  # the snapshot (out of file descriptors, memory): nothing about the files
        raise ConfigError(f"{CERT_FILE_VAR}: cannot load the certificate and key: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _snapshot_paths(*contents: bytes) -> Iterator[list[str]]:
    """Paths reading as ``contents`` (``load_cert_chain`` takes nothing else). On Linux anonymous memory
    (``memfd``), so the key gets no copy on any disk; elsewhere files in a private temporary directory."""
    if not hasattr(os, "memfd_create"):
        with tempfile.TemporaryDirectory(prefix="vod-bridge-tls-") as directory:  # mode 0700
            paths = [os.path.join(directory, str(i)) for i in range(len(contents))]
            for path, data in zip(paths, contents, strict=True):
                Path(path).write_bytes(data)
            yield paths
        return
    fds: list[int] = []
    try:
        for data in contents:
            fd = os.memfd_create("vod-bridge-tls")
            fds.append(fd)
            with open(fd, "wb", closefd=False) as memory:
                memory.write(data)
        yield [f"/proc/self/fd/{fd}" for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)


def _load_client_ca(context: ssl.SSLContext, path: str) -> None:
    data = _read(CLIENT_CA_FILE_VAR, path)
    try:
        context.load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError):
        raise ConfigError(f"{CLIENT_CA_FILE_VAR}: {path!r} is not a PEM CA certificate bundle") from None
