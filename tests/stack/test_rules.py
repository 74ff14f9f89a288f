"""Recording and alert rules: correct PromQL, every alert unit-tested with the real promtool."""

from __future__ import annotations

import re
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tokenbooth.config import StackConfig, load_settings
from tokenbooth.errors import ConfigError
from tokenbooth.stack.alerts import alert_set
from tokenbooth.stack.profile import FAST, PRODUCTION, format_duration
from tokenbooth.stack.queries import Catalog, check_query
from tokenbooth.stack.render import stack_files
from tokenbooth.stack.runbook import RUNBOOKS
from tokenbooth.stack.yamlfile import dump_yaml

from .conftest import load, run

F12 = {  # PRODUCT.md F12 and the issue, each to the alert that covers it
    "error rate": "TokenboothHighErrorRate", "P95 latency": "TokenboothHighLatencyP95",
    "P99 latency": "TokenboothHighLatencyP99", "TTFT": "TokenboothSlowTimeToFirstToken",
    "429 rate": "TokenboothRateLimited", "5xx": "TokenboothUpstreamServerErrors",
    "timeouts": "TokenboothUpstreamTimeouts", "model total failure": "TokenboothModelDown",
    "token spike": "TokenboothTokenSpike", "cost per hour": "TokenboothCostPerHourHigh",
    "cost per day": "TokenboothCostPerDayOverBudget", "budget burn": "TokenboothMonthlyBudgetBurn",
    "in-flight backlog": "TokenboothInFlightBacklog", "instance down": "TokenboothInstanceDown",
    "Pushgateway stale": "TokenboothPushgatewayStale", "tool error rate": "TokenboothToolErrorRate",
    "circuit open": "TokenboothCircuitOpen", "availability SLO": "TokenboothAvailabilityBurnRate",
    "latency SLO": "TokenboothLatencyBurnRate", "ledger behind": "TokenboothLedgerBehind",
    "ledger rows failed": "TokenboothLedgerRowsFailed", "tenant budget nearly spent": "TokenboothBudgetNearlySpent",
    "tenant budget exhausted or refusing calls": "TokenboothBudgetExhausted",
    "tenant budget burn rate": "TokenboothBudgetBurnRate", "Redis unreachable": "TokenboothRedisUnreachable",
    "cache hit rate drop": "TokenboothCacheHitRateDrop",
}


def _rules(stack_dir: Path, name: str) -> list[dict[str, Any]]:
    return [r for g in load(stack_dir / f"rules/{name}.yml")["groups"] for r in g["rules"]]


def test_every_f12_alert_exists_with_severity_team_summary_description_and_runbook(stack_dir: Path) -> None:
    alerts = _rules(stack_dir, "alerts")
    names = {a["alert"] for a in alerts}
    assert set(F12.values()) == names
    for a in alerts:
        assert a["labels"]["severity"] in ("critical", "warning"), a
        assert a["labels"]["team"] == ("finance" if "Cost" in a["alert"] or "Budget" in a["alert"] else "platform")
        assert a["annotations"]["summary"] and a["annotations"]["description"], a
        assert RUNBOOKS[a["alert"]].strip()
    readme = (stack_dir / "README.md").read_text()
    assert all(f"### {name}" in readme for name in names)


def test_slo_alerts_use_the_multiwindow_burn_rates(stack_dir: Path) -> None:
    for name in ("TokenboothAvailabilityBurnRate", "TokenboothLatencyBurnRate"):
        by_severity = {a["labels"]["severity"]: a["expr"] for a in _rules(stack_dir, "alerts") if a["alert"] == name}
        windows = {sev: re.findall(r"ratio_rate(\w+) / [\d.]+ > ([\d.]+)", expr) for sev, expr in by_severity.items()}
        assert windows["critical"] == [("1h", "14.4"), ("5m", "14.4"), ("6h", "6"), ("30m", "6")]
        assert windows["warning"] == [("1d", "3"), ("2h", "3"), ("3d", "1"), ("6h", "1")]


def test_recording_rules_are_named_level_metric_operations_and_used(stack_dir: Path) -> None:
    recorded = [r["record"] for r in _rules(stack_dir, "recording")]
    assert all(re.fullmatch(r"[a-z_]+:tokenbooth_[a-z_]+:[a-z0-9_]+", name) for name in recorded), recorded
    used = (stack_dir / "rules/alerts.yml").read_text() + "".join(
        p.read_text() for p in (stack_dir / "grafana/dashboards").glob("*.json"))
    unused = [name for name in recorded if name not in used and not any(
        name in r["expr"] for r in _rules(stack_dir, "recording"))]
    assert unused == []


def test_every_rule_is_correct_promql_over_the_catalog(stack_dir: Path) -> None:
    catalog = Catalog.build(r["record"] for r in _rules(stack_dir, "recording"))
    for rule in _rules(stack_dir, "recording") + _rules(stack_dir, "alerts"):
        assert check_query(rule["expr"], catalog) == [], rule.get("record") or rule.get("alert")
    proc = run("promtool", ["check", "rules", "rules/recording.yml", "rules/alerts.yml"], stack_dir)
    assert proc.returncode == 0, proc.stdout


def test_every_alert_fires_in_a_promtool_test_and_stays_silent_in_another(stack_dir: Path) -> None:
    tests = load(stack_dir / "rules/tests.yml")["tests"]
    fired = {t["alertname"] for g in tests for t in g["alert_rule_test"] if t["exp_alerts"]}
    silent = {t["alertname"] for g in tests for t in g["alert_rule_test"] if not t["exp_alerts"]}
    names = {a["alert"] for a in _rules(stack_dir, "alerts")}
    assert fired == names and silent == names
    # Each severity of the two-severity alerts fires in some test.
    fired_labels = {(t["alertname"], e["exp_labels"]["severity"]) for g in tests for t in g["alert_rule_test"]
                    for e in t["exp_alerts"]}
    assert {(a["alert"], a["labels"]["severity"]) for a in _rules(stack_dir, "alerts")} == fired_labels
    groups = {g["name"] for g in tests}
    assert {"healthy traffic: every alert silent", "no traffic: every alert silent, no ratio or quantile (no NaN)"} \
        <= groups
    # Other thresholds (CNY budgets, tight SLOs) run through `stack check` in tests/stack/test_cli.py.
    proc = run("promtool", ["test", "rules", "rules/tests.yml"], stack_dir)
    assert proc.returncode == 0, proc.stdout
    assert "SUCCESS" in proc.stdout


def _mutant(stack_dir: Path, directory: Path, keep: str, change: Any) -> Path:
    """A copy of the rules with one change, and only the unit tests whose name starts with ``keep``."""
    shutil.copytree(stack_dir / "rules", directory)
    before = [(directory / rel).read_text() for rel in ("recording.yml", "alerts.yml")]
    for rel in ("recording.yml", "alerts.yml"):
        doc = load(directory / rel)
        for group in doc["groups"]:
            for rule in group["rules"]:
                change(rule)
        (directory / rel).write_text(dump_yaml(doc))
    assert [load(directory / rel) for rel in ("recording.yml", "alerts.yml")] != [
        yaml.safe_load(text) for text in before], "the change changed nothing"
    tests = load(directory / "tests.yml")
    tests["tests"] = [t for t in tests["tests"] if t["name"].startswith(keep)]
    assert tests["tests"], keep
    (directory / "tests.yml").write_text(dump_yaml(tests, fast=True))
    return directory / "tests.yml"


def _set(rule: dict[str, Any], name: str, old: str, new: str) -> None:
    if rule.get("alert", rule.get("record")) == name:
        rule["expr"] = rule["expr"].replace(old, new)


def test_the_unit_tests_catch_broken_rules(stack_dir: Path, tmp_path: Path) -> None:
    mutants = {
        # A threshold ten times too high: the warning no longer fires on 15 % failures.
        "threshold": _mutant(stack_dir, tmp_path / "threshold", "TokenboothHighErrorRate warning",
                             lambda r: _set(r, "TokenboothHighErrorRate", "> 0.05", "> 0.5")),
        # No minimum-traffic guard: one failing call in five minutes is "100 % failing".
        "guard": _mutant(stack_dir, tmp_path / "guard", "a trickle",
                         lambda r: _set(r, "TokenboothHighErrorRate", "\nand on (provider, model)",
                                        "\nor on (provider, model)")),
        # No division guard: no traffic makes 0/0 = NaN ratios.
        "nan": _mutant(stack_dir, tmp_path / "nan", "no traffic",
                       lambda r: _set(r, "provider_model:tokenbooth_requests_failed:ratio_rate5m",
                                      "/ (provider_model:tokenbooth_requests:rate5m > 0)",
                                      "/ provider_model:tokenbooth_requests:rate5m")),
        # Client mistakes counted as failures: healthy traffic with bad requests would page.
        "client errors": _mutant(stack_dir, tmp_path / "client", "healthy",
                                 lambda r: _set(r, "provider_model:tokenbooth_requests_failed:rate5m",
                                                ',error_type!~"bad_request|context_length"', "")),
        # Budget burn projected across a window reset: the drop at midnight reads as a trend.
        "reset": _mutant(stack_dir, tmp_path / "reset", "TokenboothBudgetBurnRate: a day budget",
                         lambda r: _set(r, "TokenboothBudgetBurnRate", "\n  unless\n    tokenbooth_budget_spent_usd < "
                                        "max_over_time(tokenbooth_budget_spent_usd[6h])", "")),
        # tokenbooth_redis_up alone: every gateway without Redis exports it at 0.
        "no redis": _mutant(stack_dir, tmp_path / "redis", "no traffic",
                            lambda r: _set(r, "TokenboothRedisUnreachable", "\nand on (job, instance) count by "
                                           "(job, instance) (tokenbooth_redis_duration_seconds_count)", "")),
    }
    proc = run("promtool", ["test", "rules", *map(str, mutants.values())])
    assert proc.returncode != 0
    sections = {s.split("\n", 1)[0].strip(): s for s in proc.stdout.split("Unit Testing:")[1:]}
    for what, path in mutants.items():
        assert "FAILED" in sections[str(path)], (what, sections[str(path)])
    assert "alertname: TokenboothHighErrorRate" in sections[str(mutants["threshold"])]
    assert "provider_model:tokenbooth_requests_failed:ratio_rate5m" in sections[str(mutants["nan"])]
    assert "alertname: TokenboothBudgetBurnRate, time: 1d" in sections[str(mutants["reset"])]
    assert "alertname: TokenboothRedisUnreachable" in sections[str(mutants["no redis"])]


def test_fast_profile_scales_every_window_and_for_duration() -> None:
    slow, fast = (alert_set(StackConfig(), Decimal(1), p).rule_groups(p) for p in (PRODUCTION, FAST))
    assert fast[0]["rules"][0]["for"] == "5s" and slow[0]["rules"][0]["for"] == "5m"
    assert "ratio_rate5s" in fast[0]["rules"][0]["expr"]
    assert [format_duration(s) for s in (300, 5400, 0.5, 86400)] == ["5m", "90m", "500ms", "1d"]


@pytest.mark.parametrize(("stack", "message"), [
    ({"latency_p95": 400}, "Config 'stack.latency_p95' has value 400.0"),
    ({"slo_latency": 25}, "must be one of the duration histogram's buckets"),
    ({"currency": "EUR"}, "Config 'stack.currency' has value 'EUR': add its rate to pricing.fx"),
    ({"error_rate": 0.3}, "error_rate_critical must be above error_rate"),
])
def test_bad_thresholds_fail_naming_the_key(stack: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        stack_files(load_settings(overrides={"stack": stack}, environ={}))
