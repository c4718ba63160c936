"""The event counters' shortcut to their labelled children (right series, bounded cache), gauges fed by a
function, the readiness gauge, and the multiprocess mode of ``--workers N`` (one scrape for every worker)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import sample_event, scraped
from msgspec.structs import replace
from prometheus_client import values
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

import bridge
from bridge.config import SpoolSettings
from bridge.errors import ConfigError
from bridge.ops.embedded import free_port
from bridge.ops.metrics import MULTIPROCESS_DIR_ENV, REJECT_REASONS, Metrics
from bridge.sources.http import ClientGone
from bridge.vod.event_types import EVENT_TYPES
from bridge.vod.model import FALLBACK_REASONS


def samples(metrics: Metrics, name: str) -> dict[tuple[str, str], float]:
    """The series of ``name`` that counted something (every known series exists from the start, at 0)."""
    (family,) = [f for f in text_string_to_metric_families(metrics.render().decode()) if f.name == name]
    return {(s.labels["source"], s.labels["event_type"]): s.value for s in family.samples if s.value}


def gauge(metrics: Metrics, name: str) -> float:
    (family,) = [f for f in text_string_to_metric_families(metrics.render().decode()) if f.name == name]
    (sample,) = family.samples
    return float(sample.value)


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
    sizes = len(metrics._received), len(metrics._published)
    for i in range(1000):
        metrics.count_received("callback", f"forged-{i}")
        metrics.count_published("callback", f"forged-{i}")
    metrics.count_received("callback", "PullComplete")
    assert (len(metrics._received), len(metrics._published)) == sizes
    assert samples(metrics, "vod_bridge_events_received")[("callback", "other")] == 1000


def series(text: str) -> dict[str, set[tuple[tuple[str, str], ...]]]:
    """Every sample of a scrape by family name: the set of its label sets."""
    found: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for family in text_string_to_metric_families(text):
        found.setdefault(family.name, set()).update(tuple(sorted(s.labels.items())) for s in family.samples)
    return found


def test_every_known_series_is_in_the_first_scrape_at_zero() -> None:
    """Dashboards and increase() need the series before the first event: each known label value is there at 0."""
    metrics = Metrics()
    text = metrics.render().decode()
    found = series(text)
    rejected = {dict(labels)["reason"] for labels in found["vod_bridge_events_rejected"]}
    assert rejected == set(REJECT_REASONS)
    assert {dict(labels)["source"] for labels in found["vod_bridge_events_duplicate"]} == {"callback", "pull"}
    assert {dict(labels)["source"] for labels in found["vod_bridge_events_spooled"]} == {"callback", "pull"}
    dead = {(dict(labels)["source"], dict(labels)["reason"]) for labels in found["vod_bridge_events_dead_lettered"]}
    assert ("pull", "missing_key") in dead and ("callback", "kafka_refused") in dead
    fallback = {dict(labels)["reason"] for labels in found["vod_bridge_events_fallback"]}
    assert fallback == set(FALLBACK_REASONS)
    assert len(found["vod_bridge_events_received"]) == 2 * (len(EVENT_TYPES) + 1)
    assert ("callback", "PullComplete") in samples_with_zero(text, "vod_bridge_events_published")
    # ...and all of them at 0.
    assert all(
        sample.value == 0
        for family in text_string_to_metric_families(text)
        if family.type == "counter"
        for sample in family.samples
    )


def samples_with_zero(text: str, name: str) -> set[tuple[str, str]]:
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == name]
    return {(s.labels["source"], s.labels["event_type"]) for s in family.samples}


#: ``InvalidPayload(...reason="x")`` or ``AuthFailed(...)``, over lines and through one level of parentheses.
RAISED_REASON = re.compile(r"(?:InvalidPayload|AuthFailed)\((?:[^()]|\([^()]*\))*?reason=\"([a-z_]+)\"")


def test_every_reason_the_code_refuses_with_is_declared() -> None:
    """The reasons raised in the source are the ones declared: a new reason cannot start without its series."""
    raised: set[str] = {ClientGone.code}
    for path in Path(bridge.__file__).parent.rglob("*.py"):
        for match in RAISED_REASON.finditer(path.read_text()):
            raised.add(match.group(1))
    assert raised <= set(REJECT_REASONS)
    assert {"bad_token", "malformed_json", "empty_body", "t_too_far_ahead"} <= raised  # the scan finds them


def test_multiprocess_mode_needs_prometheus_client_started_in_it(tmp_path: Path) -> None:
    # This test process has no PROMETHEUS_MULTIPROC_DIR: its values are plain floats, which no other process sees.
    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR must be set when the process starts"):
        Metrics(multiprocess_dir=tmp_path)


def test_single_process_gauges_fed_by_a_function_are_read_at_each_scrape() -> None:
    metrics = Metrics()
    in_flight = [3]
    metrics.feed(metrics.in_flight, lambda: in_flight[0])
    assert gauge(metrics, "vod_bridge_publish_in_flight") == 3
    in_flight[0] = 1
    assert gauge(metrics, "vod_bridge_publish_in_flight") == 1


@pytest.fixture
def worker_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], Metrics]]:
    """``worker(pid)``: the Metrics of a simulated ``--workers`` worker with that pid, all sharing one directory,
    as prometheus_client's own tests simulate processes. Build and use one worker at a time: labelled children
    are created with the value class current when they are first used."""
    monkeypatch.setenv(MULTIPROCESS_DIR_ENV, str(tmp_path))

    def worker(pid: int) -> Metrics:
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: pid))
        return Metrics(multiprocess_dir=tmp_path)

    yield worker
    values.close_all_multiprocess_files()


def scrape(metrics: Metrics) -> dict[str, float]:
    """Every sample of one scrape, summed over its labels, by sample name; fails on a per-pid sample."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            assert "pid" not in sample.labels, sample
            totals[sample.name] = totals.get(sample.name, 0) + sample.value
    return totals


def test_one_scrape_covers_every_worker_and_combines_the_gauges(
    worker_metrics: Callable[[int], Metrics], tmp_path: Path
) -> None:
    first = worker_metrics(101)
    first_in_flight = [2]
    first.feed(first.in_flight, lambda: first_in_flight[0])
    for _ in range(3):
        first.count_received("callback", "PullComplete")
        first.count_published("callback", "PullComplete")
    first.publish_latency.observe(0.002)
    first.spool_depth.set(4)
    first.kafka_connected.set(1)

    second = worker_metrics(102)
    second.feed(second.in_flight, lambda: 5)
    second.count_received("callback", "PullComplete")
    second.count_received("pull", "Made-Up")
    second.publish_latency.observe(0.2)
    second.spool_depth.set(6)
    second.refresh_gauges()  # what its refresh task does every GAUGE_REFRESH_INTERVAL_S

    # Whichever worker answers, the scrape is the same; connected only while every producer is.
    totals = scrape(first)
    assert scrape(second) == totals
    assert totals["vod_bridge_events_received_total"] == 5
    assert totals["vod_bridge_events_published_total"] == 3
    assert totals["vod_bridge_publish_latency_seconds_count"] == 2
    assert totals["vod_bridge_publish_in_flight"] == 2 + 5
    assert totals["vod_bridge_spool_depth"] == 4 + 6
    assert totals["vod_bridge_kafka_connected"] == 0
    # Families nothing has counted yet are there too, at 0 (dashboards show 0, not "No data").
    for name in ("dead_lettered", "duplicate", "fallback", "rejected", "spooled"):
        assert totals[f"vod_bridge_events_{name}_total"] == 0, name
    second.kafka_connected.set(1)
    first_in_flight[0] = 0
    assert scrape(first)["vod_bridge_kafka_connected"] == 1
    assert scrape(first)["vod_bridge_publish_in_flight"] == 0 + 5

    # The second worker exits: its gauges go, its counts stay (counters never go backwards).
    mark_process_dead(102, str(tmp_path))
    after = scrape(first)
    assert after["vod_bridge_publish_in_flight"] == 0
    assert after["vod_bridge_spool_depth"] == 4
    assert after["vod_bridge_events_received_total"] == 5
    assert after["vod_bridge_publish_latency_seconds_count"] == 2


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


@pytest.mark.integration
async def test_a_full_spool_holding_events_is_not_ready(make_settings, make_client, tmp_path: Path) -> None:
    """Every callback would queue behind the spooled events and get 503 ``spool_full``: not ready, until room."""
    unreachable = make_settings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    settings = replace(unreachable, spool=SpoolSettings(dir=str(tmp_path / "spool"), max_bytes=1024 * 1024))
    client = await make_client(settings, wait_ready=False)
    assert (await client.get("/readyz")).status == 200, "an empty spool accepts"
    padding = "x" * 200_000
    for i in range(10):
        response = await client.post("/vod/callback", json={**sample_event(f"fill-{i}"), "Padding": padding})
        if response.status != 200:
            break
    assert response.status == 503 and (await response.json())["error"] == "spool_full", "the bound was reached"
    readyz = await client.get("/readyz")
    body = await readyz.json()
    assert (readyz.status, body["status"], body["spool"]) == (503, "not_ready", "full"), body
    assert body["spool_depth"] == i and body["kafka"] == "unreachable"
    assert await scraped(client, "vod_bridge_ready") == 0
