"""Fixtures for the whole-system tests: real processes on loopback ports."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

TB = [sys.executable, "-m", "tokenbooth.cli"]


@pytest.fixture
def sim_url() -> Iterator[str]:
    proc = subprocess.Popen([*TB, "simulate", "--port", "0", "--seed", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    assert match, line
    yield match.group(0)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=10)
