"""Two replicas of the service on one PostgreSQL ledger, over real processes: two `bentoml serve` (one worker each) on
different ports, UNDISTILLABLE_KEYS_DB naming the same database on the session's PostgreSQL server. A budget holds
across both; a revocation reaches both; a replica killed with SIGKILL mid-burst loses no billed row; the database
stopped mid-run answers 503 (never an answer without a charge) and service resumes when it is back. The model's calls
are recorded per replica by tests/instrumented_service.py."""
from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from serving_server import ROOT, Server, assert_error, keys_cli, npy, serve_until_exit, settings, usage

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
NPY = {"Content-Type": "application/octet-stream"}


def model_rows(log: Path) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


@pytest.fixture(scope="module")
def replicas(model_dir, postgres, tmp_path_factory):
    """(url, [replica 1, replica 2], their model logs), started side by side."""
    url = postgres.new_database("replicas")
    keys_cli(url, "init")
    tmp = tmp_path_factory.mktemp("replicas")
    servers, logs = [], []
    for i in (1, 2):
        logs.append(tmp / f"model-{i}.log")
        env = {**settings(model_dir, tmp, workers=1), "UNDISTILLABLE_KEYS_DB": url,
               "UNDISTILLABLE_TEST_MODEL_LOG": str(logs[-1]), "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
        servers.append(Server(env, tmp / f"serve-{i}.log", target="instrumented_service:Undistillable"))
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: s.start(180), servers))
        yield url, servers, logs
    finally:
        for s in servers:
            s.stop()


def wait_settled(url: str, name: str, left: int = 0, timeout: float = 20) -> list[dict]:
    """The key's batches once at most `left` are still reserved (live replicas commit their settles within ~0.5 s;
    a reservation whose replica died, or whose COMMIT reply was lost, stays reserved until it expires)."""
    deadline = time.monotonic() + timeout
    while True:
        batches = json.loads(keys_cli(url, "ledger", name, "--json", "--limit", "100000"))
        if sum(b["state"] == "reserved" for b in batches) <= left or time.monotonic() > deadline:
            return batches
        time.sleep(0.2)


def test_a_budget_holds_across_two_replicas_under_a_burst(replicas, digits_x):
    url, servers, logs = replicas
    budget, rows, requests = 60, 2, 80
    key = keys_cli(url, "add", "burst", "--budget", str(budget)).strip()
    before = [model_rows(log) for log in logs]
    body = npy(digits_x[:rows])
    clients = [s.client(key) for s in servers]

    def one(i: int) -> tuple[int, int]:
        r = clients[i % 2].post("/predict_npy", content=body, headers=NPY)
        if r.status_code != 200:
            assert_error(r, 429, "over_budget")
            return i % 2, 0
        return i % 2, len(np.load(io.BytesIO(r.content)))

    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(requests)))
    finally:
        for c in clients:
            c.close()
    per_replica = [sum(n for r, n in answers if r == i) for i in (0, 1)]
    ran = [model_rows(log) - b for log, b in zip(logs, before)]
    print(f"burst: budget {budget} rows, {requests} requests of {rows} rows split over 2 replicas: answered "
          f"{sum(per_replica)} rows ({per_replica[0]} + {per_replica[1]}), model ran {ran[0]} + {ran[1]} rows")
    assert sum(per_replica) == budget  # demand is twice the budget: every row of it is answered, none beyond
    assert min(per_replica) > 0, "the burst did not reach both replicas"
    assert sum(ran) == budget, "a replica ran the model for a request the budget refused"
    batches = wait_settled(url, "burst")
    assert usage(url, "burst")["rows_served"] == budget == sum(b["rows"] for b in batches)
    assert {b["state"] for b in batches} == {"served"}


def test_a_key_revoked_through_the_cli_is_refused_by_both_replicas(replicas, digits_x):
    url, servers, _ = replicas
    key = keys_cli(url, "add", "revoked").strip()
    body = npy(digits_x[:1])
    for s in servers:
        with s.client(key) as c:
            assert c.post("/predict_npy", content=body, headers=NPY).status_code == 200
    keys_cli(url, "revoke", "revoked")
    for s in servers:
        with s.client(key) as c:
            assert_error(c.post("/predict_npy", content=body, headers=NPY), 401, "unauthorized")


def _clients(servers, key: str, body: bytes, per_replica: int, stop: threading.Event, record):
    """Client threads posting `body` to each replica until `stop`; record(replica, response or None)."""
    def loop(i: int):
        with servers[i].client(key) as c:
            while not stop.is_set():
                try:
                    record(i, c.post("/predict_npy", content=body, headers=NPY))
                except httpx.HTTPError:  # the replica died under this request: nothing delivered
                    record(i, None)
                    time.sleep(0.1)
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(servers)) for _ in range(per_replica)]
    for t in threads:
        t.start()
    return threads


def test_the_database_stopped_mid_run_answers_503_and_service_resumes(replicas, postgres, digits_x):
    url, servers, _ = replicas
    key = keys_cli(url, "add", "outage").strip()
    rows, per_replica = 2, 2
    seen: list[tuple[int, str, int | None, str | None, float]] = []  # (replica, phase, status, error, t)
    delivered, lock, stop = [0], threading.Lock(), threading.Event()
    phase = ["before"]

    def record(i, r):
        with lock:
            if r is None:
                seen.append((i, phase[0], None, None, time.monotonic()))
                return
            error = None
            if r.status_code == 200:
                delivered[0] += len(np.load(io.BytesIO(r.content)))
            else:
                body = assert_error(r, 503, "ledger_unavailable")
                assert r.headers.get("Retry-After"), r.headers
                error = body["error"]
            seen.append((i, phase[0], r.status_code, error, time.monotonic()))

    threads = _clients(servers, key, npy(digits_x[:rows]), per_replica, stop, record)
    try:
        while sum(1 for s in seen if s[2] == 200) < 8:
            time.sleep(0.05)
        postgres.stop("fast")
        phase[0] = "down"
        deadline = time.monotonic() + 30
        while sum(1 for s in seen if s[1] == "down" and s[2] == 503) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        postgres.start()
        phase[0] = "back"
        deadline = time.monotonic() + 60
        while not all(sum(1 for s in seen if s[:3] == (i, "back", 200)) >= 3 for i in (0, 1)):
            assert time.monotonic() < deadline, f"service did not resume: {seen[-10:]}"
            time.sleep(0.1)
    finally:
        if not postgres.started:
            postgres.start()
        stop.set()
        for t in threads:
            t.join(60)
    statuses = {s[2] for s in seen}
    assert statuses <= {200, 503} and sum(1 for s in seen if s[1] == "down" and s[2] == 503) >= 4, statuses
    assert all("ledger unavailable, request refused with 503" in s.log_text() for s in servers
               if any(x[0] == servers.index(s) and x[2] == 503 for x in seen))
    in_flight = len(servers) * per_replica  # reservations whose COMMIT reply the stop may have cut: kept, not lost
    batches = wait_settled(url, "outage", left=in_flight)
    billed = usage(url, "outage")["rows_served"]
    print(f"database outage: {sum(1 for s in seen if s[2] == 503)} answers 503, delivered {delivered[0]} rows, "
          f"billed {billed}")
    assert delivered[0] <= billed <= delivered[0] + in_flight * rows, (delivered[0], billed)
    assert sum(b["rows"] for b in batches) == billed


def test_a_replica_killed_mid_burst_loses_no_billed_row(replicas, digits_x):
    """Runs last: it kills replica 1 (the module's servers are not used after it)."""
    url, servers, _ = replicas
    key = keys_cli(url, "add", "crash").strip()
    rows, per_replica = 500, 3
    body = npy(np.resize(digits_x, (rows, 1, 8, 8)).astype(np.float32))
    delivered, after_kill, lock, stop, killed = [0, 0], [0, 0], threading.Lock(), threading.Event(), threading.Event()

    def record(i, r):
        if r is None:
            return
        assert r.status_code == 200, r.text
        with lock:
            delivered[i] += len(np.load(io.BytesIO(r.content)))
            after_kill[i] += killed.is_set()

    threads = _clients(servers, key, body, per_replica, stop, record)
    try:
        while min(delivered) < 4 * rows:
            time.sleep(0.05)
        victim = psutil.Process(servers[0].proc.pid)
        for p in [victim, *victim.children(recursive=True)]:  # the arbiter and its worker, no clean exit
            p.send_signal(signal.SIGKILL)
        killed.set()
        deadline = time.monotonic() + 60
        while after_kill[1] < 4:
            assert time.monotonic() < deadline, "the surviving replica stopped answering"
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    batches = wait_settled(url, "crash", left=2 * per_replica)  # the survivor's last settles
    billed = usage(url, "crash")["rows_served"]
    print(f"replica killed: delivered {delivered[0]} + {delivered[1]} rows, billed {billed}, "
          f"{sum(b['state'] == 'reserved' for b in batches)} batches left reserved")
    assert sum(delivered) <= billed <= sum(delivered) + per_replica * rows, (delivered, billed)
    assert sum(b["rows"] for b in batches) == billed  # every charged row has its batch
    # left reserved (released after RESERVATION_TTL): the killed replica's requests in flight, and at most one
    # delivered answer per client whose settle it had not committed yet
    assert sum(b["state"] == "reserved" for b in batches) <= 2 * per_replica


def test_a_database_that_cannot_be_used_stops_the_server_at_start(model_dir, postgres, tmp_path):
    from serving.config import ConfigError, Settings
    from serving.guard import auth_at_start

    empty = postgres.new_database("no_tables")
    with pytest.raises(ConfigError, match="init"):
        auth_at_start(Settings(keys_db=empty, keys_db_configured=True))
    rc, out = serve_until_exit({**settings(model_dir, tmp_path),
                                "UNDISTILLABLE_KEYS_DB": f"postgresql://postgres@127.0.0.1:{postgres.port + 1}/x"})
    assert rc != 0 and "refusing to start" in out and "cannot be used" in out, out[-2000:]
