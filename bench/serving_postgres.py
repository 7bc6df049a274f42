"""The service with its keys ledger on PostgreSQL against the same service on the SQLite ledger, in one run, in
interleaved rounds (each configuration goes first in turn, so load from other jobs on the same cores hits both alike).

Both run as deployed: keys required, one key with no budget, the ledger on, the same workers and threads. Measured as
bench/serving.py measures the service: single-image POST /predict from 8 concurrent clients (req/s, latency) and bulk
POST /predict_npy at batch 256 with one stream per worker (rows/s). `single_c8_postgres_vs_sqlite` and
`bulk_postgres_vs_sqlite` are medians over rounds of (PostgreSQL ÷ SQLite); target ≥ 0.8. The PostgreSQL server is
`--keys-db URL` (an empty database, or one made with `python -m serving.keys --db URL init`), else a temporary one
started on this machine (bench/postgres_server.py) with `--synchronous-commit` as given (on: each reservation is on
the server's disk before the model runs; off: the last ~0.6 s of commits may be lost if the database server crashes).

Usage: python -m bench.serving_postgres [--model-dir DIR] [--rounds 5] [--requests 1000] [--workers N] [--out FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.serving import http_rows_per_s, machine, make_key, single_image, summary
from serving.launcher import Server

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.8
NAMES = ("postgres", "sqlite")


def fsync_ms(directory: Path, n: int = 50) -> float:
    """Mean time of write + fsync of 8 KiB on `directory`'s disk: what a synchronous COMMIT waits for at least."""
    path = directory / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.pwrite(fd, b"\0" * 8192, 0)
            os.fsync(fd)
        return 1000 * (time.perf_counter() - t0) / n
    finally:
        os.close(fd)
        path.unlink()


def ledger_alone(target: str, threads: int = 8, per_thread: int = 150) -> dict:
    """Where the time goes: the guard's ledger calls of one request (lookup, can_afford, reserve, settle) from
    `threads` threads over two ledger objects (two workers) on one key, without HTTP or model: requests/s, and the
    mean time of one reservation alone."""
    import threading

    from serving.ledger_rules import open_ledger

    admin = open_ledger(target, create=True)
    key = admin.add_key(f"alone-{time.time_ns()}")
    admin.close()
    ledgers = [open_ledger(target, serving=True) for _ in range(2)]
    key_id = ledgers[0].lookup(key, wait=2)

    def client(ledger):
        for _ in range(per_thread):
            ledger.lookup(key, wait=2)
            ledger.can_afford(key_id, 1, wait=2)
            ledger.settle(ledger.reserve(key_id, 1, "/predict", "0" * 64, wait=2))

    try:
        pool = [threading.Thread(target=client, args=(ledgers[i % 2],)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        per_s = threads * per_thread / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(200):
            ledgers[0].settle(ledgers[0].reserve(key_id, 1, "/predict", "0" * 64, wait=2))
        reserve_ms = 1000 * (time.perf_counter() - t0) / 200
    finally:
        for ledger in ledgers:
            ledger.close()
    return {"threads": threads, "one_key_requests_per_s": per_s, "reserve_ms": reserve_ms}


def measure(args: argparse.Namespace, tmp: Path, url: str) -> dict:
    from protect.card import verify_model_dir
    from serving.runtime import to_npy

    card = verify_model_dir(args.model_dir)
    x = np.random.default_rng(0).random((args.batch * args.batches_per_round, *card.input_shape), dtype=np.float32)
    bodies = [to_npy(x[i * args.batch:(i + 1) * args.batch]) for i in range(args.batches_per_round)]
    single = json.dumps({"inputs": x[:1].tolist()}).encode()
    base = {"UNDISTILLABLE_MODEL_DIR": str(args.model_dir.resolve()), "UNDISTILLABLE_WORKERS": str(args.workers),
            "UNDISTILLABLE_ORT_THREADS": str(max(1, args.threads // args.workers))}
    sqlite_db = tmp / "keys.sqlite"
    targets = {"postgres": url, "sqlite": str(sqlite_db)}
    servers, auth = {}, {}
    for name in NAMES:
        auth[name] = {"Authorization": f"Bearer {make_key(targets[name])}"}
        servers[name] = Server({**base, "UNDISTILLABLE_KEYS_DB": targets[name]}, tmp / f"{name}.log").start()
    lat = {name: [] for name in NAMES}
    rps = {name: [] for name in NAMES}
    bulk = {name: [] for name in NAMES}
    load_before = os.getloadavg()
    alone = {name: ledger_alone(targets[name]) for name in NAMES}
    try:
        for name in NAMES:  # warm-up: connections, pools, the model
            http_rows_per_s(servers[name].url, auth[name], bodies[:2 * args.workers], args.batch, args.workers)
            asyncio.run(single_image(servers[name].url, single, auth[name], 8, args.requests // 2))
        for r in range(args.rounds):
            for name in (NAMES[r % 2:] + NAMES[:r % 2]):
                v, per_s = asyncio.run(single_image(servers[name].url, single, auth[name], 8, args.requests))
                lat[name].append(v)
                rps[name].append(per_s)
                bulk[name].append(http_rows_per_s(servers[name].url, auth[name], bodies, args.batch, args.workers))
            print(f"round {r + 1}/{args.rounds}: single c8 req/s postgres {rps['postgres'][-1]:.0f} sqlite "
                  f"{rps['sqlite'][-1]:.0f}; bulk rows/s postgres {bulk['postgres'][-1]:.0f} sqlite "
                  f"{bulk['sqlite'][-1]:.0f}", file=sys.stderr)
        no_5xx = all("(status=5" not in s.log_text() for s in servers.values())
    finally:
        for s in servers.values():
            s.stop()
    single_ratio = [p / s for p, s in zip(rps["postgres"], rps["sqlite"])]
    bulk_ratio = [p / s for p, s in zip(bulk["postgres"], bulk["sqlite"])]
    return {
        "card": card, "load_average_before": load_before, "no_5xx": no_5xx, "ledger_alone": alone,
        "single_c8_postgres_vs_sqlite": statistics.median(single_ratio),
        "bulk_postgres_vs_sqlite": statistics.median(bulk_ratio),
        "single_image_c8": {**{name: summary(lat[name], rps[name]) for name in NAMES},
                            "ratio_per_round": single_ratio},
        "bulk": {"batch": args.batch, "batches_per_round": args.batches_per_round, "client_streams": args.workers,
                 **{f"{name}_rows_per_s": bulk[name] for name in NAMES},
                 **{f"{name}_median": statistics.median(bulk[name]) for name in NAMES},
                 "ratio_per_round": bulk_ratio},
    }


def markdown(result: dict) -> str:
    s, b = result["single_image_c8"], result["bulk"]
    yes = {True: "yes", False: "**no**"}
    pg, a = result["postgres"], result["ledger_alone"]
    return (
        f"# Serving on the PostgreSQL ledger vs the SQLite ledger ({result['created']})\n\n"
        f"Command: `{result['command']}`  \n"
        f"Model: {result['model']['dataset']} {result['model']['arch']}; {result['machine']['cpus']} CPUs shared with "
        f"other jobs (load average before {result['machine']['load_average_before'][0]:.2f}, after "
        f"{result['machine']['load_average_at_end'][0]:.2f}); {result['server']['workers']} worker(s) per service; "
        f"PostgreSQL {pg['where']} on the same machine, synchronous_commit {pg['synchronous_commit']}; "
        f"write + fsync of 8 KiB on its disk: {pg['fsync_ms']:.2f} ms. {result['rounds']} interleaved rounds; "
        f"ratios are medians of per-round ratios.\n\n"
        f"| measure | PostgreSQL | SQLite | ratio | target | met |\n|---|---|---|---|---|---|\n"
        f"| single image c=8, req/s | {s['postgres']['req_per_s_median']:,.0f} | {s['sqlite']['req_per_s_median']:,.0f} | "
        f"{result['single_c8_postgres_vs_sqlite']:.2f} | ≥ {TARGET} | "
        f"{yes[result['targets']['single_c8_postgres_vs_sqlite']]} |\n"
        f"| single image c=8, p50 / p99 ms | {s['postgres']['p50_ms']:.1f} / {s['postgres']['p99_ms']:.1f} | "
        f"{s['sqlite']['p50_ms']:.1f} / {s['sqlite']['p99_ms']:.1f} | | | |\n"
        f"| bulk /predict_npy batch {b['batch']}, rows/s | {b['postgres_median']:,.0f} | {b['sqlite_median']:,.0f} | "
        f"{result['bulk_postgres_vs_sqlite']:.2f} | ≥ {TARGET} | {yes[result['targets']['bulk_postgres_vs_sqlite']]} |\n"
        f"| ledger alone: one request's calls, 8 threads on one key, req/s | "
        f"{a['postgres']['one_key_requests_per_s']:,.0f} | {a['sqlite']['one_key_requests_per_s']:,.0f} | | | |\n"
        f"| ledger alone: one reservation, ms | {a['postgres']['reserve_ms']:.2f} | {a['sqlite']['reserve_ms']:.2f} | "
        f"| | |\n\nPer round (PostgreSQL ÷ SQLite): single c=8 "
        f"{', '.join(f'{r:.2f}' for r in s['ratio_per_round'])}; bulk "
        f"{', '.join(f'{r:.2f}' for r in b['ratio_per_round'])}.\n")


def summarise_into(path: Path, result: dict, full: Path) -> None:
    """Record this run's headline figures, with its command, under `postgres` in the serving results file."""
    if not path.exists():
        return
    serving = json.loads(path.read_text())
    serving["postgres"] = {key: result[key] for key in ("command", "created", "single_c8_postgres_vs_sqlite",
                                                          "bulk_postgres_vs_sqlite", "targets")}
    serving["postgres"]["results"] = str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(full)
    path.write_text(json.dumps(serving, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    from protect.host import cpu_count

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "default")
    p.add_argument("--keys-db", help="a postgresql:// URL to use (default: a temporary server on this machine)")
    p.add_argument("--synchronous-commit", choices=["on", "off"], default="on",
                   help="the temporary server's synchronous_commit (default on, PostgreSQL's default)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches-per-round", type=int, default=20)
    p.add_argument("--requests", type=int, default=1000, help="single-image requests per round and configuration")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads in all (default: all cores)")
    p.add_argument("--workers", type=int, default=None, help="workers of each service (default: one per core)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving-postgres.json")
    p.add_argument("--summary-into", type=lambda v: Path(v) if v else None,
                   default=ROOT / "bench" / "results" / "serving.json",
                   help="also record the two ratios and this command in the serving benchmark's results file (its "
                        "other fields are kept); '' to skip")
    args = p.parse_args(argv)
    args.threads = args.threads or cpu_count()
    args.workers = args.workers or cpu_count()
    argv = sys.argv[1:] if argv is None else argv

    from bench.postgres_server import TempPostgres
    from serving.ledger_rules import redact

    with tempfile.TemporaryDirectory() as tmp:
        server = None if args.keys_db else TempPostgres(synchronous_commit=args.synchronous_commit == "on").start()
        try:
            url = args.keys_db or server.url
            pg = {"where": "at " + redact(url) if args.keys_db else "(a temporary server)",
                  "synchronous_commit": args.synchronous_commit if server else "as the server is set",
                  "fsync_ms": fsync_ms(server.base if server else Path(tmp))}
            m = measure(args, Path(tmp), url)
        finally:
            if server is not None:
                server.close()
    card = m.pop("card")
    result = {
        "what": "the service on the PostgreSQL keys ledger vs on the SQLite one, measured in one run, interleaved: "
                "single-image /predict at concurrency 8 and bulk /predict_npy",
        "command": "python -m bench.serving_postgres " + shlex.join(argv),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "single_c8_postgres_vs_sqlite": m.pop("single_c8_postgres_vs_sqlite"),
        "bulk_postgres_vs_sqlite": m.pop("bulk_postgres_vs_sqlite"),
        "machine": machine(m.pop("load_average_before")),
        "model": {"dir": str(args.model_dir), "dataset": card.dataset, "arch": card.arch, "mode": card.mode,
                  "sha256": card.onnx_sha256},
        "server": {"workers": args.workers, "ort_threads": max(1, args.threads // args.workers),
                   "keys": "keys required (one key, no budget; ledger on)"},
        "postgres": pg,
        "rounds": args.rounds,
        **m,
    }
    result["targets"] = {k: result[k] >= TARGET for k in ("single_c8_postgres_vs_sqlite", "bulk_postgres_vs_sqlite")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    if args.summary_into:
        summarise_into(args.summary_into, result, args.out)
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
