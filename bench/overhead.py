"""Training cost of CMIM against CE: step time ratio, same model, batch and data, measured in one run.

Steps of the two objectives are interleaved in rounds so that load from other processes hits both
alike. Usage: python -m bench.overhead [--arch cnn-medium] [--batch-size 128] [--rounds 5] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from protect.data import load_dataset, make_loader, train_and_test_sets
from protect.models import create_model
from protect.objectives import OBJECTIVES
from protect.trainer import TrainConfig, make_optimizer


def time_steps(objective_name: str, arch: str, batches: list[dict], num_classes: int, shape, seed: int) -> float:
    torch.manual_seed(seed)
    model = create_model(arch, num_classes, shape[0], shape[1])
    objective = OBJECTIVES.get(objective_name)(num_classes)
    optimizer = make_optimizer(list(model.parameters()), TrainConfig())
    model.train()
    objective.train()
    start = time.perf_counter()
    for batch in batches:
        _, losses = objective.forward_train(model, batch)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--arch", default="cnn-medium")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    args = parser.parse_args()
    splits = load_dataset(args.dataset)
    train, _ = train_and_test_sets(splits)
    loader = make_loader(train, args.batch_size, shuffle=True, seed=0)
    batches = [b for _, b in zip(range(args.steps), loader)]
    times: dict[str, list[float]] = {"ce": [], "cmim": []}
    time_steps("ce", args.arch, batches[:3], splits.num_classes, splits.input_shape, 0)  # warm-up
    for r in range(args.rounds):
        for name in (("ce", "cmim") if r % 2 == 0 else ("cmim", "ce")):
            times[name].append(time_steps(name, args.arch, batches, splits.num_classes, splits.input_shape, r))
    ce, cmim = statistics.median(times["ce"]), statistics.median(times["cmim"])
    result = {"command": "python -m bench.overhead " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d"), "ce_step_ms": ce * 1e3, "cmim_step_ms": cmim * 1e3,
              "ratio": cmim / ce, "target": 1.15, "rounds": times}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"CE {ce * 1e3:.1f} ms/step, CMIM {cmim * 1e3:.1f} ms/step, ratio {cmim / ce:.3f} (target ≤ 1.15)")


if __name__ == "__main__":
    main()
