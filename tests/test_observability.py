"""The observability pieces agree with the code that feeds them.

A dashboard panel or an alert that names a metric the code does not export
shows nothing and never fires, silently. So: every series the Grafana
dashboard and the alert rules query must be one that common/metrics.py
exports, every latency stage must be on the dashboard, the operations guide
must list exactly the exported metrics, and the chart must ship the dashboard
file unchanged except for the one value it fills in.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from common import metrics
from tests.helm_tools import REPO_ROOT, Helm, require_tool

CHART = REPO_ROOT / "helm" / "modstream"
DASHBOARD = CHART / "files" / "dashboard.json"
ALERTS = CHART / "files" / "alerts.yaml"
METRIC_NAME = re.compile(r"\bmodstream_[a-z_]+\b")
STAGE_MATCHER = re.compile(r'\bstage="([^"$]+)"')
# The series each kind of metric puts on /metrics (checked against the exporter below).
SERIES_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
GRAFANA_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def metric_families() -> dict[str, str]:
    """Family name -> type of every metric object that common.metrics defines."""
    families = {}
    for value in vars(metrics).values():
        if isinstance(value, (Counter, Gauge, Histogram)):
            for family in value.describe():
                families[family.name] = family.type
    return families


def exported_series() -> dict[str, str]:
    """Series name as Prometheus stores it -> its family."""
    return {family + suffix: family
            for family, kind in metric_families().items() for suffix in SERIES_SUFFIXES[kind]}


def referenced(text: str) -> set[str]:
    return set(METRIC_NAME.findall(text))


def balanced(expr: str) -> bool:
    """Brackets pair up outside quoted strings: catches the usual slip when editing a query by hand."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


# --- what the exporter writes --------------------------------------------------------------------------

_PROBE = """
import json, os, sys, tempfile
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
from prometheus_client import Counter, Gauge, Histogram
from common.metrics import multiprocess_registry
Counter("modstream_probe_counter", "c", ["k"]).labels(k="v").inc()
Gauge("modstream_probe_gauge", "g", multiprocess_mode="livesum").set(1)
Histogram("modstream_probe_histogram", "h", buckets=(1.0,)).observe(0.5)
json.dump({f.name: sorted({s.name for s in f.samples}) for f in multiprocess_registry().collect()}, sys.stdout)
"""


def test_series_suffixes_are_what_the_multiprocess_exporter_writes() -> None:
    """The exporter (common.metrics.serve_metrics) sums multiprocess files; its naming is what panels query."""
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    # common.metrics' own unlabelled metrics write files too; only the probes matter here.
    written = {name: series for name, series in json.loads(result.stdout).items() if "_probe_" in name}
    assert written == {f"modstream_probe_{kind}": sorted(f"modstream_probe_{kind}{suffix}" for suffix in suffixes)
                       for kind, suffixes in SERIES_SUFFIXES.items()}


def test_operations_guide_lists_every_metric() -> None:
    """docs/operations.md's metric table is what operators read: it must neither miss nor invent a metric."""
    exported = exported_series()
    named = referenced((REPO_ROOT / "docs" / "operations.md").read_text())
    assert named <= exported.keys() | exported.values(), sorted(named - exported.keys() - exported.values())
    assert {exported.get(name, name) for name in named} >= metric_families().keys()


# --- the dashboard -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside collapsed rows


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for name, variable in variables(dashboard).items():
        if variable["type"] == "query":
            yield f"variable {name}", variable["definition"]


def test_dashboard_queries_only_exported_series(dashboard: dict[str, Any]) -> None:
    exported = exported_series()
    used = set()
    for where, expr in dashboard_queries(dashboard):
        names = referenced(expr)
        # The one query without a metric draws a dashboard variable as a reference line.
        assert names or re.fullmatch(r"vector\(\$\w+\)", expr), f"{where} queries no modstream metric: {expr}"
        assert names <= exported.keys(), f"{where} queries {sorted(names - exported.keys())}, not exported"
        assert balanced(expr), f"{where}: unbalanced brackets in {expr}"
        used |= {exported[name] for name in names}
    # A metric worth exporting is worth a panel: a new one must be added to the dashboard too.
    assert used == metric_families().keys(), f"no panel for {sorted(metric_families().keys() - used)}"


def test_every_stage_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    stage = variables(dashboard)["stage"]
    assert stage["query"].split(",") == list(metrics.STAGES)
    assert {option["value"] for option in stage["options"]} == {"$__all", *metrics.STAGES}
    pinned = {name for _, expr in dashboard_queries(dashboard) for name in STAGE_MATCHER.findall(expr)}
    assert pinned <= set(metrics.STAGES), f"panels pin unknown stages {sorted(pinned - set(metrics.STAGES))}"
    repeated = [panel for panel in panels(dashboard) if panel.get("repeat") == "stage"]
    assert repeated and all('stage="$stage"' in t["expr"] for p in repeated for t in p["targets"])


def test_dashboard_is_a_plain_grafana_model(dashboard: dict[str, Any]) -> None:
    """Loadable by the Grafana sidecar as is: no import-time ${DS_...} inputs, one datasource variable."""
    assert "__inputs" not in dashboard and dashboard["uid"] == "modstream"
    found = variables(dashboard)
    assert found["datasource"]["type"] == "datasource" and found["datasource"]["query"] == "prometheus"
    assert found["max_batch_size"]["type"] == "textbox"  # the chart fills it in
    assert found["namespace"]["includeAll"] and found["namespace"]["allValue"] == ".*"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == GRAFANA_DATASOURCE, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(target["datasource"] == GRAFANA_DATASOURCE for target in panel["targets"]), panel["title"]


# --- the alert rules -----------------------------------------------------------------------------------

def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    assert isinstance(document, dict) and document["groups"], "alerts.yaml needs groups"
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    assert rules
    for rule in rules:
        name = rule.get("alert")
        assert name and rule.get("expr") and rule.get("for"), rule
        assert rule["labels"]["severity"], name
        assert rule["annotations"]["summary"], name
        assert balanced(rule["expr"]), name
    assert len({rule["alert"] for rule in rules}) == len(rules)


def test_alert_rules_query_only_exported_series() -> None:
    exported = exported_series()
    for rule in alert_rules():
        names = referenced(rule["expr"])
        assert names, f"{rule['alert']} queries no modstream metric"
        assert names <= exported.keys(), f"{rule['alert']} queries {sorted(names - exported.keys())}"
        # Prose may name a family (modstream_stage_latency_seconds) as well as a series.
        prose = referenced(" ".join(str(text) for text in rule["annotations"].values()))
        assert prose <= exported.keys() | exported.values(), f"{rule['alert']} mentions {sorted(prose)}"


# --- the chart ships the dashboard ---------------------------------------------------------------------

def dashboard_config_maps(helm: Helm, *args: str) -> list[dict[str, Any]]:
    result = helm.run("template", "modstream", str(CHART), *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout)
            if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["labels"].get("grafana_dashboard") == "1"]


def test_chart_ships_the_dashboard_with_the_configured_batch_size(tmp_path: Path) -> None:
    helm = Helm(require_tool("helm", "HELM"), tmp_path)
    assert dashboard_config_maps(helm) == []  # off by default
    (config_map,) = dashboard_config_maps(
        helm, "--set-json", "monitoring.grafanaDashboard.enabled=true",
        "--set-json", "config.classifier.max_batch_size=48",
        "--set-json", 'monitoring.grafanaDashboard.annotations={"grafana_folder": "modstream"}')
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "modstream"}
    (shipped,) = config_map["data"].values()
    shipped = json.loads(shipped)
    expected = json.loads(DASHBOARD.read_text())
    for variable in expected["templating"]["list"]:
        if variable["name"] == "max_batch_size":
            variable.update(query="48", current={"text": "48", "value": "48"},
                            options=[{"selected": True, "text": "48", "value": "48"}])
    assert shipped == expected
