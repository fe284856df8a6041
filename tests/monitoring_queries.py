"""The PromQL of the Grafana dashboard and of the Prometheus alert rules, and what the service exports.

Shared by tests/test_deploy.py (static checks) and tests/test_monitoring.py (a live Prometheus).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from service.deployment.metrics import ApiMetrics, WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dscguard.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# Grafana's interval variables, as a short live test can query them (1 s scrapes, a minute of data at most)
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}


@dataclass(frozen=True)
class Query:
    where: str  # e.g. "panel 'Queue lag' A", "variable worker", "alert DscguardQueueLag"
    expr: str


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def provisioned_datasource_uid() -> str:
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return datasource["uid"]


def dashboard_queries() -> list[Query]:
    """Every panel target's expression, and the selector inside every `label_values(...)` variable query."""
    board = dashboard()
    queries = [Query(f"panel {panel['title']!r} {target['refId']}", target["expr"])
               for panel in board["panels"] for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
        assert match, f"variable {variable['name']}: expected label_values(selector, label)"
        queries.append(Query(f"variable {variable['name']}", match.group(1)))
    return queries


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def queryable(expr: str) -> str:
    """`expr` with the dashboard's variables as Prometheus takes them: every instance (`.*`), fixed intervals."""
    for name, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(name, value)
    for variable in dashboard()["templating"]["list"]:
        expr = expr.replace(f"${variable['name']}", ".*")
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords or label names."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        followed_by = expr[match.end():].lstrip()[:1]
        if followed_by != "(" and match.group() not in {"bool", "and", "or", "unless", "offset", "Inf", "NaN"}:
            names.add(match.group())
    return names


def comparison_operands(expr: str) -> list[str]:
    """The two sides of `expr`'s top-level comparison (an alert's condition), or [expr] when it compares nothing."""
    depth, quoted = 0, False
    for index, char in enumerate(expr):
        if char == '"' and (index == 0 or expr[index - 1] != "\\"):
            quoted = not quoted
        elif not quoted and char in "({[":
            depth += 1
        elif not quoted and char in ")}]":
            depth -= 1
        elif not quoted and depth == 0:
            operator = next((op for op in COMPARISONS if expr.startswith(op, index)), None)
            if operator:
                right = re.sub(r"^\s*(?:bool\s*)?(?:(?:on|ignoring|group_left|group_right)\s*\([^)]*\)\s*)*", "",
                               expr[index + len(operator):])
                return [expr[:index].strip(), right.strip()]
    return [expr.strip()]


def exported_metric_names() -> set[str]:
    """Every series name the API and the worker can expose (with the histogram and counter suffixes), and `up`."""
    names = {"up"}
    for metrics in (ApiMetrics(CollectorRegistry()), WorkerMetrics(CollectorRegistry())):
        for family in metrics.registry.collect():
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names
