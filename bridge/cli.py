"""`vod-bridge`: the command line. The only place that reads the process environment and picks exit codes.

Exit codes (README "Exit codes"): 0 clean shutdown (also one that abandoned records Kafka never acknowledged, none
of which was answered 200 or confirmed) or a finished command, 1 a one-shot command did not get through (``send``:
not a 2xx; ``redrive``: Kafka failed, re-run from the printed offsets; ``check``: a check failed), 2 invalid
configuration (including a spool this worker count would strand, and a listening port already in use), 3 failed
while starting or running (e.g. the broker refused the idempotent producer, or a producer could not be replaced).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path

import aiohttp
import msgspec
from aiohttp import web

from bridge import __version__
from bridge.app import COMPONENTS, check_poller_credentials, create_app, freeze_gc, reload_on_sighup, runner_options
from bridge.config import ENV_VARS, EventLoop, Settings, load_settings
from bridge.delivery.clients import check_client
from bridge.delivery.spool import check_no_stranded
from bridge.errors import BridgeError, ConfigError, KafkaUnavailable
from bridge.ops.check import (
    DEFAULT_TIMEOUT_S,
    CheckResult,
    describe_configuration,
    format_result,
    format_summary,
    run_checks,
)
from bridge.ops.embedded import EmbeddedBroker
from bridge.ops.logs import configure_logging
from bridge.ops.metrics import MULTIPROCESS_DIR_ENV, Metrics
from bridge.ops.redrive import (
    FromBeginning,
    RecordOutcome,
    StartAt,
    format_outcome,
    format_report,
    parse_offsets,
    parse_since,
    redrive_dead_letters,
)
from bridge.ops.schema import DEFAULT_SCHEMA, SCHEMA_NAMES, UnknownSchema, render, schema_document, write_schemas
from bridge.ops.tail import tail
from bridge.ops.workers import run_workers
from bridge.sources.connections import ConnectionGuard, connection_bound
from bridge.sources.listen import bind_listeners, listening_urls
from bridge.sources.listen import run as run_server
from bridge.sources.poller import check_window
from bridge.sources.tls import check_files as check_tls_files
from bridge.vod.api import Credentials
from bridge.vod.signing import expected_sign

logger = logging.getLogger("bridge.cli")

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]

EXIT_OK = 0
EXIT_UNSUCCESSFUL = 1
EXIT_CONFIG = 2
EXIT_FAILED = 3


def sample_path(name: str = "pull-complete.json") -> Path:
    return Path(str(resources.files("bridge") / "samples" / name))


#: The settings that are also flags of the commands that take settings (``--workers`` only for ``serve``).
_FLAGS = tuple(var for var in ENV_VARS if var.flag)


def _add_settings_flags(parser: argparse.ArgumentParser, *, workers: bool = False) -> None:
    group = parser.add_argument_group("settings (each overrides its environment variable)")
    for var in _FLAGS:
        if var.path == "workers" and not workers:
            continue
        choices = ["true", "false"] if var.name == "BRIDGE_KAFKA_ENABLE_IDEMPOTENCE" else None
        group.add_argument(var.flag_name, dest=var.name, choices=choices, help=f"{var.name}: {var.help}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vod-bridge", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"vod-kafka-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the bridge against the configured Kafka")
    _add_settings_flags(serve, workers=True)

    dev = commands.add_parser("dev", help="run the bridge on an embedded broker and print each record")
    _add_settings_flags(dev)

    schema = commands.add_parser(
        "schema", help="print one JSON Schema (or the AsyncAPI document) of the record contract, or write them all"
    )
    schema.add_argument("name", nargs="?", help=f"which one (default: {DEFAULT_SCHEMA}); --list names them")
    schema_mode = schema.add_mutually_exclusive_group()
    schema_mode.add_argument("--list", action="store_true", help="print the available names, one per line")
    schema_mode.add_argument("--write", metavar="DIR", type=Path, help="write every schema file into DIR")

    send = commands.add_parser("send", help="post an event file to a running bridge and print the answer")
    _add_settings_flags(send)
    send.add_argument("file", nargs="?", type=Path, help="event JSON (default: the sample PullComplete)")
    send.add_argument("--url", help="callback URL (default: from --host/--port/--callback-path)")
    send.add_argument("--task-id", help="replace the payload's TaskId (send the same file repeatedly)")
    send.add_argument("--sign", action="store_true", help="add Sign/T with BRIDGE_CALLBACK_SIGN_KEY")
    trust = send.add_mutually_exclusive_group()
    trust.add_argument("--cafile", type=Path, help="https: trust the CA certificates in this PEM file")
    trust.add_argument(
        "--insecure",
        action="store_true",
        help="https: do not verify the certificate (a local bridge's certificate rarely names 127.0.0.1)",
    )

    tail_cmd = commands.add_parser("tail", help="print records from the topic as they arrive")
    _add_settings_flags(tail_cmd)
    tail_cmd.add_argument("--event-type", help="only records of this EventType")
    tail_cmd.add_argument("--key", help="only records with this key (TaskId)")
    tail_cmd.add_argument("--from-beginning", action="store_true")
    tail_cmd.add_argument("--compact", action="store_true", help="one-line JSON values")

    redrive_cmd = commands.add_parser(
        "redrive",
        help="publish the dead letters that now decode to their main topics (the dead-letter topic is left as is)",
    )
    _add_settings_flags(redrive_cmd)
    start = redrive_cmd.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true", help="every partition from its start (the default)")
    start.add_argument(
        "--offset",
        metavar="N|P:N[,P:N]",
        help="from offset N on every partition, or from N on partition P only (other partitions are not read)",
    )
    start.add_argument("--since", metavar="TIME", help="from the first record at or after TIME, e.g. 2026-11-27T10:00Z")
    redrive_cmd.add_argument("--dry-run", action="store_true", help="decode and report; publish nothing")
    redrive_cmd.add_argument("--verbose", action="store_true", help="one line per record: where, moved or stayed, why")
    redrive_cmd.add_argument(
        "--timeout-s", type=float, default=30.0, help="bound on each Kafka wait: connecting, a fetch, an ack"
    )

    check_cmd = commands.add_parser(
        "check",
        help="pre-flight: validate the configuration, reach Kafka (topics, producer), the VOD API and the spool",
    )
    _add_settings_flags(check_cmd, workers=True)
    check_cmd.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="bound on each check (the whole run: 4 times this)",
    )
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = os.environ if environ is None else environ
    if args.command == "schema":
        return _schema(args)
    overrides = {var.name: str(value) for var in _FLAGS if (value := getattr(args, var.name, None)) is not None}
    if args.command == "check":
        return _check(env, overrides, args)
    try:
        settings = load_settings(env, overrides)
    except ConfigError as exc:
        print(f"vod-bridge: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "tail":
        return _tail(settings, args)
    if args.command == "redrive":
        return _redrive(settings, args)
    if args.command == "send":
        return asyncio.run(_send(settings, args))
    try:
        credentials = check_startup(settings, env)
    except ConfigError as exc:
        print(f"vod-bridge: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "serve":
        if settings.workers > 1:
            return run_workers(settings, {**env, **overrides})
        try:
            metrics = Metrics(multiprocess_dir=Path(d) if (d := env.get(MULTIPROCESS_DIR_ENV)) else None)
        except ConfigError as exc:
            print(f"vod-bridge: configuration error: {exc.message}", file=sys.stderr)
            return EXIT_CONFIG
        return serve(settings, credentials=credentials, metrics=metrics)
    return dev(settings, credentials=credentials)


def check_startup(settings: Settings, env: Mapping[str, str]) -> Credentials | None:
    """What ``serve`` and ``dev`` (and ``check``) verify before opening anything, beyond ``load_settings``: the
    Tencent Cloud credentials the poller needs, spools left stranded, the Kafka client. Returns the credentials
    (None without the poller); raises :class:`ConfigError`."""
    credentials = Credentials.from_env(env) if settings.poller.enabled else None
    # Before the app opens the spool: spools this worker count would never open must not be stranded.
    check_no_stranded(settings.spool.dir, settings.workers)
    check_client(settings.kafka)
    if settings.http.tls_enabled:
        # Before the workers or the embedded broker start; each serving process loads the files again.
        check_tls_files(settings.http)
    if settings.poller.enabled:
        # A confirm must still fit VOD's 30 s window after the slowest pull and publish.
        check_window(settings.kafka.publish_timeout_s, settings.poller.request_timeout_s)
    check_poller_credentials(settings, credentials)
    return credentials


def serve(
    settings: Settings,
    *,
    credentials: Credentials | None = None,
    metrics: Metrics | None = None,
    extra_cleanup: Sequence[CleanupCtx] = (),
    listeners: Sequence[socket.socket] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT: stop accepting, finish in-flight publishes, flush, exit 0. ``metrics`` is
    multiprocess for a worker of ``--workers N``. ``listeners``: sockets already bound to the configured address
    (``bind_listeners``), else bound here; either way before anything says the bridge listens."""
    failures: list[BaseException] = []
    # Until the app handles SIGHUP (certificate reload), one (e.g. forwarded by --workers) must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def on_fatal(exc: BaseException) -> None:
        logger.critical("stopping: %s", exc)
        failures.append(exc)
        # run_app turns the signal into its graceful shutdown, the same path as an operator's SIGTERM.
        signal.raise_signal(signal.SIGTERM)

    try:
        app = create_app(settings, credentials=credentials, metrics=metrics, on_fatal=on_fatal)
    except ConfigError as exc:
        print(f"vod-bridge: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    components = app[COMPONENTS]
    sink = components.sink
    app.on_startup.append(freeze_gc)
    app.cleanup_ctx.append(reload_on_sighup)
    for ctx in extra_cleanup:
        app.cleanup_ctx.append(ctx)
    # Bound before anything announces the address: a busy port is a configuration error, said once.
    if listeners is None:
        try:
            listeners = _bind(settings)
        except ConfigError as exc:
            print(f"vod-bridge: configuration error: {exc.message}", file=sys.stderr)
            return EXIT_CONFIG
    guard = ConnectionGuard(
        header_timeout_s=settings.http.header_timeout_s,
        max_connections=connection_bound(settings.http.max_connections),
        metrics=components.metrics,
    )

    def announce() -> None:
        logger.info(
            "vod-bridge %s listening on %s%s -> kafka %s topic %s (at most %d connections)",
            __version__,
            ", ".join(listening_urls(listeners, scheme=_scheme(settings))),
            settings.http.callback_path,
            settings.kafka.bootstrap_servers,
            settings.kafka.topic,
            guard.max_connections,
        )

    try:
        run_server(
            app,
            listeners,
            guard,
            loop=new_event_loop(settings.event_loop),
            ssl_context=components.tls.context if components.tls is not None else None,
            shutdown_timeout_s=settings.http.shutdown_timeout_s,
            on_serving=announce,
            **runner_options(settings),
        )
    except (OSError, BridgeError) as exc:
        logger.critical("failed: %s", exc)
        return EXIT_FAILED
    finally:
        for sock in listeners:
            sock.close()
    if failures:
        return EXIT_FAILED
    if sink.abandoned:
        # Not a failure of this stop: the sink acknowledges nothing before Kafka does, so every abandoned record's
        # sender was answered 503 (or dropped by the bounded drain: VOD sees a failure), was not confirmed, or
        # still has its copy in the spool. An orchestrator must not count it as a crash.
        logger.warning(
            "vod-bridge stopped with %d records Kafka never acknowledged; none was answered 200 or confirmed",
            sink.abandoned,
        )
        return EXIT_OK
    logger.info("vod-bridge stopped cleanly")
    return EXIT_OK


def _bind(settings: Settings) -> list[socket.socket]:
    return bind_listeners(settings.http.host, settings.http.port, reuse_port=settings.http.reuse_port)


def new_event_loop(choice: EventLoop) -> asyncio.AbstractEventLoop:
    """uvloop when asked for, or for ``auto`` when installed (the ``fast`` extra); else asyncio's loop."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("BRIDGE_EVENT_LOOP=uvloop needs the 'fast' extra (uvloop)") from None
        else:
            logger.debug("using uvloop")
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def local_callback_url(settings: Settings) -> str:
    """The callback URL of a bridge on this machine (a wildcard listen address is reached via loopback)."""
    host = "127.0.0.1" if settings.http.host in ("0.0.0.0", "::") else settings.http.host
    return f"{_scheme(settings)}://{host}:{settings.http.port}{settings.http.callback_path}"


def _scheme(settings: Settings) -> str:
    return "https" if settings.http.tls_enabled else "http"


def event_topics(settings: Settings) -> set[str]:
    """Every topic events may be published to: the default one and the routed ones."""
    return {settings.kafka.topic, *settings.kafka.topic_routes.values()}


def dev(settings: Settings, *, credentials: Credentials | None = None) -> int:
    """`make run`: an embedded tansu broker, the bridge on it, a ready curl line and a live record printer."""
    # Before the broker starts: a busy port ends the start at once, with nothing said to be listening.
    try:
        listeners = _bind(settings)
    except ConfigError as exc:
        print(f"vod-bridge: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    broker = EmbeddedBroker()
    broker.start()
    # tansu rejects aiokafka's InitProducerId; acks=all still holds (README "Idempotence").
    kafka = msgspec.structs.replace(
        settings.kafka, bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False
    )
    settings = msgspec.structs.replace(settings, kafka=kafka)
    logger.info("embedded tansu broker on %s (in memory; idempotent producer off for tansu)", broker.bootstrap_servers)
    url = local_callback_url(settings)
    # With TLS, curl must trust the certificate's CA (--cacert) and the certificate must name 127.0.0.1.
    trust = " --cacert <CA of BRIDGE_HTTP_TLS_CERT_FILE>" if settings.http.tls_enabled else ""
    banner = (
        "\nvod-bridge dev is up. Send the sample PullComplete event with:\n\n"
        f"  curl -sS{trust} -X POST {url} -H 'Content-Type: application/json' --data-binary @{sample_path()}\n\n"
        f"Records published to Kafka (dead letters included) are printed below as they land. Ctrl-C stops.\n"
    )

    async def record_printer(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(
            # Dead letters too: in dev, a body the bridge could not key is worth seeing at once.
            tail(
                settings.kafka,
                {*event_topics(settings), settings.delivery.dead_letter_topic},
                out=sys.stdout,
                from_beginning=True,
            ),
            name="dev-printer",
        )
        print(banner, flush=True)
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        return serve(settings, credentials=credentials, extra_cleanup=[record_printer], listeners=listeners)
    finally:
        broker.stop()


def _tail(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when stopped (Ctrl-C), 1 when Kafka cannot be reached."""
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                tail(
                    settings.kafka,
                    event_topics(settings),
                    out=sys.stdout,
                    event_type=args.event_type,
                    key=args.key,
                    from_beginning=args.from_beginning,
                    pretty=not args.compact,
                )
            )
    except KafkaUnavailable as exc:
        print(f"vod-bridge: tail: {exc.message}", file=sys.stderr)
        return EXIT_UNSUCCESSFUL
    return EXIT_OK


def _redrive(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 once every record up to the end offsets was handled (some may stay), 1 when Kafka trouble stopped
    the run (nothing is lost: re-run), 2 for a configuration error."""
    try:
        start: StartAt = FromBeginning()
        if args.offset is not None:
            start = parse_offsets(args.offset)
        elif args.since is not None:
            start = parse_since(args.since)
        if not args.timeout_s > 0:
            raise ValueError("--timeout-s must be positive")
    except ValueError as exc:
        print(f"vod-bridge: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def show(outcome: RecordOutcome) -> None:
        print(format_outcome(outcome, dry_run=args.dry_run), flush=True)

    try:
        report = asyncio.run(
            redrive_dead_letters(
                settings,
                start,
                dry_run=args.dry_run,
                timeout_s=args.timeout_s,
                on_record=show if args.verbose else None,
            )
        )
    except ConfigError as exc:
        print(f"vod-bridge: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except KafkaUnavailable as exc:
        print(f"vod-bridge: redrive: {exc.message}; nothing was published", file=sys.stderr)
        return 1
    print(format_report(report, verbose=args.verbose), flush=True)
    return 1 if report.interrupted is not None else EXIT_OK


async def _send(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 on a 2xx answer, 1 otherwise (the answer is printed either way); 2 for a file it cannot use."""
    path = args.file or sample_path()
    try:
        body = path.read_bytes()
        event = msgspec.json.decode(body) if args.task_id or args.sign else None
    except OSError as exc:
        print(f"vod-bridge: send: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    except msgspec.DecodeError as exc:
        print(f"vod-bridge: send: {path} is not JSON ({exc}); --task-id and --sign edit a JSON object", file=sys.stderr)
        return EXIT_CONFIG
    if event is not None:
        if not isinstance(event, dict):
            print(f"vod-bridge: send: {path} is not a JSON object; --task-id and --sign edit one", file=sys.stderr)
            return EXIT_CONFIG
        if args.task_id:
            for value in event.values():
                if isinstance(value, dict) and "TaskId" in value:
                    value["TaskId"] = args.task_id
        if args.sign:
            if settings.http.sign_key is None:
                print("vod-bridge: --sign needs BRIDGE_CALLBACK_SIGN_KEY", file=sys.stderr)
                return EXIT_CONFIG
            event["T"] = int(time.time()) + 600
            event["Sign"] = expected_sign(settings.http.sign_key, event["T"])
        body = msgspec.json.encode(event)
    url = args.url or local_callback_url(settings)
    if settings.http.token is not None and not args.url:
        url += f"?token={settings.http.token}"
    tls: ssl.SSLContext | bool = True  # aiohttp's default: verify against the system CAs
    if args.insecure:
        tls = False
    elif args.cafile is not None:
        try:
            tls = ssl.create_default_context(cafile=str(args.cafile))
        except (OSError, ssl.SSLError) as exc:
            print(f"vod-bridge: --cafile {args.cafile}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        try:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}, ssl=tls) as response:
                print(response.status, await response.text())
                return EXIT_OK if response.status < 300 else 1
        except aiohttp.ClientError as exc:
            print(f"vod-bridge: cannot reach {url.split('?')[0]}: {exc}", file=sys.stderr)
            return 1


def _check(env: Mapping[str, str], overrides: Mapping[str, str], args: argparse.Namespace) -> int:
    """One line per check on stdout, then a summary. Exit 0 when none failed (warnings allowed), 1 when one did,
    2 for an invalid configuration (then nothing else is checked)."""
    try:
        if not args.timeout_s > 0:
            raise ConfigError("--timeout-s must be positive")
        settings = load_settings(env, overrides)
        credentials = check_startup(settings, env)
    except ConfigError as exc:
        print(format_result(CheckResult("configuration", "fail", exc.message)), flush=True)
        return EXIT_CONFIG
    # The report is the output; client libraries' own lines would repeat it (kept at DEBUG, for a diagnosis).
    verbose = settings.log_level == "DEBUG"
    configure_logging("DEBUG" if verbose else "ERROR", settings.log_format)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_not_a_client_library)
    configuration = CheckResult("configuration", "ok", describe_configuration(settings))
    print(format_result(configuration), flush=True)
    results = asyncio.run(run_checks(settings, credentials, timeout_s=args.timeout_s))
    for result in results:
        print(format_result(result))
    print(format_summary([configuration, *results]), flush=True)
    return EXIT_UNSUCCESSFUL if any(result.failed for result in results) else EXIT_OK


def _not_a_client_library(record: logging.LogRecord) -> bool:
    # The check's report already says what aiokafka's or librdkafka's error lines would.
    return not record.name.startswith(("aiokafka", "librdkafka"))


def _schema(args: argparse.Namespace) -> int:
    """One JSON document on stdout (so that jq and schema tools can read it), the names, or every file written."""
    if args.name is not None and (args.list or args.write is not None):
        print("vod-bridge: schema: give a NAME, --list or --write, not several", file=sys.stderr)
        return EXIT_CONFIG
    if args.list:
        print("\n".join(SCHEMA_NAMES))
        return EXIT_OK
    if args.write is not None:
        for path in write_schemas(args.write):
            print(path)
        return EXIT_OK
    try:
        document = schema_document(args.name or DEFAULT_SCHEMA)
    except UnknownSchema as exc:
        print(f"vod-bridge: schema: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(render(document).decode())
    return EXIT_OK
