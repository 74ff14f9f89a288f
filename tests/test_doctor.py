"""``tokenbooth doctor``'s own checks (config, upstreams, ledger, gateway) and its output, exit codes and
options. The monitoring checks run against real services in tests/integration/test_doctor_stack.py."""

from __future__ import annotations

import contextlib
import io
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.conftest import GatewayHandle, SimHandle, free_port
from tests.ledger.test_journal import _as_dead
from tokenbooth.cli import main
from tokenbooth.doctor import Finding, Report, all_checks, render_text
from tokenbooth.ledger.journal import Journal
from tokenbooth.ledger.schema import connect


def doctor(*args: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["doctor", "--json", *args])
    document = orjson.loads(out.getvalue()) if out.getvalue() else {"checks": []}
    return code, {f["id"]: f for f in document["checks"]}, err.getvalue()


def _config(tmp_path: Path, **values: Any) -> str:
    path = tmp_path / "tokenbooth.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.fixture(autouse=True)
def _alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No config from the environment, and the default paths (spill file, journal) in a temp directory."""
    monkeypatch.delenv("TOKENBOOTH_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


def test_an_invalid_config_fails_and_the_checks_that_need_it_do_not_run(tmp_path: Path) -> None:
    code, found, err = doctor("--config", _config(tmp_path, ledger={"batch_size": 0}))
    assert code == 1 and "config.valid" in err
    assert found["config.valid"]["status"] == "fail"
    assert "Config 'ledger.batch_size' has value 0" in found["config.valid"]["evidence"]
    assert found["config.prices"] == {**found["config.prices"], "status": "skip",
                                      "evidence": "not run: the config does not validate"}


def test_upstreams_are_called_and_each_failure_classified(tmp_path: Path, sim: SimHandle,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TB_DOCTOR_KEY", "sk-doctor")
    good = _config(tmp_path, upstreams=[{"name": "sim", "base_url": sim.url, "api_key_env": "TB_DOCTOR_KEY"}])
    code, found, _ = doctor("--config", good, "--skip", "gateway", "ledger", "tokens")  # neither is here
    assert code == 0, found
    assert found["upstreams.reachable"]["evidence"] == "GET /models answered: 'sim' 200"
    assert found["config.keys"]["status"] == "ok"
    monkeypatch.delenv("TB_DOCTOR_KEY")
    broken = _config(tmp_path, upstreams=[
        {"name": "closed", "base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key_env": "TB_DOCTOR_KEY"},
        {"name": "nxdomain", "base_url": "http://no-such-host.invalid/v1"}])
    code, found, _ = doctor("--config", broken, "--skip", "gateway", "ledger", "tokens")
    evidence = found["upstreams.reachable"]["evidence"]
    assert code == 1 and "'closed'" in evidence and "connection refused" in evidence
    assert "'nxdomain' http://no-such-host.invalid/v1/models: the host name does not resolve" in evidence
    assert found["config.keys"]["status"] == "warn" and "TB_DOCTOR_KEY, which is not set" in \
        found["config.keys"]["evidence"]


def test_a_database_without_the_ledger_fails_and_says_what_to_do(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE unrelated (a)")
    code, found, _ = doctor("--db", f"sqlite:///{tmp_path / 'other.db'}", "--skip", "upstreams")
    assert code == 1
    assert found["ledger.reachable"]["status"] == "fail"
    assert "has no tokenbooth_calls table" in found["ledger.reachable"]["evidence"]


def test_a_healthy_ledger_then_a_spill_file_and_an_unclean_shutdown_warn(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    connect(f"sqlite:///{db}").dispose()
    config = _config(tmp_path, ledger={"url": f"sqlite:///{db}"})
    code, found, _ = doctor("--config", config, "--skip", "gateway")
    assert code == 0, found
    assert found["ledger.reachable"]["evidence"].endswith("a write and rollback succeeded")
    assert found["tokens.mismatch"]["status"] == "ok"
    (tmp_path / "tokenbooth-ledger-spill.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    journal = Journal(Path(f"{db}.journal"))
    journal.begin()
    _as_dead(journal)
    code, found, _ = doctor("--config", config, "--skip", "gateway")
    assert code == 0  # warnings only
    assert found["ledger.spill"]["status"] == "warn" and "holds 2 row(s)" in found["ledger.spill"]["evidence"]
    assert found["ledger.spill"]["fix"] == f"tokenbooth ledger replay tokenbooth-ledger-spill.jsonl --config {config}"
    assert "up to 1 calls may be missing" in found["ledger.journal"]["evidence"]
    assert doctor("--config", config, "--strict", "--skip", "gateway")[0] == 1
    assert list(Path(f"{db}.journal").iterdir()), "doctor is read-only: the journal stays for the next start"
    code, found, _ = doctor("--config", config, "--strict", "--skip", "gateway", "ledger.spill", "ledger.journal")
    assert code == 0 and found["ledger.spill"]["evidence"] == "skipped (--skip)"


def test_a_running_gateway_passes_and_a_missing_one_fails(
        make_gateway: Callable[..., GatewayHandle], sim: SimHandle) -> None:
    gateway = make_gateway([{"name": "sim", "base_url": sim.url}])
    code, found, _ = doctor("--gateway", gateway.base)
    assert code == 0 and found["gateway.health"]["status"] == "ok"
    assert found["gateway.metrics"]["evidence"].startswith(f"{gateway.base}/metrics carries all ")
    code, found, _ = doctor("--gateway", f"127.0.0.1:{free_port()}")
    assert code == 1 and "connection refused" in found["gateway.health"]["evidence"]
    assert found["gateway.health"]["fix"] == "start it: tokenbooth serve --config FILE"


def test_text_output_marks_each_check_and_its_fix_without_colour_off_a_terminal() -> None:
    report = Report([Finding("a.one", "ok", "fine"), Finding("b.longer", "warn", "so-so", "do this"),
                     Finding("c", "fail", "broken", "do that"), Finding("d", "skip", "not run: no --d")])
    text = render_text(report, colour=False)
    assert text.splitlines() == ["✓ a.one     fine", "! b.longer  so-so", "            fix: do this",
                                 "✗ c         broken", "            fix: do that", "not run: d (no --d)",
                                 "1 ok, 1 warning(s), 1 failure(s)"]
    assert "\x1b[" not in text and "\x1b[31m✗" in render_text(report, colour=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        main(["doctor", "--skip", "upstreams"])  # stdout is not a terminal here
    assert "\x1b[" not in out.getvalue() and out.getvalue().startswith("✓ config.valid")


def test_json_has_the_documented_shape_and_an_unknown_skip_is_a_usage_error() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["doctor", "--json", "--skip", "upstreams"]) == 0
    document = orjson.loads(out.getvalue())
    assert set(document) == {"schema", "ok", "strict", "checks"} and document["schema"] == 1
    assert [c["id"] for c in document["checks"]] == [c.id for c in all_checks()]
    assert all(set(c) == {"id", "status", "evidence", "fix", "seconds"} for c in document["checks"])
    documented = Path(__file__).parents[1].joinpath("docs", "doctor.md").read_text(encoding="utf-8")
    assert all(f"`{c.id}`" in documented for c in all_checks())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["doctor", "--skip", "prometheus.nope"]) == 2
    assert "--skip prometheus.nope: no such check" in err.getvalue()


def test_redis_answers_ping_then_fails_once_stopped(tmp_path: Path, redis_server: Any) -> None:
    config = _config(tmp_path, redis={"url": redis_server.url})
    code, found, _ = doctor("--config", config, "--skip", "gateway", "ledger", "tokens")
    assert code == 0 and found["redis.ping"]["evidence"].startswith(f"redis://127.0.0.1:{redis_server.port}/0: PONG")
    redis_server.stop()
    code, found, _ = doctor("--config", config, "--skip", "gateway", "ledger", "tokens")
    assert code == 1 and "connection refused" in found["redis.ping"]["evidence"]
    assert found["redis.ping"]["fix"] == "start Redis, or correct redis.url"
