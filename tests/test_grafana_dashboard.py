"""deploy/grafana/fedcore-dashboard.json queries only series the aggregator exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedcore.metrics import AggregatorMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "fedcore-dashboard.json"

# PromQL words that are not metric names when not followed by "(" (functions always are).
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*")
# Suffixes prometheus_client adds to each family type's exposed series.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (Grafana variables allowed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and other strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables ($__rate_interval, ...)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation
        if match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def exported_series() -> set[str]:
    """Series names a real `AggregatorMetrics` registry exposes, with each type's suffixes."""
    names = set()
    for family in AggregatorMetrics().registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels collapsed into a row


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [
        (f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        query = query.get("query", "") if isinstance(query, dict) else query
        values_of = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", query)
        found.append((f"variable {variable['name']!r}", values_of.group(1) if values_of else query))
    return found


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("fedcore_current_round", {"fedcore_current_round"}),
        (
            'sum by (reason) (increase(fedcore_x_total{instance=~"$instance",a="b(c)"}[5m])) > 0',
            {"fedcore_x_total"},
        ),
        (
            "histogram_quantile(0.9, sum by (phase, le) (rate(a_bucket[$__rate_interval])))",
            {"a_bucket"},
        ),
        ("a and on(instance) b > 1e-3 or vector(0)", {"a", "b"}),
        ("sum without (job) (rate(x[1m] offset 5m)) / ignoring(le) y", {"x", "y"}),
        ("fedcor_typo_total", {"fedcor_typo_total"}),
    ],
)
def test_metric_names_are_extracted_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_query_uses_only_exported_series() -> None:
    exported = exported_series()
    queries = _queries(_dashboard())
    assert len(queries) >= 10
    unknown = {
        f"{where}: {name}"
        for where, expr in queries
        for name in metric_names(expr)
        if name not in exported
    }
    assert not unknown, f"the Grafana dashboard queries series fedcore does not export: {unknown}"
    assert all(metric_names(expr) for _, expr in queries), "a query selects no metric"


def test_the_check_catches_a_series_that_is_not_exported() -> None:
    exported = exported_series()
    assert "fedcore_rounds_completed_total" in exported
    assert "fedcore_round_phase_seconds_bucket" in exported
    assert "fedcore_rounds_failed_total" in exported  # labelled, no sample yet: still exported
    assert "fedcore_rounds_completed" not in exported  # a counter without its _total
    assert "fedcore_connected_clients_total" not in exported  # a gauge is not a counter
    assert "fedcore_round_phase_seconds" not in exported  # a histogram needs its suffix


def test_the_panels_cover_what_operators_watch() -> None:
    dashboard = _dashboard()
    used = {name for _, expr in _queries(dashboard) for name in metric_names(expr)}
    wanted = {
        "fedcore_rounds_completed_total",
        "fedcore_round_phase_seconds_bucket",
        "fedcore_global_model_accuracy",
        "fedcore_global_model_loss",
        "fedcore_connected_clients",
        "fedcore_updates_accepted_total",
        "fedcore_updates_rejected_total",
        "fedcore_connections_refused_total",
        "fedcore_bytes_received_total",
        "fedcore_bytes_sent_total",
    }
    assert wanted <= used, wanted - used
    panels = list(_panels(dashboard["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:  # every query goes to the data source the importer picks
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert dashboard["uid"] and dashboard["title"]
