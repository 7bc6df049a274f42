"""Serving throughput and latency: the bulk endpoint against raw ONNX Runtime in-process, and single-image
JSON latency at concurrency 1 and 8, on a real `bentoml serve` over loopback.

Bulk: rows/s of POST /predict_npy at batch 256 (float32 raw pixels, the audit's traffic) and of
`session.run` on the same model with the same thread count in this process, measured in interleaved
rounds in one run so that load from other processes hits both alike; the ratio is the result.
Latency: p50/p99 of POST /predict with one image, sequential (c=1) and with 8 concurrent clients (c=8).

Usage: python -m bench.serving --model-dir DIR [--batch 256] [--rounds 5] [--batches-per-round 20]
                               [--requests 400] [--out bench/results/serving.json]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def raw_rows_per_s(session, card, x: np.ndarray, batch: int, batches: int) -> float:
    from protect.card import normalise

    feeds = [normalise(x[i * batch:(i + 1) * batch], card) for i in range(batches)]
    start = time.perf_counter()
    for f in feeds:
        session.run([card.output_name], {card.input_name: f})
    return batch * batches / (time.perf_counter() - start)


def http_rows_per_s(client: httpx.Client, bodies: list[bytes], batch: int) -> float:
    start = time.perf_counter()
    for body in bodies:
        r = client.post("/predict_npy", content=body, headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()
    return batch * len(bodies) / (time.perf_counter() - start)


async def latencies(url: str, body: bytes, concurrency: int, total: int) -> list[float]:
    out: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        per_client = total // concurrency

        async def worker():
            for _ in range(per_client):
                t0 = time.perf_counter()
                r = await client.post("/predict", content=body, headers={"Content-Type": "application/json"})
                out.append(time.perf_counter() - t0)
                r.raise_for_status()

        for _ in range(10):  # warm-up
            (await client.post("/predict", content=body, headers={"Content-Type": "application/json"})).raise_for_status()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "default")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches-per-round", type=int, default=20)
    p.add_argument("--requests", type=int, default=400, help="single-image requests per concurrency level")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    p.add_argument("--workers", type=int, default=None,
                   help="BentoML worker processes (default: the server's default, one per core); ORT threads are split among them")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    args = p.parse_args(argv)

    from protect.card import ONNX, verify_model_dir
    from serving.config import cpu_count
    from serving.runtime import make_session
    from serving_server import Server, npy

    card = verify_model_dir(args.model_dir)
    threads = args.threads or cpu_count()
    args.workers = args.workers or cpu_count()
    rng = np.random.default_rng(0)
    try:
        from protect.data import load_dataset

        x_all = load_dataset(card.dataset, None).test_x.numpy().astype(np.float32)
    except Exception:  # the dataset is not on this machine: random pixels cost the model the same
        x_all = rng.random((4096, *card.input_shape), dtype=np.float32)
    n = args.batch * args.batches_per_round
    x = np.resize(x_all, (n, *card.input_shape)).astype(np.float32)
    bodies = [npy(x[i * args.batch:(i + 1) * args.batch]) for i in range(args.batches_per_round)]
    single = json.dumps({"inputs": x[:1].tolist()}).encode()

    session = make_session(args.model_dir / ONNX, threads)
    with tempfile.TemporaryDirectory() as tmp:
        env = {"UNDISTILLABLE_MODEL_DIR": str(args.model_dir.resolve()), "UNDISTILLABLE_KEYS_DB": f"{tmp}/keys.sqlite",
               "UNDISTILLABLE_ORT_THREADS": str(max(1, threads // args.workers)),
               "UNDISTILLABLE_WORKERS": str(args.workers)}
        srv = Server(env, Path(tmp) / "serve.log").start()
        try:
            raw, http = [], []
            with httpx.Client(base_url=srv.url, timeout=120) as client:
                http_rows_per_s(client, bodies[:3], args.batch)  # warm-up
                raw_rows_per_s(session, card, x, args.batch, 3)
                for _ in range(args.rounds):
                    raw.append(raw_rows_per_s(session, card, x, args.batch, args.batches_per_round))
                    http.append(http_rows_per_s(client, bodies, args.batch))
            lat = {c: asyncio.run(latencies(srv.url, single, c, args.requests)) for c in (1, 8)}
            served_ok = "(status=5" not in srv.log_text()
        finally:
            srv.stop()

    raw_med, http_med = statistics.median(raw), statistics.median(http)
    result = {
        "what": "bulk /predict_npy rows/s vs raw ONNX Runtime in-process (same model, same threads, interleaved "
                "rounds); single-image JSON /predict latency",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "model": {"dir": str(args.model_dir), "dataset": card.dataset, "arch": card.arch, "mode": card.mode,
                  "sha256": card.onnx_sha256, "input_shape": card.input_shape},
        "server": {"workers": args.workers, "ort_threads": max(1, threads // args.workers), "keys": "open (ledger on)", "providers":
                   session.get_providers()},
        "bulk": {"batch": args.batch, "rounds": args.rounds, "batches_per_round": args.batches_per_round,
                 "raw_ort_rows_per_s": raw, "http_rows_per_s": http, "raw_ort_median": raw_med,
                 "http_median": http_med, "ratio_of_medians": http_med / raw_med,
                 "ratio_per_round": [h / r for h, r in zip(http, raw)], "target_ratio": 0.75,
                 "target_met": http_med / raw_med >= 0.75},
        "latency_ms": {f"c{c}": {"requests": len(v), "p50": pct(v, 50), "p99": pct(v, 99), "mean": 1000 * statistics.mean(v)}
                       for c, v in lat.items()},
        "latency_target": {"p99_c8_ms": 25, "met": pct(lat[8], 99) <= 25},
        "no_5xx": served_ok,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(
        f"# Serving benchmark ({result['created']})\n\n"
        f"Model: {card.dataset} {card.arch} ({card.mode}), {args.model_dir.name}; {os.cpu_count()} CPUs, ORT threads "
        f"{threads} (in-process) / {max(1, threads // args.workers)} per worker, {args.workers} worker(s), open service with the ledger on; load average at the end "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} (shared machine).\n\n"
        f"| measure | value | target |\n|---|---|---|\n"
        f"| bulk /predict_npy, batch {args.batch} | {http_med:,.0f} rows/s | |\n"
        f"| raw ONNX Runtime in-process, batch {args.batch} | {raw_med:,.0f} rows/s | |\n"
        f"| ratio (medians of {args.rounds} interleaved rounds) | {http_med / raw_med:.2f} | ≥ 0.75 |\n"
        f"| JSON single image, c=1: p50 / p99 | {pct(lat[1], 50):.1f} / {pct(lat[1], 99):.1f} ms | |\n"
        f"| JSON single image, c=8: p50 / p99 | {pct(lat[8], 50):.1f} / {pct(lat[8], 99):.1f} ms | p99 ≤ 25 ms |\n")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
