"""The crash journal: after a SIGKILL, the next start learns an upper bound on the missing rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tokenbooth.ledger.journal import Journal, recover


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _as_dead(journal: Journal) -> None:
    """Leave the journal as a killed process would: mapped counters on disk, no clean close."""
    journal._map.close()
    journal._file.close()
    journal.path.rename(journal.path.with_name(f"writer-{_dead_pid()}.count"))


def test_a_call_begun_but_not_yet_submitted_counts_as_possibly_missing(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for _ in range(5):
        journal.begin()
    for _ in range(3):  # three calls finished and handed their rows to the writer
        journal.add_submitted()
        journal.end()
    journal.add_written(2)  # one of those rows was written
    _as_dead(journal)
    # two calls still in flight, one row submitted and not written
    assert recover(tmp_path) == 3
    assert recover(tmp_path) == 0, "the dead run's journal is read once"


def test_a_clean_close_leaves_nothing_to_report(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.begin()
    journal.add_submitted()
    journal.end()
    journal.add_written(1)
    journal.close()
    assert list(tmp_path.iterdir()) == []
    assert recover(tmp_path) == 0


def test_live_writers_are_left_alone(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.begin()
    assert recover(tmp_path) == 0  # our own pid: still running
    assert journal.path.exists()
    journal.close()
