"""Shared fixtures: small real runs on `digits`, made once per session through the real CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Two cores: several torch processes each grabbing both would thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m protect ...` (or another module via args[0] == '-m') and capture its output."""
    cmd = [sys.executable, *args] if args and args[0] == "-m" else [sys.executable, "-m", "protect", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def digits_ce_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ce"
    run_cli("train", "--mode", "ce", "--dataset", "digits", "--epochs", "2", "--quiet", "--out", str(out))
    return out


@pytest.fixture(scope="session")
def digits_ce_model(digits_ce_run, tmp_path_factory) -> Path:
    """The CE teacher exported (model.onnx + model.json)."""
    out = tmp_path_factory.mktemp("ce-model") / "model"
    run_cli("export", str(digits_ce_run), "--out", str(out))
    return out


@pytest.fixture(scope="session")
def digits_cmim_model(tmp_path_factory) -> Path:
    """A CMIM teacher trained on digits and exported: (run dir, model dir)."""
    base = tmp_path_factory.mktemp("cmim")
    run_cli("train", "--mode", "cmim", "--dataset", "digits", "--epochs", "2", "--quiet", "--out", str(base / "run"))
    run_cli("export", str(base / "run"), "--out", str(base / "model"))
    return base


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The digits model the serving tests serve (protect train + protect export: cnn-tiny, 1 epoch)."""
    from serving_server import make_digits_model

    return make_digits_model(tmp_path_factory.mktemp("serving_model"))


@pytest.fixture(scope="session")
def digits_x():
    """The digits test split, float32 (N, 1, 8, 8) in [0, 1]."""
    import numpy as np

    from protect.data import load_dataset

    return load_dataset("digits", None).test_x.numpy().astype(np.float32)


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the session (bench/postgres_server.py), stopped and removed at the end
    even when tests fail; `postgres_db` gives each user a database of its own on it."""
    from bench.postgres_server import INSTALL_HINT, TempPostgres, binaries

    if binaries() is None:  # a failure, not a skip: a suite without a real PostgreSQL must not pass as green
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = TempPostgres()
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def postgres_db(postgres, request) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    return postgres.new_database(request.node.name)
