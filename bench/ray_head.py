"""A one-node Ray cluster for a benchmark or the tests: `ray start --head --block` in a process group of its own,
so that stopping it (SIGTERM, then SIGKILL to the group) leaves nothing behind, whatever happened meanwhile.
It lives for minutes on the loopback address, without Ray's token authentication (`LOOPBACK_ENV`: a token found
in ~/.ray would turn it on for the head but not for the drivers that join it)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

READY = "block forever"  # what `ray start --block` prints once the head is up
LOOPBACK_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # for the head and its drivers


@dataclass
class RayHead:
    process: subprocess.Popen
    address: str
    temp_dir: Path

    def stop(self) -> None:
        """Stop the head (its raylet stops the workers), then anything of its process group left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(num_cpus: int, object_store_bytes: int | None = None, timeout: float = 120.0) -> RayHead:
    """Start a head of `num_cpus` CPUs on 127.0.0.1 and a free port; returns once drivers can join it."""
    port = _free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus", str(num_cpus),
           "--port", str(port), "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
           "--include-dashboard=false", "--temp-dir", str(temp)]
    if object_store_bytes:
        cmd += ["--object-store-memory", str(object_store_bytes)]
    log = temp / "head.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **LOOPBACK_ENV})
    head = RayHead(proc, f"127.0.0.1:{port}", temp)
    deadline = time.monotonic() + timeout
    while READY not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text()
            head.stop()
            raise RuntimeError(f"the Ray head did not start:\n{text}")
        time.sleep(0.1)
    return head
