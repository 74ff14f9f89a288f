"""Knowing, after a crash, how many ledger rows may be missing.

Each gateway process keeps four counters in a small memory-mapped file: records submitted, rows written,
and calls begun and ended. A call counts as begun before its upstream is contacted and as ended
after its record was submitted, so at every instant a call that was made but is not in the
ledger yet is counted in one of the two differences. The kernel keeps a mapped file's contents
even when the process is killed with SIGKILL, so the next start can read what the dead process
had not written yet. A clean shutdown removes the file.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path

__all__ = ["Journal", "pending", "recover"]

log = logging.getLogger("tokenbooth.ledger")

_FORMAT = "<QQQQ"  # submitted, written, begun, ended
_SIZE = struct.calcsize(_FORMAT)


class Journal:
    """The counters of one live gateway process. Each counter has one writing thread: the event
    loop submits, begins and ends; the ledger writer thread counts what it wrote."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"writer-{os.getpid()}.count"
        with self.path.open("wb") as f:
            f.write(b"\0" * _SIZE)
        self._file = self.path.open("r+b")
        self._map = mmap.mmap(self._file.fileno(), _SIZE)
        self.submitted = 0
        self.written = 0
        self.begun = 0
        self.ended = 0

    def add_submitted(self) -> None:
        self.submitted += 1
        struct.pack_into("<Q", self._map, 0, self.submitted)

    def add_written(self, n: int) -> None:
        self.written += n
        struct.pack_into("<Q", self._map, 8, self.written)

    def begin(self) -> None:
        """A call is about to be made: from here until its record is submitted it counts."""
        self.begun += 1
        struct.pack_into("<Q", self._map, 16, self.begun)

    def end(self) -> None:
        """Called after the call's record was submitted (or could not be)."""
        self.ended += 1
        struct.pack_into("<Q", self._map, 24, self.ended)

    def close(self) -> None:
        """After a clean flush: nothing can be missing, so the file goes."""
        self._map.close()
        self._file.close()
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead(directory: Path) -> list[tuple[Path, int]]:
    """The journals of writers no longer running, with how many calls each may have left out."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("writer-*.count"):
        try:
            pid = int(path.stem.split("-", 1)[1].split(".")[0])
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            submitted, written, begun, ended = struct.unpack(_FORMAT, path.read_bytes().ljust(_SIZE, b"\0")[:_SIZE])
        except OSError:
            continue
        found.append((path, max(submitted - written, 0) + max(begun - ended, 0)))
    return found


def pending(directory: Path) -> int:
    """What :func:`recover` would report, leaving the journals where they are (``tokenbooth doctor``)."""
    return sum(missing for _, missing in _dead(directory))


def recover(directory: Path) -> int:
    """Read the journals of writers that died without a clean shutdown, remove them, and return
    how many calls they had begun or submitted and not written: an upper bound on the rows
    missing."""
    missing = 0
    for path, lost in _dead(directory):
        missing += lost
        path.unlink(missing_ok=True)
    return missing
