"""The project's BentoML service built without the gate (keys, budgets, ledger, body limits, error rewriting): a
baseline for bench/serving.py only, so that `single_c8_vs_bentoml` measures what the gate itself costs. It is not an
operator setting: `bentoml serve bench.ungated_service:Ungated` serves every route to anyone."""
from serving.service import build

Ungated = build(gated=False)
