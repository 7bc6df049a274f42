"""The keys database on PostgreSQL: the tables, questions and semantics of serving/ledger.py, shared by any number of
replicas (`UNDISTILLABLE_KEYS_DB=postgresql://…`).

Admission is the same reservation: `reserve` locks the key's row (`SELECT … FOR UPDATE`), checks budget and rate
(serving/ledger_rules.py) and charges the rows in one short transaction before the model runs, so replicas that
share the database can never run the model beyond a budget; no transaction is held across the model call. Refunds,
settles (piggybacked on the worker's next write) and the release of expired reservations are short transactions too.

`wait` bounds every call: the pool's wait for a connection, `lock_timeout` for a row another replica holds, and
`statement_timeout`; past it `LedgerBusy`. A server that cannot be reached, or a connection lost mid-call, raises
`LedgerUnavailable`; both are answered 503 by the guard. A connection found dead before its transaction committed is
retried once on a fresh one (the server rolled the transaction back); one lost during COMMIT is not, since it may have
committed: a reservation committed so stays `reserved` and is released after RESERVATION_TTL. Each call is a round
trip to the server, so the service runs it in a thread, never on the event loop: `wait=0` (the event loop's first
try, serving/admission.py) answers only what needs no round trip (`can_afford` right after `lookup`) and raises
`LedgerBusy` for the rest, which moves the call to a thread.
"""
from __future__ import annotations

import collections
import threading
import time
import weakref

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import ConnectionPool, PoolTimeout

from serving.ledger_keys import KeyQueries
from serving.ledger_rules import (CLI_WAIT, KEY_STATE_COLUMNS, RESERVATION_TTL, Decision, LedgerBusy, LedgerUnavailable,
                                  SettleQueue, assess, hash_key, redact)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS keys (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        key_hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        row_budget BIGINT,                     -- NULL: unlimited
        rate_rows_per_min DOUBLE PRECISION,    -- NULL: unlimited
        tokens DOUBLE PRECISION,               -- token bucket for the rate, capacity = one minute of rows
        tokens_ts DOUBLE PRECISION,
        rows_served BIGINT NOT NULL DEFAULT 0, -- rows charged: served and reserved
        requests BIGINT NOT NULL DEFAULT 0,
        refused BIGINT NOT NULL DEFAULT 0,
        first_seen DOUBLE PRECISION,
        last_seen DOUBLE PRECISION,
        created DOUBLE PRECISION NOT NULL,
        revoked DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS batches (
        id BIGSERIAL PRIMARY KEY,
        key_id BIGINT,                         -- NULL: served while the service ran open (no keys)
        ts DOUBLE PRECISION NOT NULL,
        endpoint TEXT NOT NULL,
        rows INTEGER NOT NULL,
        digest TEXT NOT NULL,                  -- sha256 of the request body
        state TEXT NOT NULL DEFAULT 'served')  -- reserved (admitted, not yet delivered) | served | released""",
    "CREATE INDEX IF NOT EXISTS batches_key ON batches(key_id, ts)",
    "CREATE INDEX IF NOT EXISTS batches_open ON batches(state, ts)",
]
KEY_STATE = f"SELECT {KEY_STATE_COLUMNS} FROM keys WHERE id=%s"
# Settle delivered batches in one statement. One released meanwhile (its settle was held up past the reservation's
# expiry) is charged again: an answer handed to the client is never left unbilled.
MARK_SERVED = """WITH open AS (SELECT id, key_id, rows, state FROM batches WHERE id = ANY(%s)
                               AND state IN ('reserved', 'released') FOR UPDATE),
     marked AS (UPDATE batches b SET state='served' FROM open WHERE b.id = open.id),
     recharge AS (SELECT key_id, SUM(rows) AS rows, COUNT(*) AS n FROM open
                  WHERE state='released' AND key_id IS NOT NULL GROUP BY key_id)
UPDATE keys SET rows_served = rows_served + recharge.rows, requests = requests + recharge.n
FROM recharge WHERE keys.id = recharge.key_id"""
POOL_SIZE = 4  # connections per worker: requests beyond it queue on the pool (bounded by `wait`)
CONNECT_TIMEOUT = 5  # seconds to reach the server (the CLI, and each connection the pool opens)
# A replica that stops between BEGIN and COMMIT (suspended, its thread stuck) must not hold a key's row for ever
IDLE_IN_TRANSACTION = "10s"
LOOKUP_FRESH = 0.5  # seconds a key's state read by `lookup` answers `can_afford` (the same request's next question)
BUSY = (pgerrors.LockNotAvailable, pgerrors.QueryCanceled, pgerrors.DeadlockDetected, pgerrors.SerializationFailure)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class _Lost(Exception):
    """A connection that died before its transaction committed: safe to run the transaction again."""


class PgLedger(SettleQueue, KeyQueries):
    """The keys database on a PostgreSQL server. `serving=True` (the guard in each worker) uses a connection pool;
    the CLI one connection. `create` makes the tables when they are missing (the CLI's init and add)."""

    PLACEHOLDER = "%s"  # psycopg's, in KeyQueries' SQL
    DUPLICATE = pgerrors.UniqueViolation

    def __init__(self, url: str, serving: bool = False, create: bool = False):
        self.url, self.where = url, redact(url)
        self.serving, self.create = serving, create
        self._pool: ConnectionPool | None = None
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()  # guards opening the pool, and the CLI's one connection
        self._settled: collections.deque[int] = collections.deque()  # delivered, not yet marked served
        self._looked_up: dict[int, tuple[float, tuple]] = {}  # key id -> (when, state) read by `lookup`
        self._bounds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # connection -> lock_timeout set (ms)

    # -- plumbing
    def _configure(self, conn: psycopg.Connection) -> None:
        conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, false)", (IDLE_IN_TRANSACTION,))

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                   application_name="undistillable-keys")
        except psycopg.Error as exc:
            raise LedgerUnavailable(f"cannot reach the keys database {self.where}: {str(exc).strip()}") from None
        try:
            self._configure(conn)
            if self.create:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext('undistillable keys schema'))")
                    for statement in SCHEMA:
                        conn.execute(statement)
        except psycopg.Error as exc:  # e.g. a role without CREATE on the database
            conn.close()
            raise LedgerUnavailable(f"cannot prepare the keys tables in {self.where}: {_first_line(exc)}") from None
        return conn

    def _get(self, wait: float) -> psycopg.Connection:
        if not self.serving:
            self._lock.acquire()
            if self._conn is None or self._conn.closed:
                try:
                    self._conn = self._connect()
                except BaseException:
                    self._lock.release()
                    raise
            return self._conn
        if self._pool is None:
            with self._lock:
                if self._pool is None:  # opened in the worker that uses it (never across a fork)
                    pool = ConnectionPool(self.url, min_size=1, max_size=POOL_SIZE, open=False, name="ledger",
                                          configure=self._configure, kwargs={
                                              "autocommit": True, "connect_timeout": CONNECT_TIMEOUT,
                                              "application_name": "undistillable-serving"})
                    pool.open(wait=False)
                    self._pool = pool
        try:
            return self._pool.getconn(timeout=max(wait, 0.001))
        except PoolTimeout:
            raise LedgerBusy(f"no connection to the keys database {self.where} within {wait:g} s (the server is "
                             "unreachable, or every pooled connection is busy)") from None

    def _put(self, conn: psycopg.Connection) -> None:
        if not self.serving:
            self._lock.release()
        else:
            self._pool.putconn(conn)  # a broken connection is discarded by the pool

    def _bound(self, conn: psycopg.Connection, wait: float) -> None:
        """lock_timeout (and statement_timeout, a little longer) of this connection set to `wait`."""
        ms = max(1, int(wait * 1000))  # 0 would mean no limit at all
        if self._bounds.get(conn) != ms:
            conn.execute("SELECT set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false)",
                         (f"{ms}ms", f"{ms + 1000}ms"))
            self._bounds[conn] = ms

    def _mapped(self, exc: BaseException, wait: float) -> Exception | None:
        if isinstance(exc, BUSY):
            return LedgerBusy(f"the keys database {self.where} stayed locked for over {wait:g} s "
                              f"({type(exc).__name__})")
        if isinstance(exc, (pgerrors.UndefinedTable, pgerrors.UndefinedColumn)):
            return LedgerUnavailable(f"{self.where} holds no keys tables ({_first_line(exc)}); create them with "
                                     f"`python -m serving.keys --db URL init`")
        if isinstance(exc, psycopg.OperationalError):
            return LedgerUnavailable(f"lost the keys database {self.where}: {_first_line(exc)}")
        return None

    def _drain(self) -> list[int]:
        """The pending settles, taken once each: several threads of a worker run transactions at once."""
        out = []
        while True:
            try:
                out.append(self._settled.popleft())
            except IndexError:
                return out

    def _call(self, fn, wait: float, write: bool):
        """fn(conn), in one transaction when `write` (the pending settles marked served in the same commit). One
        statement per round trip: sending BEGIN and the settles with the row lock, and COMMIT with the charge (two
        round trips, client-side binding), or psycopg's pipeline mode, measured no faster on loopback: the server's
        parse and plan, not the network, is the cost."""
        if wait <= 0:  # a round trip is a wait: the event loop's try (serving/admission.py) moves to a thread
            raise LedgerBusy(f"the keys database {self.where} is a round trip away; asked not to wait")
        for attempt in (0, 1):
            settled = self._drain() if write else []
            conn = self._get(wait)
            committing = False
            try:
                try:
                    self._bound(conn, wait)
                    if not write:
                        return fn(conn)
                    conn.execute("BEGIN")
                    if settled:
                        conn.execute(MARK_SERVED, (settled,))
                    result = fn(conn)
                    committing = True
                    conn.execute("COMMIT")
                    return result
                except BaseException as exc:
                    self._settled.extendleft(reversed(settled))  # marking served again is harmless
                    if not conn.broken and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        try:
                            conn.execute("ROLLBACK")
                        except psycopg.Error:
                            pass
                    if (attempt == 0 and not committing and conn.broken and isinstance(exc, psycopg.OperationalError)
                            and not isinstance(exc, BUSY)):
                        raise _Lost() from exc
                    mapped = self._mapped(exc, wait)
                    if mapped is not None:
                        raise mapped from None
                    raise
                finally:
                    if conn.broken:
                        self._bounds.pop(conn, None)
                        if not self.serving:
                            self._conn = None
                    self._put(conn)
            except _Lost:
                continue  # the server dropped this connection (a restart): once more on a fresh one
        raise AssertionError("unreachable")

    def _tx(self, fn, wait: float = CLI_WAIT):
        return self._call(fn, wait, write=True)

    def _read(self, fn, wait: float = CLI_WAIT):
        return self._call(fn, wait, write=False)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    # -- the guard's questions (the key CLI's are KeyQueries')
    def lookup(self, key: str, wait: float = CLI_WAIT) -> int | None:
        """The active key's id, or None. Its budget and rate state comes with it, kept for the `can_afford` of the
        same request (one round trip less; `reserve` rereads it under the row lock and decides for good)."""
        row = self._read(lambda c: c.execute(f"SELECT id, {KEY_STATE_COLUMNS} FROM keys WHERE key_hash=%s AND "
                                             "revoked IS NULL", (hash_key(key),)).fetchone(), wait)
        if row is None:
            return None
        self._looked_up[row[0]] = (time.monotonic(), row[1:])
        return row[0]

    @staticmethod
    def _count_refusal(conn, key_id: int, refusal: Decision, now: float) -> Decision:
        if refusal.status == 429:
            conn.execute("UPDATE keys SET refused = refused + 1, last_seen=%s WHERE id=%s", (now, key_id))
        return refusal

    def can_afford(self, key_id: int, rows: int = 1, wait: float = CLI_WAIT) -> Decision | None:
        """The refusal a request of `rows` would get now, or None (a read; `reserve` decides for good)."""
        now = time.time()
        seen = self._looked_up.pop(key_id, None)
        if seen is not None and time.monotonic() - seen[0] < LOOKUP_FRESH:
            state = seen[1]
        else:
            state = self._read(lambda c: c.execute(KEY_STATE, (key_id,)).fetchone(), wait)
        refusal, _ = assess(state, rows, now)
        if refusal is None:
            return None
        return self._tx(lambda conn: self._count_refusal(conn, key_id, refusal, now), wait)

    def reserve(self, key_id: int | None, rows: int, endpoint: str, digest: str,
                wait: float = CLI_WAIT) -> Decision:
        """Lock the key's row, check budget and rate and charge `rows`, recording the batch as reserved."""
        now = time.time()

        def run(conn) -> Decision:
            if key_id is not None:
                state = conn.execute(KEY_STATE + " FOR UPDATE", (key_id,)).fetchone()
                refusal, tokens = assess(state, rows, now)
                if refusal is not None:
                    return self._count_refusal(conn, key_id, refusal, now)
                batch_id = conn.execute(
                    "WITH charged AS (UPDATE keys SET rows_served = rows_served + %s, requests = requests + 1,"
                    " first_seen = COALESCE(first_seen, %s), last_seen = %s, tokens = COALESCE(%s, tokens),"
                    " tokens_ts = %s WHERE id=%s) INSERT INTO batches (key_id, ts, endpoint, rows, digest, state)"
                    " VALUES (%s, %s, %s, %s, %s, 'reserved') RETURNING id",
                    (rows, now, now, tokens, now, key_id, key_id, now, endpoint, rows, digest)).fetchone()[0]
            else:
                batch_id = conn.execute("INSERT INTO batches (key_id, ts, endpoint, rows, digest, state) VALUES "
                                        "(NULL, %s, %s, %s, %s, 'reserved') RETURNING id",
                                        (now, endpoint, rows, digest)).fetchone()[0]
            return Decision(True, batch_id=batch_id, key_id=key_id, rows=rows)

        return self._tx(run, wait)


    def refund(self, decision: Decision, wait: float = CLI_WAIT) -> None:
        """Undo a reservation whose answer was not delivered. Only a batch still reserved is refunded, so a refund
        retried after a lost connection (serving/admission.py) or one that comes after the release never gives
        the rows back twice."""
        def run(conn):
            gone = conn.execute("DELETE FROM batches WHERE id=%s AND state='reserved' RETURNING rows",
                                (decision.batch_id,)).fetchone()
            if gone is not None and decision.key_id is not None:
                conn.execute("UPDATE keys SET rows_served = rows_served - %s, requests = requests - 1,"
                             " tokens = CASE WHEN rate_rows_per_min IS NULL THEN tokens"
                             " ELSE LEAST(rate_rows_per_min, tokens + %s) END WHERE id=%s",
                             (gone[0], gone[0], decision.key_id))
        self._tx(run, wait)

    def release_expired(self, ttl: float = RESERVATION_TTL, wait: float = CLI_WAIT) -> int:
        """Give back the rows of reservations older than `ttl` (their worker was killed); returns how many. Replicas
        release concurrently: each reserved batch is released by one of them only (the UPDATE rechecks its state)."""
        cutoff = time.time() - ttl

        def run(conn) -> int:
            stale = conn.execute("UPDATE batches SET state='released' WHERE state='reserved' AND ts < %s "
                                 "RETURNING key_id, rows", (cutoff,)).fetchall()
            per_key = collections.Counter()
            count = collections.Counter()
            for key_id, rows in stale:
                if key_id is not None:
                    per_key[key_id] += rows
                    count[key_id] += 1
            for key_id in sorted(per_key):  # one order of row locks across replicas
                conn.execute("UPDATE keys SET rows_served = rows_served - %s, requests = requests - %s WHERE id=%s",
                             (per_key[key_id], count[key_id], key_id))
            return len(stale)

        return self._tx(run, wait)
