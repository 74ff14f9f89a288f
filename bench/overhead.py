"""Gateway overhead: the same calls direct to the simulated upstream and through tokenbooth.

    python bench/overhead.py [--duration 10] [--concurrency 1 16] [--stream] [--responses]

Needs wrk (Debian package ``wrk``). The simulated upstream answers at once, so every
microsecond measured through the gateway is the gateway's. The gateway runs with
metering and an SQLite ledger on, pinned to CPU 0; wrk and the upstream share CPU 1.
Figures: requests/s, p50/p99 latency from wrk, added latency against direct, and the
gateway's CPU time per call from /proc (user + system).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from _common import Processes, cpu_seconds, exit_on_sigterm, rss_mb, run_wrk, start_simulator, start_tokenbooth

BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":16}'
STREAM_BODY = BODY[:-1] + ',"stream":true,"stream_options":{"include_usage":true}}'
# the Responses API (what the Agents SDK and Codex call): usage in the body, or in the terminal event
RESPONSES_BODY = '{"model":"gpt-4o-mini","input":"Say hello to the benchmark.","max_output_tokens":16}'
RESPONSES_STREAM_BODY = RESPONSES_BODY[:-1] + ',"stream":true}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--stream", action="store_true", help="also measure streamed calls")
    parser.add_argument("--responses", action="store_true",
                        help="also measure the Responses API (/v1/responses), plain and, with --stream, streamed")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario; medians are reported")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")

    with exit_on_sigterm(), tempfile.TemporaryDirectory() as tmpdir, Processes() as procs:
        tmp = Path(tmpdir)
        sim_url = start_simulator(procs)
        gw, gw_url = start_tokenbooth(procs, sim_url, tmp / "ledger.db")
        chat, responses = "/chat/completions", "/responses"
        scenarios = [("chat", chat, BODY, c) for c in args.concurrency]
        if args.stream:
            scenarios += [("chat-stream", chat, STREAM_BODY, c) for c in args.concurrency]
        if args.responses:
            scenarios += [("responses", responses, RESPONSES_BODY, c) for c in args.concurrency]
            if args.stream:
                scenarios += [("responses-stream", responses, RESPONSES_STREAM_BODY, c) for c in args.concurrency]
        print(f"# tokenbooth overhead: median of {args.repeat} runs of {args.duration:.0f} s, "
              "gateway pinned to CPU 0")
        print("| scenario | conc | direct rps | gateway rps | direct p50 ms | gateway p50 ms | added p50 ms "
              "| direct p99 ms | gateway p99 ms | added p99 ms | gateway CPU ms/call | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, path, body, conc in scenarios:
            run_wrk(f"{gw_url}{path}", body, conc, 2, tmp)  # warm-up
            runs = []
            for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits both sides
                d = run_wrk(f"{sim_url}{path}", body, conc, args.duration, tmp)
                before = cpu_seconds(gw.pid)
                v = run_wrk(f"{gw_url}{path}", body, conc, args.duration, tmp)
                v["cpu_ms"] = (cpu_seconds(gw.pid) - before) * 1000 / max(v["requests"], 1)
                runs.append((d, v))
            direct = {k: statistics.median(d[k] for d, _ in runs) for k in runs[0][0]}
            via = {k: statistics.median(v[k] for _, v in runs) for k in runs[0][1]}
            cpu_ms = via["cpu_ms"]
            print(f"| {name} | {conc} | {direct['rps']:.0f} | {via['rps']:.0f} | {direct['p50']:.3f} | "
                  f"{via['p50']:.3f} | {via['p50'] - direct['p50']:.3f} | {direct['p99']:.3f} | "
                  f"{via['p99']:.3f} | {via['p99'] - direct['p99']:.3f} | {cpu_ms:.3f} | "
                  f"{via['errors']:.0f} |", flush=True)
        print(f"\ngateway RSS after load: {rss_mb(gw.pid):.1f} MB")


if __name__ == "__main__":
    main()
