"""Serving throughput and latency on a real `bentoml serve` over loopback, each against a baseline measured in the
same run, in interleaved rounds, so that load from other jobs on the same cores hits both alike.

Bulk: rows/s of POST /predict_npy at batch 256 (float32 raw pixels, the audit's traffic), one client stream per
worker, against `session.run` on the same model with as many threads in this process.
Single image: POST /predict with one image from 8 concurrent clients, against the bare baseline
(bench/bare_serving.py: the same Runtime behind plain Starlette under uvicorn, same workers and threads, no
keys, ledger, metrics or pydantic), and against the same BentoML service built without the gate
(bench/ungated_service.py). `single_c8_vs_bentoml` is the median over rounds of (service req/s ÷ ungated req/s):
what the gate itself costs; `single_c8_vs_bare` the same against the bare app (information);
`single_c8_p99_over_p50` the median over rounds of the service's p99 ÷ p50. Sequential (c=1) latency is reported too.
The service runs as deployed by default: keys required, one key with no budget, the ledger on.

Usage: python -m bench.serving --model-dir DIR [--rounds 7] [--requests 2000] [--workers N] [--out FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from serving.launcher import Server

ROOT = Path(__file__).resolve().parents[1]
P99_OVER_P50_TARGET, VS_BARE_TARGET, BULK_TARGET, VS_BENTOML_TARGET = 3.0, 0.8, 0.75, 0.9
NAMES = ("service", "bentoml", "bare")
NPY = {"Content-Type": "application/octet-stream"}


class BareServer(Server):
    """bench/bare_serving.py under uvicorn with `workers` processes, the same settings as the service."""

    def __init__(self, env: dict[str, str], log: Path, workers: int):
        super().__init__(env, log)
        self.workers = workers

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "bench.bare_serving", "--port", str(self.port), "--workers", str(self.workers)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def raw_rows_per_s(session, card, x: np.ndarray, batch: int, batches: int) -> float:
    from protect.card import normalise

    feeds = [normalise(x[i * batch:(i + 1) * batch], card) for i in range(batches)]
    start = time.perf_counter()
    for f in feeds:
        session.run([card.output_name], {card.input_name: f})
    return batch * batches / (time.perf_counter() - start)


def http_rows_per_s(url: str, headers: dict, bodies: list[bytes], batch: int, streams: int) -> float:
    """Rows/s of POST /predict_npy from `streams` sequential clients at once, one per worker: each worker runs a
    request on its own ORT threads, so that is the service's whole share of the cores, as in-process."""
    from concurrent.futures import ThreadPoolExecutor

    def stream(part: list[bytes]) -> None:
        with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
            for body in part:
                client.post("/predict_npy", content=body, headers=NPY).raise_for_status()

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(stream, [bodies[i::streams] for i in range(streams)]))
    return batch * len(bodies) / (time.perf_counter() - start)


def connections_per_worker(server: Server) -> list[int]:
    """Established connections each worker process of `server` holds, most first."""
    import psutil

    counts = [sum(c.status == psutil.CONN_ESTABLISHED for c in p.net_connections("tcp"))
              for p in psutil.Process(server.proc.pid).children(recursive=True)]
    return sorted((n for n in counts if n), reverse=True)


async def single_image(url: str, body: bytes, headers: dict, concurrency: int, total: int,
                       probe=None) -> tuple[list[float], float]:
    """Latencies (s) of `total` POST /predict from `concurrency` keep-alive clients, and requests per second;
    `probe()` is called once the connections are open. aiohttp rather than httpx: the client shares the cores with
    the server, so it should cost as little as can be."""
    import aiohttp

    out: list[float] = []
    headers = {"Content-Type": "application/json", **headers}
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def one() -> float:
            t0 = time.perf_counter()
            async with session.post("/predict", data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}/predict answered {r.status}")
            return time.perf_counter() - t0

        await asyncio.gather(*(one() for _ in range(2 * concurrency)))  # open the connections
        if probe is not None:
            probe()
        per_client = total // concurrency

        async def client():
            for _ in range(per_client):
                out.append(await one())

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return out, len(out) / (time.perf_counter() - start)


def make_key(db: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "serving.keys", "--db", str(db), "add", "bench", "--json"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)["key"]


def summary(lat: list[list[float]], rps: list[float]) -> dict:
    pooled = [v for r in lat for v in r]
    return {"requests": len(pooled), "p50_ms": pct(pooled, 50), "p99_ms": pct(pooled, 99),
            "mean_ms": 1000 * statistics.mean(pooled), "req_per_s_per_round": rps,
            "req_per_s_median": statistics.median(rps),
            "p99_over_p50_per_round": [pct(r, 99) / pct(r, 50) for r in lat],
            "p99_over_p50_median": statistics.median(pct(r, 99) / pct(r, 50) for r in lat)}


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    from protect.card import ONNX, verify_model_dir
    from protect.host import onnx_session
    from serving.runtime import to_npy

    card = verify_model_dir(args.model_dir)
    try:
        from protect.data import load_dataset

        x_all = load_dataset(card.dataset, None).test_x.numpy().astype(np.float32)
    except Exception:  # the dataset is not on this machine: random pixels cost the model the same
        x_all = np.random.default_rng(0).random((4096, *card.input_shape), dtype=np.float32)
    n = args.batch * args.batches_per_round
    x = np.resize(x_all, (n, *card.input_shape)).astype(np.float32)
    bodies = [to_npy(x[i * args.batch:(i + 1) * args.batch]) for i in range(args.batches_per_round)]
    single = json.dumps({"inputs": x[:1].tolist()}).encode()

    session = onnx_session(args.model_dir / ONNX, args.threads)
    env = {"UNDISTILLABLE_MODEL_DIR": str(args.model_dir.resolve()), "UNDISTILLABLE_WORKERS": str(args.workers),
           "UNDISTILLABLE_ORT_THREADS": str(max(1, args.threads // args.workers)),
           "UNDISTILLABLE_KEYS_DB": str(tmp / "keys.sqlite")}
    auth: dict[str, str] = {}
    if args.open:
        env["UNDISTILLABLE_REQUIRE_KEYS"] = "off"
    else:
        auth = {"Authorization": f"Bearer {make_key(tmp / 'keys.sqlite')}"}
    load_before = os.getloadavg()
    service = Server(env, tmp / "serve.log").start()
    bentoml_only = Server(env, tmp / "ungated.log", target="bench.ungated_service:Ungated").start()
    bare = BareServer(env, tmp / "bare.log", args.workers).start()
    raw, bulk = [], []
    lat = {name: {1: [], 8: []} for name in NAMES}
    rps = {name: {1: [], 8: []} for name in NAMES}
    split: dict[str, list[list[int]]] = {name: [] for name in NAMES}
    try:
        http_rows_per_s(service.url, auth, bodies[:2 * args.workers], args.batch, args.workers)  # warm-up
        raw_rows_per_s(session, card, x, args.batch, 3)
        for url, headers in ((service.url, auth), (bentoml_only.url, {}), (bare.url, {})):
            asyncio.run(single_image(url, single, headers, 8, args.requests // 2))
        for r in range(args.rounds):
            raw.append(raw_rows_per_s(session, card, x, args.batch, args.batches_per_round))
            bulk.append(http_rows_per_s(service.url, auth, bodies, args.batch, args.workers))
            trio = [("service", service, auth), ("bentoml", bentoml_only, {}), ("bare", bare, {})]
            for name, server, headers in trio[r % 3:] + trio[:r % 3]:  # each goes first in turn
                for c, total in ((8, args.requests), (1, args.requests // 4)):
                    probe = (lambda: split[name].append(connections_per_worker(server))) if c == 8 else None
                    v, per_s = asyncio.run(single_image(server.url, single, headers, c, total, probe))
                    lat[name][c].append(v)
                    rps[name][c].append(per_s)
        no_5xx = "(status=5" not in service.log_text()
    finally:
        service.stop()
        bentoml_only.stop()
        bare.stop()
    s8, b8 = summary(lat["service"][8], rps["service"][8]), summary(lat["bare"][8], rps["bare"][8])
    u8 = summary(lat["bentoml"][8], rps["bentoml"][8])
    vs_bare = [s / b for s, b in zip(rps["service"][8], rps["bare"][8])]
    vs_bentoml = [s / b for s, b in zip(rps["service"][8], rps["bentoml"][8])]
    raw_med, bulk_med = statistics.median(raw), statistics.median(bulk)
    return {
        "card": card, "providers": session.get_providers(), "load_average_before": load_before, "no_5xx": no_5xx,
        "single_c8_vs_bare": statistics.median(vs_bare), "single_c8_vs_bentoml": statistics.median(vs_bentoml),
        "single_c8_p99_over_p50": s8["p99_over_p50_median"],
        "single_image": {
            "c8": {"service": s8, "bentoml": u8, "bare": b8, "vs_bare_per_round": vs_bare,
                   "vs_bentoml_per_round": vs_bentoml, "connections_per_worker": split},
            "c1": {name: summary(lat[name][1], rps[name][1]) for name in NAMES}},
        "bulk": {"batch": args.batch, "batches_per_round": args.batches_per_round, "client_streams": args.workers,
                 "raw_ort_rows_per_s": raw, "http_rows_per_s": bulk, "raw_ort_median": raw_med,
                 "http_median": bulk_med, "ratio_of_medians": bulk_med / raw_med,
                 "ratio_per_round": [h / r for h, r in zip(bulk, raw)]},
    }


def machine(load_average_before) -> dict:
    """The machine a serving benchmark ran on and how busy it was (it is shared), for the results file."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average_before": load_average_before, "load_average_at_end": os.getloadavg()}


def markdown(result: dict) -> str:
    def splits(name: str) -> str:
        return ", ".join("+".join(map(str, r)) for r in result["single_image"]["c8"]["connections_per_worker"][name])

    s8, b8 = result["single_image"]["c8"]["service"], result["single_image"]["c8"]["bare"]
    u8 = result["single_image"]["c8"]["bentoml"]
    s1, b1 = result["single_image"]["c1"]["service"], result["single_image"]["c1"]["bare"]
    bulk, srv, m = result["bulk"], result["server"], result["model"]
    t = result["targets"]
    yes = {True: "yes", False: "**no**"}
    return (
        f"# Serving benchmark ({result['created']})\n\n"
        f"Command: `{result['command']}`  \n"
        f"Model: {m['dataset']} {m['arch']} ({m['mode']}); {result['machine']['cpus']} CPUs; {srv['workers']} worker(s) "
        f"× {srv['ort_threads']} ORT thread(s) for the service and the bare baseline alike, {srv['threads_in_process']} "
        f"in-process; service {srv['keys']}; load average before {result['machine']['load_average_before'][0]:.2f}, "
        f"after {result['machine']['load_average_at_end'][0]:.2f} (other jobs on the same cores). "
        f"{result['rounds']} interleaved rounds; ratios are medians of per-round ratios.\n\n"
        f"| measure | service | baseline | ratio | target | met |\n|---|---|---|---|---|---|\n"
        f"| bulk /predict_npy, batch {bulk['batch']}, one stream per worker, rows/s (baseline: ONNX Runtime "
        f"in-process) | "
        f"{bulk['http_median']:,.0f} | {bulk['raw_ort_median']:,.0f} | {bulk['ratio_of_medians']:.2f} | "
        f"≥ {BULK_TARGET} | {yes[t['bulk_ratio']]} |\n"
        f"| single image c=8, req/s (baseline: bare Starlette) | {s8['req_per_s_median']:,.0f} | "
        f"{b8['req_per_s_median']:,.0f} | {result['single_c8_vs_bare']:.2f} | ≥ {VS_BARE_TARGET} | "
        f"{yes[t['single_c8_vs_bare']]} |\n"
        f"| single image c=8, req/s (baseline: the same BentoML service without the gate) | "
        f"{s8['req_per_s_median']:,.0f} | {u8['req_per_s_median']:,.0f} | {result['single_c8_vs_bentoml']:.2f} | "
        f"≥ {VS_BENTOML_TARGET} | {yes[t['single_c8_vs_bentoml']]} |\n"
        f"| single image c=8, p50 / p99 ms | {s8['p50_ms']:.1f} / {s8['p99_ms']:.1f} | {b8['p50_ms']:.1f} / "
        f"{b8['p99_ms']:.1f} | | | |\n"
        f"| single image c=8, p99 ÷ p50 | {result['single_c8_p99_over_p50']:.2f} | {b8['p99_over_p50_median']:.2f} | | "
        f"≤ {P99_OVER_P50_TARGET:g} | {yes[t['single_c8_p99_over_p50']]} |\n"
        f"| single image c=1, p50 / p99 ms | {s1['p50_ms']:.1f} / {s1['p99_ms']:.1f} | {b1['p50_ms']:.1f} / "
        f"{b1['p99_ms']:.1f} | | | |\n\n"
        f"Connections of the 8 clients per worker, round by round (the kernel hands each new connection to whichever "
        f"worker accepts first): service {splits('service')}; ungated {splits('bentoml')}; bare {splits('bare')}.\n")


def main(argv: list[str] | None = None) -> int:
    from protect.host import cpu_count

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "default")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batches-per-round", type=int, default=20)
    p.add_argument("--requests", type=int, default=2000,
                   help="single-image requests per round and server at c=8 (a quarter of it at c=1)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads in all (default: all cores)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes of the service and the baseline (default: one per core); ORT threads are "
                        "split among them")
    p.add_argument("--open", action="store_true", help="serve without keys (UNDISTILLABLE_REQUIRE_KEYS=off, ledger on)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    args = p.parse_args(argv)
    args.threads = args.threads or cpu_count()
    args.workers = args.workers or cpu_count()
    argv = sys.argv[1:] if argv is None else argv

    with tempfile.TemporaryDirectory() as tmp:
        m = measure(args, Path(tmp))
    card = m.pop("card")
    result = {
        "what": "service vs baselines measured in one run, interleaved: bulk /predict_npy rows/s vs ONNX Runtime "
                "in-process; single-image /predict req/s and latency vs the same BentoML service without the gate "
                "and vs a bare Starlette app on the same Runtime",
        "command": "python -m bench.serving " + shlex.join(argv),  # as typed: it reruns as is
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "single_c8_vs_bentoml": m.pop("single_c8_vs_bentoml"),
        "single_c8_vs_bare": m.pop("single_c8_vs_bare"),
        "single_c8_p99_over_p50": m.pop("single_c8_p99_over_p50"),
        "machine": machine(m.pop("load_average_before")),
        "model": {"dir": str(args.model_dir), "dataset": card.dataset, "arch": card.arch, "mode": card.mode,
                  "sha256": card.onnx_sha256, "input_shape": card.input_shape},
        "server": {"workers": args.workers, "ort_threads": max(1, args.threads // args.workers),
                   "threads_in_process": args.threads, "providers": m.pop("providers"),
                   "keys": "open (ledger on)" if args.open else "keys required (one key, no budget; ledger on)",
                   "settings": {k: v for k, v in os.environ.items() if k.startswith("UNDISTILLABLE_")}},
        "rounds": args.rounds,
        **m,
    }
    result["targets"] = {"bulk_ratio": result["bulk"]["ratio_of_medians"] >= BULK_TARGET,
                         "single_c8_vs_bare": result["single_c8_vs_bare"] >= VS_BARE_TARGET,
                         "single_c8_vs_bentoml": result["single_c8_vs_bentoml"] >= VS_BENTOML_TARGET,
                         "single_c8_p99_over_p50": result["single_c8_p99_over_p50"] <= P99_OVER_P50_TARGET}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(markdown(result))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
