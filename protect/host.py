"""What this machine offers: its usable cores, whether it has a GPU, and an ONNX Runtime session that uses the GPU
only when one is there. Torch-free: the server imports it (bentofile.yaml packs it), and importing torch costs each
server worker about 600 MB and makes every full garbage collection pause the worker 5× longer."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, which containers and `taskset` narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def gpu_present() -> bool:
    """A GPU that ONNX Runtime's CUDA provider could use: the NVIDIA driver lists one."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=5).returncode == 0
    except Exception:
        return False


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime session on `path`: the CUDA provider first only when the installed runtime has it and a GPU
    is really there (onnxruntime-gpu on a machine without one would otherwise warn and fall back), else the CPU
    provider. `threads` sets the intra-op threads (one inter-op thread); None leaves ONNX Runtime's default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers() and gpu_present():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)
