"""The ledger as a worker's event loop may use it: never a blocking wait on the loop.

Each call first runs on the loop with no wait at all (the common case: the lock is free, a call takes ~0.1 ms, less
than a thread hop); if the lock or the database is busy it moves to a thread that waits at most `LOCK_WAIT`, and then
gives up with `LedgerBusy`, which the guard answers with 503 and `Retry-After`. A ledger on a server
(serving/ledger_pg.py) answers `wait=0` only when it needs no round trip and raises `LedgerBusy` at once otherwise, so
its network calls always run in the thread. A background thread per worker commits delivered answers' settles the
worker has no request to carry, and releases reservations left by killed workers.
"""
from __future__ import annotations

import atexit
import functools
import logging
import threading
import time

import anyio

from serving.ledger_rules import Decision, LedgerBusy, LedgerUnavailable

logger = logging.getLogger("bentoml.undistillable")

LOCK_WAIT = 2.0  # seconds a request may wait for the ledger before it gets 503
RETRY_AFTER = 1
FLUSH_EVERY = 0.5  # seconds between the background commits of pending settles
RELEASE_EVERY = 60.0


class Admission:
    """Async, bounded access to one worker's Ledger."""

    def __init__(self, ledger):  # serving.ledger.Ledger or serving.ledger_pg.PgLedger
        self.ledger = ledger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._background, name="ledger-settles", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    async def call(self, method, *args):
        try:
            return method(*args, wait=0)
        except LedgerBusy:
            pass
        return await anyio.to_thread.run_sync(functools.partial(method, *args, wait=LOCK_WAIT))

    async def lookup(self, key: str) -> int | None:
        return await self.call(self.ledger.lookup, key)

    async def can_afford(self, key_id: int) -> Decision | None:
        return await self.call(self.ledger.can_afford, key_id, 1)

    async def reserve(self, key_id: int | None, rows: int, endpoint: str, digest: str) -> Decision:
        return await self.call(self.ledger.reserve, key_id, rows, endpoint, digest)

    def settle(self, decision: Decision) -> None:
        self.ledger.settle(decision)

    async def refund(self, decision: Decision) -> None:
        await self.call(self.ledger.refund, decision)

    def refund_later(self, decision: Decision) -> None:
        """From a cancelled request, which can no longer await: the background thread refunds."""
        threading.Thread(target=self._refund_retrying, args=(decision,), name="ledger-refund", daemon=True).start()

    def _refund_retrying(self, decision: Decision) -> None:
        for _ in range(30):
            try:
                self.ledger.refund(decision, wait=LOCK_WAIT)
                return
            except (LedgerBusy, LedgerUnavailable) as exc:
                logger.warning("refund of batch %s postponed: %s", decision.batch_id, exc)
                time.sleep(RETRY_AFTER)
        logger.error("batch %s (%d rows) could not be refunded; it is released after the reservation expires",
                     decision.batch_id, decision.rows)

    def _background(self) -> None:
        next_release = 0.0
        while not self._stop.wait(FLUSH_EVERY):
            try:
                if self.ledger.pending_settles():
                    self.ledger.flush(wait=LOCK_WAIT)
                if time.monotonic() >= next_release:
                    released = self.ledger.release_expired(wait=LOCK_WAIT)
                    if released:
                        logger.warning("released %d reservations left by a killed worker", released)
                    next_release = time.monotonic() + RELEASE_EVERY
            except (LedgerBusy, LedgerUnavailable) as exc:  # the next round tries again
                logger.warning("ledger background commit postponed: %s", exc)
            except Exception:
                logger.exception("ledger background commit failed")

    def close(self) -> None:
        """Commit what is pending (a worker that exits cleanly leaves no delivered answer unsettled)."""
        self._stop.set()
        try:
            self.ledger.flush(wait=LOCK_WAIT)
        except Exception as exc:
            logger.warning("pending settles not committed at exit: %s", exc)
