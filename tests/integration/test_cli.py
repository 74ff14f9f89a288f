"""The CLI end to end: real processes, real sockets, real signals."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import free_port
from tokenbooth.ledger.schema import calls

TB = [sys.executable, "-m", "tokenbooth.cli"]


def _wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not come up")


class Gateway:
    def __init__(self, tmp: Path, upstream: str, *extra: str, port: int | None = None) -> None:
        self.db = tmp / "ledger.db"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBOOTH_")}
        self.proc = subprocess.Popen(
            [*TB, "serve", "--upstream", upstream, "--port", str(self.port), "--db", f"sqlite:///{self.db}",
             *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        _wait_http(f"http://127.0.0.1:{self.port}/healthz", self.proc, timeout=60)

    def rows(self) -> list[sa.Row[tuple[str, str]]]:
        engine = sa.create_engine(f"sqlite:///{self.db}")
        with engine.connect() as conn:
            rows = conn.execute(sa.select(calls.c.request_id, calls.c.outcome)).all()
        engine.dispose()
        return list(rows)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


async def _load(url: str, total: int | None, concurrency: int, stop_after: float | None = None,
                answered: list[str] | None = None, keepalive: bool = True) -> tuple[list[str], int]:
    """Send chat calls; returns the request ids of answered (200) calls and the count of failed sends."""
    answered = [] if answered is None else answered
    failed = 0
    sent = 0
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    deadline = time.monotonic() + stop_after if stop_after else None
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=not keepalive)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal sent, failed
            while (total is None or sent < total) and (deadline is None or time.monotonic() < deadline):
                sent += 1
                try:
                    async with session.post(f"{url}/chat/completions", json=body) as resp:
                        await resp.read()
                        if resp.status == 200:
                            answered.append(resp.headers["x-request-id"])
                        else:
                            failed += 1
                except aiohttp.ClientError:
                    failed += 1
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answered, failed


def test_ten_thousand_calls_at_concurrency_64_give_ten_thousand_rows(tmp_path: Path, sim_url: str) -> None:
    gw = Gateway(tmp_path, sim_url)
    answered, failed = asyncio.run(_load(gw.url, 10_000, 64))
    code, err = gw.stop()
    assert (len(answered), failed) == (10_000, 0)
    assert code == 0, err
    rows = gw.rows()
    assert len(rows) == 10_000
    assert {r.request_id for r in rows} == set(answered)


def test_sigterm_under_load_loses_no_row_of_an_answered_call(tmp_path: Path, sim_url: str) -> None:
    gw = Gateway(tmp_path, sim_url)

    async def scenario() -> tuple[list[str], int]:
        answered: list[str] = []
        load = asyncio.create_task(_load(gw.url, None, 32, stop_after=6.0, answered=answered))
        deadline = time.monotonic() + 4
        while len(answered) < 300 and time.monotonic() < deadline:  # in the middle of load
            await asyncio.sleep(0.02)
        gw.proc.send_signal(signal.SIGTERM)
        return await load

    answered, _ = asyncio.run(scenario())
    code, err = gw.stop()
    assert code == 0, err
    assert len(answered) > 100
    ledger_ids = {r.request_id for r in gw.rows()}
    missing = set(answered) - ledger_ids
    assert not missing, f"{len(missing)} answered calls have no ledger row"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TB, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve"], "No upstreams configured"),
        (["serve", "--upstream", "ftp://x"], "Config 'upstreams.0.base_url' has value 'ftp://x'"),
        (["serve", "--upstream", "http://127.0.0.1:1/v1", "--port", "99999"], "Config 'port' has value 99999"),
        (["serve", "--config", "/nonexistent.yaml"], "cannot be read"),
        (["serve", "--upstream", "http://127.0.0.1:1/v1", "--db", "bogus://x"], "cannot be used"),
        (["report", "--db", "sqlite:////nonexistent/ledger.db"], "No ledger at"),
        (["report", "--by", "colour"], "invalid choice"),
        (["prices", "no-such-model-zz"], "No price known for model 'no-such-model-zz'"),
        (["prices", "gpt-4o", "--provider", "nosuchprov"], "Unknown provider 'nosuchprov'; known: "),
        (["ledger", "replay", "/nonexistent/spill.jsonl", "--db", "bogus://x"],
         "No spill file at '/nonexistent/spill.jsonl'"),
        (["report", "--since", "last-week"], "'last-week' is not a date; use YYYY-MM-DD, today or yesterday"),
        (["simulate", "--faults", "418x=0.1"], "unknown fault kind"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_errors_are_one_line_and_nonzero(args: list[str], message: str) -> None:
    result = _cli(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenbooth: error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_prices_shows_the_price_and_its_source(tmp_path: Path) -> None:
    out = _cli("prices", "gpt-4o", "--provider", "openai")
    assert out.returncode == 0, out.stderr
    assert "genai-prices" in out.stdout and "2.5 per 1M" in out.stdout and "1.25 per 1M" in out.stdout
    f = tmp_path / "p.yaml"
    f.write_text("models:\n  - model: relay-x\n    currency: CNY\n    input: 2\n    output: 8\n")
    out = _cli("prices", "relay-x", "--price-file", str(f))
    assert out.returncode == 0, out.stderr
    assert "price file" in out.stdout and "CNY" in out.stdout and "8 per 1M" in out.stdout


def _without_the_venv_on_path() -> dict[str, str]:
    """The environment of a shell that has not activated the virtualenv (as after ``make demo``)."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TOKENBOOTH_")}, "PATH": path}


def test_demo_runs_and_reports(tmp_path: Path) -> None:
    db = "sqlite:///demo.db"  # relative, as in the demo's default
    script = Path(sys.executable).parent / "tokenbooth"  # the console script `make demo` runs
    env = _without_the_venv_on_path()
    out = subprocess.run([str(script), "demo", "--duration", "4", "--port", "0", "--db", db],
                         capture_output=True, text=True, timeout=90, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "/metrics" in out.stdout and "TOTAL" in out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    assert "3 % get 429 with Retry-After" in out.stdout and "the errors you see are on purpose" in out.stdout
    hint = out.stdout.rstrip().splitlines()[-1].split("try: ", 1)[1]
    assert not hint.startswith("tokenbooth ") or shutil.which("tokenbooth", path=env["PATH"])
    shown = subprocess.run(hint, shell=True, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert shown.returncode == 0, (hint, shown.stderr)  # the hint works as printed, in the same shell
    header, *lines = shown.stdout.strip().splitlines()
    assert header.startswith("provider,requests") and {line.split(",")[0] for line in lines} >= {"openai"}


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("case", ["port in use", "bad price file", "bad ledger URL"])
def test_serve_refuses_with_one_line_before_printing_or_creating_anything(tmp_path: Path, case: str) -> None:
    busy = _listening()
    port = busy.getsockname()[1] if case == "port in use" else 0
    extra = {"port in use": ["--db", "sqlite:///ledger.db"],
             "bad price file": ["--price-file", "missing-prices.yaml"],
             "bad ledger URL": ["--db", "bogus://x"]}[case]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBOOTH_")}
    with busy:
        out = subprocess.run([*TB, "serve", "--upstream", "http://127.0.0.1:9/v1", "--port", str(port), *extra],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert out.returncode == 2 and out.stdout == "", out
    message = {"port in use": f"Cannot listen on 127.0.0.1:{port}: address already in use",
               "bad price file": "Price file 'missing-prices.yaml' cannot be read",
               "bad ledger URL": "Ledger URL 'bogus://x' cannot be used"}[case]
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"tokenbooth: error: {message}"), line
    assert list(tmp_path.iterdir()) == []  # no tokenbooth.db, no journal, nothing


def test_serve_warns_of_each_unset_upstream_key_and_keys_mode_refuses(tmp_path: Path) -> None:
    config = tmp_path / "tb.yaml"
    config.write_text("upstreams:\n  - {name: main, base_url: 'http://127.0.0.1:9/v1', api_key_env: TB_UNSET_KEY}\n"
                      f"ledger: {{url: 'sqlite:///{tmp_path / 'l.db'}'}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBOOTH_") and k != "TB_UNSET_KEY"}
    proc = subprocess.Popen([*TB, "serve", "--config", str(config), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().startswith("tokenbooth gateway on ")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert "tokenbooth: warning: upstream 'main' has api_key_env TB_UNSET_KEY, which is not set" in err
    keys = subprocess.run([*TB, "serve", "--config", str(config), "--port", "0"], capture_output=True, text=True,
                          timeout=60, env={**env, "TOKENBOOTH_AUTH__MODE": "keys"})
    assert keys.returncode == 2 and keys.stdout == ""
    (line,) = keys.stderr.splitlines()
    assert "TB_UNSET_KEY (upstream 'main') are not set" in line


def test_every_ledger_command_on_a_database_without_the_ledger_says_so_in_one_line(tmp_path: Path) -> None:
    import sqlite3

    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE unrelated (a)")
    (tmp_path / "spill.jsonl").write_text("{}\n")
    db = f"sqlite:///{tmp_path / 'other.db'}"
    for args in (["report"], ["report", "--by", "month", "--since", "today"], ["budgets"], ["keys", "list"],
                 ["keys", "revoke", "key_x"], ["ledger", "replay", str(tmp_path / "spill.jsonl")]):
        out = _cli(*args, "--db", db)
        assert out.returncode == 2, (args, out)
        (line,) = out.stderr.splitlines()
        assert line.startswith(f"tokenbooth: error: No ledger at '{db}': the database has no tokenbooth_calls"), line


def test_simulate_help_shows_every_default() -> None:
    out = _cli("simulate", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for shown in ("(default 127.0.0.1)", "(default 8000)", "(default 0)", "(default none)", "(default 1)",
                  "(default 30)", "a new one each run"):
        assert shown in text, shown
