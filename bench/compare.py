"""Side by side: direct, through tokenbooth and through LiteLLM's proxy, on one simulated upstream.

    python bench/compare.py [--duration 10] [--repeat 3] [--scenarios chat-c1 ...] [--skip-litellm]

Needs wrk (Debian package ``wrk``). The simulated upstream (``tokenbooth simulate``, 0 ms
latency) answers at once, so what a gateway adds is the gateway's. Both gateways are pinned
to CPU 0; wrk and the upstream share CPU 1 (where the machine has two CPUs and taskset).

- tokenbooth: ``tokenbooth serve --upstream SIM`` with metering and an SQLite ledger (the defaults).
- LiteLLM: its proxy, installed from PyPI into ``bench/.venv-litellm`` on the first run
  (``litellm[proxy]`` plus ``prometheus_client``), one uvicorn worker, no database, its
  Prometheus callback on, the log level its production guide recommends (``LITELLM_LOG=ERROR``).

Every scenario runs ``--repeat`` times, interleaved (direct, tokenbooth, LiteLLM, again), and
the medians are reported. Figures: requests/s, p50/p99 latency (wrk, whole response: for a
stream, until its last byte), added latency against direct, gateway CPU per request (user +
system over the gateway's process tree, from /proc) and RSS after load. The table is printed
and written to ``bench/RESULTS.md`` with versions, settings and the targets met or not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _common import (
    GATEWAY_CPU,
    Processes,
    can_pin,
    exit_on_sigterm,
    free_port,
    pinned,
    run_wrk,
    start_simulator,
    start_tokenbooth,
    tree_cpu_seconds,
    tree_rss_mb,
    wait_up,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LITELLM_VENV = HERE / ".venv-litellm"
LITELLM_PACKAGES = ("prometheus_client",)  # the proxy's Prometheus callback needs it; litellm[proxy] lacks it

CHAT = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":16}'
STREAM = CHAT[:-1] + ',"stream":true}'
EMBED = '{"model":"text-embedding-3-small","input":"Say hello to the benchmark."}'

# SIM_URL is replaced by the simulated upstream's /v1 URL; the master key comes from the environment.
LITELLM_CONFIG = """\
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: SIM_URL
      api_key: sk-simulated
  - model_name: text-embedding-3-small
    litellm_params:
      model: openai/text-embedding-3-small
      api_base: SIM_URL
      api_key: sk-simulated
litellm_settings:
  callbacks: ["prometheus"]
  request_timeout: 600
  set_verbose: false
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
"""
LITELLM_ENV = {  # from LiteLLM's "Best Practices for Production"; DATABASE_URL is removed
    "LITELLM_LOG": "ERROR",  # no per-request info logs
    "LITELLM_MODE": "PRODUCTION",  # no load_dotenv()
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the bundled cost map: no fetch from GitHub at start
}


@dataclass(frozen=True)
class Scenario:
    """One row of the table: a request body sent at a fixed concurrency."""

    name: str
    kind: str
    path: str
    body: str
    concurrency: int
    streamed: bool = False


SCENARIOS = {s.name: s for s in (
    Scenario("chat-c1", "chat", "/chat/completions", CHAT, 1),
    Scenario("chat-c16", "chat", "/chat/completions", CHAT, 16),
    Scenario("chat-c64", "chat", "/chat/completions", CHAT, 64),
    Scenario("stream-c16", "chat, streamed", "/chat/completions", STREAM, 16, streamed=True),
    Scenario("embeddings-c16", "embeddings", "/embeddings", EMBED, 16),
)}


@dataclass
class Target:
    """Where wrk sends the calls: the upstream itself, or a gateway whose process tree is measured."""

    name: str
    url: str
    pid: int | None = None


@dataclass
class Row:
    """The runs of one scenario against every target, and each gateway's RSS after them."""

    scenario: Scenario
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)

    def median(self, target: str, key: str) -> float | None:
        runs = self.runs.get(target)
        return statistics.median(r[key] for r in runs) if runs else None

    def added(self, target: str, key: str) -> float | None:
        """Median over runs of (gateway − direct), each pair taken back to back."""
        runs, direct = self.runs.get(target), self.runs.get("direct")
        if not runs or not direct:
            return None
        return statistics.median(r[key] - d[key] for r, d in zip(runs, direct, strict=True))


# -- LiteLLM ----------------------------------------------------------------------------------
def ensure_litellm(spec: str) -> Path:
    """Create ``bench/.venv-litellm`` and install ``spec`` into it unless that is already done;
    returns the venv's python."""
    python = LITELLM_VENV / "bin" / "python"
    marker = LITELLM_VENV / ".bench-installed"
    wanted = " ".join((spec, *LITELLM_PACKAGES))
    if python.exists() and (LITELLM_VENV / "bin" / "litellm").exists() and \
            marker.exists() and marker.read_text() == wanted:
        return python
    print(f"installing {wanted} into {LITELLM_VENV.relative_to(ROOT)} (a minute or two, once) ...",
          file=sys.stderr, flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    spec, *LITELLM_PACKAGES], check=True)
    marker.write_text(wanted)
    return python


def litellm_command(port: int, config: Path) -> list[str]:
    """The proxy's command line: one uvicorn worker (its default, and what its guide advises)."""
    return [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1"]


def start_litellm(procs: Processes, sim_url: str, tmp: Path, master_key: str) -> tuple[int, str]:
    """Start the proxy on the gateway CPU, its output in ``tmp/litellm.log``; returns its pid and
    its ``/v1`` URL once it is up."""
    config = tmp / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.replace("SIM_URL", sim_url))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DIRECT_URL")}
    env.update(LITELLM_ENV, LITELLM_MASTER_KEY=master_key)
    port = free_port()
    log = tmp / "litellm.log"
    with log.open("w") as out:
        proc = procs.start(pinned(GATEWAY_CPU, litellm_command(port, config)), env=env, cwd=tmp,
                           stdout=out, stderr=subprocess.STDOUT, grace=30)
    wait_up(f"http://127.0.0.1:{port}/health/liveliness", timeout=180, proc=proc, log=log)
    return proc.pid, f"http://127.0.0.1:{port}/v1"


# -- measuring --------------------------------------------------------------------------------
def smoke(target: Target, scenario: Scenario, headers: dict[str, str]) -> None:
    """One call before the load: the answer must be a 200 of the expected shape."""
    r = httpx.post(target.url + scenario.path, content=scenario.body, timeout=60,
                   headers={**headers, "content-type": "application/json"})
    ok = r.status_code == 200 and (
        r.text.rstrip().endswith("data: [DONE]") if scenario.streamed
        else ("choices" if scenario.path == "/chat/completions" else "data") in r.json())
    if not ok:
        raise SystemExit(f"{target.name} {scenario.path}: HTTP {r.status_code}, not a valid answer:\n{r.text[:500]}")


def measure(scenario: Scenario, targets: Sequence[Target], duration: float, repeat: int, tmp: Path,
            headers: dict[str, str]) -> Row:
    """Warm up, then ``repeat`` interleaved wrk runs per target; CPU from /proc around each run."""
    row = Row(scenario, {t.name: [] for t in targets})
    for t in targets:
        smoke(t, scenario, headers)
        run_wrk(t.url + scenario.path, scenario.body, scenario.concurrency, min(2, duration), tmp, headers)
    for i in range(repeat):
        for t in targets:  # interleaved, so drift on a shared machine hits every target alike
            before = tree_cpu_seconds(t.pid) if t.pid else 0.0
            result = run_wrk(t.url + scenario.path, scenario.body, scenario.concurrency, duration, tmp, headers)
            if t.pid:
                result["cpu_ms"] = (tree_cpu_seconds(t.pid) - before) * 1000 / max(result["requests"], 1)
            row.runs[t.name].append(result)
            print(f"  {scenario.name} run {i + 1}/{repeat} {t.name}: {result['rps']:.0f} rps, "
                  f"p50 {result['p50']:.3f} ms, p99 {result['p99']:.3f} ms"
                  + (f", {result['cpu_ms']:.3f} CPU ms/req" if t.pid else "")
                  + (f", {result['errors']:.0f} ERRORS" if result["errors"] else ""), file=sys.stderr, flush=True)
    row.rss = {t.name: tree_rss_mb(t.pid) for t in targets if t.pid}
    return row


def metric_sum(url: str, name: str, headers: dict[str, str], labels: str = "") -> float | None:
    """Sum of the samples of ``name`` (whose labels contain ``labels``) at a /metrics URL."""
    try:
        text = httpx.get(url, headers=headers, timeout=10, follow_redirects=True).text
    except httpx.HTTPError:
        return None
    values = [float(m.group(2)) for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)
              if labels in (m.group(1) or "")]
    return sum(values) if values else None


def litellm_prometheus_status(counted: float | None, gated: float | None) -> str:
    """What LiteLLM's /metrics/ showed about its Prometheus callback, as a sentence for RESULTS.md."""
    if gated:
        return ("**The Prometheus callback is gated behind LiteLLM's enterprise licence in this version**: "
                f"`/metrics/` counted {gated:.0f} calls in `litellm_not_a_premium_user_metric`; the callback "
                "was configured and ran, but its metrics are the licence-gated ones.")
    if counted:
        return ("The Prometheus callback was on and not gated behind an enterprise licence in this version "
                f"(older versions logged \"Prometheus Metrics is on LiteLLM Enterprise\"): `/metrics/` "
                f"counted {counted:.0f} calls in `litellm_proxy_total_requests_metric_total`, with its "
                "latency, token and spend series beside it.")
    return ("**The Prometheus callback was configured but `/metrics/` served no "
            "`litellm_proxy_total_requests_metric_total`**: check the LiteLLM log.")


# -- the report -------------------------------------------------------------------------------
def _n(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    digits = 3 if abs(value) < 1 else 2 if abs(value) < 100 else 0
    return f"{value:.{digits}f}{unit}"


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0.005:
        return "n/a"
    return f"{num / den:.1f}×"


def table(rows: Sequence[Row], names: Sequence[str]) -> str:
    """The markdown table: one line per scenario, each cell 'direct / tokenbooth / LiteLLM'."""
    gws = [n for n in names if n != "direct"]
    short = {"direct": "direct", "tokenbooth": "tb", "litellm": "LiteLLM"}
    both = " / ".join(short[n] for n in names)
    only = " / ".join(short[n] for n in gws)
    head = (f"| scenario | conc | rps ({both}) | p50 ms ({both}) | p99 ms ({both}) | added p50 ms ({only}) "
            f"| added p99 ms ({only}) | CPU ms/req ({only}) | RSS MB after ({only}) ")
    lines = []
    has_litellm = "litellm" in gws
    if has_litellm:
        head += "| LiteLLM ÷ tb: CPU/req, added p50, added p99 "
    head += f"| errors ({both}) |"
    lines.append(head)
    lines.append("|" + "---|" * (head.count("|") - 1))

    def cells(values: Sequence[float | None], fmt: Callable[[float | None], str] = _n) -> str:
        return " / ".join(fmt(v) for v in values)

    def whole(value: float | None) -> str:
        return "—" if value is None else f"{value:.0f}"

    for row in rows:
        s = row.scenario
        line = (f"| {s.kind} | {s.concurrency} "
                f"| {cells([row.median(n, 'rps') for n in names], whole)} "
                f"| {cells([row.median(n, 'p50') for n in names])} "
                f"| {cells([row.median(n, 'p99') for n in names])} "
                f"| {cells([row.added(n, 'p50') for n in gws])} "
                f"| {cells([row.added(n, 'p99') for n in gws])} "
                f"| {cells([row.median(n, 'cpu_ms') for n in gws])} "
                f"| {cells([row.rss.get(n) for n in gws], whole)} ")
        if has_litellm:
            line += ("| " + ", ".join((
                _ratio(row.median("litellm", "cpu_ms"), row.median("tokenbooth", "cpu_ms")),
                _ratio(row.added("litellm", "p50"), row.added("tokenbooth", "p50")),
                _ratio(row.added("litellm", "p99"), row.added("tokenbooth", "p99")))) + " ")
        line += f"| {cells([sum(x['errors'] for x in row.runs[n]) for n in names], whole)} |"
        lines.append(line)
    return "\n".join(lines)


def targets_table(rows: Sequence[Row], has_litellm: bool) -> str:
    """The bars from issue 7, for tokenbooth, with LiteLLM's figure alongside for reference."""
    by_name = {r.scenario.name: r for r in rows}

    def added(name: str, key: str) -> Callable[[str], tuple[float, str] | None]:
        def get(gw: str) -> tuple[float, str] | None:
            row = by_name.get(name)
            value = row.added(gw, key) if row else None
            return None if value is None else (value, f"{value:.3f} ms")
        return get

    def worst_cpu(streamed: bool) -> Callable[[str], tuple[float, str] | None]:
        def get(gw: str) -> tuple[float, str] | None:
            found = [(v, r.scenario) for r in rows if r.scenario.streamed == streamed
                     and (v := r.median(gw, "cpu_ms")) is not None]
            if not found:
                return None
            value, where = max(found, key=lambda f: f[0])
            worst = f", the highest of {len(found)} scenarios" if len(found) > 1 else ""
            return value, f"{value:.3f} ms ({where.kind} c{where.concurrency}{worst})"
        return get

    def max_rss(gw: str) -> tuple[float, str] | None:
        found = [(r.rss[gw], r.scenario) for r in rows if gw in r.rss]
        if not found:
            return None
        value, where = max(found, key=lambda f: f[0])
        return value, f"{value:.0f} MB (after {where.kind} c{where.concurrency})"

    bars: list[tuple[str, float, str, Callable[[str], tuple[float, str] | None]]] = [
        ("added p50 latency, chat at concurrency 1", 0.3, "< 0.3 ms", added("chat-c1", "p50")),
        ("added p99 latency, chat at concurrency 1", 2.0, "< 2 ms", added("chat-c1", "p99")),
        ("gateway CPU per non-streaming call", 0.4, "< 0.4 ms", worst_cpu(streamed=False)),
        ("gateway CPU per streamed call", 0.5, "< 0.5 ms", worst_cpu(streamed=True)),
        ("RSS after load", 100.0, "< 100 MB", max_rss),
    ]
    lines = ["| target | bar | tokenbooth | met? |" + (" LiteLLM (for reference) |" if has_litellm else ""),
             "|---|---|---|---|" + ("---|" if has_litellm else "")]
    for label, limit, bar, get in bars:
        tb = get("tokenbooth")
        met = "not measured" if tb is None else "**met**" if tb[0] < limit else "**not met**"
        line = f"| {label} | {bar} | {tb[1] if tb else '—'} | {met} |"
        if has_litellm:
            ll = get("litellm")
            line += f" {ll[1] if ll else '—'} |"
        lines.append(line)
    return "\n".join(lines)


def _dist(names: Sequence[str], python: Path | None = None) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return 'not installed'\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    if python is None:
        out: dict[str, str] = {}
        for n in names:
            try:
                out[n] = importlib.metadata.version(n)
            except importlib.metadata.PackageNotFoundError:
                out[n] = "not installed"
        return out
    done = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


def environment(litellm_python: Path | None) -> list[str]:
    """Markdown lines: versions and machine."""
    ours = _dist(["tokenbooth", "aiohttp", "uvicorn", "uvloop", "prometheus-client", "sqlalchemy"])
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    lines = [f"- Python {platform.python_version()}; tokenbooth {ours.pop('tokenbooth')} with "
             + ", ".join(f"{k} {v}" for k, v in ours.items())]
    if litellm_python is not None:
        theirs = _dist(["litellm", "uvicorn", "fastapi", "aiohttp", "httpx", "openai", "prometheus_client",
                        "uvloop"], litellm_python)
        py = subprocess.run([str(litellm_python), "-c", "import platform; print(platform.python_version())"],
                            capture_output=True, text=True, check=True).stdout.strip()
        lines.append(f"- LiteLLM {theirs.pop('litellm')} (Python {py}, `bench/.venv-litellm`) with "
                     + ", ".join(f"{k} {v}" for k, v in theirs.items()))
    lines += [
        f"- {wrk[0] if wrk else 'wrk'}",
        f"- machine: `nproc` = {len(os.sched_getaffinity(0))}, {cpu}, Linux {platform.release()}, "
        f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "- pinning: " + (f"gateways on CPU {GATEWAY_CPU} (`taskset -c {GATEWAY_CPU}`), wrk and the simulated "
                         "upstream on CPU 1" if can_pin() else "none (taskset missing or a single CPU)"),
    ]
    return lines


def _rel(path: str) -> str:
    try:
        return str(Path(path).absolute().relative_to(ROOT))
    except ValueError:
        return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario and target; medians are reported")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS),
                        metavar="NAME", help=f"scenarios to run (default all: {' '.join(SCENARIOS)})")
    parser.add_argument("--skip-litellm", action="store_true", help="only direct and tokenbooth")
    parser.add_argument("--litellm-spec", default="litellm[proxy]",
                        help="what pip installs for LiteLLM (default %(default)s; pin with litellm[proxy]==X)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="where to write the results")
    parser.add_argument("--note", default="", help="a remark for RESULTS.md, e.g. about the machine's state")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    scenarios = [SCENARIOS[n] for n in SCENARIOS if n in args.scenarios]
    names = ["direct", "tokenbooth"] + ([] if args.skip_litellm else ["litellm"])
    litellm_python = None if args.skip_litellm else ensure_litellm(args.litellm_spec)
    estimate = len(scenarios) * len(names) * (min(2, args.duration) + args.repeat * args.duration) + 30
    print(f"# {len(scenarios)} scenarios × {len(names)} targets × {args.repeat} runs of {args.duration:g} s: "
          f"about {estimate / 60:.0f} min", file=sys.stderr, flush=True)
    command = shlex.join([_rel(sys.executable), _rel(sys.argv[0]), *sys.argv[1:]])
    started = time.monotonic()
    env_lines = environment(litellm_python)
    master_key = f"sk-{secrets.token_hex(32)}"
    headers = {"Authorization": f"Bearer {master_key}"}  # sent to every target alike; only LiteLLM checks it

    with exit_on_sigterm(), tempfile.TemporaryDirectory() as tmpdir, Processes() as procs:
        tmp = Path(tmpdir)
        sim_url = start_simulator(procs)
        gw, gw_url = start_tokenbooth(procs, sim_url, tmp / "ledger.db", log=tmp / "tokenbooth.log")
        targets = [Target("direct", sim_url), Target("tokenbooth", gw_url, gw.pid)]
        if litellm_python is not None:
            pid, url = start_litellm(procs, sim_url, tmp, master_key)
            targets.append(Target("litellm", url, pid))
        rows = []
        for scenario in scenarios:
            rows.append(measure(scenario, targets, args.duration, args.repeat, tmp, headers))
        time.sleep(1)  # the ledger flushes every 0.2 s; LiteLLM logs success events after the response
        tb_metrics = gw_url.removesuffix("/v1") + "/metrics"
        checks = {
            "tokenbooth requests metered": metric_sum(tb_metrics, "tokenbooth_requests_total", {}),
            "tokenbooth ledger rows written (metric)": metric_sum(
                tb_metrics, "tokenbooth_ledger_rows_total", {}, 'result="written"'),
        }
        prometheus = ""
        if litellm_python is not None:
            ll_metrics = targets[-1].url.removesuffix("/v1") + "/metrics/"
            counted = metric_sum(ll_metrics, "litellm_proxy_total_requests_metric_total", headers)
            gated = metric_sum(ll_metrics, "litellm_not_a_premium_user_metric_total", headers)
            checks["LiteLLM requests counted by its Prometheus callback"] = counted
            prometheus = litellm_prometheus_status(counted, gated)
        procs.stop(gw)  # SIGTERM: the gateway writes every ledger row before it exits
        with sqlite3.connect(tmp / "ledger.db") as db:
            checks["tokenbooth ledger rows in SQLite after shutdown"] = db.execute(
                "SELECT count(*) FROM tokenbooth_calls").fetchone()[0]

    completed = {n: sum(r["requests"] for row in rows for r in row.runs[n]) for n in names}
    result = table(rows, names)
    print(result)
    write_results(args, command, env_lines, rows, names, result, checks, completed, prometheus,
                  time.monotonic() - started)
    print(f"\nwritten to {_rel(str(args.output))}", file=sys.stderr)


def write_results(args: argparse.Namespace, command: str, env_lines: list[str], rows: Sequence[Row],
                  names: Sequence[str], result: str, checks: dict[str, float | None],
                  completed: dict[str, float], prometheus: str, elapsed: float) -> None:
    """Write RESULTS.md: what ran, on what, the table, how to read it, the targets."""
    has_litellm = "litellm" in names
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Side-by-side benchmark: direct, tokenbooth, LiteLLM",
        "",
        f"Generated by `bench/compare.py` on {now} in {elapsed / 60:.1f} min. "
        f"Median of {args.repeat} interleaved run(s) of {args.duration:g} s per scenario and target.",
    ]
    if args.note:
        out += ["", f"> **Note:** {args.note}"]
    out += ["", "```sh", command, "```", "", "## Versions and machine", "", *env_lines, "",
            "## What runs", "",
            "- **upstream**: `tokenbooth simulate --port 0 --seed 1` (0 ms latency, no faults), on CPU 1.",
            "- **direct**: wrk against the simulated upstream itself.",
            "- **tokenbooth**: `tokenbooth serve --upstream SIM --port P --db sqlite:///TMP/ledger.db "
            "--log-level warning`: metering (Prometheus metrics, pricing, token reconciliation) and the "
            "SQLite ledger on, every setting at its default"
            + (" except what the environment set: " + ", ".join(
                f"`{k}={v}`" for k, v in sorted(os.environ.items()) if k.startswith("TOKENBOOTH_"))
               if any(k.startswith("TOKENBOOTH_") for k in os.environ) else "") + "."]
    if has_litellm:
        out += [
            f"- **LiteLLM**: `pip install '{args.litellm_spec}' {' '.join(LITELLM_PACKAGES)}` into "
            "`bench/.venv-litellm`, then `litellm --config litellm.yaml --host 127.0.0.1 --port P --num_workers 1` "
            "(one uvicorn worker on uvloop, LiteLLM's defaults otherwise) with this environment: "
            + ", ".join(f"`{k}={v}`" for k, v in LITELLM_ENV.items())
            + ", `LITELLM_MASTER_KEY=sk-<64 random hex digits>` (this version refuses to start without a master "
            "key, so every call carries `Authorization: Bearer <key>`; direct and tokenbooth get the same "
            "header), no `DATABASE_URL` (no database: no spend logs, no virtual keys). `litellm.yaml`:",
            "", "```yaml", LITELLM_CONFIG.replace("SIM_URL", "http://127.0.0.1:SIM_PORT/v1").rstrip(), "```", "",
            "  " + prometheus,
        ]
    out += ["- **load**: `wrk -t1 -cN -dDs --timeout 30s --latency -s post.lua URL` on CPU 1; the Lua script "
            "sets the method, `Content-Type`, the `Authorization` header and the body.",
            "- **bodies**: chat `" + CHAT + "`; streamed chat adds `\"stream\":true` (no `stream_options`: "
            "tokenbooth asks the upstream for usage and strips it from what the client sees); embeddings `"
            + EMBED + "`.",
            "", "## Results", "", result, "",
            "## How to read it", "",
            "- Each cell lists its figures in the order of the column heading (`tb` is tokenbooth).",
            "- **rps**: requests/s wrk completed with N connections, each sending its next call when the last "
            "one is answered (a closed loop). Past concurrency 1 a gateway is saturated on its single core, so "
            "its rps is its throughput on one core and its latency mostly queueing.",
            "- **p50/p99**: wrk's latency percentiles over the whole response; for a stream, until its last "
            "byte, not the time to first token.",
            "- **added**: the gateway's percentile minus the direct one, taken pairwise from back-to-back runs, "
            "median over the runs. The direct path is wrk → upstream on one core; through a gateway the "
            "gateway has a core of its own, so small negative values are possible.",
            "- **CPU ms/req**: user + system CPU of the gateway's whole process tree (from `/proc/PID/stat`, "
            "10 ms ticks) during a run, divided by the requests completed in it: request handling, metrics, "
            "ledger thread and garbage collection included.",
            "- **RSS MB after**: resident memory of the gateway's process tree after the scenario's last run.",
            "- **LiteLLM ÷ tb**: how many times tokenbooth's figure LiteLLM's is (`n/a` when tokenbooth's is "
            "zero or below).",
            "- **errors**: non-2xx answers plus socket errors over all measured runs; they should be 0.",
            "- The machine is shared: compare figures within one run, and rerun with a longer `--duration` "
            "and more `--repeat` when the spread matters.",
            "", "## Targets (issue 7)", "", targets_table(rows, has_litellm), "",
            "## Checks", "",
            "| check | count |", "|---|---|"]
    out += [f"| requests completed by wrk in measured runs, {n} | {completed[n]:.0f} |" for n in names]
    out += [f"| {k} | {'—' if v is None else f'{v:.0f}'} |" for k, v in checks.items()]
    out += ["", "Gateway counts include warm-up runs and one check call per scenario, and calls still in "
            "flight when a wrk run ended; with no losses, ledger rows = requests metered.", ""]
    args.output.write_text("\n".join(out))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the servers are already stopped: Processes saw to it
        sys.exit("interrupted")
