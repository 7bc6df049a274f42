"""API keys, row budgets, rates and the query ledger in one SQLite file.

Admission is a reservation: `reserve` checks budget and rate and charges the rows in one `BEGIN IMMEDIATE`
transaction before the model runs, so concurrent requests (threads, workers, processes) can never run the model
beyond a budget. A request that fails before its answer is delivered is refunded (`refund`); a delivered one is
marked served (`settle`) in the worker's next transaction, never in one of its own, so a successful request costs
one write. A reservation still open after `RESERVATION_TTL` (longer than any request may run) belongs to a killed
worker: `release_expired` gives its rows back and marks it `released`.

Every call takes `wait`, the longest it may wait for the writers' flock (`DB.lock`) or SQLite's own locks; past it
`LedgerBusy` is raised (the guard answers 503), so a stuck writer (a suspended CLI, an open `sqlite3` shell) never
freezes a worker. The file's identity (device, inode) is checked on every call: a database replaced while serving is
reopened, a deleted one raises `LedgerUnavailable`. WAL with synchronous=NORMAL keeps every committed transaction
across a crash or restart of the server process. Keys are stored as sha256 digests only.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path

from serving.ledger_keys import KeyQueries
from serving.ledger_rules import (  # noqa: F401  (re-exported: callers import them from here)
    BATCH_COLUMNS, CLI_WAIT, KEY_PREFIX, KEY_STATE_COLUMNS, REQUEST_TIMEOUT, RESERVATION_TTL, Decision, LedgerBusy, LedgerUnavailable,
    LIST_COLUMNS, SettleQueue, assess, hash_key, new_key)

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    row_budget INTEGER,            -- NULL: unlimited
    rate_rows_per_min REAL,        -- NULL: unlimited
    tokens REAL,                   -- token bucket for the rate, capacity = one minute of rows
    tokens_ts REAL,
    rows_served INTEGER NOT NULL DEFAULT 0,   -- rows charged: served and reserved
    requests INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    first_seen REAL,
    last_seen REAL,
    created REAL NOT NULL,
    revoked REAL
);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    key_id INTEGER,                -- NULL: served while the service ran open (no keys)
    ts REAL NOT NULL,
    endpoint TEXT NOT NULL,
    rows INTEGER NOT NULL,
    digest TEXT NOT NULL,          -- sha256 of the request body
    state TEXT NOT NULL DEFAULT 'served'   -- reserved (admitted, answer not yet delivered) | served | released
);
CREATE INDEX IF NOT EXISTS batches_key ON batches(key_id, ts);
"""
# Databases made before reservations have no `state`: every batch they hold was served.
MIGRATIONS = ["ALTER TABLE batches ADD COLUMN state TEXT NOT NULL DEFAULT 'served'",
              "CREATE INDEX IF NOT EXISTS batches_open ON batches(state, ts)"]
KEY_STATE = f"SELECT {KEY_STATE_COLUMNS} FROM keys WHERE id=?"


def _busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class Ledger(SettleQueue, KeyQueries):
    """The keys database. `serving=True` (the guard in each worker) moves WAL checkpoints off the request path."""

    DUPLICATE = sqlite3.IntegrityError  # a second key of the same name (KeyQueries.add_key)

    def __init__(self, path: str | Path, serving: bool = False, create: bool | None = None):
        self.path = Path(path)
        self.serving = serving
        # The service never creates a keys database (a missing one is an error, not an empty ledger), except when it
        # runs open and only records anonymous batches; the key CLI creates one where it is told to
        self.create = (not serving) if create is None else create
        self._conn: sqlite3.Connection | None = None
        self._ident: tuple[int, int] | None = None
        self._busy_ms = -1
        self._lock = threading.Lock()
        self._writer_fd: int | None = None
        self._settled: collections.deque[int] = collections.deque()  # delivered, not yet marked served
        self._checkpointer = False

    # -- plumbing
    def _open(self, wait: float) -> sqlite3.Connection:
        if not self.create:
            target, uri = f"file:{self.path}?mode=rw", True
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            target, uri = str(self.path), False
        try:
            conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=0, uri=uri)
        except sqlite3.OperationalError as exc:
            raise LedgerUnavailable(f"cannot open the keys database {self.path}: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")  # the schema may wait for another writer
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(batches)")}
            if "state" not in columns:
                conn.execute(MIGRATIONS[0])
            conn.execute(MIGRATIONS[1])
        except sqlite3.OperationalError as exc:
            conn.close()
            raise (LedgerBusy if _busy(exc) else LedgerUnavailable)(f"{self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise LedgerUnavailable(f"{self.path} is not a keys database ({exc})") from None
        self._busy_ms = -1
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        if self.serving and not self._checkpointer:
            # A commit that crosses 1000 WAL pages checkpoints the file and fsyncs it, inside the request that
            # committed (tens of ms on a busy disk, with the worker's event loop waiting): a thread does it instead
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = True
            threading.Thread(target=self._checkpoints, name="ledger-checkpoints", daemon=True).start()
        elif self.serving:
            conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    def conn(self, wait: float = CLI_WAIT) -> sqlite3.Connection:
        """The connection, reopened when the file at `path` is no longer the one it was opened on. Caller holds
        `_lock`."""
        if self._conn is not None:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                raise LedgerUnavailable(f"the keys database {self.path} was removed while serving; restore it or "
                                        "restart the service") from None
            if (st.st_dev, st.st_ino) != self._ident:  # replaced (rm + init, a restored backup): follow it
                self._close_locked()
        if self._conn is None:
            self._conn = self._open(wait)
        ms = int(wait * 1000)
        if ms != self._busy_ms:
            self._conn.execute(f"PRAGMA busy_timeout={ms}")
            self._busy_ms = ms
        return self._conn

    def _checkpoints(self, every: float = 1.0) -> None:
        while True:
            time.sleep(every)
            try:
                conn = sqlite3.connect(f"file:{self.path}?mode=rw", isolation_level=None, timeout=0, uri=True)
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    conn.close()
            except sqlite3.Error:  # busy or gone: the next round tries again
                pass

    @contextlib.contextmanager
    def _held(self, wait: float):
        """This object's lock, waiting at most `wait` seconds."""
        got = self._lock.acquire(timeout=wait) if wait > 0 else self._lock.acquire(blocking=False)
        if not got:
            raise LedgerBusy("another thread of this worker holds the ledger")
        try:
            yield
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _writer(self, wait: float):
        """Writers queue on an flock beside the database before BEGIN IMMEDIATE: SQLite's own busy handler sleeps
        1, 2, 5, 10… ms between tries (measured with two processes charging at once: 0.85 ms per charge; queued on
        the lock, 0.15 ms). Non-blocking tries until `wait` has passed, so a holder that never lets go costs a
        bounded wait and a `LedgerBusy`, not a frozen worker."""
        if self._writer_fd is None:
            self._writer_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        pause = 0.0005
        while True:
            try:
                fcntl.flock(self._writer_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LedgerBusy(f"{self.path}.lock is held by another process for over {wait:g} s") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        try:
            yield
        finally:
            fcntl.flock(self._writer_fd, fcntl.LOCK_UN)

    def _tx(self, fn, wait: float = CLI_WAIT):
        """Run fn(conn) in one write transaction; marks the delivered batches served in the same commit."""
        with self._held(wait):
            conn = self.conn(wait)
            with self._writer(wait):
                settled = [self._settled.popleft() for _ in range(len(self._settled))]
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        if settled:
                            self._mark_served(conn, settled)
                        result = fn(conn)
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                    conn.execute("COMMIT")
                except BaseException as exc:
                    self._settled.extendleft(reversed(settled))
                    if isinstance(exc, sqlite3.OperationalError) and _busy(exc):
                        raise LedgerBusy(f"{self.path} stayed locked for over {wait:g} s") from None
                    raise
                return result

    @staticmethod
    def _mark_served(conn, batch_ids: list[int]) -> None:
        """Settle delivered batches. One released meanwhile (its settle was held up past the reservation's expiry)
        is charged again: an answer handed to the client is never left unbilled."""
        marks = ",".join("?" * len(batch_ids))
        recharged = conn.execute(f"UPDATE batches SET state='served' WHERE id IN ({marks}) AND state='released' "
                                 "RETURNING key_id, rows", batch_ids).fetchall()
        for key_id, rows in recharged:
            if key_id is not None:
                conn.execute("UPDATE keys SET rows_served = rows_served + ?, requests = requests + 1 WHERE id=?",
                             (rows, key_id))
        conn.execute(f"UPDATE batches SET state='served' WHERE id IN ({marks}) AND state='reserved'", batch_ids)

    def _read(self, fn, wait: float = CLI_WAIT):
        with self._held(wait):
            try:
                return fn(self.conn(wait))
            except sqlite3.OperationalError as exc:
                if _busy(exc):
                    raise LedgerBusy(f"{self.path} stayed locked for over {wait:g} s") from None
                raise

    def _close_locked(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._writer_fd is not None:
            os.close(self._writer_fd)
            self._writer_fd = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    # -- the guard's questions (the key CLI's are KeyQueries')
    def lookup(self, key: str, wait: float = CLI_WAIT) -> int | None:
        row = self._read(lambda c: c.execute("SELECT id FROM keys WHERE key_hash=? AND revoked IS NULL",
                                             (hash_key(key),)).fetchone(), wait)
        return row[0] if row else None

    _assess = staticmethod(assess)

    @staticmethod
    def _count_refusal(conn, key_id: int, refusal: Decision, now: float) -> Decision:
        if refusal.status == 429:
            conn.execute("UPDATE keys SET refused = refused + 1, last_seen=? WHERE id=?", (now, key_id))
        return refusal

    def can_afford(self, key_id: int, rows: int = 1, wait: float = CLI_WAIT) -> Decision | None:
        """The refusal a request of `rows` would get now, or None. A read, so that the guard can refuse a key with
        nothing left before it reads the body; `reserve` decides for good."""
        now = time.time()
        refusal, _ = self._assess(self._read(lambda c: c.execute(KEY_STATE, (key_id,)).fetchone(), wait), rows, now)
        if refusal is None:
            return None
        return self._tx(lambda conn: self._count_refusal(conn, key_id, refusal, now), wait)

    def reserve(self, key_id: int | None, rows: int, endpoint: str, digest: str,
                wait: float = CLI_WAIT) -> Decision:
        """Check budget and rate and charge `rows` to the key, atomically, recording the batch as reserved."""
        now = time.time()

        def run(conn) -> Decision:
            if key_id is not None:
                refusal, tokens = self._assess(conn.execute(KEY_STATE, (key_id,)).fetchone(), rows, now)
                if refusal is not None:
                    return self._count_refusal(conn, key_id, refusal, now)
                conn.execute("UPDATE keys SET rows_served = rows_served + ?, requests = requests + 1,"
                             " first_seen = COALESCE(first_seen, ?), last_seen = ?, tokens = COALESCE(?, tokens),"
                             " tokens_ts = ? WHERE id=?", (rows, now, now, tokens, now, key_id))
            cur = conn.execute("INSERT INTO batches (key_id, ts, endpoint, rows, digest, state) "
                               "VALUES (?, ?, ?, ?, ?, 'reserved')", (key_id, now, endpoint, rows, digest))
            return Decision(True, batch_id=cur.lastrowid, key_id=key_id, rows=rows)

        return self._tx(run, wait)


    def refund(self, decision: Decision, wait: float = CLI_WAIT) -> None:
        """Undo a reservation whose answer was not handed to the client (refused by the model, client gone). Only a
        batch still reserved is refunded: one released already gave its rows back, and giving them twice would drive
        the key's usage below zero."""
        def run(conn):
            if conn.execute("DELETE FROM batches WHERE id=? AND state='reserved'", (decision.batch_id,)).rowcount == 0:
                return
            if decision.key_id is not None:
                conn.execute("UPDATE keys SET rows_served = rows_served - ?, requests = requests - 1,"
                             " tokens = CASE WHEN rate_rows_per_min IS NULL THEN tokens"
                             " ELSE MIN(rate_rows_per_min, tokens + ?) END WHERE id=?",
                             (decision.rows, decision.rows, decision.key_id))
        self._tx(run, wait)

    def release_expired(self, ttl: float = RESERVATION_TTL, wait: float = CLI_WAIT) -> int:
        """Give back the rows of reservations older than `ttl` (their worker was killed); returns how many."""
        cutoff = time.time() - ttl

        def run(conn) -> int:
            stale = conn.execute("SELECT id, key_id, rows FROM batches WHERE state='reserved' AND ts < ?",
                                 (cutoff,)).fetchall()
            for batch_id, key_id, rows in stale:
                conn.execute("UPDATE batches SET state='released' WHERE id=? AND state='reserved'", (batch_id,))
                if key_id is not None:
                    conn.execute("UPDATE keys SET rows_served = rows_served - ?, requests = requests - 1 WHERE id=?",
                                 (rows, key_id))
            return len(stale)

        return self._tx(run, wait)
