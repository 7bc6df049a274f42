"""The key CLI's queries (add, find, revoke, list, batch history, active count), written once for both ledgers.

The SQL is the same on SQLite and PostgreSQL but for the placeholder: it is written with `?` and each backend says
its own (`PLACEHOLDER`), its error for a duplicate name (`DUPLICATE`), and how it runs a transaction (`_tx`) and a
read (`_read`)."""
from __future__ import annotations

import time

from serving.ledger_rules import BATCH_COLUMNS, LIST_COLUMNS, hash_key, new_key

FIND_COLUMNS = ["id", "name", "prefix", "revoked"]


class KeyQueries:
    PLACEHOLDER = "?"
    DUPLICATE: type[Exception] = Exception  # the backend's unique-violation error

    def _sql(self, text: str) -> str:
        return text if self.PLACEHOLDER == "?" else text.replace("?", self.PLACEHOLDER)

    def add_key(self, name: str, row_budget: int | None = None, rate: float | None = None,
                key: str | None = None) -> str:
        key = key or new_key()
        now = time.time()
        sql = self._sql("INSERT INTO keys (name, key_hash, prefix, row_budget, rate_rows_per_min, tokens, tokens_ts,"
                        " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        try:
            self._tx(lambda c: c.execute(sql, (name, hash_key(key), key[:8], row_budget, rate, rate, now, now)))
        except self.DUPLICATE:
            raise ValueError(f"a key named {name!r} already exists (names are unique, revoked ones included)") from None
        return key

    def find(self, name_or_prefix: str, active_only: bool = False) -> list[dict]:
        """Keys whose name, or whose whole 8-character prefix, is `name_or_prefix`."""
        sql = "SELECT id, name, prefix, revoked FROM keys WHERE (name=? OR prefix=?)"
        sql = self._sql(sql + (" AND revoked IS NULL" if active_only else "") + " ORDER BY id")
        rows = self._read(lambda c: c.execute(sql, (name_or_prefix, name_or_prefix)).fetchall())
        return [dict(zip(FIND_COLUMNS, r)) for r in rows]

    def revoke(self, key_id: int) -> bool:
        sql = self._sql("UPDATE keys SET revoked=? WHERE id=? AND revoked IS NULL")
        return self._tx(lambda c: c.execute(sql, (time.time(), key_id)).rowcount) > 0

    def list_keys(self) -> list[dict]:
        rows = self._read(lambda c: c.execute(f"SELECT {', '.join(LIST_COLUMNS)} FROM keys ORDER BY id").fetchall())
        return [dict(zip(LIST_COLUMNS, r)) for r in rows]

    def batches(self, key_id: int | None = None, limit: int = 100) -> list[dict]:
        """The latest batches of a key (None: those served while the service ran open)."""
        open_sql = self._sql("SELECT b.id, NULL, b.ts, b.endpoint, b.rows, b.digest, b.state FROM batches b "
                             "WHERE b.key_id IS NULL ORDER BY b.id DESC LIMIT ?")
        key_sql = self._sql("SELECT b.id, k.name, b.ts, b.endpoint, b.rows, b.digest, b.state FROM batches b "
                            "JOIN keys k ON k.id = b.key_id WHERE k.id=? ORDER BY b.id DESC LIMIT ?")

        def run(c):
            if key_id is None:
                return c.execute(open_sql, (limit,)).fetchall()
            return c.execute(key_sql, (key_id, limit)).fetchall()
        return [dict(zip(BATCH_COLUMNS, r)) for r in self._read(run)]

    def active_keys(self) -> int:
        return self._read(lambda c: c.execute("SELECT COUNT(*) FROM keys WHERE revoked IS NULL").fetchone()[0])
