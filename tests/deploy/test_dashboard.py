"""The chart's Grafana dashboard (issue 13), and the metric names of every PromQL
expression the chart ships (dashboard panels and alert rules).

Why: a renamed or misspelt metric makes a panel empty and an alert silent without any error,
so every `dharma_*` name in an expression must be one controller/metrics.py really exports
(with the suffixes its exposition adds: _total, _bucket, _sum, _count). The dashboard is
files/dashboard.json in the chart; the ConfigMap that carries it must have the label
Grafana's dashboard sidecar looks for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from controller.metrics import Metrics
from tests.deploy.chart import CHART, NETWORK_SET, find, helm, kinds, render, values_args

DASHBOARD = CHART / "files" / "dashboard.json"
#: Metric names that are not the controller's own: Prometheus' scrape health.
FOREIGN = {"up"}


def exported_names() -> set[str]:
    """Every series name the controller's registry can expose, labelled children or not."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def dashboard_expressions() -> list[str]:
    """Panel queries and the template variables' queries."""
    found = []
    for key, value in _walk(dashboard()):
        if key == "expr" or (key == "query" and isinstance(value, str) and "(" in value):
            found.append(value)
    return found


def alert_expressions() -> list[str]:
    manifests = render(set_values=[*NETWORK_SET, "alerts.enabled=true"])
    spec = find(manifests, "PrometheusRule")["spec"]
    return [rule["expr"] for group in spec["groups"] for rule in group["rules"]]


def dharma_names(expr: str) -> set[str]:
    return set(re.findall(r"\bdharma_[a-zA-Z0-9_]+", expr))


def test_metric_names_are_parsed_from_expressions() -> None:
    expr = 'sum(rate(dharma_claims_total{job="x"}[5m])) / max(dharma_leader) and up{job="x"}'
    assert dharma_names(expr) == {"dharma_claims_total", "dharma_leader"}
    assert "dharma_attempt_duration_seconds_bucket" in exported_names()
    assert "dharma_attempt_outcomes_total" in exported_names()


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_expressions_use_only_exported_metrics(source: str) -> None:
    exprs = dashboard_expressions() if source == "dashboard" else alert_expressions()
    assert exprs
    exported = exported_names()
    for expr in exprs:
        names = dharma_names(expr)
        assert sorted(names - exported) == [], expr
        # Selectors of other metrics: only Prometheus' own `up`.
        others = {
            name
            for name in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr)
            if not name.startswith("dharma_")
        }
        assert others <= FOREIGN, expr


def test_the_dashboard_shows_every_exported_metric() -> None:
    """A metric added to controller/metrics.py gets a panel (or this test is told why not)."""
    shown = set().union(*(dharma_names(e) for e in dashboard_expressions()))
    families = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics().registry.collect()
    }
    missing = {
        name for name in families if not any(s == name or s.startswith(f"{name}_") for s in shown)
    }
    assert sorted(missing) == []


def test_dashboard_is_valid_grafana_json() -> None:
    board = dashboard()
    assert board["uid"] == "dharma-stream-batch" and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Every query is scoped to the installation the viewer picked.
            assert 'namespace="$namespace",job="$job"' in target["expr"], panel["title"]


def test_dashboard_is_off_by_default() -> None:
    manifests = render(set_values=NETWORK_SET)
    assert not [m for m in manifests if m["metadata"]["name"].endswith("-dashboard")]


def test_dashboard_configmap_carries_the_sidecar_label_and_the_file() -> None:
    manifests = render(set_values=[*NETWORK_SET, "dashboard.enabled=true"])
    config_map = find(manifests, "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["dharma-stream.json"]) == dashboard()
    assert kinds(manifests).count("ConfigMap") == 3


def test_dashboard_label_and_annotations_are_configurable() -> None:
    manifests = render(
        set_values=[
            *NETWORK_SET,
            "dashboard.enabled=true",
            "dashboard.label.key=grafana.example.org/dashboard",
            "dashboard.label.value=yes",
            "dashboard.annotations.grafana_folder=Media",
        ]
    )
    meta = find(manifests, "ConfigMap", "-dashboard")["metadata"]
    assert meta["labels"]["grafana.example.org/dashboard"] == "yes"
    assert "grafana_dashboard" not in meta["labels"]
    assert meta["annotations"] == {"grafana_folder": "Media"}


def test_helm_lint_strict_with_alerts_and_dashboard() -> None:
    set_values = [*NETWORK_SET, "alerts.enabled=true", "dashboard.enabled=true"]
    result = helm("lint", "--strict", str(CHART), *values_args(set_values=set_values))
    assert "0 chart(s) failed" in result.stdout
