"""The BentoML service: `bentoml serve serving.service:Undistillable` (bentofile.yaml names it).

Model directory: UNDISTILLABLE_MODEL_DIR (default: models/default beside serving/); every setting is an
UNDISTILLABLE_* environment variable, see docs/serving.md. The model logic is in serving/runtime.py, the gate (keys,
budgets, ledger) in serving/guard.py, the raw .npy, image-upload and /metadata routes in serving/bulk.py.
"""
from __future__ import annotations

import gc
import logging
from typing import Any

import bentoml

from serving import bulk
from protect.card import ModelDirError, verify_model_dir
from serving.config import ConfigError, Settings
from serving.errors import InputError
from serving.guard import GuardMiddleware, auth_at_start
from serving.ledger_rules import REQUEST_TIMEOUT
from serving.policy import rows_json
from serving.routes import MODEL
from serving.runtime import SMALL_BATCH, Runtime, decode_json
from serving.schemas import Pixels, PredictResponse

logger = logging.getLogger("bentoml.undistillable")


def _refuse_to_start(exc: Exception):
    logger.error("refusing to start: %s", exc)
    raise SystemExit(f"undistillable serving: refusing to start: {exc}") from None


try:
    SETTINGS = Settings.from_env()
except ConfigError as exc:
    _refuse_to_start(exc)
try:  # fail fast, before any worker starts: a missing model or a sha256 mismatch stops the server
    verify_model_dir(SETTINGS.model_dir)
except ModelDirError as exc:
    _refuse_to_start(exc)


def build(gated: bool = True) -> Any:
    """The service class. `gated=False` leaves the gate out: only for bench/ (what the gate itself costs), never a
    setting an operator can reach."""

    @bentoml.asgi_app(bulk.app, path="/")
    @bentoml.service(name="undistillable", workers=SETTINGS.workers, threads=SETTINGS.api_threads,
                     traffic={"timeout": REQUEST_TIMEOUT}, logging={"access": {"enabled": SETTINGS.access_log}},
                     # OpenTelemetry's ASGI middleware costs a fifth of a one-image request even when no trace is kept
                     # (BentoML's default sample rate is 0); prediction routes skip it unless UNDISTILLABLE_TRACING=1
                     tracing={} if SETTINGS.tracing else {"excluded_urls": list(MODEL)})
    class Undistillable:
        """Black-box API of a protected classifier: JSON, bulk .npy and image-upload predictions."""

        def __init__(self) -> None:
            self.runtime = Runtime(SETTINGS)
            bulk.install(self.runtime, SETTINGS.api_threads)
            card = self.runtime.card
            logger.info("model %s (%s, %s, sha256 %s…) on %s; policy %s; ORT threads %d", SETTINGS.model_dir,
                        card.mode, card.arch, card.onnx_sha256[:12], ",".join(self.runtime.providers),
                        SETTINGS.policy.as_dict(), SETTINGS.ort_threads)
            if gated:
                logger.log(*auth_at_start(SETTINGS))
            # Everything alive now (modules, the model, schemas) lives as long as the worker: kept out of the
            # garbage collector, a full collection takes well under a millisecond instead of ~20 ms (the worker's
            # whole event loop waits for it, so it was the p99 of concurrent requests)
            gc.freeze()

        @bentoml.on_deployment
        def check_keys_database() -> None:
            """Once per `bentoml serve`, before any worker starts (not on `bentoml build`, where no keys database
            need exist): keys required and no keys database at the configured path stops the server."""
            if gated:
                try:
                    auth_at_start(SETTINGS)
                except ConfigError as exc:
                    _refuse_to_start(exc)

        @bentoml.api(route="/predict")
        async def predict(self, inputs: Pixels) -> PredictResponse:
            """Predict a batch of raw-pixel images (N, C, H, W) in [0, 1]; per-row answers under the output policy."""
            try:
                x = decode_json(inputs, self.runtime.card, self.runtime.max_rows)
            except InputError as exc:  # answered as is: BentoML would log a traceback per refused input
                return exc.response()
            probs = await bulk.run(self.runtime.probs, x, small=len(x) <= SMALL_BATCH)
            return PredictResponse(policy=self.runtime.policy.as_dict(),
                                   predictions=rows_json(probs, self.runtime.policy, self.runtime.card.classes))

    if gated:
        Undistillable.add_asgi_middleware(GuardMiddleware, settings=SETTINGS)
    return Undistillable


Undistillable = build()
