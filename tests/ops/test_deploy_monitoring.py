"""deploy/grafana's dashboard and deploy/prometheus's alert rules, checked against the bridge that feeds them.

Every PromQL expression is parsed (promql-parser; Grafana's variables substituted first, as Grafana does before
querying), and every metric it names must be exported by a running bridge: a renamed metric breaks this test, not
a panel or an alert in production. promtool, where installed (Debian's ``prometheus`` package), also checks the
rules file and runs each alert against series that must and must not fire it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "vod-bridge-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "vod-bridge-rules.yml"

#: What every panel and query reads from: the dashboard's datasource variable, so that importing it (or
#: provisioning it from a file) needs no editing.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Grafana replaces these before a query reaches Prometheus; the test does the same with stand-in values.
_GRAFANA_RANGES = re.compile(r"\$(?:__rate_interval|__interval|__range)\b")
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")
_RANGE = re.compile(r"\[([^\]]+)\]")
_LABEL_VALUES = re.compile(r"^label_values\((\w+)")
BY = promql_parser.AggModifierType.By

#: The series names a family of each type exposes, for families declared without samples yet (a labelled
#: metric has no children until its first use, so only its HELP and TYPE lines are in the scrape).
_SERIES_OF_TYPE: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


@dataclass
class Query:
    """What one PromQL expression reads and does, from its syntax tree."""

    metrics: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    #: Labels of every ``by (...)`` clause.
    grouped_by: set[str] = field(default_factory=set)
    #: First arguments of ``histogram_quantile`` calls.
    quantiles: set[float] = field(default_factory=set)


def duration(text: str) -> timedelta:
    """A Prometheus duration; ``0m`` too (``for: 0m`` fires at once), which ``parse_duration`` refuses."""
    return timedelta() if re.fullmatch(r"0[smhdwy]?", text) else promql_parser.parse_duration(text)


def grafana_to_promql(expr: str) -> str:
    return _GRAFANA_VARIABLE.sub(".*", _GRAFANA_RANGES.sub("5m", expr))


def analyse(expr: str) -> Query:
    """Parse ``expr`` (raises ``ValueError`` on a syntax error) and collect what it reads."""
    query = Query()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            query.metrics.add(node.name)
        elif isinstance(node, promql_parser.Call):
            query.functions.add(node.func.name)
            if node.func.name == "histogram_quantile":
                query.quantiles.add(node.args[0].val)
        elif isinstance(node, promql_parser.AggregateExpr) and getattr(node.modifier, "type", None) == BY:
            query.grouped_by.update(node.modifier.labels)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return query


def exported_series(scrape: str) -> set[str]:
    """Every series name a query may select from this scrape: the samples present, and the series of each family
    declared without samples (``vod_bridge_events_rejected`` counter -> ``vod_bridge_events_rejected_total``)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(scrape):
        names.update(family.name + suffix for suffix in _SERIES_OF_TYPE.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


# ---------------------------------------------------------------------------------------------------------
# Loading the two files
# ---------------------------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (not the rows), including those inside collapsed rows."""
    for panel in board["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries(panel: dict[str, Any]) -> list[Query]:
    return [analyse(grafana_to_promql(target["expr"])) for target in panel["targets"]]


def dashboard_metrics() -> set[str]:
    board = dashboard()
    metrics = {name for panel in panels(board) for query in panel_queries(panel) for name in query.metrics}
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"variable {variable['name']}: not label_values(<metric>, <label>)"
            metrics.add(match.group(1))
    return metrics


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def rule(alert: str) -> dict[str, Any]:
    (found,) = [r for r in rules() if r["alert"] == alert]
    return found


def rules_metrics() -> set[str]:
    return {name for r in rules() for name in analyse(r["expr"]).metrics}


# ---------------------------------------------------------------------------------------------------------
# Against a running bridge
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_every_metric_queried_is_exported_by_a_running_bridge(make_settings, make_client) -> None:
    client = await make_client(make_settings())
    response = await client.get("/metrics")
    assert response.status == 200
    exported = exported_series(await response.text())
    # The mapping from families to series names is exact, not lenient: the counter family's own name and a
    # made-up suffix are not series.
    assert "vod_bridge_events_rejected_total" in exported and "vod_bridge_events_rejected" not in exported
    assert "vod_bridge_spool_depth" in exported and "vod_bridge_spool_depth_total" not in exported

    queried = dashboard_metrics() | rules_metrics()
    assert len(queried) >= 15
    assert all(name.startswith("vod_bridge_") for name in queried), sorted(queried)
    missing = sorted(queried - exported)
    assert not missing, f"queried by the dashboard or the alert rules, not exported by the bridge: {missing}"


# ---------------------------------------------------------------------------------------------------------
# The dashboard
# ---------------------------------------------------------------------------------------------------------


def test_the_dashboard_is_importable_as_it_is() -> None:
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", board["uid"]) and board["title"]
    assert board.get("id") is None, "an exported id would overwrite an unrelated dashboard on import"
    (source,) = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]

    shown = list(panels(board))
    assert len(shown) >= 10
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in shown:
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_panels_do_not_overlap_and_fit_the_grid() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_every_range_is_grafanas_interval_or_at_least_a_minute() -> None:
    """``rate`` over less than four scrapes is noisy or empty; ``$__rate_interval`` adapts to the scrape interval
    and the zoom. Fixed windows are kept for the panels that mirror an alert's window."""
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            for window in _RANGE.findall(target["expr"]):
                if window in ("$__rate_interval", "$__range"):
                    continue
                assert promql_parser.parse_duration(window) >= timedelta(minutes=1), (panel["title"], window)


#: Each topic the dashboard must show: a metric, and the labels its panel must keep apart.
REQUIRED_TOPICS: dict[str, tuple[str, set[str]]] = {
    "events by type and source": ("vod_bridge_events_received_total", {"source", "event_type"}),
    "rejections by reason": ("vod_bridge_events_rejected_total", {"reason"}),
    "fallbacks by reason": ("vod_bridge_events_fallback_total", {"reason"}),
    "publish latency": ("vod_bridge_publish_latency_seconds_bucket", {"le"}),
    "spool depth": ("vod_bridge_spool_depth", set()),
    "confirm age": ("vod_bridge_poller_confirm_age_seconds_bucket", {"le"}),
    "dead letters": ("vod_bridge_events_dead_lettered_total", {"reason"}),
    "producer replacements": ("vod_bridge_producer_replacements_total", set()),
    "pulls by VOD application": ("vod_bridge_poller_pulls_total", {"sub_app_id", "outcome"}),
}


def panels_reading(metric: str, labels: set[str]) -> list[dict[str, Any]]:
    return [
        panel
        for panel in panels(dashboard())
        if panel["type"] == "timeseries"
        and any(metric in q.metrics and labels <= q.grouped_by for q in panel_queries(panel))
    ]


@pytest.mark.parametrize("topic", REQUIRED_TOPICS)
def test_the_dashboard_shows(topic: str) -> None:
    metric, labels = REQUIRED_TOPICS[topic]
    assert panels_reading(metric, labels), f"no time series panel reads {metric} grouped by {sorted(labels)}"


def test_latency_panels_show_quantiles_of_the_histograms() -> None:
    for metric in ("vod_bridge_publish_latency_seconds_bucket", "vod_bridge_poller_confirm_age_seconds_bucket"):
        quantiles = {
            quantile
            for panel in panels_reading(metric, {"le"})
            for query in panel_queries(panel)
            if "histogram_quantile" in query.functions and "rate" in query.functions
            for quantile in query.quantiles
        }
        assert 0.99 in quantiles, metric


def test_the_confirm_age_panel_draws_the_alert_and_the_window_as_lines() -> None:
    (panel,) = panels_reading("vod_bridge_poller_confirm_age_seconds_bucket", {"le"})
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["unit"] == "s"
    assert {step["value"] for step in defaults["thresholds"]["steps"]} == {None, 20, 30}
    assert "line" in defaults["custom"]["thresholdsStyle"]["mode"]
    assert defaults["custom"]["axisSoftMax"] > 30, "the 30 s line stays in view while confirms are fast"
    # The same window as the VodBridgeConfirmAgeHigh alert, so that the panel shows what the alert saw.
    assert all("[5m]" in target["expr"] for target in panel["targets"])


def test_the_producer_replacements_panel_says_what_librdkafka_does_instead() -> None:
    (panel,) = panels_reading("vod_bridge_producer_replacements_total", set())
    assert "librdkafka" in panel["description"] and "restart" in panel["description"]


# ---------------------------------------------------------------------------------------------------------
# The alert rules
# ---------------------------------------------------------------------------------------------------------


def test_every_rule_has_a_severity_a_summary_and_an_action() -> None:
    loaded = yaml.safe_load(RULES.read_text())
    (group,) = loaded["groups"]
    assert group["name"] and group["rules"]
    names = [r["alert"] for r in group["rules"]]
    assert len(names) == len(set(names))
    for r in group["rules"]:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert re.fullmatch(r"VodBridge[A-Z][A-Za-z]+", r["alert"])
        analyse(r["expr"])  # parses
        duration(r["for"])
        assert r["labels"]["severity"] in {"critical", "warning"}, r["alert"]
        assert r["annotations"]["summary"].strip(), r["alert"]
        assert "Action:" in r["annotations"]["description"], f"{r['alert']}: the description names no action"


@dataclass(frozen=True)
class AlertCase:
    alert: str
    metric: str
    #: One of them must be applied.
    functions: set[str]
    at_least_for: timedelta


REQUIRED_ALERTS = [
    AlertCase("VodBridgeNotReady", "vod_bridge_ready", set(), timedelta(minutes=1)),
    AlertCase("VodBridgeSpoolGrowing", "vod_bridge_spool_depth", {"deriv", "delta"}, timedelta(minutes=5)),
    AlertCase(
        "VodBridgeConfirmAgeHigh", "vod_bridge_poller_confirm_age_seconds_bucket", {"histogram_quantile"}, timedelta()
    ),
    AlertCase("VodBridgeDeadLetters", "vod_bridge_events_dead_lettered_total", {"increase"}, timedelta()),
]


@pytest.mark.parametrize("case", REQUIRED_ALERTS, ids=lambda case: case.alert)
def test_the_rules_alert_on(case: AlertCase) -> None:
    found = rule(case.alert)
    query = analyse(found["expr"])
    assert case.metric in query.metrics
    assert not case.functions or case.functions & query.functions
    assert duration(found["for"]) >= case.at_least_for


def test_the_not_ready_alert_waits_exactly_a_minute_and_confirm_age_compares_with_20_s() -> None:
    assert duration(rule("VodBridgeNotReady")["for"]) == timedelta(minutes=1)
    expr = rule("VodBridgeConfirmAgeHigh")["expr"]
    assert analyse(expr).quantiles == {0.99} and re.search(r"\[5m\]\)\) > 20$", expr), expr


# ---------------------------------------------------------------------------------------------------------
# promtool: the rules file as Prometheus reads it, and each alert fired by the series it is about
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def promtool() -> Callable[..., subprocess.CompletedProcess[str]]:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus; or set PROMTOOL)")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([found, *args], capture_output=True, text=True, timeout=30)

    return run


def test_promtool_accepts_the_rules(promtool) -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def series(metric: str, pod: str, values: str, **labels: str) -> dict[str, str]:
    """An input series of ``pod`` in promtool's notation (``0+5x30``: 0, 5, ... 150; ``_x3``: three gaps)."""
    selector = ",".join(f'{name}="{value}"' for name, value in {"job": "vod-bridge", "instance": pod, **labels}.items())
    return {"series": f"{metric}{{{selector}}}", "values": values}


def confirm_ages(pod: str, counts_by_le: dict[str, str]) -> list[dict[str, str]]:
    return [series(CONFIRM_AGE, pod, counts, le=le) for le, counts in counts_by_le.items()]


def expect(eval_time: str, alert: str, *firing: dict[str, str]) -> dict[str, Any]:
    """At ``eval_time``, ``alert`` fires for exactly these series (given by their labels besides ``job``)."""
    severity = rule(alert)["labels"]["severity"]
    alerts = [{"exp_labels": {"job": "vod-bridge", "severity": severity, **labels}} for labels in firing]
    return {"eval_time": eval_time, "alertname": alert, "exp_alerts": alerts}


CONFIRM_AGE = "vod_bridge_poller_confirm_age_seconds_bucket"
DEAD_LETTERS = "vod_bridge_events_dead_lettered_total"


def scenarios() -> list[dict[str, Any]]:
    """promtool unit tests, one sample a minute. Each alert fires for the pod in trouble, not for the others; the
    evaluation times show its ``for`` (pending, then firing) and its end."""

    def scenario(input_series: list[dict[str, str]], *checks: dict[str, Any]) -> dict[str, Any]:
        return {"interval": "1m", "input_series": input_series, "alert_rule_test": list(checks)}

    ten_a_minute = "0+10x20"
    return [
        scenario(
            [series("vod_bridge_ready", "down", "1 0 0 0 0"), series("vod_bridge_ready", "fine", "1 1 1 1 1")],
            expect("1m", "VodBridgeNotReady"),
            expect("2m", "VodBridgeNotReady", {"instance": "down"}),
        ),
        scenario(
            [
                # Kafka away: 5 more events a minute, for half an hour.
                series("vod_bridge_spool_depth", "cut-off", "0+5x30"),
                # Kafka back: the backlog drains.
                series("vod_bridge_spool_depth", "draining", "300-30x10 0x20"),
                # A brief outage: spooled, then forwarded within minutes.
                series("vod_bridge_spool_depth", "blip", "0 10 20 0x27"),
            ],
            expect("12m", "VodBridgeSpoolGrowing"),
            expect("20m", "VodBridgeSpoolGrowing", {"instance": "cut-off"}),
        ),
        scenario(
            [
                # Ten confirms a minute: within a second of the pull on one pod, 20-25 s after it on the other.
                *confirm_ages("fast", dict.fromkeys(("1", "20", "25", "30", "+Inf"), ten_a_minute)),
                *confirm_ages("slow", {"1": "0x20", "20": "0x20"} | dict.fromkeys(("25", "30", "+Inf"), ten_a_minute)),
            ],
            expect("4m", "VodBridgeConfirmAgeHigh"),
            expect("10m", "VodBridgeConfirmAgeHigh", {"instance": "slow"}),
        ),
        scenario(
            [
                # The series appears with its first dead letter (increase() alone cannot see that step).
                series(DEAD_LETTERS, "new", "_x10 1x10", source="callback", reason="missing_key"),
                # One more dead letter at 8m on a series that existed.
                series(DEAD_LETTERS, "more", "2x7 3x12", source="pull", reason="no_payload"),
                # Old dead letters, none lately.
                series(DEAD_LETTERS, "old", "7x20", source="callback", reason="missing_key"),
            ],
            expect(
                "10m",
                "VodBridgeDeadLetters",
                {"instance": "new", "source": "callback", "reason": "missing_key"},
                {"instance": "more", "source": "pull", "reason": "no_payload"},
            ),
            expect("19m", "VodBridgeDeadLetters"),
        ),
        scenario(
            [
                series("vod_bridge_spool_set_aside_total", "refused", "0x5 1x20"),
                series("vod_bridge_spool_set_aside_total", "fine", "0x25"),
            ],
            expect("8m", "VodBridgeSpoolRecordsSetAside", {"instance": "refused"}),
            expect("25m", "VodBridgeSpoolRecordsSetAside"),
        ),
    ]


def test_each_alert_fires_for_the_pod_in_trouble_only(promtool, tmp_path: Path) -> None:
    tests = scenarios()
    tested = {check["alertname"] for scenario in tests for check in scenario["alert_rule_test"]}
    assert tested == {r["alert"] for r in rules()}, "every alert has a scenario"
    # promtool compares annotations too; the expressions, durations and labels are what is under test here (the
    # templates are checked by `promtool check rules` above), so the copy it runs has none.
    loaded = yaml.safe_load(RULES.read_text())
    for r in loaded["groups"][0]["rules"]:
        r.pop("annotations")
    (tmp_path / "rules.yml").write_text(json.dumps(loaded))  # JSON is YAML
    (tmp_path / "tests.yml").write_text(
        json.dumps({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests})
    )
    tested_run = promtool("test", "rules", str(tmp_path / "tests.yml"))
    assert tested_run.returncode == 0, tested_run.stdout + tested_run.stderr
