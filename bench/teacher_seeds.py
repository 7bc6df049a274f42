"""What a defence costs in accuracy, over teacher seeds: each row's teacher trained at several seeds beside CE, the
accuracy drop paired by seed (the same seed gives both the same initialisation and data order).

One teacher per mode measures a difference of a few tenths of a point with run-to-run noise of the same size; issue
11's target (CMIM ≥ CE − 0.3 points) is read here as the mean paired drop with its one-sided 95% upper bound.
Finished runs are reused. Results: bench/results/teacher-seeds-<dataset>.{json,md}.

    python -m bench.teacher_seeds --seeds 3                      # CE and CMIM (defaults), cnn-small, 16 epochs
    python -m bench.teacher_seeds --teachers ce,cmim,cmim-lam60-warm --seeds 5 --device cuda
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from scipy import stats

from bench.protection import ROOT, TEACHER_EPOCHS, provenance, teacher_spec, train_command

DROP_MAX_POINTS = 0.3


def epoch_records(run: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per finished epoch."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_metrics(run: Path) -> dict:
    """The last epoch's line of a finished run's metrics.jsonl."""
    return epoch_records(run)[-1]


def training_seconds(run: Path) -> float:
    """A run's training time as its epochs recorded it (the real cost even when this invocation reused the run)."""
    return sum(r.get("seconds", 0.0) for r in epoch_records(run))


def paired_drop(ce: list[float], other: list[float]) -> dict:
    """CE − other in points, paired by seed: mean, std, one-sided 95% upper bound (Student t; None under 2 seeds)."""
    d = [100 * (a - b) for a, b in zip(ce, other)]
    out = {"per_seed": [round(x, 3) for x in d], "mean": round(statistics.fmean(d), 3), "std": None, "upper": None}
    if len(d) >= 2:
        sd = statistics.stdev(d)
        out["std"] = round(sd, 3)
        out["upper"] = round(out["mean"] + stats.t.ppf(0.95, len(d) - 1) * sd / len(d) ** 0.5, 3)
    return out


def markdown(result: dict) -> str:
    s, rows = result["settings"], result["teachers"]
    seeds = sorted({k for r in rows.values() for k in r["accuracy"]}, key=int)
    recorded = sum(x for r in rows.values() for x in r.get("training_seconds", {}).values())
    runs = sum(len(r.get("training_seconds", {})) for r in rows.values())
    lines = [f"# Teacher accuracy over seeds: {s['dataset']}", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
             f"Date: {result['date']}; training time recorded in the runs: {recorded / 60:.1f} min, "
             f"{recorded / 60 / max(1, runs):.1f} min per teacher (this invocation: {result['wall_seconds'] / 60:.1f} "
             "min wall)", "",
             f"`{s['teacher_arch']}`, {s['teacher_epochs']} epochs on {s['train_limit'] or 'all'} training rows; test "
             "accuracy (%) of the last epoch; drop = CE − teacher in points, paired by seed, with its one-sided 95% "
             "upper bound (Student t).", "",
             "| teacher | " + " | ".join(f"seed {k}" for k in seeds) + " | mean | CMI T=1 (mean) | drop vs CE "
             "(mean, ≤ upper) |", "|---|" + "---|" * (len(seeds) + 3)]
    for name, r in rows.items():
        accs = " | ".join(f"{100 * r['accuracy'][k]:.2f}" if k in r["accuracy"] else "–" for k in seeds)
        drop = r.get("drop_vs_ce")
        cell = "–" if not drop else (f"{drop['mean']:+.2f}" + (f" (≤ {drop['upper']:+.2f})" if drop["upper"] is not None
                                                                else ""))
        lines.append(f"| {name} | {accs} | {100 * r['mean_accuracy']:.2f} | {r['mean_cmi_1']:.4f} | {cell} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="ce,cmim", help="rows: ce first, then cmim or a CMIM variant of bench/ablation.py")
    p.add_argument("--seeds", type=int, default=3, help="teacher seeds 0..N-1 per row")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", help="where the dataset's files are (default: the Debian path)")
    p.add_argument("--teacher-arch", default="cnn-small")
    p.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS, help="the protection benchmark's")
    p.add_argument("--train-limit", type=int, default=0, help="training rows (0 = all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", type=Path, default=Path("bench/work/teacher-seeds"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    args.train_limit = args.train_limit or None
    from bench.ablation import VARIANTS

    names = [t for t in args.teachers.split(",") if t]
    if names[0] != "ce" or args.seeds < 1:
        raise SystemExit("--teachers must start with ce (the reference of the drop) and --seeds must be ≥ 1")
    specs = {n: teacher_spec(n, VARIANTS) for n in names}
    if any(s.get("needs") or "mode" not in s for s in specs.values()):
        raise SystemExit("only teachers trained from scratch can be compared over seeds (not fine-tuned or served rows)")
    started = time.time()
    work = args.work / args.dataset
    rows: dict[str, dict] = {}
    for name in names:
        accuracy, cmi, seconds = {}, [], {}
        for seed in range(args.seeds):
            run_name = f"{name}-s{seed}"
            cmd = train_command(work, run_name, specs[name], argparse.Namespace(**{**vars(args), "teacher_seed": seed}))
            if cmd is not None:
                print(f"training {run_name}", flush=True)
                log = work / "logs" / f"{run_name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w") as fh:
                    if subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode != 0:
                        raise SystemExit(f"teacher {run_name} failed; see {log}")
            m = final_metrics(work / "runs" / run_name)
            seconds[str(seed)] = round(training_seconds(work / "runs" / run_name), 1)
            accuracy[str(seed)] = m["test_acc"]
            cmi.append(m["test_cmi"]["1"])
        rows[name] = {"flags": specs[name].get("flags", []), "accuracy": accuracy,
                      "mean_accuracy": statistics.fmean(accuracy.values()), "mean_cmi_1": statistics.fmean(cmi),
                      "training_seconds": seconds}
        if name != "ce":
            rows[name]["drop_vs_ce"] = paired_drop(list(rows["ce"]["accuracy"].values()), list(accuracy.values()))
            rows[name]["drop_within_target"] = rows[name]["drop_vs_ce"]["mean"] <= DROP_MAX_POINTS
    result = {**provenance("bench.teacher_seeds", args, started, work), "teachers": rows,
              "drop_max_points": DROP_MAX_POINTS}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"teacher-seeds-{args.dataset}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
