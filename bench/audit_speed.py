"""How fast the audit trains students, side by side in one run on the same model, data, batch size and
threads: (a) a bare 20-line PyTorch loop over in-memory tensors (and (a') the same on one thread, to show how far
one student already uses the cores), (b) the audit's student path
(`audit.students.run_students`: protect's `fit`, a validation pass per epoch, the test split once) with one job,
(c) the same with two jobs (worker processes, cores ÷ 2 threads each), and (d) the Ray path (`--ray`)
against (c) over an audit-sized round of students (`--ray-students`, default 16) with the same total threads:
one-CPU, one-thread Ray tasks on a local cluster of `cores` CPUs, the cluster's start-up timed apart
(`ray_startup_seconds`). Rounds are interleaved (jobs, Ray, jobs, Ray, ...) and medians reported: the machine is
shared. Results: bench/results/audit-speed.{json,md}.

    python -m bench.audit_speed                       # the committed run
    python -m bench.audit_speed --ray-only --ray-epochs 5 --ray-rounds 3   # (d) alone, merged into the results
    python -m bench.audit_speed --epochs 2 --students 2 --rounds 1 --rows 2000 --ray-students 4 --out /tmp/s
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from experiments.common import provenance


def student_data(dataset: str, rows: int, student: str):
    """The audit's student tensors for a label-only 'teacher' (one-hot answers): the cost does not depend on it."""
    import numpy as np

    from audit.recover import recover_logp
    from audit.runner import AuditSettings
    from audit.runner import student_data as build
    from protect.data import load_dataset

    splits = load_dataset(dataset).subset_train(rows)
    logp = recover_logp(np.eye(splits.num_classes, dtype=np.float32)[splits.train_y.numpy()]).logp
    return build(splits, logp, AuditSettings(dataset=dataset, out=Path("."), student=student))


def bare_loop(data, epochs: int, lr: float, batch: int, seed: int) -> None:
    """The yardstick: plain SGD on CE over in-memory tensors, nothing else."""
    from protect.models import create_model

    torch.manual_seed(seed)
    model = create_model(data.student, data.num_classes, data.train_x.shape[1], data.train_x.shape[2])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    x, y = data.train_x, data.train_y
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def student_tasks(epochs: int, lr: float, batch: int, count: int, tag: str):
    from audit.attacks import reference_variants
    from audit.students import StudentTask
    from protect.trainer import TrainConfig

    ls = next(v for v in reference_variants() if v.name == "ls-e0.1")
    train = asdict(TrainConfig(epochs=epochs, lr=lr, batch_size=batch, schedule="onecycle", device="cpu"))
    return [StudentTask(key=f"{tag}-{s}", family="ls", variant=ls, seed=s, train=train, patience=None)
            for s in range(count)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    from audit.students import default_threads, run_students
    from protect.host import cpu_count

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--rows", type=int, default=10000, help="transfer rows (10%% of them for validation)")
    p.add_argument("--student", default="cnn-tiny")
    p.add_argument("--epochs", type=int, default=15, help="epochs per student (default: the audit's recipe)")
    p.add_argument("--students", type=int, default=2, help="students per measurement")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats (medians are reported)")
    p.add_argument("--ray-students", type=int, default=16, help="students per Ray/jobs measurement (default 16)")
    p.add_argument("--ray-epochs", type=int, help="epochs per student in the Ray comparison (default: --epochs)")
    p.add_argument("--ray-rounds", type=int, default=2, help="interleaved (jobs, Ray) pairs (default 2)")
    p.add_argument("--ray-address", help="join this running cluster instead of starting a local one")
    p.add_argument("--ray-only", action="store_true",
                   help="measure only (d) and merge it into the results file, keeping its other fields")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    started = time.time()
    cores = cpu_count()
    data = student_data(args.dataset, args.rows, args.student)
    ray_part = ray_vs_jobs(data, args, cores, started)
    if args.ray_only:
        path = args.out / "audit-speed.json"
        result = {**(json.loads(path.read_text()) if path.exists() else {}), **ray_part}
        if "targets" in result:
            result["targets"]["ray_vs_jobs"] = ray_part["ray"]["target"]
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        (args.out / "audit-speed.md").write_text(markdown(result))
        print(markdown(result))
        return
    times: dict[str, list[float]] = {"bare": [], "bare_1thread": [], "jobs1": [], "jobs2": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for threads, name in ((cores, "bare"), (1, "bare_1thread")):
                torch.set_num_threads(threads)
                times[name].append(timed(lambda: [bare_loop(data, args.epochs, args.lr, args.batch_size, s)
                                                  for s in range(args.students)]))
            torch.set_num_threads(cores)
            for jobs, name in ((1, "jobs1"), (2, "jobs2")):
                tasks = student_tasks(args.epochs, args.lr, args.batch_size, args.students, f"{name}-{r}")
                times[name].append(timed(lambda: run_students(tasks, data, lambda rec: [], jobs=jobs,
                                                              threads=default_threads(jobs), workdir=Path(tmp),
                                                              progress=False)))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    per_hour = {k: 3600 * args.students / statistics.median(v) for k, v in times.items()}
    result = {**provenance("bench.audit_speed", args, started, Path(tmp)),
              "students_per_hour": {k: round(v, 1) for k, v in per_hour.items()},
              "seconds_per_round": times,
              "vs_bare_loop": round(per_hour["jobs1"] / per_hour["bare"], 3),
              "parallel_speedup": round(per_hour["jobs2"] / per_hour["jobs1"], 3),
              # how well one student uses the cores by itself: what jobs can add on top is at most its inverse
              "bare_thread_scaling": round(per_hour["bare"] / per_hour["bare_1thread"], 3),
              "targets": {"vs_bare_loop": 0.85, "parallel_speedup": 1.6},
              "setup": {"rows": args.rows, "train_rows": len(data.train_y), "val_rows": len(data.val_y),
                        "student": args.student, "epochs": args.epochs, "students": args.students,
                        "batch_size": args.batch_size, "threads": {"bare": cores, "jobs1": default_threads(1),
                                                                   "jobs2": default_threads(2)}}}
    result.pop("recorded_training_seconds", None)
    result.update(ray_part)
    result["targets"]["ray_vs_jobs"] = ray_part["ray"]["target"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit-speed.json").write_text(json.dumps(result, indent=2))
    (args.out / "audit-speed.md").write_text(markdown(result))
    print(markdown(result))


def ray_vs_jobs(data, args, cores: int, started: float) -> dict:
    """(d): the same round of students as --jobs `cores` (one thread each) and as one-CPU, one-thread Ray tasks,
    interleaved. Each Ray round is a new driver on the running cluster, as each audit is: it joins, puts the data
    in the object store, starts its workers and leaves; the cluster's own start-up is timed apart."""
    from dataclasses import replace

    from audit.ray_jobs import RayOptions, connect, disconnect
    from audit.students import run_students
    from bench.ray_head import LOOPBACK_ENV, start_head

    epochs = args.ray_epochs or args.epochs
    load_before = os.getloadavg()[0]  # the machine is shared: how busy it was, beside the ratios
    t0 = time.perf_counter()
    head = None if args.ray_address else start_head(cores)
    startup = None if head is None else round(time.perf_counter() - t0, 2)  # a running cluster's is not ours
    if head is not None:
        os.environ.update(LOOPBACK_ENV)  # the drivers of its rounds join it as it was started
    address = args.ray_address or head.address
    times: dict[str, list[float]] = {"jobs": [], "ray": []}
    options = RayOptions(address)

    def ray_round(tasks) -> None:
        connect(options)
        try:
            run_students(tasks, replace(data), lambda rec: [], threads=1, workdir=Path(tmp), progress=False,
                         ray=options)
        finally:
            disconnect()

    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.ray_rounds):
                tasks = student_tasks(epochs, args.lr, args.batch_size, args.ray_students, f"jobs-{r}")
                times["jobs"].append(timed(lambda: run_students(tasks, data, lambda rec: [], jobs=cores, threads=1,
                                                                workdir=Path(tmp), progress=False)))
                tasks = student_tasks(epochs, args.lr, args.batch_size, args.ray_students, f"ray-{r}")
                times["ray"].append(timed(lambda: ray_round(tasks)))
                print(f"ray round {r + 1}: jobs {times['jobs'][-1]:.1f} s, ray {times['ray'][-1]:.1f} s", flush=True)
    finally:
        if head is not None:
            head.stop()
    ratios = [j / r for j, r in zip(times["jobs"], times["ray"])]  # Ray's students per hour ÷ jobs'
    per_hour = {k: round(3600 * args.ray_students / statistics.median(v), 1) for k, v in times.items()}
    ratio = round(statistics.median(ratios), 3)
    where = provenance("bench.audit_speed", args, started, Path(tempfile.gettempdir()) / "none")
    where.pop("recorded_training_seconds", None)
    return {"ray_vs_jobs": ratio, "ray_startup_seconds": startup,
            "ray": {**where, "target": 0.9, "students_per_hour": per_hour, "seconds_per_round": times,
                    "ratios": ratios, "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
                    "setup": {"students": args.ray_students, "epochs": epochs, "rows": args.rows,
                              "train_rows": len(data.train_y), "student": args.student, "batch_size": args.batch_size,
                              "jobs": cores, "ray_cluster_cpus": cores, "student_cpus": 1, "threads_per_student": 1,
                              "cluster": args.ray_address or "one node, started by the benchmark (ray start --head)"}}}


def ray_markdown(r: dict) -> list[str]:
    if "ray" not in r:
        return []
    g, s = r["ray"], r["ray"]["setup"]
    med = {k: statistics.median(v) for k, v in g["seconds_per_round"].items()}
    return ["## (d) Ray tasks against --jobs, same total threads", "",
            f"Command: `{g['command']}`  ", f"Machine: {g['machine']}  ", f"Date: {g['date']}", "",
            f"{s['students']} students of `{s['student']}` per measurement, {s['epochs']} epochs each on "
            f"{s['train_rows']} rows, batch {s['batch_size']}; --jobs {s['jobs']} against Ray tasks of "
            f"{s['student_cpus']} CPU on a cluster of {s['ray_cluster_cpus']} CPUs ({s['cluster']}), one thread per "
            f"student in both; {len(g['ratios'])} interleaved pairs, the median of their ratios reported"
            + (f" (load average {g['load_average_1min']['before']:.1f} before, {g['load_average_1min']['after']:.1f}"
               " after, on a shared machine)" if "load_average_1min" in g else "") + ".",
            *([f"Note: {g['note']}"] if g.get("note") else []), "",
            "| path | median seconds | students per hour |", "|---|---|---|",
            f"| --jobs {s['jobs']} | {med['jobs']:.1f} | {g['students_per_hour']['jobs']:.0f} |",
            f"| --ray | {med['ray']:.1f} | {g['students_per_hour']['ray']:.0f} |", "",
            "| ratio | measured | target |", "|---|---|---|",
            f"| ray_vs_jobs (median of {', '.join(f'{x:.3f}' for x in g['ratios'])}) | {r['ray_vs_jobs']:.3f} | "
            f"≥ {g['target']} |",
            f"| ray_startup_seconds (the head's start, apart from the rounds; each Ray round joins it as a new "
            "driver, as an audit does) | "
            f"{'—' if r['ray_startup_seconds'] is None else format(r['ray_startup_seconds'], '.1f')} | (context) |", ""]


def markdown(r: dict) -> str:
    if "setup" not in r:  # (d) alone
        return "\n".join(["# Audit student speed", "", *ray_markdown(r)])
    s, ph = r["setup"], r["students_per_hour"]
    med = {k: statistics.median(v) for k, v in r["seconds_per_round"].items()}
    return "\n".join([
        "# Audit student speed", "",
        f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ", f"Date: {r['date']}", "",
        f"{s['students']} students of `{s['student']}` per measurement, {s['epochs']} epochs each on {s['train_rows']} "
        f"rows (+{s['val_rows']} validation rows), batch {s['batch_size']}; medians of "
        f"{len(r['seconds_per_round']['bare'])} interleaved rounds.", "",
        "| path | threads | median seconds | students per hour |", "|---|---|---|---|",
        f"| (a) bare PyTorch loop | {s['threads']['bare']} | {med['bare']:.1f} | {ph['bare']:.0f} |",
        f"| (a') bare PyTorch loop, one thread | 1 | {med['bare_1thread']:.1f} | {ph['bare_1thread']:.0f} |",
        f"| (b) audit students, --jobs 1 | {s['threads']['jobs1']} | {med['jobs1']:.1f} | {ph['jobs1']:.0f} |",
        f"| (c) audit students, --jobs 2 | {s['threads']['jobs2']} per job | {med['jobs2']:.1f} | {ph['jobs2']:.0f} |",
        "", "| ratio | measured | target |", "|---|---|---|",
        f"| vs_bare_loop (b ÷ a) | {r['vs_bare_loop']:.2f} | ≥ {r['targets']['vs_bare_loop']} |",
        f"| parallel_speedup (c ÷ b) | {r['parallel_speedup']:.2f} | ≥ {r['targets']['parallel_speedup']} |",
        f"| bare loop, {s['threads']['bare']} threads ÷ 1 thread | {r['bare_thread_scaling']:.2f} | (context) |", "",
        *ray_markdown(r)])


if __name__ == "__main__":
    main()
