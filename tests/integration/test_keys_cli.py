"""`tokenbooth keys` and `tokenbooth budgets` as an operator types them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx

from tests.conftest import RedisServer
from tests.integration.conftest import TB
from tests.integration.test_replicas import Cluster


def _tb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TB, *args], capture_output=True, text=True, timeout=60)


def test_keys_create_list_and_revoke(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    made = _tb("keys", "create", "--tenant", "acme", "--name", "ci", "--budget", "50/month", "--budget",
               "300CNY/day:soft", "--rpm", "60", "--tpm", "100000", "--concurrency", "4", "--expires", "2030-01-01",
               "--db", db)
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    secret = lines[-1]
    assert secret.startswith("tb-") and " " not in secret
    key_id, prefix = lines[0].split()[2], lines[0].split()[4].rstrip(")")
    assert key_id.startswith("key_") and secret.startswith(prefix)
    listed = json.loads(_tb("keys", "list", "--format", "json", "--db", db).stdout)
    assert listed[0]["id"] == key_id and listed[0]["budgets"] == ["50USD/month", "300CNY/day:soft"]
    assert (listed[0]["rpm"], listed[0]["tpm"], listed[0]["concurrency"]) == (60, 100000, 4)
    assert listed[0]["expires"] == "2030-01-01 00:00:00" and listed[0]["revoked"] == "-"
    table = _tb("keys", "list", "--db", db).stdout
    assert key_id in table and prefix in table and secret not in table
    revoked = _tb("keys", "revoke", prefix, "--db", db)
    assert revoked.returncode == 0 and key_id in revoked.stdout
    assert json.loads(_tb("keys", "list", "--format", "json", "--db", db).stdout)[0]["revoked"] != "-"


def test_keys_errors_are_one_line_and_exit_non_zero(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert _tb("keys", "create", "--tenant", "a", "--db", db).returncode == 0
    for args, words in ((["keys", "create", "--tenant", "a", "--budget", "5/week", "--db", db], "--budget '5/week'"),
                        (["keys", "create", "--tenant", "a", "--rpm", "0", "--db", db], "--rpm"),
                        (["keys", "create", "--tenant", "a", "--budget", "5EUR/day", "--db", db], "pricing.fx.EUR"),
                        (["keys", "create", "--tenant", "a", "--expires", "soon", "--db", db], "not a date"),
                        (["keys", "create", "--db", db], "--tenant"),
                        (["keys", "revoke", "key_nope", "--db", db], "no key"),
                        (["keys", "list", "--db", f"sqlite:///{tmp_path / 'none.db'}"], "No ledger")):
        result = _tb(*args)
        assert result.returncode != 0, args
        assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_budgets_shows_limit_spent_reserved_remaining_and_reset(tmp_path: Path, sim_url: str, pg_url: str,
                                                                redis_server: RedisServer) -> None:
    c = Cluster(tmp_path, sim_url, pg_url, redis_server.url, tenants="  acme: {budgets: ['1/month', '2/day:soft']}\n")
    try:
        _, secret = c.key("acme", "--budget", "0.5/total")
        import time

        time.sleep(1)
        for _ in range(3):
            r = httpx.post(f"{c.replicas[0].base}/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                           json={"model": "flat-model", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
    finally:
        c.stop()
    out = _tb("budgets", "--config", str(c.config), "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = {(r["scope"].split(" (")[0], r["window"]): r for r in json.loads(out.stdout)}
    month = rows[("tenant 'acme'", "month")]
    assert (month["limit"], month["spent"], month["reserved"], month["remaining"]) == ("1", "0.15", "0", "0.85")
    assert month["mode"] == "hard" and month["resets"].endswith("00:00:00 UTC")
    assert rows[("tenant 'acme'", "day")]["mode"] == "soft"
    total = next(r for (scope, w), r in rows.items() if scope.startswith("key ") and w == "total")
    assert (total["spent"], total["remaining"], total["resets"]) == ("0.15", "0.35", "never")
    table = _tb("budgets", "--config", str(c.config)).stdout
    assert "tenant 'acme'" in table and "0.85" in table
