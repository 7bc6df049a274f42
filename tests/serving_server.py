"""Test helpers for serving: a digits model made by the real pipeline, the settings and key CLI the tests use,
and the one error shape. The real `bentoml serve` on a free loopback port is serving.launcher.Server."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from serving.launcher import BENTOML, ROOT, Server  # noqa: F401  (re-exported for the tests)
from serving.runtime import to_npy as npy  # noqa: F401


def make_digits_model(base: Path) -> Path:
    """`protect train --mode ce --dataset digits --arch cnn-tiny --epochs 1` then `protect export`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for args in (["train", "--mode", "ce", "--dataset", "digits", "--arch", "cnn-tiny", "--epochs", "1", "--quiet",
                  "--out", str(base / "run")],
                 ["export", str(base / "run"), "--out", str(base / "model")]):
        proc = subprocess.run([sys.executable, "-m", "protect", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"protect {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return base / "model"


MAX_ROWS = 6000
MAX_BODY = 4 << 20


def settings(model_dir: Path, tmp: Path, **extra) -> dict[str, str]:
    """UNDISTILLABLE_* of a test server: the keys database in `tmp`, small limits, and `extra` by short name."""
    return {"UNDISTILLABLE_MODEL_DIR": str(model_dir), "UNDISTILLABLE_KEYS_DB": str(tmp / "keys.sqlite"),
            "UNDISTILLABLE_MAX_ROWS": str(MAX_ROWS), "UNDISTILLABLE_MAX_BODY_BYTES": str(MAX_BODY),
            **{f"UNDISTILLABLE_{k.upper()}": str(v) for k, v in extra.items()}}


def assert_error(response: httpx.Response, status: int | tuple, code: str | None = None) -> dict:
    """The response has one of `status` and the one error shape {"error", "detail"} (with `code` when given)."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error", "detail"} and isinstance(body["error"], str) and isinstance(body["detail"], str), body
    if code is not None:
        assert body["error"] == code, body
    return body


def keys_cli(db: Path, *args: str) -> str:
    """`python -m serving.keys --db DB ARGS...`, which must succeed; its stdout."""
    proc = subprocess.run([sys.executable, "-m", "serving.keys", "--db", str(db), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def usage(db: Path, name: str) -> dict:
    return next(k for k in json.loads(keys_cli(db, "list", "--json")) if k["name"] == name)


def fuzz_openapi(url: str, tmp: Path, *options: str) -> str:
    """schemathesis over `url`/docs.json, bounded (60 examples per operation, fixed seed): every check but the two
    that judge request data, since a JSON schema cannot say that images are 8×8 or what an .npy file is. Fails the
    test on any finding; returns the report."""
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/docs.json", "--checks", "all",
         "--exclude-checks", "positive_data_acceptance,negative_data_rejection", *options, "--max-examples", "60",
         "--seed", "1", "--workers", "2", "--request-timeout", "30", "--phases", "examples,coverage,fuzzing",
         "--suppress-health-check", "all", "--generation-database", "none", "--no-color"],
        cwd=tmp, capture_output=True, text=True, timeout=600, env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    generated = re.search(r"(\d+) generated", out)
    assert generated and int(generated.group(1)) >= 200, out[-2000:]
    return out


def serve_until_exit(env: dict[str, str]) -> tuple[int, str]:
    """`bentoml serve` expected to refuse to start: its exit status and output."""
    proc = subprocess.run([BENTOML, "serve", "serving.service:Undistillable", "--host", "127.0.0.1", "--port", "0"],
                          cwd=ROOT, env={**os.environ, **env, "BENTOML_DO_NOT_TRACK": "true"}, capture_output=True,
                          text=True, timeout=180)
    return proc.returncode, proc.stdout + proc.stderr
