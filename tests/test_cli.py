"""The real `vod-bridge` process: serve, dev, graceful shutdown, exit codes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import sample_bytes, sample_event, selected_brokers, wait_until
from faultkit import AckHoldingBroker, bridge_env, keys_in_kafka, metric_value, spawn, wait_ready

from bridge.ops.embedded import EmbeddedBroker, free_port
from bridge.testing import VodBridge

pytestmark = pytest.mark.integration


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def accepts_connections(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (the bridge closes its listening socket as shutdown begins)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("broker_name", selected_brokers())
async def test_serve_publishes_then_drains_in_flight_on_sigterm(
    broker_name: str, topic: str, tmp_path: Path, processes
) -> None:
    """SIGTERM while callbacks wait for their Kafka acks, held back by the broker (tansu: its answers held in a
    proxy, the records appended; the mock cluster: frozen): the bridge stops accepting connections, keeps the
    callbacks in flight until their acks come, answers each 200, flushes the producer and exits 0 within its
    shutdown timeout; and every record is in Kafka."""
    shutdown_timeout_s = 5.0
    held_after_sigterm_s = 1.0
    in_flight = 20
    async with AckHoldingBroker(broker_name) as broker:
        port = free_port()
        log = tmp_path / "bridge.log"
        env = bridge_env(
            BRIDGE_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
            BRIDGE_KAFKA_TOPIC=topic,
            BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=str(broker.supports_idempotence).lower(),
            BRIDGE_SHUTDOWN_TIMEOUT_S=str(shutdown_timeout_s),
        )
        process = spawn(["serve", "--port", str(port), "--host", "127.0.0.1"], env, log)
        processes.append(process)
        await wait_ready(port, process)

        url = f"http://127.0.0.1:{port}/vod/callback"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=sample_bytes()) as response:
                assert response.status == 200

            async def post(key: str) -> tuple[int, dict[str, Any]]:
                async with session.post(url, json=sample_event(key)) as response:
                    return response.status, await response.json()

            broker.hold()
            keys = [f"drain-{i}" for i in range(in_flight)]
            callbacks = [asyncio.create_task(post(key)) for key in keys]
            # Every one of them reached the bridge and waits for its ack (tansu: some ack is held in the proxy).
            async with asyncio.timeout(10):
                while await metric_value(port, "vod_bridge_publish_in_flight") < in_flight or broker.held_bytes == 0:
                    await asyncio.sleep(0.02)
            assert not any(callback.done() for callback in callbacks)

            process.send_signal(signal.SIGTERM)
            signalled_at = time.monotonic()
            # Shutdown began: the listening socket is closed (new callbacks are refused; VOD retries them).
            await wait_until(lambda: not accepts_connections(port), timeout_s=5)
            # The acks stay held for a while (a slow Kafka): the bridge waits for them, up to its shutdown timeout.
            with pytest.raises(subprocess.TimeoutExpired):
                await asyncio.to_thread(process.wait, held_after_sigterm_s)
            assert not any(callback.done() for callback in callbacks), "no answer before the acks"

            broker.release()
            async with asyncio.timeout(shutdown_timeout_s):
                answers = await asyncio.gather(*callbacks)
        code = await asyncio.to_thread(process.wait, shutdown_timeout_s)
        exited_after_s = time.monotonic() - signalled_at
        in_kafka = await keys_in_kafka(broker.bootstrap_servers, topic, at_least=1 + in_flight)

    print(f"[{broker_name}] exit {code} {exited_after_s:.2f}s after SIGTERM; answers {[s for s, _ in answers]}")
    assert [(status, body["status"]) for status, body in answers] == [(200, "published")] * in_flight
    assert code == 0 and exited_after_s < shutdown_timeout_s
    output = log.read_text()
    assert "stopped cleanly" in output
    assert "kafka producer flushed and closed" in output
    assert set(keys) <= set(in_kafka), f"answered 200 but missing from Kafka: {set(keys) - set(in_kafka)}"
    assert "125676836723-Pull-f5ac8127b3b6b85cdc13f237c6005d8" in in_kafka


async def test_idempotent_producer_on_tansu_fails_start_with_clear_error(tmp_path: Path, processes) -> None:
    """tansu only, whatever BRIDGE_TEST_BROKERS says: it is the broker that refuses InitProducerId (the mock
    cluster accepts it), and that refusal is what must end the start with exit code 3."""
    with EmbeddedBroker() as broker:
        log = tmp_path / "bridge.log"
        env = bridge_env(
            BRIDGE_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers, BRIDGE_KAFKA_ENABLE_IDEMPOTENCE="true"
        )
        process = spawn(["serve", "--port", str(free_port()), "--host", "127.0.0.1"], env, log)
        processes.append(process)
        assert await asyncio.to_thread(process.wait, 20) == 3
    output = log.read_text()
    assert "refused the idempotent producer" in output
    assert "BRIDGE_KAFKA_ENABLE_IDEMPOTENCE=false" in output


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({}, ["--port", "http"], "BRIDGE_HTTP_PORT"),
        ({"BRIDGE_KAFKA_LINGER_MS": "soon"}, [], "BRIDGE_KAFKA_LINGER_MS"),
        ({"BRIDGE_KAFKA_BOOTSTRAP_SERVERS": "no-port"}, [], "BRIDGE_KAFKA_BOOTSTRAP_SERVERS"),
        ({"BRIDGE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, [], "BRIDGE_KAFKA_SECURITY_PROTOCOL"),
        ({"BRIDGE_PULL_ENABLED": "true"}, [], "TENCENTCLOUD_SECRET_ID"),
        ({"BRIDGE_PULL_ENABLED": "true", "TENCENTCLOUD_SECRET_ID": "AKIDonly"}, [], "TENCENTCLOUD_SECRET_KEY"),
        ({"BRIDGE_CALLBACK_ENABLED": "false"}, [], "BRIDGE_CALLBACK_ENABLED"),
    ],
)
def test_invalid_configuration_exits_2_naming_the_variable(env, args, named) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", *args],
        env=bridge_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert named in result.stderr


async def test_dev_mode_prints_curl_and_each_record(tmp_path: Path, processes) -> None:
    port = free_port()
    log = tmp_path / "dev.log"
    process = spawn(["dev", "--port", str(port)], bridge_env(), log)
    processes.append(process)
    await wait_ready(port, process)
    output = log.read_text()
    match = re.search(r"curl -sS -X POST (\S+) -H 'Content-Type: application/json' --data-binary @(\S+)", output)
    assert match, output
    url, sample = match.groups()
    assert url == f"http://127.0.0.1:{port}/vod/callback"
    curl = await asyncio.to_thread(
        subprocess.run,
        [
            "curl",
            "-sS",
            "-X",
            "POST",
            url,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            f"@{sample}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(curl.stdout)["status"] == "published"
    deadline = time.monotonic() + 10
    while "key=125676836723-Pull-f5ac8127b3b6b85cdc13f237c6005d8" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        await asyncio.sleep(0.1)
    process.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(process.wait, 15) == 0
    assert '"Animal World"' in log.read_text()


def test_schema_command_prints_the_contract_as_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "schema", "headers"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert "event-type" in json.loads(result.stdout)["required"]


@pytest.mark.vod_bridge(http_sign_key="Key123")
def test_send_posts_a_signed_sample_to_a_running_bridge(vod_bridge: VodBridge) -> None:
    env = bridge_env(BRIDGE_CALLBACK_SIGN_KEY="Key123")
    url = vod_bridge.callback_url
    command = [sys.executable, "-m", "bridge", "send", "--url", url, "--task-id", "sent-1", "--sign"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("200 ")
    unsigned = subprocess.run(command[:-1], env=env, capture_output=True, text=True, timeout=30)
    assert unsigned.returncode == 1 and unsigned.stdout.startswith("401 ")
    (record,) = vod_bridge.records(1)
    assert record.key == b"sent-1"
    vod_bridge.assert_no_records(within_s=0.5)


@pytest.mark.parametrize("command", [["serve"], ["dev"], ["serve", "--workers", "2"]], ids=" ".join)
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_busy_port_exits_2_before_anything_says_it_listens(command: list[str], host: str) -> None:
    """The socket is bound before the "listening" line and the dev banner: a port another process holds ends the
    start with the configuration exit code and one message naming the address, the port and their settings."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # serve would otherwise fail on Kafka first: nothing listens on this broker address.
        env = bridge_env(BRIDGE_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
        result = subprocess.run(
            [sys.executable, "-m", "bridge", *command, "--host", host, "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"cannot listen on {host} port {port}: address already in use" in result.stderr
    assert "BRIDGE_HTTP_PORT / --port" in result.stderr
    assert "listening on" not in output
    assert "is up" not in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("content", "args", "said"),
    [
        (None, [], "cannot read"),
        (b"{not json", ["--task-id", "t-1"], "is not JSON"),
        (b"[1, 2]", ["--task-id", "t-1"], "is not a JSON object"),
    ],
    ids=["missing", "not-json", "not-an-object"],
)
def test_send_with_a_file_it_cannot_use_exits_2_without_a_traceback(
    tmp_path: Path, content: bytes | None, args: list[str], said: str
) -> None:
    path = tmp_path / "event.json"
    if content is not None:
        path.write_bytes(content)
    command = [sys.executable, "-m", "bridge", "send", str(path), "--url", "http://127.0.0.1:9/vod/callback", *args]
    result = subprocess.run(command, env=bridge_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and said in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_tail_without_kafka_exits_1_naming_the_address(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "tail"],
        env=bridge_env(BRIDGE_KAFKA_BOOTSTRAP_SERVERS=address),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert f"vod-bridge: tail: kafka not reachable at {address}" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
