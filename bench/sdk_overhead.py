"""SDK overhead: the same calls with a bare and with an instrumented openai client.

    python bench/sdk_overhead.py [--calls 2000] [--repeat 5] [--stream]

The simulated upstream runs in its own process (answering at once) pinned to CPU 1, the
client in this process on CPU 0. Per call, the script measures this process's CPU time
(``time.process_time``) and wall time for the bare client and for the instrumented one,
interleaving runs, and reports medians and the difference: what instrumentation costs.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import openai
from prometheus_client import CollectorRegistry

import tokenbooth

TB = [sys.executable, "-m", "tokenbooth.cli"]


def run(client: openai.OpenAI, calls: int, stream: bool) -> tuple[float, float]:
    """(CPU µs per call, wall µs per call) for ``calls`` sequential chat calls."""
    messages = [{"role": "user", "content": "Say hello to the benchmark."}]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        if stream:
            for _chunk in client.chat.completions.create(model="gpt-4o-mini", messages=messages,  # type: ignore[arg-type]
                                                         max_tokens=16, stream=True,
                                                         stream_options={"include_usage": True}):
                pass
        else:
            client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=16)  # type: ignore[arg-type]
    return ((time.process_time() - cpu0) / calls * 1e6, (time.perf_counter() - wall0) / calls * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    sim = subprocess.Popen(["taskset", "-c", "1", *TB, "simulate", "--port", "0"], stdout=subprocess.PIPE, text=True)
    assert sim.stdout is not None
    url = re.search(r"http://\S+/v1", sim.stdout.readline()).group(0)  # type: ignore[union-attr]
    try:
        bare = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        metered = tokenbooth.instrument(openai.OpenAI(base_url=url, api_key="k", max_retries=0),
                                        registry=CollectorRegistry())
        run(bare, 200, args.stream)  # warm-up: connections, imports, price data
        run(metered, 200, args.stream)
        results: dict[str, list[tuple[float, float]]] = {"bare": [], "instrumented": []}
        for _ in range(args.repeat):
            results["bare"].append(run(bare, args.calls, args.stream))
            results["instrumented"].append(run(metered, args.calls, args.stream))
        med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in results.items()}
        kind = "streamed" if args.stream else "non-streaming"
        print(f"# SDK overhead, {kind} chat, {args.calls} calls x {args.repeat} runs (medians)")
        print("| client | CPU µs/call | wall µs/call |\n|---|---|---|")
        for name, (cpu, wall) in med.items():
            print(f"| {name} | {cpu:.1f} | {wall:.1f} |")
        print(f"| **instrumentation** | **{med['instrumented'][0] - med['bare'][0]:.1f}** | "
              f"**{med['instrumented'][1] - med['bare'][1]:.1f}** |")
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(10)


if __name__ == "__main__":
    main()
