"""The batched ledger writer: rows leave the request path through a queue.

A background thread takes records from the queue and writes them in batches, every
``batch_size`` rows or ``flush_interval`` seconds, whichever comes first. When the database
fails, a batch is retried with backoff. Rows go to a JSON-lines spill file instead, counted
as ``tokenbooth_ledger_rows_total{result="failed"}`` and loaded back later with
``tokenbooth ledger replay``, in three cases: a batch still failing at close; a row the database
refuses for its data (found by writing its batch row by row); and, during an outage, every
batch that fails while ``max_queue`` rows wait behind it, so memory stays bounded.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from tokenbooth.catalog import Metrics
from tokenbooth.ledger.journal import Journal
from tokenbooth.ledger.schema import insert_sql, row_from_record, row_values, session_row, session_values, sessions
from tokenbooth.record import CallRecord, SessionRecord

Record = CallRecord | SessionRecord

__all__ = ["LedgerWriter", "is_outage"]

log = logging.getLogger("tokenbooth.ledger")

_STOP = object()


class _Marker:
    """Put in the queue by :meth:`LedgerWriter.flush`; set once every row before it is written."""

    def __init__(self) -> None:
        self.done = threading.Event()


# How much nicer the writer thread is than the thread that started it. Pinned to one core, a
# writer at the loop's priority took the CPU from the event loop for milliseconds at a time (p99
# at one call at a time: 2.5 ms, against 0.9 ms at +5). At +5, CFS still gives it a quarter of a
# saturated core; it needs about a sixth.
_WRITER_NICE = 5


def _yield_to_the_request_path() -> None:
    """Lower this thread's scheduling priority below the event loop's (Linux: per-thread nice)."""
    if sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + _WRITER_NICE, 19))
    except OSError as exc:  # a sandbox may forbid it; the writer works all the same
        log.debug("ledger writer keeps its priority: %s", exc)


def is_outage(exc: BaseException) -> bool:
    """Whether a failed write says the database is away (retry it), not that a row is bad.

    Connection, lock and pool errors are outages. Anything else (DataError, IntegrityError,
    a driver's OverflowError on a value out of range, ...) may be a row's own fault: the batch
    is then written row by row, and only a row that fails alone is spilled.
    """
    if isinstance(exc, (OperationalError, InterfaceError, DisconnectionError, PoolTimeout, OSError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _reason(exc: BaseException) -> str:
    """An error as one short line for the log: its class and its message's first line."""
    text = str(exc)
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:200] if text else ''}"


def _statement_sizes(rows: int, most: int) -> list[int]:
    """Rows per statement for ``rows`` rows: powers of four (256, 64, 16, 4, 1) up to ``most``,
    largest first. Few distinct statements keep the driver's cache of prepared statements
    small; an INSERT of 256 rows compiles to ~1 MB in SQLite, and every row count would be
    one more.

    >>> _statement_sizes(500, 32766 // 29)
    [256, 64, 64, 64, 16, 16, 16, 4]
    """
    sizes = []
    size = 256
    while size > max(most, 1):
        size //= 4
    while rows:
        while size > rows:
            size //= 4
        sizes.append(size)
        rows -= size
    return sizes


@functools.lru_cache(maxsize=16)
def _many_rows(sql: str, rows: int) -> str:
    """A one-row ``INSERT ... VALUES (...)`` made into ``rows`` rows."""
    head, _, group = sql.rpartition(" VALUES ")
    return f"{head} VALUES {', '.join([group] * rows)}"


def _max_params(engine: Engine) -> int:
    """Bound parameters one statement may hold: SQLite's compiled-in limit (999 before 3.32,
    32766 after), PostgreSQL's 65535."""
    if engine.dialect.name != "sqlite":
        return 65535
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        limit = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if isinstance(raw, sqlite3.Connection) else 999
    return int(limit)


class LedgerWriter:
    """Writes call rows in batches on a background thread.

    >>> writer = LedgerWriter(engine, metrics)   # doctest: +SKIP
    >>> writer.start(); writer.submit(record); writer.close()   # doctest: +SKIP
    """

    def __init__(self, engine: Engine, metrics: Metrics, *, batch_size: int = 500,
                 flush_interval: float = 0.2, spill_path: str | Path | None = None,
                 max_retry_delay: float = 5.0, journal: Journal | None = None, max_queue: int = 50_000) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.spill_path = Path(spill_path) if spill_path else Path("tokenbooth-ledger-spill.jsonl")
        self.max_retry_delay = max_retry_delay
        self.max_queue = max_queue
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tokenbooth-ledger", daemon=True)
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._written = metrics.ledger_rows.labels("written")
        self._failed = metrics.ledger_rows.labels("failed")
        self._depth = metrics.ledger_queue_depth
        self.journal = journal
        self.rows_written = 0
        self.rows_spilled = 0
        self._sql = insert_sql(engine.dialect)
        self._session_sql = insert_sql(engine.dialect, sessions)
        self._sqlite = engine.dialect.name == "sqlite"
        self._max_params = _max_params(engine)

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: Record) -> None:
        """Queue one call record or session roll-up; returns at once."""
        self._queue.put(record)
        if self.journal is not None:
            self.journal.add_submitted()

    def _convert(self, record: Record) -> tuple[str, tuple[Any, ...]]:
        if isinstance(record, CallRecord):
            return self._sql, row_values(record, self._sqlite)
        return self._session_sql, session_values(record, self._sqlite)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until every row submitted before this call is written (or spilled)."""
        if not self._thread.is_alive():
            return self._queue.empty()
        marker = _Marker()
        self._queue.put(marker)
        self._wake.set()
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Write everything queued, then stop the thread. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._wake.set()
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("ledger writer did not finish within %.0f s; %d rows still queued",
                          timeout or 0, self._queue.qsize())
                return  # the journal stays: the next start reports what may be missing
        else:
            self._run()  # never started: write what was queued here, with the same loop
        self._depth.set(0)
        self._checkpoint()
        if self.journal is not None:
            self.journal.close()

    def _checkpoint(self) -> None:
        """Move an SQLite ledger's rows from its ``-wal`` file into the database file, so a copy of
        the file alone holds them once the gateway has stopped."""
        if self.engine.dialect.name != "sqlite":
            return
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except SQLAlchemyError as exc:  # another process reading: its rows stay in the -wal file, still safe
            log.warning("ledger: the WAL checkpoint at shutdown did not complete: %s", exc)

    def _run(self) -> None:
        # The thread wakes every flush_interval (or at once for flush/close) and drains the queue
        # in bulk, rather than waking for every row: fewer GIL hand-offs with the event loop.
        stop = False
        limit = self.batch_size * 4
        if threading.current_thread() is self._thread:  # not when close() runs this loop itself
            _yield_to_the_request_path()
        while not stop:
            if self._queue.empty():
                self._wake.wait(self.flush_interval)
            self._wake.clear()
            self._depth.set(self._queue.qsize())  # a plain set: it also sums across worker processes
            batch: list[Record] = []
            rows: list[tuple[str, tuple[Any, ...]]] = []
            markers: list[_Marker] = []
            while len(batch) < limit or stop:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Marker):
                    markers.append(item)
                else:
                    batch.append(item)
                    rows.append(self._convert(item))
                    if len(rows) % 64 == 0:
                        time.sleep(0)  # hand the GIL back to the event loop between slices
            if batch:
                self._write(batch, final=stop, rows=rows)
                self._depth.set(self._queue.qsize())  # what is left once this batch is in
            for marker in markers:
                marker.done.set()

    def _write(self, batch: list[Record], *, final: bool,
               rows: list[tuple[str, tuple[Any, ...]]] | None = None) -> None:
        if rows is None:
            rows = [self._convert(rec) for rec in batch]
        attempt = 0
        done = 0
        one_by_one_until = 0  # rows of a batch the database refused for its data go one at a time
        while done < len(batch):
            attempt += 1
            chunk = rows[done:done + (1 if done < one_by_one_until else self.batch_size)]
            try:
                self._insert(chunk)
            except Exception as exc:
                if not is_outage(exc):  # a row the database refuses, not an outage
                    reason = _reason(exc)
                    if len(chunk) > 1:
                        log.warning("ledger refused a batch (%s); writing its %d rows one by one", reason,
                                    len(chunk))
                        one_by_one_until = done + len(chunk)
                    else:  # this is the row: keep it in the spill file and go on with the others
                        self._spill(batch[done:done + 1], reason)
                        done += 1
                    attempt = 0
                    continue
                # the database is down, locked, or gone
                self._depth.set(self._queue.qsize() + len(batch) - done)  # the backlog includes this batch
                if not final and self._queue.qsize() >= self.max_queue:
                    # a long outage: rows wait on disk for a replay, not in memory without bound
                    self._spill(batch[done:], f"{_reason(exc)}; {self._queue.qsize()} more rows queued")
                    return
                if self._retry_or_spill(batch[done:], attempt, final, _reason(exc)):
                    continue
                return
            done += len(chunk)
            attempt = 0
            self._written.inc(len(chunk))
            self.rows_written += len(chunk)
            if self.journal is not None:
                self.journal.add_written(len(chunk))

    def _retry_or_spill(self, rest: list[Record], attempt: int, final: bool, reason: str) -> bool:
        """After a failed write: wait and say True (try again), or spill ``rest`` when closing
        and it failed three times, and say False."""
        if final or self._closing.is_set():
            if attempt < 3:
                time.sleep(0.05 * 4 ** (attempt - 1))
                return True
            self._spill(rest, reason)
            return False
        log.warning("ledger write of %d rows failed (attempt %d), retrying: %s", len(rest), attempt, reason)
        time.sleep(min(0.05 * 2 ** (attempt - 1), self.max_retry_delay))
        return True

    def _insert(self, chunk: list[tuple[str, tuple[Any, ...]]]) -> None:
        by_table: dict[str, list[tuple[Any, ...]]] = {}
        for sql, values in chunk:
            by_table.setdefault(sql, []).append(values)
        with self.engine.begin() as conn:
            for sql, values_list in by_table.items():
                # Many rows per statement, not executemany: the driver releases the GIL around
                # every statement it runs, and with the event loop busy on another core, each
                # release costs the writer a switch interval to get it back (executemany fell to
                # ~6k rows/s against a busy thread; this keeps ~140k).
                at = 0
                for size in _statement_sizes(len(values_list), self._max_params // len(values_list[0])):
                    part = values_list[at:at + size]
                    at += size
                    conn.exec_driver_sql(_many_rows(sql, size), tuple(v for values in part for v in values))

    def _spill(self, batch: list[Record], reason: str) -> None:
        try:
            data = b"".join(orjson.dumps(row_from_record(rec) if isinstance(rec, CallRecord) else
                                         {"table": "tokenbooth_sessions", **session_row(rec)}, default=str) + b"\n"
                            for rec in batch)
            # one unbuffered append: workers that spill at the same time do not interleave lines
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with self.spill_path.open("ab", buffering=0) as f:
                view = memoryview(data)
                while view:  # a short write (a full disk) must not leave half a line behind
                    n = f.write(view)
                    if not n:
                        raise OSError("the spill file took no more bytes")
                    view = view[n:]
        except (OSError, TypeError, ValueError) as exc:
            log.error("ledger: %d rows LOST: database failed (%s) and spill file %s failed (%s)",
                      len(batch), reason, self.spill_path, exc)
        else:
            log.error("ledger: database failed (%s); %d rows written to %s: load them with "
                      "'tokenbooth ledger replay FILE' once the database is back",
                      reason, len(batch), self.spill_path)
        self._failed.inc(len(batch))
        self.rows_spilled += len(batch)

