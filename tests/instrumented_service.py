"""The project's service with its model calls recorded: `bentoml serve instrumented_service:Undistillable` (tests/ on
PYTHONPATH). Each call of Runtime.logits appends its row count to the file named by UNDISTILLABLE_TEST_MODEL_LOG,
so a test can see what reached the model, whatever the HTTP layer answered. Test-only: nothing in serving/ reads it.
`Ungated` is the same service built without the gate (bench/ungated_service.py)."""
from __future__ import annotations

import os

from serving import runtime

_LOG = os.environ.get("UNDISTILLABLE_TEST_MODEL_LOG")
_logits = runtime.Runtime.logits


def _recorded(self, x):
    if _LOG:
        with open(_LOG, "a") as fh:
            fh.write(f"{len(x)}\n")
    return _logits(self, x)


runtime.Runtime.logits = _recorded

from bench.ungated_service import Ungated  # noqa: E402  (after the patch: workers import this module)
from serving.service import Undistillable  # noqa: E402

__all__ = ["Undistillable", "Ungated"]
