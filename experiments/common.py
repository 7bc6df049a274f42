"""What every experiment's results file carries: the command as typed, the machine, the date and the training
time recorded in the artifacts."""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

from protect.atomic import write_atomic
from protect.history import training_seconds
from protect.host import cpu_count

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    import torch

    gpu = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {cpu_count()} cores, torch {torch.__version__}, {gpu}"


def recorded_seconds(work: Path) -> dict:
    """Training time recorded in the artifacts (teacher epochs, student epochs): the benchmark's real cost even
    when this invocation only reused finished work."""
    teachers = sum(training_seconds(run) for run in work.glob("runs/*"))
    students = 0.0
    for f in [*work.glob("reports/*/students.jsonl"), *work.glob("references/students.jsonl")]:
        for line in f.read_text().splitlines():
            try:
                students += sum(h.get("seconds", 0.0) for h in json.loads(line).get("history", []))
            except (json.JSONDecodeError, AttributeError):
                continue
    return {"teachers": round(teachers, 1), "students": round(students, 1)}


def provenance(script: str, args: argparse.Namespace, started: float, work: Path) -> dict:
    """command, machine, date and times of a benchmark result."""
    return {"command": f"python -m {script} " + shlex.join(sys.argv[1:]),  # as typed: it reruns as is
            "machine": machine(), "date": time.strftime("%Y-%m-%d"), "wall_seconds": time.time() - started,
            "recorded_training_seconds": recorded_seconds(work),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def timing_line(result: dict) -> str:
    rec = result["recorded_training_seconds"]
    return (f"Date: {result['date']}; training time recorded in the artifacts: teachers {rec['teachers'] / 60:.1f} min, "
            f"students {rec['students'] / 60:.1f} min (this invocation: {result['wall_seconds'] / 60:.1f} min wall)")


def write_results(json_path: Path, result: dict, markdown) -> None:
    """The results file and its markdown beside it, each written atomically: an experiment rewrites them after
    every row, and a crash mid-write must not leave the previous rows unreadable."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(json_path, json.dumps(result, indent=2) + "\n")
    write_atomic(json_path.with_suffix(".md"), markdown(result))
