"""Fuzz the gateway with Schemathesis over OpenAI's own OpenAPI spec: does it ever fail by itself?

    .venv/bin/pip install schemathesis          # a tool for this run, not a tokenbooth dependency
    git --git-dir=MIRROR show HEAD:openapi.yaml > /tmp/openapi.yaml   # github.com/openai/openai-openapi
    .venv/bin/python bench/fuzz_openapi.py --spec /tmp/openapi.yaml

The script starts the simulated upstream and a gateway in front of it (metering and an SQLite
ledger on, as ``tokenbooth serve --upstream`` runs), then ``schemathesis run`` against the
gateway's ``/v1`` (the spec's ``servers`` entry, api.openai.com, is overridden) for the
operations in :data:`OPERATIONS`: the gateway's own endpoints, ``/models``, and a few it passes
through. Each operation gets at most ``--max-examples`` test cases per phase (the coverage phase
adds its own finite set), positive and negative, with the ``not_a_server_error`` check.

A 5xx is the gateway's own when the gateway rendered it: an OpenAI error body of one of the 5xx
classes in ``tokenbooth/errors.py`` (``upstream_unreachable``, ``upstream_timeout``, ...), or
uvicorn's plain ``Internal Server Error`` for an exception nothing handled. Any other 5xx is
the upstream's, passed through as it was. The gateway must also be alive at the end and its
log free of Tracebacks.

The report: per operation, the requests sent, the status codes, how many got a ledger row
(joined on ``x-request-id``), and the commonest 4xx messages; every gateway 5xx with a curl
command that repeats it; Tracebacks in the gateway's log; what the simulated upstream could not
handle (requests the gateway forwarded that it choked on); ledger rows against the calls the
upstream counted. Schemathesis's reports (HAR, JSON) and both logs stay in ``--out``.
Exit status 1 when the gateway answered a 5xx of its own, left a request unanswered, died, or
logged a Traceback.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from _common import Processes, exit_on_sigterm, start_simulator, start_tokenbooth

from tokenbooth.errors import TokenboothError, UpstreamStatusError

# What the gateway serves, as the spec names it: its own endpoints, /models, and pass-through ones.
OPERATIONS = (
    "POST /chat/completions",
    "POST /completions",
    "POST /embeddings",
    "POST /responses",
    "GET /models",
    "GET /models/{model}",
    "POST /moderations",
    "GET /files",
    "POST /files",
    "GET /responses/{response_id}",
    "POST /responses/input_tokens",
)
PROBES = "other methods on these paths"  # Schemathesis's unsupported_method probes, one row for all
CLIENT_KEY = "sk-fuzz"  # open mode forwards it upstream; the simulator accepts any key
# request headers a repeating curl command does not need
_CURL_SKIP = {"user-agent", "accept-encoding", "accept", "connection", "content-length", "x-schemathesis-testcaseid"}
_INLINE_BODY = 2000  # longer bodies go to a file beside the report


def gateway_error_kinds() -> set[tuple[str, str | None]]:
    """``(type, code)`` of every error body the gateway renders with a 5xx status.

    >>> ("upstream_error", "upstream_unreachable") in gateway_error_kinds()
    True
    """
    kinds, todo = set(), [TokenboothError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.status_code >= 500 and not issubclass(cls, UpstreamStatusError):  # that one is the upstream's
            kinds.add((cls.openai_type, cls.code))
    return kinds


def origin(content_type: str, text: str, own: set[tuple[str, str | None]]) -> str | None:
    """Who produced a 5xx answer: a ``gateway: ...`` label, or None for the upstream's own."""
    if content_type.startswith("text/plain") and text.strip() == "Internal Server Error":
        return "gateway: unhandled exception (uvicorn's 500)"
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(error, dict) and (error.get("type"), error.get("code")) in own:
        return f"gateway: {error.get('code') or error.get('type')}"
    return None


@dataclass
class Operation:
    """What one operation saw over the run."""

    requests: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    metered: int = 0
    upstream_5xx: int = 0
    messages: collections.Counter[str] = field(default_factory=collections.Counter)


def _matcher(names: Iterable[str]) -> list[tuple[str, str, re.Pattern[str]]]:
    # literal paths first, so /responses/input_tokens is not taken for /responses/{response_id}
    rows = [(name.split(" ", 1)[0], name.split(" ", 1)[1], name) for name in names]
    rows.sort(key=lambda r: "{" in r[1])
    return [(method, name, re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$"))
            for method, path, name in rows]


def operation_of(method: str, path: str, matcher: list[tuple[str, str, re.Pattern[str]]]) -> str:
    """The operation a request belongs to; Schemathesis's probes with other methods are grouped apart."""
    same_path = [(op_method, name) for op_method, name, pattern in matcher if pattern.match(path)]
    for op_method, name in same_path:
        if op_method == method:
            return name
    if same_path:
        return PROBES
    return f"{method} {path} [outside the selection]"


def curl(request: dict[str, Any], out: Path, index: int) -> str:
    """A shell command repeating one HAR request against ``$GW`` (the gateway's origin)."""
    parts = ["curl", "-sS", "-i", "-X", request["method"]]
    for header in request["headers"]:
        name = header["name"]
        if name.lower() in _CURL_SKIP:
            continue
        value = f"Bearer {CLIENT_KEY}" if name.lower() == "authorization" else header["value"]
        parts += ["-H", f"{name}: {value}"]
    text = (request.get("postData") or {}).get("text")
    if text:
        if len(text) > _INLINE_BODY or text.startswith("@") or "\x00" in text:
            body = out / f"repro-{index}.body"
            body.write_text(text)
            parts += ["--data-binary", f"@{body}"]
        else:
            parts += ["--data-binary", text]
    url = urlsplit(request["url"])
    target = url.path + (f"?{url.query}" if url.query else "")
    return shlex.join(parts) + ' "$GW"' + shlex.quote(target)


def tracebacks(log: Path) -> list[list[str]]:
    """Each ``Traceback`` block in a log, up to and including its exception's first line."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("Traceback (most recent call last)"):
            current = [line]
            blocks.append(current)
        elif current is not None:
            current.append(line)
            if line and not line[0].isspace():
                current = None
    return blocks


def _norm(line: str) -> str:
    return re.sub(r"\b[0-9a-f]{16,}\b|\d+", "N", line)[:160]


def _schemathesis() -> str:
    beside = Path(sys.executable).with_name("schemathesis")
    found = str(beside) if beside.exists() else shutil.which("schemathesis")
    if found is None:
        raise SystemExit("schemathesis is not installed: .venv/bin/pip install schemathesis")
    return found


def schemathesis_command(args: argparse.Namespace, base_url: str, out: Path) -> list[str]:
    """``schemathesis run`` over the selected operations, with HAR and JSON reports in ``out``."""
    cmd = [_schemathesis(), "run", str(args.spec.resolve()), "--url", base_url,
           "--max-examples", str(args.max_examples), "--request-timeout", str(args.request_timeout),
           "--checks", "not_a_server_error", "--continue-on-failure", "--seed", str(args.seed),
           "--generation-database", "none", "--workers", str(args.workers), "--phases", args.phases,
           "--header", f"Authorization: Bearer {CLIENT_KEY}", "--no-color", "--report", "har,json",
           "--report-har-path", str(out / "schemathesis.har"), "--report-json-path", str(out / "schemathesis.json")]
    for name in OPERATIONS:
        cmd += ["--include-name", name]
    return cmd


def ledger_rows(db: Path) -> dict[str, tuple[str, int | None]]:
    """request_id -> (operation, http_status) of every row in the ledger."""
    with sqlite3.connect(db) as conn:
        return {rid: (op, status) for rid, op, status in
                conn.execute("SELECT request_id, operation, http_status FROM tokenbooth_calls")}


def _header(headers: list[dict[str, str]], name: str) -> str:
    return next((h["value"] for h in headers if h["name"].lower() == name), "")


def _error_message(text: str) -> str:
    try:
        error = json.loads(text)["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        message = text.strip().splitlines()[0] if text.strip() else "(empty body)"
    return _norm(str(message))[:100]


def _statuses(counter: collections.Counter[int]) -> str:
    return " ".join(f"{status}×{n}" for status, n in sorted(counter.items()))


def _print_block(lines: Iterable[str], indent: str = "    ", limit: int = 40) -> None:
    for i, line in enumerate(lines):
        if i == limit:
            print(f"{indent}...")
            return
        print(f"{indent}{line}")


def _summary_tail(output: str) -> Iterator[str]:
    # Schemathesis's failures and summary, without the progress of every phase
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"=+ (FAILURES|ERRORS|WARNINGS|SUMMARY) =+", line)),
                 max(0, len(lines) - 40))
    yield from lines[start:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True, help="openapi.yaml from openai/openai-openapi")
    parser.add_argument("--max-examples", type=int, default=50, help="test cases per operation and phase")
    parser.add_argument("--request-timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="Schemathesis workers")
    parser.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    parser.add_argument("--out", type=Path, help="where reports and logs go (default: a new temp dir)")
    args = parser.parse_args()
    if not args.spec.is_file():
        raise SystemExit(f"--spec {args.spec}: no such file")
    out = args.out or Path(tempfile.mkdtemp(prefix="tokenbooth-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    gw_log, sim_log, db = out / "gateway.log", out / "simulator.log", out / "ledger.db"
    db.unlink(missing_ok=True)

    with exit_on_sigterm(), Processes() as procs, sim_log.open("w") as sim_out:
        upstream = start_simulator(procs, sim_out)
        gw, base_url = start_tokenbooth(procs, upstream, db, log=gw_log)
        cmd = schemathesis_command(args, base_url, out)
        print(f"reports and logs in {out}\n$ {shlex.join(cmd)}", flush=True)
        started = time.monotonic()
        run = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        (out / "schemathesis.txt").write_text(run.stdout + run.stderr)
        alive = gw.poll() is None
        healthy = alive and httpx.get(base_url.removesuffix("/v1") + "/healthz", timeout=5).status_code == 200
        upstream_stats = httpx.get(upstream.removesuffix("/v1") + "/_sim/stats", timeout=5).json()
        procs.stop(gw)  # a graceful stop: the ledger writer flushes every row
        exit_code = gw.returncode

    print(f"\n--- schemathesis (exit {run.returncode}, {elapsed:.0f} s; full output in schemathesis.txt) ---")
    _print_block(_summary_tail(run.stdout + run.stderr), indent="  ", limit=120)
    har_path = out / "schemathesis.har"
    if not har_path.exists():
        raise SystemExit(f"schemathesis wrote no HAR report:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")

    own = gateway_error_kinds()
    rows = ledger_rows(db)
    matcher = _matcher(OPERATIONS)
    ops: dict[str, Operation] = collections.defaultdict(Operation)
    gateway_5xx: dict[tuple[str, int, str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    seen_ids: set[str] = set()
    entries = json.loads(har_path.read_text())["log"]["entries"]
    for entry in entries:
        request, response = entry["request"], entry["response"]
        op = ops[operation_of(request["method"], urlsplit(request["url"]).path.removeprefix("/v1"), matcher)]
        status = response["status"]
        op.requests += 1
        op.statuses[status] += 1
        rid = _header(response["headers"], "x-request-id")
        seen_ids.add(rid)
        if rid in rows:
            op.metered += 1
        text = response["content"].get("text") or ""
        if 400 <= status < 500:
            op.messages[f"{status} {_error_message(text)}"] += 1
        if status >= 500:
            who = origin(_header(response["headers"], "content-type"), text, own)
            if who is None:
                op.upstream_5xx += 1
            else:
                name = operation_of(request["method"], urlsplit(request["url"]).path.removeprefix("/v1"), matcher)
                gateway_5xx[name, status, who, _error_message(text)].append(request)

    print(f"\n--- per operation ({len(entries)} requests in the HAR report) ---")
    print("| operation | requests | status codes | ledger rows | gateway 5xx | upstream 5xx |")
    print("|---|---|---|---|---|---|")
    own_by_op: collections.Counter[str] = collections.Counter()
    for key, requests in gateway_5xx.items():
        own_by_op[key[0]] += len(requests)
    for name in sorted(ops, key=lambda n: (n not in OPERATIONS, OPERATIONS.index(n) if n in OPERATIONS else 0,
                                           n != PROBES, n)):
        op = ops[name]
        print(f"| {name} | {op.requests} | {_statuses(op.statuses)} | {op.metered} | {own_by_op[name]} "
              f"| {op.upstream_5xx} |")
    print("\ncommonest 4xx answers per operation (the gateway's or the upstream's, passed through):")
    for name in OPERATIONS:
        for message, n in ops[name].messages.most_common(3):
            print(f"  {name}: {n}× {message}")

    print(f"\n--- gateway 5xx: {sum(len(r) for r in gateway_5xx.values())} ---")
    index = 0
    for (name, status, who, message), requests in gateway_5xx.items():
        print(f"  {len(requests)}× {name} -> {status} ({who}): {message}")
        for request in requests[:3]:
            index += 1
            print(f"    {curl(request, out, index)}")
    if gateway_5xx:
        print("  (set GW to a gateway's origin, e.g. GW=http://127.0.0.1:8080, before the curl commands)")

    report = json.loads((out / "schemathesis.json").read_text()) if (out / "schemathesis.json").exists() else {}
    errors = report.get("errors") or []
    print(f"\n--- requests without an answer (Schemathesis's errors: timeouts, connections cut): {len(errors)} ---")
    for error in errors[:10]:
        print(f"  {json.dumps(error)[:300]}")

    gw_tracebacks = tracebacks(gw_log)
    print(f"\n--- gateway process: {'alive' if alive else 'DEAD'} at the end, /healthz "
          f"{'ok' if healthy else 'FAILED'}, exit code {exit_code} after SIGTERM; "
          f"{len(gw_tracebacks)} Traceback(s) in its log ---")
    by_kind = collections.Counter(block[-1] for block in gw_tracebacks)
    for kind, n in by_kind.most_common():
        print(f"  {n}× {kind}")
        _print_block(next(b for b in gw_tracebacks if b[-1] == kind))
    others = collections.Counter(_norm(line) for line in gw_log.read_text(errors="replace").splitlines()
                                 if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line))
    for line, n in others.most_common(10):
        print(f"  {n}× {line}")

    sim_tracebacks = tracebacks(sim_log)
    print(f"\n--- simulated upstream: {len(sim_tracebacks)} Traceback(s) in its log "
          "(requests the gateway forwarded that the upstream choked on) ---")
    for kind, n in collections.Counter(_norm(b[-1]) for b in sim_tracebacks).most_common(10):
        print(f"  {n}× {kind}")

    counted = upstream_stats.get("total", 0)
    orphans = len(set(rows) - seen_ids)
    print(f"\n--- ledger: {len(rows)} rows; the upstream's handlers counted {counted} calls "
          f"(GET /models is neither metered nor counted); {len(sim_tracebacks)} more failed in the upstream "
          f"before or inside a handler; {orphans} rows have a request id missing from the HAR report "
          "(Schemathesis's probes before the run are not in it) ---")
    by_op = collections.Counter(f"{op} {status}" for op, status in rows.values())
    print("  rows by operation and status: " + ", ".join(f"{k}×{n}" for k, n in sorted(by_op.items())))
    print("  upstream calls by route: " + ", ".join(f"{k}×{n}" for k, n in
                                                 sorted(upstream_stats.get("requests", {}).items())))

    failed = bool(gateway_5xx) or not healthy or bool(gw_tracebacks) or bool(errors)
    print("\nFAIL: the gateway failed on its own" if failed else "\nPASS: no 5xx of the gateway's own, no crash")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
