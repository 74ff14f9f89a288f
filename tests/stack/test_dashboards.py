"""Grafana dashboards: generated as code, provisioned data source, every query valid over the catalog."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from tokenbooth.stack.check import run_checks
from tokenbooth.stack.compose import DATASOURCE_UID
from tokenbooth.stack.dashboards import SHIPPED, build_dashboards, dashboard_json
from tokenbooth.stack.queries import Catalog, check_query, grafana_to_promql

from .conftest import load


def _boards(stack_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((stack_dir / "grafana/dashboards").glob("*.json"))}


def test_shipped_json_is_what_the_generator_produces() -> None:
    built = build_dashboards()
    assert sorted(built) == sorted(p.name for p in SHIPPED.glob("*.json"))
    for name, data in built.items():
        assert (SHIPPED / name).read_text() == dashboard_json(data), "regenerate: python -m tokenbooth.stack.dashboards"


def test_the_four_dashboards_are_provisioned_from_the_stack(stack_dir: Path) -> None:
    boards = _boards(stack_dir)
    assert {b["title"] for b in boards.values()} == {
        "tokenbooth overview", "tokenbooth cost and tenants", "tokenbooth agents", "tokenbooth gateway internals"}
    provider = load(stack_dir / "grafana/provisioning/dashboards/tokenbooth.yml")["providers"][0]
    compose = load(stack_dir / "docker-compose.yml")["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in compose
    assert len({b["uid"] for b in boards.values()}) == 4


def test_every_panel_and_variable_uses_the_provisioned_data_source(stack_dir: Path) -> None:
    datasource = load(stack_dir / "grafana/provisioning/datasources/tokenbooth.yml")["datasources"]
    assert [d["uid"] for d in datasource] == [DATASOURCE_UID]
    for name, board in _boards(stack_dir).items():
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] == DATASOURCE_UID


def test_every_query_parses_and_uses_only_catalog_metrics_or_recording_rules(stack_dir: Path) -> None:
    recorded = [r["record"] for g in load(stack_dir / "rules/recording.yml")["groups"] for r in g["rules"]]
    catalog = Catalog.build(recorded)
    count = 0
    for name, board in _boards(stack_dir).items():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                count += 1
                assert check_query(grafana_to_promql(target["expr"]), catalog) == [], (name, panel["title"])
        for variable in board["templating"]["list"]:
            metric = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"])
            assert metric and metric.group(1) in catalog.series, variable["query"]
    assert count > 40


def test_overview_answers_the_health_and_cost_questions(stack_dir: Path) -> None:
    overview = _boards(stack_dir)["overview.json"]
    panels = {p["title"]: p for p in overview["panels"]}
    for title in ("Requests per second", "Success rate", "Latency P50 / P95 / P99", "Time to first token P50 / P95",
                  "Tokens per minute by model and type", "Cost today", "Cost this month", "Errors per second by type",
                  "Requests per second by model"):
        assert title in panels, title
    assert panels["Cost today"]["timeFrom"] == "now/d" and panels["Cost this month"]["timeFrom"] == "now/M"
    quantiles = [t["expr"] for t in panels["Latency P50 / P95 / P99"]["targets"]]
    assert all(q.startswith("histogram_quantile(") and "sum by (le)" in q for q in quantiles)


def test_the_dashboard_check_names_what_is_wrong(stack_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "stack"
    shutil.copytree(stack_dir, broken, ignore=shutil.ignore_patterns("tests.yml"))
    path = broken / "grafana/dashboards/internals.json"
    board = json.loads(path.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    panels[0]["datasource"]["uid"] = "someone-elses"
    panels[1]["targets"][0]["expr"] = "sum(rate(tokenbooth_ledger_queue_depth[5m]))"
    panels[2]["targets"][0]["expr"] = "histogram_quantile(0.9, rate(tokenbooth_tool_duration_seconds_bucket[5m]))"
    panels[3]["targets"][0]["expr"] = "sum(rate(tokenbooth_ledger_rows_total[5m]"
    path.write_text(json.dumps(board))
    from tokenbooth.stack import check

    result = check._dashboards(broken)
    assert result.status == "fail"
    assert "uses data source 'someone-elses', but the provisioned one is tokenbooth-prometheus" in result.detail
    assert "applies rate() to tokenbooth_ledger_queue_depth, which is not a counter" in result.detail
    assert "calls histogram_quantile() on something other than sum by (le, ...)" in result.detail
    assert "does not parse as PromQL" in result.detail
    assert run_checks(broken)[0].detail.endswith(f"write it with `tokenbooth stack init {broken}`")


def test_cost_dashboard_shows_budgets_and_refusals_and_internals_shows_redis(stack_dir: Path) -> None:
    boards = _boards(stack_dir)
    cost = {p["title"]: p for p in boards["cost.json"]["panels"]}
    used = cost["Budget used by tenant and window"]
    assert used["type"] == "bargauge" and used["targets"][0]["expr"].startswith(
        "sort_desc(max by (tenant, window) (tokenbooth_budget_used_ratio))")
    steps = [(s["value"], s["color"]) for s in used["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [(None, "green"), (0.8, "orange"), (1, "red")]
    assert cost["Budget used over time"]["fieldConfig"]["defaults"]["thresholds"]["steps"][1:] == \
        used["fieldConfig"]["defaults"]["thresholds"]["steps"][1:]
    assert [t["legendFormat"] for t in cost["Budget spent and limit"]["targets"]] == [
        "{{tenant}} {{window}} spent", "{{tenant}} {{window}} limit"]
    assert "tokenbooth_rejected_requests_total" in cost["Calls refused per minute by reason"]["targets"][0]["expr"]
    internals = {p["title"]: p for p in boards["internals.json"]["panels"]}
    assert "Redis" in internals
    # tokenbooth_redis_up is 0 in gateways without Redis: the panel keeps only those that use it.
    assert "tokenbooth_redis_duration_seconds_count" in internals["Redis by instance"]["targets"][0]["expr"]
    assert "sum by (le, operation)" in internals["Redis latency P99 by operation"]["targets"][0]["expr"]
    assert "tokenbooth_redis_errors_total" in internals["Redis errors per minute by operation"]["targets"][0]["expr"]
