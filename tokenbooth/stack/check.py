"""``tokenbooth stack check DIR``: validate a stack directory with the real tools, say what is wrong.

Runs, in order: ``promtool check config`` (which also loads the rule files), ``promtool check
rules``, the rule unit tests (``promtool test rules``), ``amtool check-config``, the PromQL of
every rule and dashboard query against the metric catalog (:mod:`tokenbooth.stack.queries`),
the dashboards' data sources, and ``docker compose config`` when Docker's compose plugin runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from tokenbooth.errors import TokenboothError
from tokenbooth.stack.queries import Catalog, check_query, grafana_to_promql
from tokenbooth.stack.tools import MissingTool, run_tool

__all__ = ["CheckResult", "StackCheckFailed", "format_results", "run_checks"]

Status = Literal["ok", "fail", "skip"]
_RULES = ("rules/recording.yml", "rules/alerts.yml")


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, whether it passed, and what is wrong in plain words."""

    name: str
    status: Status
    detail: str = ""


class StackCheckFailed(TokenboothError):
    """At least one check of ``stack check`` failed (the details were printed above)."""


def _tool(name: str, tool: str, args: list[str], directory: Path, what: str) -> CheckResult:
    try:
        code, output = run_tool(tool, args, cwd=directory)
    except MissingTool as exc:
        return CheckResult(name, "fail", exc.message)
    if code == 0:
        return CheckResult(name, "ok")
    return CheckResult(name, "fail", f"{what}; {tool} says:\n{output}")


def _yaml(path: Path) -> Any:
    loader = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)


def _rule_queries(directory: Path) -> CheckResult:
    name = "PromQL of the rules"
    docs = [(rel, _yaml(directory / rel)) for rel in _RULES]
    recorded = [r["record"] for _, doc in docs for g in doc.get("groups", []) for r in g["rules"] if "record" in r]
    catalog = Catalog.build(recorded)
    problems = []
    for rel, doc in docs:
        for group in doc.get("groups", []):
            for rule in group["rules"]:
                label = rule.get("record") or rule.get("alert")
                problems += [f"{rel}: {label} {p}" for p in check_query(str(rule.get("expr", "")), catalog)]
    return CheckResult(name, "fail", "\n".join(problems)) if problems else CheckResult(name, "ok")


def _dashboards(directory: Path) -> CheckResult:
    name = "Grafana dashboards"
    uids = {ds.get("uid") for path in (directory / "grafana/provisioning/datasources").glob("*.yml")
            for ds in (_yaml(path) or {}).get("datasources", [])}
    recorded = [r["record"] for g in _yaml(directory / _RULES[0]).get("groups", []) for r in g["rules"]]
    catalog = Catalog.build(recorded)
    problems: list[str] = []
    boards = sorted((directory / "grafana/dashboards").glob("*.json"))
    if not boards:
        problems.append("grafana/dashboards has no dashboard")
    for path in boards:
        try:
            board = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            problems.append(f"{path.name} is not valid JSON: {exc}")
            continue
        for variable in board.get("templating", {}).get("list", []):
            problems += _datasource(path.name, f"variable {variable.get('name')}", variable, uids)
            query = str(variable.get("query", ""))
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
            if not m or m.group(1) not in catalog.series:
                problems.append(f"{path.name}: variable {variable.get('name')} queries {query!r}, not "
                                "label_values(<catalog metric>, <label>)")
        for panel in board.get("panels", []):
            if panel.get("type") == "row":
                continue
            where = f"panel '{panel.get('title')}'"
            problems += _datasource(path.name, where, panel, uids)
            if not panel.get("targets"):
                problems.append(f"{path.name}: {where} has no query")
            for target in panel.get("targets", []):
                expr = str(target.get("expr", ""))
                problems += [f"{path.name}: {where} {p}" for p in check_query(grafana_to_promql(expr), catalog)]
    return CheckResult(name, "fail", "\n".join(problems)) if problems else CheckResult(name, "ok")


def _datasource(board: str, where: str, item: dict[str, Any], uids: set[Any]) -> list[str]:
    uid = (item.get("datasource") or {}).get("uid")
    if uid not in uids:
        return [f"{board}: {where} uses data source {uid!r}, but the provisioned one is "
                f"{', '.join(sorted(map(str, uids))) or 'missing'}"]
    return []


def _compose(directory: Path) -> CheckResult:
    name = "docker compose config"
    try:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30,
                               check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CheckResult(name, "skip", f"Docker is not installed here ({type(exc).__name__}).")
    if probe.returncode != 0:
        return CheckResult(name, "skip", "Docker's compose plugin does not run here: "
                           f"{(probe.stdout + probe.stderr).strip().splitlines()[0]}")
    text = (directory / "docker-compose.yml").read_text(encoding="utf-8")
    env = dict(os.environ)
    for var in re.findall(r"\$\{(\w+):\?", text):  # required variables: a placeholder is enough to check syntax
        env.setdefault(var, "https://example.invalid/robot")
    proc = subprocess.run(["docker", "compose", "-f", "docker-compose.yml", "config", "--quiet"], cwd=directory,
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    if proc.returncode == 0:
        return CheckResult(name, "ok")
    return CheckResult(name, "fail", f"docker-compose.yml is not valid; docker compose says:\n{proc.stderr.strip()}")


def run_checks(directory: Path) -> list[CheckResult]:
    """Every check of a stack directory, in order; files it needs but lacks make their checks fail."""
    needed = ["prometheus.yml", *_RULES, "rules/tests.yml", "alertmanager.yml", "docker-compose.yml"]
    missing = [rel for rel in needed if not (directory / rel).is_file()]
    if missing:
        return [CheckResult("files", "fail", f"{directory} lacks {', '.join(missing)}: write it with "
                            f"`tokenbooth stack init {directory}`")]
    checks: list[tuple[str, Callable[[], CheckResult]]] = [
        ("promtool check config", lambda: _tool(
            "promtool check config", "promtool", ["check", "config", "prometheus.yml"], directory,
            "prometheus.yml (or a rule file it loads) is not valid")),
        ("promtool check rules", lambda: _tool(
            "promtool check rules", "promtool", ["check", "rules", *_RULES], directory, "a rule file is not valid")),
        ("rule unit tests", lambda: _tool(
            "rule unit tests", "promtool", ["test", "rules", "rules/tests.yml"], directory,
            "an alert does not behave as its unit test expects")),
        ("amtool check-config", lambda: _tool(
            "amtool check-config", "amtool", ["check-config", "alertmanager.yml"], directory,
            "alertmanager.yml is not valid")),
        ("PromQL of the rules", lambda: _rule_queries(directory)),
        ("Grafana dashboards", lambda: _dashboards(directory)),
        ("docker compose config", lambda: _compose(directory)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(check())
        except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, subprocess.TimeoutExpired) as exc:
            results.append(CheckResult(name, "fail", f"could not run it: {type(exc).__name__}: {exc}"))
    return results


def format_results(results: list[CheckResult]) -> str:
    """One line per check (``ok``, ``FAIL``, ``skip``), with the details of failures indented below."""
    lines = []
    for r in results:
        lines.append(f"{ {'ok': 'ok  ', 'fail': 'FAIL', 'skip': 'skip'}[r.status]}  {r.name}"
                     + (f": {r.detail}" if r.status == "skip" else ""))
        if r.status == "fail" and r.detail:
            lines += [f"      {line}" for line in r.detail.splitlines()]
    failed = sum(r.status == "fail" for r in results)
    lines.append(f"{len(results) - failed} of {len(results)} checks passed" if failed else "all checks passed")
    return "\n".join(lines) + "\n"
