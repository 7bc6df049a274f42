"""Test helpers for serving: a digits model made by the real pipeline, and a real `bentoml serve`
subprocess on a free loopback port."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).with_name("bentoml"))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


class Server:
    """`bentoml serve serving.service:Undistillable` with UNDISTILLABLE_* settings, on 127.0.0.1."""

    def __init__(self, env: dict[str, str | None], log: Path, target: str = "serving.service:Undistillable",
                 cwd: Path = ROOT):
        self.env, self.log, self.target, self.cwd = env, log, target, cwd
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "Server":
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "BENTOML_DO_NOT_TRACK": "true",
               "UNDISTILLABLE_ORT_THREADS": "1", **self.env}
        env = {k: v for k, v in env.items() if v is not None}
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen([BENTOML, "serve", self.target, "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=self.cwd, env=env, stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"bentoml serve not ready after {timeout}s:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        if getattr(self, "_fh", None):
            self._fh.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, key: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)
