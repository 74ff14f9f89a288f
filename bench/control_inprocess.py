"""CPU of the control path alone, in process: authenticate, plan, estimate, admit, settle.

    python bench/control_inprocess.py [--calls 20000] [--profile]

A keys-mode gateway is built (no server, no upstream) with a tenant that has a hard monthly
budget and RPM and TPM limits, held in process; one call's controller work is repeated and timed
with ``time.process_time()``. ``--profile`` prints cProfile's top entries for 5,000 more calls.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from decimal import Decimal

from prometheus_client import CollectorRegistry

from tokenbooth.calls import ENDPOINTS
from tokenbooth.config import load_settings
from tokenbooth.control.keys import KeyStore
from tokenbooth.gateway.app import build_gateway
from tokenbooth.gateway.proxy import rate_headers
from tokenbooth.ledger.schema import connect
from tokenbooth.record import CallRecord, Cost, Operation, Outcome, TokenUsage

PAYLOAD = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
           "max_tokens": 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/ledger.db"
        secret = KeyStore(connect(db)).create("acme")[1]
        settings = load_settings(overrides={
            "upstreams": [{"name": "sim", "base_url": "http://127.0.0.1:9/v1"}], "auth": {"mode": "keys"},
            "ledger": {"url": db, "enabled": False},
            "tenants": {"acme": {"budgets": ["100000/month"], "limits": {"rpm": 10**8, "tpm": 10**10}}},
        }, environ={})
        gateway = build_gateway(settings, CollectorRegistry())
        control, proxy = gateway.control, gateway.proxy
        assert control is not None
        headers = {b"authorization": f"Bearer {secret}".encode()}
        ep = ENDPOINTS["/v1/chat/completions"]
        targets = proxy.router.targets("gpt-4o-mini")
        record = CallRecord("r", time.time(), "openai", "sim", "gpt-4o-mini", Operation.CHAT, Outcome.SUCCESS, 0.01,
                            usage=TokenUsage(20, 16), cost=Cost(Decimal("0.00001"), "USD", Decimal("0.00001"), "x"))

        async def one() -> None:
            key = control.authenticate(headers)
            checks = control.plan(key)
            ticket = await control.admit(checks, proxy._demand(ep, "gpt-4o-mini", targets, PAYLOAD))
            assert ticket is not None
            rate_headers(ticket.rates)
            control.settle(ticket, record)

        async def run() -> None:
            for _ in range(1000):
                await one()
            t0 = time.process_time()
            for _ in range(args.calls):
                await one()
            print(f"control path: {(time.process_time() - t0) / args.calls * 1e6:.1f} µs of CPU per call "
                  f"({args.calls} calls)")
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                for _ in range(5000):
                    await one()
                profile.disable()
                pstats.Stats(profile).sort_stats("tottime").print_stats(15)

        asyncio.run(run())


if __name__ == "__main__":
    main()
