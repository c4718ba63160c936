"""The event counters' shortcut to their labelled children: right series, bounded cache; the readiness gauge."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import scraped
from msgspec.structs import replace
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import SpoolSettings
from bridge.ops.embedded import free_port
from bridge.ops.metrics import Metrics


def samples(metrics: Metrics, name: str) -> dict[tuple[str, str], float]:
    (family,) = [f for f in text_string_to_metric_families(metrics.render().decode()) if f.name == name]
    return {(s.labels["source"], s.labels["event_type"]): s.value for s in family.samples}


def test_counts_land_on_their_labels_and_unknown_types_share_other() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.count_received("callback", "PullComplete")
    metrics.count_received("pull", "PullComplete")
    metrics.count_received("callback", "SomethingNew")
    metrics.count_received("callback", "other")
    metrics.count_published("callback", "PullComplete")
    metrics.count_published("callback", "Made-Up")
    assert samples(metrics, "vod_bridge_events_received") == {
        ("callback", "PullComplete"): 3,
        ("pull", "PullComplete"): 1,
        ("callback", "other"): 2,
    }
    assert samples(metrics, "vod_bridge_events_published") == {
        ("callback", "PullComplete"): 1,
        ("callback", "other"): 1,
    }


def test_caller_controlled_types_do_not_grow_the_cache() -> None:
    metrics = Metrics()
    for i in range(1000):
        metrics.count_received("callback", f"forged-{i}")
        metrics.count_published("callback", f"forged-{i}")
    metrics.count_received("callback", "PullComplete")
    assert len(metrics._received) == 2 and len(metrics._published) == 1
    assert samples(metrics, "vod_bridge_events_received")[("callback", "other")] == 1000


@pytest.mark.integration
async def test_the_ready_gauge_answers_what_readyz_answers(make_settings, make_client, tmp_path: Path) -> None:
    """``vod_bridge_ready`` is what alerts watch: 0 exactly while /readyz answers 503."""
    # Nothing listens there: the producer keeps retrying in the background.
    unreachable = make_settings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    spooled = replace(unreachable, spool=SpoolSettings(dir=str(tmp_path / "spool")))
    # (case, settings, wait for Kafka, /readyz status, gauge)
    cases = [
        ("no kafka", unreachable, False, 503, 0.0),
        ("kafka connected", make_settings(), True, 200, 1.0),
        ("no kafka, a spool", spooled, False, 200, 1.0),
    ]
    for case, settings, wait_ready, status, gauge in cases:
        client = await make_client(settings, wait_ready=wait_ready)
        readyz = await client.get("/readyz")
        assert (readyz.status, await scraped(client, "vod_bridge_ready")) == (status, gauge), case
