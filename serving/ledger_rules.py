"""What every ledger backend decides the same way: key hashing, the admission outcome (`Decision`), the budget and
rate assessment of a key's row, the errors the guard answers with 503, and the time limits. The SQLite ledger
(serving/ledger.py) and the PostgreSQL one (serving/ledger_pg.py) import these; neither has its own copy."""
from __future__ import annotations



import hashlib
import math
import secrets
from dataclasses import dataclass

KEY_PREFIX = "ud_"
# BentoML's request timeout is 300 s (serving/service.py): no live worker holds a reservation longer than that.
REQUEST_TIMEOUT = 300.0
RESERVATION_TTL = REQUEST_TIMEOUT + 60.0
CLI_WAIT = 30.0  # the key CLI may wait this long for the lock; the service waits far less (serving/admission.py)
# The columns of a key's row that `assess` reads, in this order (both backends select them so).
KEY_STATE_COLUMNS = "row_budget, rate_rows_per_min, tokens, tokens_ts, rows_served, revoked"
LIST_COLUMNS = ["id", "name", "prefix", "row_budget", "rate_rows_per_min", "rows_served", "requests", "refused",
                "first_seen", "last_seen", "created", "revoked"]
BATCH_COLUMNS = ["id", "key", "ts", "endpoint", "rows", "digest", "state"]


class LedgerBusy(RuntimeError):
    """The ledger's locks (or its connections) stayed taken for longer than the caller may wait."""


class LedgerUnavailable(RuntimeError):
    """The keys database is gone, unreachable, or is not a keys database."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


@dataclass
class Decision:
    """The outcome of an admission question: allowed (with the reserved batch), or a refusal to send as is."""

    allowed: bool
    status: int = 200
    error: str = ""
    detail: str = ""
    retry_after: int | None = None
    batch_id: int | None = None
    key_id: int | None = None
    rows: int = 0


def assess(row, rows: int, now: float) -> tuple[Decision | None, float | None]:
    """Budget and rate checks on a key's row (KEY_STATE_COLUMNS, None for no such key): (refusal, None), or
    (None, tokens left after the charge; None when the key has no rate)."""
    if row is None or row[5] is not None:
        return Decision(False, 401, "unauthorized", "the API key was revoked"), None
    budget, rate, tokens, tokens_ts, served, _ = row
    if budget is not None and served + rows > budget:
        left = max(0, budget - served)
        return Decision(False, 429, "over_budget",
                        f"this request has {rows} rows; the key's budget has {left} of {budget} rows left"), None
    if rate is None:
        return None, None
    capacity = rate
    tokens = capacity if tokens is None else min(capacity, tokens + (now - (tokens_ts or now)) * rate / 60)
    if rows > capacity:
        return Decision(False, 429, "over_rate", f"{rows} rows in one request exceed the key's rate of {rate:g} "
                        "rows per minute; send smaller batches"), None
    if tokens < rows:
        wait = math.ceil((rows - tokens) * 60 / rate)
        return Decision(False, 429, "over_rate", f"rate limit of {rate:g} rows per minute reached; retry in "
                        f"{wait} s", retry_after=max(1, wait)), None
    return None, tokens - rows


class SettleQueue:
    """Delivered batches not yet marked served, in either ledger: they are committed with the ledger's next
    transaction (`_tx` drains `_settled`), so a successful request costs one write."""

    _settled: "deque[int]"  # made by each ledger's __init__

    def settle(self, decision: Decision) -> None:
        """The answer of a reserved batch is handed to the client: marked served in this worker's next transaction
        (or by its background thread within half a second)."""
        self._settled.append(decision.batch_id)

    def pending_settles(self) -> int:
        return len(self._settled)

    def flush(self, wait: float = CLI_WAIT) -> None:
        """Commit the pending settles now (a worker with no next request, or about to exit)."""
        if self._settled:
            self._tx(lambda conn: None, wait)


def is_url(target) -> bool:
    """A PostgreSQL URL (the keys database on a server) rather than a path to a SQLite file."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def open_ledger(target, serving: bool = False, create: bool = True):
    """The ledger `target` names: a `postgresql://` URL is the PostgreSQL backend, anything else a SQLite path.
    `create=False` never creates the database: the CLI's reads, and a service that requires keys (running open, a
    SQLite service may create its record of anonymous batches; a service never creates a PostgreSQL schema)."""
    if is_url(target):
        from serving.ledger_pg import PgLedger

        return PgLedger(target, serving=serving, create=create and not serving)
    from serving.ledger import Ledger

    return Ledger(target, serving=serving, create=create)
