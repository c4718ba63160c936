"""examples/consumer.py against a real broker, and deploy/kubernetes checked against bridge.config.

The manifests are read as text with regular expressions (no YAML parser is a dependency): they are written
in a regular style, and these tests pin what must stay consistent with the code (variable names, secret
files, probe paths, the shutdown budget).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from conftest import Kafka, sample_event

from bridge.config import ENV_VARS
from bridge.delivery.records import Source, event_headers
from bridge.vod.decode import decode_event

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = ROOT / "examples" / "consumer.py"
K8S = ROOT / "deploy" / "kubernetes"

# ---------------------------------------------------------------------------------------------------------
# The example consumer
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_consumer_example_prints_each_event_once_and_commits(kafka: Kafka, topic: str) -> None:
    run = uuid.uuid4().hex[:8]
    ok_a, ok_b, failed = f"{run}-Pull-a", f"{run}-Pull-b", f"{run}-Pull-c"
    deliveries: list[tuple[dict[str, object], Source]] = [
        (sample_event(ok_a), "callback"),
        (sample_event(ok_b), "callback"),
        (sample_event(failed, ErrCode=70000, Message="internal error"), "callback"),
        (sample_event(ok_a), "pull"),  # the same event again: delivery is at least once
    ]
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers, acks="all", enable_idempotence=kafka.supports_idempotence
    )
    await producer.start()
    try:
        for body, source in deliveries:
            event = decode_event(json.dumps(body).encode())
            headers = event_headers(event, source=source, received_at=datetime.now(UTC))
            await producer.send_and_wait(topic, event.value, key=event.key.encode(), headers=headers)
    finally:
        await producer.stop()

    group = f"example-{run}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CONSUMER),
        "--bootstrap-servers",
        kafka.bootstrap_servers,
        "--topic",
        topic,
        "--group-id",
        group,
        "--max-records",
        str(len(deliveries)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=45)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    stdout, stderr = out.decode(), err.decode()
    assert process.returncode == 0, stderr

    lines = stdout.splitlines()
    for task_id in (ok_a, ok_b, failed):
        assert sum(f"TaskId={task_id} " in line for line in lines) == 1, stdout
    (line_a,) = (line for line in lines if f"TaskId={ok_a} " in line)
    assert "Status=FINISH ErrCode=0 FileId=14508071098244959037 FileUrl=http://" in line_a
    assert "source=callback received-at=" in line_a  # the first copy is handled, the pulled repeat is not
    (line_failed,) = (line for line in lines if f"TaskId={failed} " in line)
    assert line_failed.startswith("PullComplete FAILED") and "ErrCode=70000" in line_failed
    assert f"duplicate PullComplete key={ok_a} skipped" in stderr

    # Offsets were committed after processing: the group resumes after the 4 records.
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        metadata = await consumer._client.fetch_all_metadata()  # all topics; consumer.topics() keeps no copy
        partitions = metadata.partitions_for_topic(topic) or set()
        committed = [await consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)]
    finally:
        await consumer.stop()
    assert sum(offset or 0 for offset in committed) == len(deliveries)


# ---------------------------------------------------------------------------------------------------------
# The Kubernetes manifests
# ---------------------------------------------------------------------------------------------------------

SECRET_MOUNT = "/etc/vod-bridge/secrets"
#: Read by bridge.vod.api.Credentials.from_env, each with a _FILE variant too.
TENCENTCLOUD_VARS = frozenset({"TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY", "TENCENTCLOUD_SESSION_TOKEN"})
SECRET_VARS = frozenset({var.name for var in ENV_VARS if var.secret}) | TENCENTCLOUD_VARS
KNOWN_VARS = frozenset({var.name for var in ENV_VARS}) | TENCENTCLOUD_VARS | {name + "_FILE" for name in SECRET_VARS}
WORKLOADS = ("deployment.yaml", "statefulset-spool.yaml", "poller.yaml")
RECEIVERS = ("deployment.yaml", "statefulset-spool.yaml")

_VAR_RE = re.compile(r"\b((?:BRIDGE|TENCENTCLOUD)_[A-Z0-9_]*[A-Z0-9])\b")
_ENV_ENTRY_RE = re.compile(r"^\s*- name: ([A-Z][A-Z0-9_]*)\n\s+value: \"?([^\"\n]*)\"?$", re.MULTILINE)
_CONFIGMAP_ENTRY_RE = re.compile(r"^  ([A-Z][A-Z0-9_]*): \"([^\"]*)\"$", re.MULTILINE)


def manifest(name: str) -> str:
    return (K8S / name).read_text()


def uncommented(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def env_entries(name: str) -> dict[str, str]:
    """The `env:` entries (name -> literal value) of a workload, commented ones left out."""
    return dict(_ENV_ENTRY_RE.findall(uncommented(manifest(name))))


def configmap() -> dict[str, str]:
    return dict(_CONFIGMAP_ENTRY_RE.findall(uncommented(manifest("configmap.yaml"))))


def probe_path(text: str, probe: str) -> str:
    match = re.search(rf"^\s+{probe}:\n\s+httpGet:\n\s+path: (\S+)$", text, re.MULTILINE)
    assert match, f"no {probe} with an httpGet path"
    return match.group(1)


def number(pattern: str, text: str) -> int:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, pattern
    return int(match.group(1))


def test_every_variable_named_in_the_manifests_is_a_bridge_setting() -> None:
    files = [*sorted(K8S.glob("*.yaml")), K8S / "README.md"]
    named = {(path.name, var) for path in files for var in _VAR_RE.findall(path.read_text())}
    assert {var for _, var in named} >= {"BRIDGE_KAFKA_BOOTSTRAP_SERVERS", "BRIDGE_SPOOL_DIR", "BRIDGE_PULL_ENABLED"}
    unknown = sorted((file, var) for file, var in named if var not in KNOWN_VARS)
    assert not unknown, f"not in bridge.config.ENV_VARS (nor a secret's _FILE variant): {unknown}"


def test_secrets_are_only_given_as_mounted_files() -> None:
    secret_keys = set(re.findall(r"^  ([a-z0-9-]+): ", manifest("secret.example.yaml").split("stringData:")[1], re.M))
    assert not set(configmap()) & (SECRET_VARS | {name + "_FILE" for name in SECRET_VARS})
    for name in WORKLOADS:
        text = manifest(name)
        env = env_entries(name)
        assert not set(env) & SECRET_VARS, f"{name}: a secret as a plain value"
        mounted = set(re.findall(r"^\s+- key: ([a-z0-9-]+)$", text, re.MULTILINE))
        assert f"mountPath: {SECRET_MOUNT}\n" in text
        for var, path in env.items():
            if var.endswith("_FILE"):
                assert var.removesuffix("_FILE") in SECRET_VARS, f"{name}: {var} has no _FILE support"
                key = path.removeprefix(SECRET_MOUNT + "/")
                assert path == f"{SECRET_MOUNT}/{key}" and key in secret_keys, f"{name}: {var} -> {path}"
                assert key in mounted, f"{name}: {var} names {key}, which is not in the volume's items"
    assert env_entries("poller.yaml").keys() >= {"TENCENTCLOUD_SECRET_ID_FILE", "TENCENTCLOUD_SECRET_KEY_FILE"}
    assert "tencentcloud-secret-key" not in manifest("deployment.yaml")


def test_probes_security_and_grace_period() -> None:
    settings = configmap()
    shutdown_s = int(settings["BRIDGE_SHUTDOWN_TIMEOUT_S"])
    flush_s = int(settings["BRIDGE_KAFKA_PUBLISH_TIMEOUT_S"])
    images = set()
    for name in WORKLOADS:
        text = uncommented(manifest(name))
        assert probe_path(text, "readinessProbe") == "/readyz"
        assert probe_path(text, "livenessProbe") == "/healthz"
        assert probe_path(text, "startupProbe") == "/healthz"
        for setting in ("runAsUser: 10001", "readOnlyRootFilesystem: true", 'drop: ["ALL"]', "type: RuntimeDefault"):
            assert setting in text, f"{name}: {setting}"
        assert "automountServiceAccountToken: false" in text
        images |= set(re.findall(r"^\s+image: (\S+)$", text, re.MULTILINE))
        grace_s = number(r"^\s+terminationGracePeriodSeconds: (\d+)$", text)
        pre_stop_s = number(r'command: \["sleep", "(\d+)"\]', text) if name in RECEIVERS else 0
        # SIGTERM ends the process within shutdown + flush + a few seconds whatever Kafka does (a bounded
        # close abandons what it cannot flush); the grace period must cover that after the preStop sleep.
        assert grace_s >= pre_stop_s + shutdown_s + flush_s + 5, f"{name}: SIGKILL could cut the drain short"
    assert images == {"vod-kafka-bridge:0.1.0"}


def test_variants_and_kustomization() -> None:
    spool = env_entries("statefulset-spool.yaml")
    assert spool["BRIDGE_SPOOL_DIR"] == "/var/lib/vod-bridge/spool"
    assert "mountPath: /var/lib/vod-bridge/spool\n" in manifest("statefulset-spool.yaml")
    assert "volumeClaimTemplates:" in manifest("statefulset-spool.yaml")
    poller = env_entries("poller.yaml")
    assert (poller["BRIDGE_PULL_ENABLED"], poller["BRIDGE_CALLBACK_ENABLED"]) == ("true", "false")
    assert number(r"^  replicas: (\d+)$", manifest("poller.yaml")) == 1
    assert number(r"^  replicas: (\d+)$", manifest("deployment.yaml")) == 2
    assert number(r"^  minAvailable: (\d+)$", manifest("pdb.yaml")) == 1

    listed = re.findall(r"^\s*#?\s*- ([\w.-]+\.yaml)\b", manifest("kustomization.yaml"), re.MULTILINE)
    applied = re.findall(r"^  - ([\w.-]+\.yaml)\b", manifest("kustomization.yaml"), re.MULTILINE)
    assert set(listed) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert "deployment.yaml" in applied and "statefulset-spool.yaml" not in applied
