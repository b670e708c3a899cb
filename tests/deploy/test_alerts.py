"""The chart's alerting rules (issue 13), checked and unit-tested by the real `promtool`.

Why: an alert that never fires, fires on another installation's series, or does not even
parse is worse than none. The rules are one file, deploy/helm/dharma-stream/files/alerts.yaml,
a template of the chart's values; these tests render the PrometheusRule with `helm`, write its
spec to a file and run `promtool check rules` and `promtool test rules` (cases in
tests/deploy/alerts-test.yaml: each alert firing and not firing) on exactly that file.
Every alert's runbook is a heading of docs/operations.md's "Alerts" section.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.chart import CHART, NETWORK_SET, REPO_ROOT, Manifest, find, kinds, render

RULES_TEST = Path(__file__).with_name("alerts-test.yaml")
#: What tests/deploy/alerts-test.yaml's rule_files names.
RENDERED_NAME = "rendered-alerts.yaml"
ENABLED = (*NETWORK_SET, "alerts.enabled=true")
ALERTS = {
    "DharmaControllerDown",
    "DharmaNoLeader",
    "DharmaDatabaseErrors",
    "DharmaQueueStalled",
    "DharmaHighFailureRatio",
    "DharmaRunnersOOMKilled",
    "DharmaRunnersStuckPending",
}


def promtool_binary() -> str:
    """`promtool` (Debian's `prometheus` package, installed by scripts/bootstrap): missing
    fails under CI and skips elsewhere."""
    found = shutil.which("promtool")
    if found:
        return found
    message = "no promtool: apt-get install prometheus (scripts/bootstrap does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def promtool(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        [promtool_binary(), *args], capture_output=True, text=True, cwd=cwd, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def rules_of(
    set_values: Sequence[str] = ENABLED, values_files: Sequence[Path] = ()
) -> dict[str, Any]:
    manifests = render(values_files, set_values)
    spec: dict[str, Any] = find(manifests, "PrometheusRule")["spec"]
    return spec


def alert_rules(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in spec["groups"] for rule in group["rules"]}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default values' rules, written as promtool reads them, next to the test cases."""
    directory = tmp_path_factory.mktemp("alerts")
    (directory / RENDERED_NAME).write_text(yaml.safe_dump(rules_of(), sort_keys=False))
    shutil.copy(RULES_TEST, directory / RULES_TEST.name)
    return directory


def test_rules_are_off_by_default() -> None:
    assert "PrometheusRule" not in kinds(render(set_values=NETWORK_SET))


def test_rules_render_when_enabled_with_the_objects_labels() -> None:
    manifests = render(set_values=[*ENABLED, "alerts.labels.release=kube-prometheus-stack"])
    rule: Manifest = find(manifests, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "dharma"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(alert_rules(rule["spec"])) == ALERTS


def test_promtool_checks_the_rendered_rules(rendered: Path) -> None:
    out = promtool("check", "rules", RENDERED_NAME, cwd=rendered)
    assert f"SUCCESS: {len(ALERTS)} rules found" in out


def test_promtool_unit_tests_pass(rendered: Path) -> None:
    """Each alert fires on its synthetic series and stays quiet on the others."""
    assert yaml.safe_load(RULES_TEST.read_text())["rule_files"] == [RENDERED_NAME]
    promtool("test", "rules", RULES_TEST.name, cwd=rendered)


def test_promtool_tested_exactly_what_the_chart_renders(rendered: Path) -> None:
    """The file promtool tested is the chart's PrometheusRule spec, unchanged: the rules
    have one source (files/alerts.yaml, included by templates/prometheusrule.yaml)."""
    assert yaml.safe_load((rendered / RENDERED_NAME).read_text()) == rules_of()
    template = (CHART / "templates" / "prometheusrule.yaml").read_text()
    assert '.Files.Get "files/alerts.yaml"' in template
    assert "alert:" not in template and "expr:" not in template


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == ALERTS
    assert quiet == ALERTS


def test_every_alert_links_its_runbook_in_the_operations_guide() -> None:
    text = (REPO_ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    headings = set(re.findall(r"^### (Dharma\w+)$", section, re.MULTILINE))
    assert headings == ALERTS
    for name, rule in alert_rules(rules_of()).items():
        url = rule["annotations"]["runbook_url"]
        assert url.endswith(f"/docs/operations.md#{name.lower()}"), url
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_values_reach_the_rules(tmp_path: Path) -> None:
    """Thresholds, windows, the selector and extra labels come from the values, and the
    result is still valid for promtool."""
    values = {
        "alerts": {
            "selector": 'job="dharma",cluster="eu1"',
            "ruleLabels": {"team": "media"},
            "runbookUrl": "https://wiki.example.org/dharma",
            "oldestPending": {"thresholdSeconds": 900},
            "failureRatio": {"threshold": 0.5, "window": "2h"},
            "oomKills": {"threshold": 0},
            "runnersPending": {"for": "10m"},
        }
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    spec = rules_of(ENABLED, [tmp_path / "values.yaml"])
    rules = alert_rules(spec)
    assert rules["DharmaQueueStalled"]["expr"].endswith("> 900")
    ratio = rules["DharmaHighFailureRatio"]["expr"]
    assert ") > 0.5" in ratio and "[2h]" in ratio and "[30m]" not in ratio
    assert rules["DharmaRunnersOOMKilled"]["expr"].endswith("> 0")
    assert rules["DharmaRunnersStuckPending"]["for"] == "10m"
    for name, rule in rules.items():
        assert 'job="dharma",cluster="eu1"' in rule["expr"], name
        assert "namespace=" not in rule["expr"], name
        assert rule["labels"]["team"] == "media"
        assert (
            rule["annotations"]["runbook_url"] == f"https://wiki.example.org/dharma#{name.lower()}"
        )
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    promtool("check", "rules", "rules.yaml", cwd=tmp_path)
