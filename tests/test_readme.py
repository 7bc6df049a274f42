"""The README's examples run as printed: the library snippet, and every command of the quickstart."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from serving.launcher import free_port
from tests.conftest import ROOT


def readme_block(marker: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- example: {marker} -->\n```{lang}\n(.*?)```", text, re.S)
    assert block, f"README lost its {marker} example"
    return block.group(1)


def test_library_example_runs():
    namespace: dict = {}
    exec(compile(readme_block("library", "python"), "README.md", "exec"), namespace)  # noqa: S102
    assert set(namespace["criterion"].last_terms) == {"ce", "cmi"}


def test_quickstart_runs_as_printed(tmp_path: Path):
    script = readme_block("quickstart", "bash")
    # The test's interpreter stands for the activated venv, and a free port for 3000 (another test may hold it);
    # every other character runs as printed, from a fresh directory with the repository on PYTHONPATH.
    assert script.startswith(". .venv/bin/activate\n")
    script = script.removeprefix(". .venv/bin/activate\n").replace("3000", str(free_port()))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("UNDISTILLABLE_")}
    # its own process group, so that a failing command does not leave the background server running
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    lines = out.splitlines()
    assert any(line.startswith("401") for line in lines), out[-2000:]  # the prediction without a key
    # the server logs to the same stdout and may land right after a body, before curl's newline: read one object
    first_json = json.JSONDecoder().raw_decode
    metadata = first_json(next(line for line in lines if line.startswith('{"classes"')))[0]
    assert metadata["input_shape"] == [1, 8, 8]
    answer = first_json(next(line for line in lines if line.startswith('{"policy"')))[0]
    assert len(answer["predictions"]) == 2
    report = json.loads((tmp_path / "reports/quick/report.json").read_text())
    assert report["verdict"]["outcome"] in {"distillable", "undistillable", "inconclusive"}
    # the default query strategies: the budget's 600 queries are real rows and mixtures of them, and KD trains on both
    budget = report["queries"]["budget"]
    assert set(report["queries"]["strategies"]) == {"rows", "mixup"}
    assert budget["synthetic"] > 0 and budget["rows"] + budget["synthetic"] == budget["total"] == 600, budget
    assert {"kd", "kd@mixup", "logit-std"} <= set(report["attacks"])
    usage = next(line.split() for line in lines if line.startswith("quickstart "))
    assert usage[2:4] == ["1000", "602"], usage  # budget, served: the audit's 600 rows and the 2 of the query
