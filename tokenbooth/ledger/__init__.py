"""The per-call ledger: schema, batched writer, reports."""
