"""The ledger's semantics, the same test over both backends: SQLite (a file) and PostgreSQL (a real server started
by the `postgres` fixture). Two ledger objects on one database stand for two replicas."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from serving.ledger_rules import LedgerBusy, LedgerUnavailable, is_url, open_ledger

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path):
    """A keys database (a path or a URL) with its tables made."""
    where = str(tmp_path / "keys.sqlite") if request.param == "sqlite" else request.getfixturevalue("postgres_db")
    ledger = open_ledger(where, create=True)
    ledger.active_keys()  # makes the file (SQLite) or the tables (PostgreSQL)
    ledger.close()
    return where


@pytest.fixture
def ledgers(target):
    """Opener of ledgers on `target` (serving=True: what each worker of each replica holds), closed at the end."""
    opened = []

    def make(serving: bool = True):
        ledger = open_ledger(target, serving=serving)
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        ledger.close()


def usage(ledger, name: str) -> dict:
    return next(k for k in ledger.list_keys() if k["name"] == name)


def test_two_replicas_reserving_at_once_never_overspend(target, ledgers):
    admin = ledgers(serving=False)
    key = admin.add_key("burst", row_budget=100)
    replicas = [ledgers(), ledgers()]
    key_id = replicas[0].lookup(key)
    granted, lock = [], threading.Lock()

    def client(ledger):
        while True:
            decision = ledger.reserve(key_id, 3, "/predict_npy", "0" * 64, wait=10)
            if not decision.allowed:
                assert decision.error == "over_budget", decision
                return
            ledger.settle(decision)
            with lock:
                granted.append(decision.rows)

    threads = [threading.Thread(target=client, args=(replicas[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for ledger in replicas:
        ledger.flush(wait=10)
    # 3-row requests on a 100-row budget: every client stops at its first refusal, which comes at 99 rows
    assert sum(granted) == 99 == usage(admin, "burst")["rows_served"]
    batches = admin.batches(key_id, limit=1000)
    assert len(batches) == 33 and {b["state"] for b in batches} == {"served"}


def test_refund_gives_the_rows_back_once(ledgers):
    admin, worker = ledgers(serving=False), ledgers()
    key = admin.add_key("refunded", row_budget=10, rate=60)
    key_id = worker.lookup(key)
    decision = worker.reserve(key_id, 5, "/predict", "1" * 64)
    assert usage(admin, "refunded")["rows_served"] == 5
    worker.refund(decision)
    worker.refund(decision)  # a retried refund (serving/admission.py retries after a lost connection)
    k = usage(admin, "refunded")
    assert (k["rows_served"], k["requests"]) == (0, 0) and admin.batches(key_id) == []
    assert worker.reserve(key_id, 10, "/predict", "2" * 64).allowed  # the whole budget is there again


def test_settle_rides_on_the_next_write_and_release_takes_only_open_reservations(ledgers):
    admin = ledgers(serving=False)
    key = admin.add_key("settled", row_budget=50)
    replicas = [ledgers(), ledgers()]
    key_id = replicas[0].lookup(key)
    delivered = replicas[0].reserve(key_id, 4, "/predict", "a" * 64)
    replicas[0].settle(delivered)
    assert [b["state"] for b in admin.batches(key_id)] == ["reserved"]  # no transaction of its own
    abandoned = replicas[0].reserve(key_id, 7, "/predict", "b" * 64)  # the next write carries the settle
    assert {b["id"]: b["state"] for b in admin.batches(key_id)} == {delivered.batch_id: "served",
                                                                    abandoned.batch_id: "reserved"}
    # both replicas look for expired reservations: the abandoned one is released once, by one of them
    released = [replicas[0].release_expired(ttl=0), replicas[1].release_expired(ttl=0)]
    assert sorted(released) == [0, 1]
    assert usage(admin, "settled")["rows_served"] == 4
    replicas[1].refund(abandoned)  # a refund that comes after the release gives nothing back twice
    assert usage(admin, "settled")["rows_served"] == 4
    assert {b["id"]: b["state"] for b in admin.batches(key_id)} == {delivered.batch_id: "served",
                                                                    abandoned.batch_id: "released"}


def test_rate_is_one_token_bucket_for_all_replicas(ledgers):
    admin = ledgers(serving=False)
    key = admin.add_key("rated", rate=6)
    replicas = [ledgers(), ledgers()]
    key_id = replicas[0].lookup(key)
    assert replicas[0].reserve(key_id, 4, "/predict", "c" * 64).allowed
    refused = replicas[1].reserve(key_id, 4, "/predict", "d" * 64)  # 2 tokens left in the shared bucket
    assert (refused.error, refused.retry_after is not None and refused.retry_after >= 1) == ("over_rate", True)
    assert replicas[1].can_afford(key_id, 2) is None and replicas[1].can_afford(key_id, 3).error == "over_rate"
    assert usage(admin, "rated")["refused"] == 2


def test_a_row_held_by_another_writer_is_busy_within_the_wait(target, ledgers):
    admin = ledgers(serving=False)
    key = admin.add_key("held", row_budget=10)
    worker = ledgers()
    key_id = worker.lookup(key)
    if is_url(target):
        import psycopg

        holder = psycopg.connect(target)
        holder.execute("SELECT * FROM keys WHERE id=%s FOR UPDATE", (key_id,))  # a transaction left open
    else:
        holder = sqlite3.connect(target, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerBusy):
            worker.reserve(key_id, 1, "/predict", "e" * 64, wait=0.3)
        assert worker.lookup(key, wait=0.3) == key_id  # reads do not wait for writers
    finally:
        holder.rollback() if is_url(target) else holder.execute("ROLLBACK")
        holder.close()
    assert worker.reserve(key_id, 1, "/predict", "f" * 64, wait=5).allowed
    assert usage(admin, "held")["rows_served"] == 1


def keys(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.keys", "--db", target, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_a_revoke_that_names_two_keys_is_refused(target, ledgers):
    """A name equal to another key's prefix matches both: the CLI refuses, lists them and revokes neither."""
    first = keys(target, "add", "first").stdout.strip()
    assert keys(target, "add", first[:8]).returncode == 0  # a key named like the first one's prefix
    proc = keys(target, "revoke", first[:8])
    assert proc.returncode == 1 and "matches 2 keys" in proc.stderr and "'first'" in proc.stderr, proc.stderr
    worker = ledgers()
    assert worker.lookup(first) is not None
    assert keys(target, "revoke", "first").returncode == 0
    assert worker.lookup(first) is None and worker.active_keys() == 1


def test_a_postgres_ledger_that_cannot_be_used_says_why(postgres_db, postgres):
    with pytest.raises(LedgerUnavailable, match="cannot reach"):
        open_ledger(f"postgresql://postgres@127.0.0.1:{postgres.port + 1}/none").active_keys()
    empty = open_ledger(postgres_db, serving=True)  # a database nobody ran `init` on
    try:
        with pytest.raises(LedgerUnavailable, match="serving.keys --db URL init"):
            empty.lookup("ud_x", wait=2)
    finally:
        empty.close()
    proc = keys(postgres_db, "list")
    assert proc.returncode == 1 and "init" in proc.stderr  # reads never create the tables
    assert keys(postgres_db, "init").returncode == 0 and keys(postgres_db, "list").returncode == 0


def test_a_postgres_ledger_never_makes_a_round_trip_when_asked_not_to_wait(postgres_db):
    """wait=0 is the event loop's first try (serving/admission.py): a network call must move to a thread."""
    admin = open_ledger(postgres_db, create=True)
    worker = open_ledger(postgres_db, serving=True)
    try:
        key_id = worker.lookup(key := admin.add_key("loop", row_budget=3), wait=2)
        assert worker.can_afford(key_id, 1, wait=0) is None  # the state `lookup` just read: no round trip
        for call in (lambda: worker.lookup(key, wait=0), lambda: worker.can_afford(key_id, 1, wait=0),
                     lambda: worker.reserve(key_id, 1, "/predict", "0" * 64, wait=0)):
            with pytest.raises(LedgerBusy, match="round trip"):
                call()
        assert admin.list_keys()[0]["rows_served"] == 0
    finally:
        worker.close()
        admin.close()


def test_a_settle_held_up_past_the_release_charges_the_rows_again(postgres_db):
    """An answer was delivered but its settle reached the database only after the reservation expired and was
    released (its worker stalled): the settle charges it again, so no delivered answer is left unbilled."""
    admin = open_ledger(postgres_db, create=True)
    replicas = [open_ledger(postgres_db, serving=True), open_ledger(postgres_db, serving=True)]
    try:
        key_id = replicas[0].lookup(admin.add_key("late", row_budget=20), wait=2)
        late = replicas[0].reserve(key_id, 6, "/predict", "a" * 64)
        replicas[0].settle(late)
        assert replicas[1].release_expired(ttl=0) == 1 and admin.list_keys()[0]["rows_served"] == 0
        replicas[0].flush()
        k = admin.list_keys()[0]
        assert (k["rows_served"], k["requests"]) == (6, 1)
        assert [b["state"] for b in admin.batches(key_id)] == ["served"]
        replicas[0].flush()  # nothing pending: nothing charged twice
        assert admin.list_keys()[0]["rows_served"] == 6
    finally:
        for ledger in (*replicas, admin):
            ledger.close()
