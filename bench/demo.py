"""The end-to-end demo (`make demo`): train a CE and a CMIM teacher on Fashion-MNIST, export both, serve each with
BentoML behind an API key, audit each over HTTP with converged students and paired seeds, and print the outcomes
side by side (the label-only student's accuracy beside every Δ) with the paths of the HTML reports.

Sized for 2 CPU cores, about 20 minutes (19.3 min wall with the venv in place, 2026-12-07): `cnn-small` teachers, 8
epochs on all 60,000 training rows; the audit's converged `cnn-tiny` students within 10,000 queries and the audit's
default query strategies (rows and mixtures of them: 5,263 real rows, 526 of them the validation slice, and 4,737
mixtures), 5 paired seeds, the attack families of `--attacks` (KD over its quick grid, on the rows and on the
mixtures, and logit standardisation: the strongest against a CE teacher in bench/results/ablation-fashion-mnist.md),
the label-only references at ε 0.1 (LS on the rows, on the mixtures) and no plain CE student. The reference students
never see a teacher, so the CMIM audit reuses the CE audit's. Everything lands in demo_output/ and a second run
reuses it: teachers, models, answers, students.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from audit.queries import DEFAULT_QUERIES

ROOT = Path(__file__).resolve().parents[1]
console = Console(stderr=True)


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def sh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a project command with its output streaming to the terminal; stop the demo if it fails."""
    console.print(f"[dim]$ {escape(' '.join(args))}[/dim]")
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if proc.returncode != 0:
        console.print(f"[red]failed ({proc.returncode}): {escape(' '.join(args))}[/red]")
        sys.exit(proc.returncode)
    return proc


def bin_(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def teacher(out: Path, mode: str, args) -> Path:
    run = out / "runs" / mode
    if (run / "model.pt").exists():
        console.print(f"{mode}: reusing the finished teacher in {run}")
    elif (run / "checkpoint.pt").exists():
        sh(bin_("protect"), "train", "--out", str(run), "--resume")
    else:
        sh(bin_("protect"), "train", "--mode", mode, "--dataset", "fashion-mnist", "--arch", args.teacher_arch,
           "--epochs", str(args.teacher_epochs), "--out", str(run))
    model = out / "models" / mode
    if not (model / "model.json").exists():
        sh(bin_("protect"), "export", str(run), "--out", str(model), "--force")
    return model


def serve_and_audit(out: Path, mode: str, model: Path, args) -> dict:
    from serving.launcher import Server

    report_dir = out / "reports" / mode
    keys_db = out / "ledger" / f"{mode}.sqlite"
    keys_db.parent.mkdir(parents=True, exist_ok=True)
    key_file = out / "ledger" / f"{mode}.key"
    if not key_file.exists():
        added = subprocess.run([sys.executable, "-m", "serving.keys", "--db", str(keys_db), "add", "auditor",
                                "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
        key_file.write_text(json.loads(added.stdout)["key"])
    env = {"UNDISTILLABLE_MODEL_DIR": str(model.resolve()), "UNDISTILLABLE_KEYS_DB": str(keys_db.resolve()),
           "UNDISTILLABLE_ACCESS_LOG": "0"}
    console.print(f"starting bentoml serve for the {mode} model (log: {out / 'logs' / (mode + '.log')})")
    with Server(env, out / "logs" / f"{mode}.log") as server:
        console.print(f"serving on {server.url} (API key required; key in {key_file})")
        sh(bin_("audit"), "run", "--endpoint", server.url, "--dataset", "fashion-mnist", "--attacks", args.attacks,
           "--kd-grid", args.kd_grid, "--ls-epsilons", args.ls_epsilons, "--seeds", args.seeds,
           "--budget", str(args.budget), "--queries", args.queries, "--no-ce-reference",
           "--references", str(out / "references"),
           "--out", str(report_dir),
           env={"AUDIT_API_KEY": key_file.read_text().strip()})  # via the environment: never echoed
    return json.loads((report_dir / "report.json").read_text())


OUTCOME_STYLE = {"distillable": "red", "undistillable": "green", "inconclusive": "yellow"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "demo_output")
    p.add_argument("--teacher-arch", default="cnn-small")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--budget", type=int, default=10000, help="queries each audit asks, real rows and synthetic ones")
    p.add_argument("--queries", default=DEFAULT_QUERIES,
                   help=f"the audits' query strategies (default {DEFAULT_QUERIES}, audit run's; 'rows': the rows "
                        "alone)")
    p.add_argument("--seeds", default="5", help="paired seeds per audit, or 'auto'")
    p.add_argument("--attacks", default="kd,logit-std", help="attack families (the full battery: 'all')")
    p.add_argument("--kd-grid", default="quick", choices=["quick", "full"])
    p.add_argument("--ls-epsilons", default="0.1", help="label-smoothing ε candidates of the reference student")
    args = p.parse_args()
    started = time.time()
    rows = {}
    for mode in ("ce", "cmim"):
        step(f"{mode} teacher: train and export")
        model = teacher(args.out, mode, args)
        step(f"{mode} teacher: serve and audit over HTTP")
        rows[mode] = (model, serve_and_audit(args.out, mode, model, args))
    from audit.report import reference_family
    from protect.card import load_card

    table = Table(title=f"CE vs CMIM on Fashion-MNIST ({time.time() - started:.0f} s)")
    for col in ("teacher", "test acc", "CMI T=1", "label-only student", "strongest family (Δ, points)",
                "largest upper bound", "outcome"):
        table.add_column(col)
    for mode, (model, report) in rows.items():
        card = load_card(model)
        v = report["verdict"]
        reference = reference_family(report)  # `ls`, or the `ls@strategy` that won on validation
        ref_summary = report["references"].get(reference, {}).get("summary") or {}
        fams = v.get("families") or {}
        upper = max((f["upper"] for f in fams.values() if f["upper"] is not None), default=None)
        strongest = v.get("strongest_attack")
        table.add_row(mode, f"{card.test_accuracy * 100:.2f}%", f"{card.cmi['1']:.4f}",
                      f"{reference} {ref_summary.get('mean', float('nan')) * 100:.2f}%",
                      f"{strongest} ({v['best_delta']:+.2f})" if strongest else "–",
                      f"{upper:+.2f}" if upper is not None else "–",
                      f"[{OUTCOME_STYLE.get(v['outcome'], 'white')}]{v['outcome']}[/]")
    out = Console() if sys.stdout.isatty() else Console(width=150)  # a log file gets the whole table, not folded cells
    out.print(table)
    for mode, (_, report) in rows.items():
        out.print(f"[bold]{mode}[/bold]: {escape(report['verdict']['statement'])}")
        out.print(f"  report: {(args.out / 'reports' / mode / 'report.html').resolve()}")


if __name__ == "__main__":
    main()
