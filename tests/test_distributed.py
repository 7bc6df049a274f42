"""torchrun with 2 CPU processes (gloo): DDP training, and CMIM centroids identical on every rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_two_process_cmim_keeps_centroids_in_agreement(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "protect", "train", "--mode", "cmim", "--dataset", "digits", "--epochs", "4", "--quiet",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4  # one writer: rank 0
    for line in lines:
        assert line["objective_buffer_rank_spread"] == 0.0
    # 4 epochs, not 2: at 2 (12 steps per rank) the final accuracy ranged 0.33–0.86 from run to run
    assert lines[-1]["test_acc"] > 0.5
    import torch

    bank = torch.load(out / "checkpoint.pt", weights_only=True)["objective"]["loss.bank.centroids"]
    assert not torch.allclose(bank, torch.full_like(bank, 0.1))  # the centroids really moved
