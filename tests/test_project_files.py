"""The checkout's own files: packaging metadata setuptools accepts without warnings, and a .gitignore
that keeps what the gateway writes out of commits."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_license_is_an_spdx_expression_for_a_setuptools_that_reads_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "Apache-2.0"  # the table form warns on every install
    assert project["build-system"]["requires"] == ["setuptools>=77"]  # the first to take the SPDX form


def test_what_the_gateway_writes_beside_its_database_is_ignored() -> None:
    for path in ("tokenbooth.db", "tokenbooth.db-wal", "tokenbooth.db.journal/writer-1.count",
                 "tokenbooth-ledger-spill.jsonl"):
        ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, check=False)
        assert ignored.returncode == 0, path
