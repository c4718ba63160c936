"""The event counters' shortcut to their labelled children: right series, bounded cache."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

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
