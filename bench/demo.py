"""The end-to-end demo (`make demo`): train a CE and a CMIM teacher on Fashion-MNIST with a quick recipe,
export both, serve each with BentoML behind an API key, audit each over HTTP with the attack battery, and
print a side-by-side table with the paths of the HTML reports.

Everything lands in demo_output/ and is reused by a second run: finished teachers, exported models, the
audit's answer cache and its finished students.
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
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console(stderr=True)


def step(title: str) -> None:
    console.rule(f"[bold]{title}")


def sh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a project command with its output streaming to the terminal; stop the demo if it fails."""
    console.print(f"[dim]$ {' '.join(args)}[/dim]")
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if proc.returncode != 0:
        console.print(f"[red]failed ({proc.returncode}): {' '.join(args)}[/red]")
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
           "--train-limit", str(args.train_limit), "--epochs", str(args.teacher_epochs), "--out", str(run))
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
        sh(bin_("audit"), "run", "--endpoint", server.url, "--dataset", "fashion-mnist", "--student", args.student_arch,
           "--attacks", "all", "--kd-grid", args.kd_grid, "--seeds", str(args.seeds), "--epochs",
           str(args.student_epochs), "--budget", str(args.budget), "--out", str(report_dir),
           env={"AUDIT_API_KEY": key_file.read_text().strip()})  # via the environment: never echoed
    return json.loads((report_dir / "report.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "demo_output")
    p.add_argument("--teacher-arch", default="cnn-small")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=20000)
    p.add_argument("--student-arch", default="cnn-tiny")
    p.add_argument("--student-epochs", type=int, default=2)
    p.add_argument("--budget", type=int, default=10000, help="transfer rows each audit queries")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--kd-grid", default="quick", choices=["quick", "full"])
    args = p.parse_args()
    started = time.time()
    rows = {}
    for mode in ("ce", "cmim"):
        step(f"{mode} teacher: train and export")
        model = teacher(args.out, mode, args)
        step(f"{mode} teacher: serve and audit over HTTP")
        rows[mode] = (model, serve_and_audit(args.out, mode, model, args))
    table = Table(title=f"CE vs CMIM on Fashion-MNIST (demo recipe, {time.time() - started:.0f} s)")
    for col in ("teacher", "test acc", "CMI T=1", "CMI T=4", "best knockoff", "LS student", "best Δ", "verdict"):
        table.add_column(col)
    from protect.card import load_card

    for mode, (model, report) in rows.items():
        card = load_card(model)
        v = report["verdict"]
        best = report["attacks"].get(v["strongest_attack"] or "", {})
        ls = report["references"]["ls"].get("summary") or {}
        table.add_row(mode, f"{card.test_accuracy * 100:.2f}%", f"{card.cmi['1']:.4f}", f"{card.cmi['4']:.4f}",
                      f"{v['strongest_attack']} {best.get('summary', {}).get('mean', float('nan')) * 100:.2f}%",
                      f"{ls.get('mean', float('nan')) * 100:.2f}%",
                      f"{v['best_delta'] * 100:+.2f} pts" if v["best_delta"] is not None else "–",
                      {True: "[green]undistillable[/green]", False: "[red]distillable[/red]", None: "–"}[v["undistillable"]])
    out = Console() if sys.stdout.isatty() else Console(width=150)  # a log file gets the whole table, not folded cells
    out.print(table)
    for mode in rows:
        out.print(f"{mode} report: {(args.out / 'reports' / mode / 'report.html').resolve()}")


if __name__ == "__main__":
    main()
