"""serving: the protected model as a black-box HTTP API (BentoML + ONNX Runtime), with keys, budgets and a ledger.

`serving/service.py` is the BentoML service (`bentoml serve serving.service:Undistillable`); the model logic
lives in `runtime.py` and `policy.py`, the HTTP schemas in `schemas.py`, keys/budgets/ledger in `guard.py`
and `ledger.py`, the key CLI in `keys.py` (`python -m serving.keys`). Configuration: `config.py`.
"""
