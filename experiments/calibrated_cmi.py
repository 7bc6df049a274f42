"""What a teacher leaks at the scale an attacker reads it: seconds per teacher, no students.

For each teacher, on the audit's transfer rows (the first `--budget` training rows) and its validation slice:
- τ: the temperature calibrated-kd fits (NLL of the labels on the validation slice; searched in protect.metrics.TAU_BOUNDS,
  [0.02, 50], the range the audit's calibrated-kd searches);
- CMI at τ given the true label, and given the teacher's own top-1 label (what the answers carry beyond the
  teacher's hard labels, which a hard-label student gets anyway);
- the within-class share of the centred log-probabilities' variance (what logit-mse regresses on; scale-free);
- CMI at the raw T = 1 and 4, and test accuracy, for comparison with `protect eval`.

    python -m experiments.calibrated_cmi experiments/work/protection/fashion-mnist/runs/{ce,cmim}
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from protect.metrics import fit_temperature
from audit.runner import validation_split
from protect.cmi import conditional_mutual_information
from protect.data import load_dataset
from protect.predict import load_predictor


def measure(path: Path, splits, budget: int, val_fraction: float) -> dict:
    predictor = load_predictor(path)
    x, y = splits.train_x[:budget], splits.train_y[:budget]
    z = torch.from_numpy(predictor.logits(x.numpy())).double()
    test_z = torch.from_numpy(predictor.logits(splits.test_x.numpy())).double()
    logp = torch.log_softmax(z, 1)
    _, val = validation_split(budget, val_fraction)
    tau = fit_temperature(logp[val], y[val])
    centred = logp - logp.mean(1, keepdim=True)
    means = torch.stack([centred[y == k].mean(0) for k in range(int(y.max()) + 1)])
    within = float(((centred - means[y]) ** 2).sum(1).mean() / (centred ** 2).sum(1).mean())
    top1 = z.argmax(1)
    return {"test_accuracy": float((test_z.argmax(1) == splits.test_y).double().mean()),
            "transfer_agreement": float((top1 == y).double().mean()), "tau": tau,
            "cmi_at_tau": float(conditional_mutual_information(z, y, tau)),
            "cmi_at_tau_given_top1": float(conditional_mutual_information(z, top1, tau)),
            "cmi_T1": float(conditional_mutual_information(z, y, 1.0)),
            "cmi_T4": float(conditional_mutual_information(z, y, 4.0)),
            "within_class_logp_variance_share": within}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teachers", nargs="+", type=Path, help="run directories or exported model directories")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--budget", type=int, default=10000, help="transfer rows, as the audit's --budget")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = p.parse_args()
    splits = load_dataset(args.dataset, args.data_dir)
    rows = {t.name: measure(t, splits, args.budget, args.val_fraction) for t in args.teachers}
    lines = ["| teacher | test acc | τ | CMI at τ | CMI at τ given top-1 | within-class share | CMI T=1 | CMI T=4 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {100 * r['test_accuracy']:.2f} | {r['tau']:.3f} | {r['cmi_at_tau']:.4f} | "
              f"{r['cmi_at_tau_given_top1']:.4f} | {r['within_class_logp_variance_share']:.4f} | {r['cmi_T1']:.4f} | "
              f"{r['cmi_T4']:.4f} |" for n, r in rows.items()]
    print("\n".join(lines))
    if args.out:
        import shlex
        import sys

        from experiments.common import machine

        command = "python -m experiments.calibrated_cmi " + shlex.join(sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d"), "teachers": rows}, indent=2))
        args.out.with_suffix(".md").write_text(
            f"# Leakage at the attacker's scale: {args.dataset}\n\nCommand: `{command}`  \nMachine: {machine()}  \n"
            f"Date: {time.strftime('%Y-%m-%d')}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
