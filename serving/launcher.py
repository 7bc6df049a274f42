"""Start and stop a real `bentoml serve serving.service:Undistillable` on a loopback port (demo, tests, benchmarks)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).with_name("bentoml"))


BIND_ATTEMPTS = 3


class PortTaken(Exception):
    """The chosen port was bound by another process between choosing it and `bentoml serve` binding it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess with UNDISTILLABLE_* settings in `env` (a None value unsets a variable), logging to
    `log`; ready once GET /readyz answers 200. By default `bentoml serve` of the project's service, or `target`."""

    def __init__(self, env: dict[str, str | None], log: Path, target: str = "serving.service:Undistillable",
                 cwd: Path = ROOT):
        self.env, self.log, self.target, self.cwd = env, log, target, cwd
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [BENTOML, "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self, timeout: float = 120, attempts: int = BIND_ATTEMPTS) -> Server:
        """Start on a free loopback port and wait until ready. The port is free when chosen but may be taken
        before `bentoml serve` binds it (a Ray node or another server opens ports all the time): a start that
        dies with "Address already in use" is retried on a fresh port, up to `attempts` starts."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout)
            except PortTaken:
                if attempt == attempts:
                    raise RuntimeError(f"{attempts} starts found their port taken before bentoml bound it:\n"
                                       f"{self.log_text()[-3000:]}") from None

    def _start_once(self, timeout: float) -> Server:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "BENTOML_DO_NOT_TRACK": "true",
               "UNDISTILLABLE_ORT_THREADS": "1", **self.env}
        env = {k: v for k, v in env.items() if v is not None}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log, "ab")
        logged_before = self._fh.tell()
        self.proc = subprocess.Popen(self.argv(), cwd=self.cwd, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, this_start = self.proc.returncode, self.log.read_bytes()[logged_before:].decode(errors="replace")
                self.stop()
                if "Address already in use" in this_start:
                    raise PortTaken(self.port)
                raise RuntimeError(f"{self.argv()[0]} exited {code}:\n{this_start[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import psutil  # a BentoML dependency

            try:  # BentoML's workers run in process groups of their own: a SIGKILL of ours would miss them
                workers = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                workers = []
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            for worker in workers:
                try:
                    worker.wait(10)
                except psutil.TimeoutExpired:
                    worker.kill()
                except psutil.Error:
                    pass
        self.proc = None
        if getattr(self, "_fh", None):
            self._fh.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, key: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)
