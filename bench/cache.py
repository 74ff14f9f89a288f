"""The response cache's cost and gain: gateway CPU per call for a hit, a miss and a proxied call.

    python bench/cache.py [--duration 10] [--repeat 3] [--concurrency 1]
    python bench/cache.py --micro          # in process: µs of CPU the cache adds to a miss
    python bench/cache.py --micro --redis redis://127.0.0.1:6390/0   # the same with the Redis backend

End to end (needs wrk): two gateways on the simulated upstream at 0 ms, run one after the other on
CPU 0, each with metering and an SQLite ledger. ``proxied``: cache off, every body different.
``miss``: cache on (memory), every body different, so each call is looked up, proxied and stored.
``hit``: cache on, one body, so every call after the first is answered from the cache. Gateway CPU
per call is user + system time from /proc over the run, divided by the calls wrk completed; the
miss overhead is ``miss - proxied``, which on a shared machine is within the noise of two runs:
``--micro`` measures it directly, as CPU time of the cache's own steps on a call.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from _common import UNIQUE, Processes, cpu_seconds, exit_on_sigterm, run_wrk, start_simulator, start_tokenbooth

BODY = ('{"model":"gpt-4o-mini","temperature":0,"max_tokens":16,'
        '"messages":[{"role":"user","content":"Say hello to the benchmark, call ' + UNIQUE + '."}]}')
FIXED = BODY.replace(UNIQUE, "0")


def _micro(iterations: int, redis_url: str | None) -> None:
    import orjson
    from prometheus_client import CollectorRegistry

    from tokenbooth.calls import ENDPOINTS
    from tokenbooth.catalog import Metrics
    from tokenbooth.config import CacheConfig
    from tokenbooth.gateway.caching import ResponseCache
    from tokenbooth.record import CallRecord, Cost, Operation, Outcome, TokenUsage

    ep = ENDPOINTS["/v1/chat/completions"]
    def backend() -> Any:
        if redis_url is None:
            from tokenbooth.cache.memory import MemoryBackend

            return MemoryBackend(1 << 30)
        from tokenbooth.cache.redis import RedisBackend

        return RedisBackend(redis_url, timeout=1.0)

    cache = ResponseCache(CacheConfig(enabled=True), backend(), Metrics(CollectorRegistry()))
    answer = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello " * 16},
                                        "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36}})
    rag = "Context: " + "The gateway meters every call and keeps a ledger of them. " * 120  # ~7 KB of retrieved text
    bodies = {
        "small chat (bench body)": orjson.loads(FIXED),
        "RAG chat, 7 KB, tools": {"model": "gpt-4o-mini", "temperature": 0, "max_tokens": 256,
                                  "messages": [{"role": "system", "content": "Answer from the context."},
                                               {"role": "user", "content": rag},
                                               {"role": "assistant", "content": "Understood."},
                                               {"role": "user", "content": "What does the gateway keep?"}],
                                  "tools": [{"type": "function", "function": {
                                      "name": "search", "description": "Search the docs",
                                      "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]},
    }
    record = CallRecord("r", time.time(), "openai", "sim", "gpt-4o-mini", Operation.CHAT, Outcome.SUCCESS, 0.001,
                        http_status=200, usage=TokenUsage(20, 16),
                        cost=Cost(Decimal(0), "USD", Decimal(0), "genai-prices"))

    async def misses(raws: list[bytes], steps: bool) -> float:
        t0 = time.process_time()
        for raw in raws:
            payload = orjson.loads(raw)  # as the gateway has it: parsed from the request just now
            if steps:
                plan = cache.plan(ep, payload, False, "sim", "gpt-4o-mini", {}, [], None, None, b"")
                await cache.lookup(plan)
                capture = cache.capture()
                capture.body, capture.complete = answer, True
                cache.store(plan, capture, record)
        return time.process_time() - t0

    where = f"Redis at {redis_url}" if redis_url else "memory"
    print(f"# cache steps on a miss (plan and key, lookup, capture, store) in {where}, {iterations} calls each")
    print("| request | bytes | CPU µs per miss |")
    print("|---|---|---|")
    for name, body in bodies.items():
        raws = [orjson.dumps({**body, "max_tokens": 1000 + i}) for i in range(iterations)]  # each another key
        added = []
        for _ in range(5):  # the parse alone, then with the cache's steps: the difference is theirs
            alone = asyncio.run(misses(raws, False))
            added.append(asyncio.run(misses(raws, True)) - alone)
            cache.backend = backend()
        print(f"| {name} | {len(raws[0])} | {statistics.median(added) / iterations * 1e6:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario; medians are reported")
    parser.add_argument("--micro", action="store_true", help="in process: CPU the cache adds to a miss")
    parser.add_argument("--iterations", type=int, default=20_000, help="calls per --micro measurement")
    parser.add_argument("--redis", metavar="URL", help="--micro against the Redis backend at URL (it is written to)")
    args = parser.parse_args()
    if args.micro:
        _micro(args.iterations, args.redis)
        return
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    with exit_on_sigterm(), tempfile.TemporaryDirectory() as tmpdir, Processes() as procs:
        tmp = Path(tmpdir)
        sim_url = start_simulator(procs)
        config = tmp / "cache.yaml"
        config.write_text("cache:\n  enabled: true\n  backend: memory\n  max_bytes: 67108864\n")
        plain, plain_url = start_tokenbooth(procs, sim_url, tmp / "plain.db")
        cached, cached_url = start_tokenbooth(procs, sim_url, tmp / "cached.db", config=config)
        scenarios = [("proxied", plain, plain_url, BODY), ("miss", cached, cached_url, BODY),
                     ("hit", cached, cached_url, FIXED)]
        results: dict[str, list[float]] = {name: [] for name, *_ in scenarios}
        for _, _, url, body in scenarios:
            run_wrk(f"{url}/chat/completions", body, args.concurrency, 2, tmp)  # warm-up
        for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits every scenario
            for name, proc, url, body in scenarios:
                before = cpu_seconds(proc.pid)
                run = run_wrk(f"{url}/chat/completions", body, args.concurrency, args.duration, tmp)
                if run["errors"]:
                    raise SystemExit(f"{name}: {run['errors']:.0f} errors")
                results[name].append((cpu_seconds(proc.pid) - before) * 1000 / max(run["requests"], 1))
        cpu = {name: statistics.median(values) for name, values in results.items()}
        print(f"# response cache: gateway CPU ms per call, median of {args.repeat} runs of {args.duration:.0f} s, "
              f"concurrency {args.concurrency}")
        print("| proxied | miss | hit | miss - proxied | hit / proxied |")
        print("|---|---|---|---|---|")
        print(f"| {cpu['proxied']:.3f} | {cpu['miss']:.3f} | {cpu['hit']:.3f} | "
              f"{cpu['miss'] - cpu['proxied']:+.3f} | {cpu['hit'] / cpu['proxied']:.2f} |")


if __name__ == "__main__":
    main()
