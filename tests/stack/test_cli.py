"""``tokenbooth stack init | check | up`` as a user runs them: real processes, real tools, real signals."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port, need
from tokenbooth.cli import main
from tokenbooth.stack import tools
from tokenbooth.stack.tools import MissingTool, find_tool

from .conftest import load, run

TB = [sys.executable, "-m", "tokenbooth.cli"]


def tb(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI in this process (as the console script would), capturing what it prints."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_init_takes_thresholds_from_the_config_file_and_flags_and_check_passes(tmp_path: Path) -> None:
    config = tmp_path / "tokenbooth.yaml"
    config.write_text(yaml.safe_dump({
        "pricing": {"fx": {"CNY": "0.14"}},
        "stack": {"currency": "CNY", "cost_per_hour": 150, "cost_per_day": 2000, "error_rate": 0.02,
                  "pushgateway_stale": 86400}}))
    directory = tmp_path / "monitoring"
    proc = tb("stack", "init", str(directory), "--config", str(config), "--error-rate", "0.01",
              "--latency-p95", "12", "--ttft-p95", "1.3", "--slo-availability", "0.999", "--slo-latency", "10",
              "--min-requests", "50", "--budget-warning-ratio", "0.9", "--chat", "dingtalk", "--chat", "feishu")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 16 files" in proc.stdout
    alerts = (directory / "rules/alerts.yml").read_text()
    assert "ratio_rate5m > 0.01\n" in alerts  # the flag wins over the file's 0.02
    assert "/ 0.14 > 150" in alerts and "/ 0.14 > 2000" in alerts  # CNY budgets against the USD metric
    assert "time() - push_time_seconds > 86400" in alerts
    assert "max by (tenant, window) (tokenbooth_budget_used_ratio) >= 0.9\n" in alerts
    assert 'le="10.0"' in (directory / "rules/recording.yml").read_text()
    services = load(directory / "docker-compose.yml")["services"]
    assert set(services) == {"tokenbooth", "prometheus", "alertmanager", "pushgateway", "grafana"}
    assert "TOKENBOOTH_NOTIFY__FEISHU__URL" in services["tokenbooth"]["environment"]
    for volume in [v for s in services.values() for v in s.get("volumes", []) if v.startswith("./")]:
        assert (directory / volume.split(":")[0]).exists(), volume
    assert (directory / "tokenbooth/Dockerfile").exists() and (directory / "secrets/README.md").exists()

    proc = tb("stack", "check", str(directory))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("promtool check config", "promtool check rules", "rule unit tests", "amtool check-config",
                 "PromQL of the rules", "Grafana dashboards"):
        assert f"ok    {name}" in proc.stdout
    assert re.search(r"^(ok  |skip)  docker compose config", proc.stdout, re.M)
    assert proc.stdout.rstrip().endswith("all checks passed")


def test_init_does_not_overwrite_without_force(stack_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "stack"
    shutil.copytree(stack_dir, directory)
    (directory / "alertmanager.yml").write_text("# my edits\n")
    proc = tb("stack", "init", str(directory))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"tokenbooth: error: {directory} already has README.md, prometheus.yml")
    assert "pass --force to overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert (directory / "alertmanager.yml").read_text() == "# my edits\n"
    assert tb("stack", "init", str(directory), "--force").returncode == 0
    assert "receivers:" in (directory / "alertmanager.yml").read_text()


def test_bad_threshold_flag_is_one_line_naming_the_key(tmp_path: Path) -> None:
    proc = tb("stack", "init", str(tmp_path / "x"), "--slo-latency", "25")
    assert proc.returncode == 2
    assert proc.stderr.startswith("tokenbooth: error: Config 'stack.slo_latency' has value 25.0")
    assert not (tmp_path / "x").exists()


def test_check_says_what_is_wrong_in_plain_words(stack_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "stack"
    shutil.copytree(stack_dir, directory)
    # A threshold edited by hand without regenerating the tests (kept to the two cases it breaks).
    alerts = directory / "rules/alerts.yml"
    alerts.write_text(alerts.read_text().replace("ratio_rate5m > 0.05\n", "ratio_rate5m > 0.5\n"))
    tests = load(directory / "rules/tests.yml")
    tests["tests"] = [t for t in tests["tests"] if t["name"].startswith("TokenboothHighErrorRate")]
    (directory / "rules/tests.yml").write_text(yaml.safe_dump(tests))
    config = directory / "alertmanager.yml"
    config.write_text(config.read_text().replace("- receiver: finance", "- receiver: finance-team"))
    recording = directory / "rules/recording.yml"
    recording.write_text(recording.read_text().replace("tokenbooth_tokens_total[", "tokenbooth_token_total["))
    proc = tb("stack", "check", str(directory))
    assert proc.returncode == 1
    out = proc.stdout
    assert "FAIL  rule unit tests" in out and "alertname: TokenboothHighErrorRate" in out
    assert "FAIL  amtool check-config" in out and 'undefined receiver "finance-team"' in out
    assert "FAIL  PromQL of the rules" in out
    assert "uses 'tokenbooth_token_total', which is not a tokenbooth metric" in out
    assert "ok    Grafana dashboards" in out
    assert proc.stderr.strip().startswith("tokenbooth: error: 3 check(s) failed: rule unit tests, amtool check-config")


def test_prometheus_config_and_its_commented_examples_are_valid(stack_dir: Path, tmp_path: Path) -> None:
    text = (stack_dir / "prometheus.yml").read_text()
    config = load(stack_dir / "prometheus.yml")
    push = next(j for j in config["scrape_configs"] if j["job_name"] == "tokenbooth-pushgateway")
    assert push["honor_labels"] is True
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    uncommented = re.sub(r"^# (\s*(- |[a-z_]+:))", r"\1", text, flags=re.M)
    example = yaml.safe_load(uncommented)
    kubernetes = next(j for j in example["scrape_configs"] if j["job_name"] == "tokenbooth-kubernetes")
    assert kubernetes["kubernetes_sd_configs"] == [{"role": "pod"}]
    assert example["remote_write"][0]["url"].endswith("/api/v1/write")
    # Debian's promtool is built without Kubernetes discovery: check the rest with it.
    example["scrape_configs"].remove(kubernetes)
    (tmp_path / "rules").mkdir()
    for rel in ("rules/recording.yml", "rules/alerts.yml"):
        shutil.copy(stack_dir / rel, tmp_path / rel)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(example))
    for directory in (stack_dir, tmp_path):
        proc = run("promtool", ["check", "config", "prometheus.yml"], directory)
        assert proc.returncode == 0, proc.stdout


def _closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_stack_up_runs_local_binaries_and_stops_on_ctrl_c(stack_dir: Path, tmp_path: Path) -> None:
    for tool in ("prometheus", "alertmanager", "pushgateway"):
        need(tool)
    directory = tmp_path / "stack"
    shutil.copytree(stack_dir, directory)
    gateway = f"127.0.0.1:{free_port()}"
    ports = {name: free_port() for name in ("prometheus", "alertmanager", "pushgateway")}
    proc = subprocess.Popen([*TB, "stack", "up", str(directory), "--gateway", gateway,
                             *(f"--{name}-port={port}" for name, port in ports.items())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"prometheus http://127.0.0.1:{ports['prometheus']}"), line + proc.stderr.read()
        for name, port in ports.items():
            assert httpx.get(f"http://127.0.0.1:{port}/-/ready").status_code == 200, name
        prom = f"http://127.0.0.1:{ports['prometheus']}"
        loaded = httpx.get(f"{prom}/api/v1/status/config").json()["data"]["yaml"]
        assert f"- {gateway}" in loaded and f"- 127.0.0.1:{ports['alertmanager']}" in loaded
        rules = httpx.get(f"{prom}/api/v1/rules").json()["data"]["groups"]
        assert sum(len(g["rules"]) for g in rules) == sum(
            len(g["rules"]) for rel in ("recording", "alerts") for g in load(directory / f"rules/{rel}.yml")["groups"])
        status = httpx.get(f"http://127.0.0.1:{ports['alertmanager']}/api/v2/status").json()
        assert f"http://{gateway}/alertmanager/webhook/dingtalk" in status["config"]["original"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.rstrip().endswith("stopped")
    assert all(_closed(port) for port in ports.values())
    assert (directory / ".run" / "pushgateway.data").is_file()  # its own, not /var/lib/prometheus's


def test_stack_up_keeps_each_process_data_in_the_stack_directory(stack_dir: Path, tmp_path: Path) -> None:
    from tokenbooth.stack.up import LocalStack

    shutil.copytree(stack_dir, tmp_path / "stack")
    stack = LocalStack(tmp_path / "stack")
    commands = stack.commands(*stack.prepare())
    flags = {"prometheus": "--storage.tsdb.path=", "alertmanager": "--storage.path=",
             "pushgateway": "--persistence.file="}
    for name, flag in flags.items():
        (value,) = [arg.removeprefix(flag) for arg in commands[name] if arg.startswith(flag)]
        assert Path(value).parent == stack.run_dir, (name, value)


def test_a_missing_tool_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_tool("promtool")
    monkeypatch.setitem(tools._NAMES, "promtool", ("promtool-that-is-not-installed",))
    with pytest.raises(MissingTool, match="promtool is not installed: apt-get install prometheus "
                                          "prometheus-alertmanager prometheus-pushgateway"):
        find_tool("promtool")
