"""Routes that BentoML's @bentoml.api cannot express: a raw .npy body in and out (POST /predict_npy) and a GET
(/metadata). A small Starlette app, mounted on the service; it shares the worker's Runtime."""
from __future__ import annotations

import json

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.errors import InputError

_runtime = None
SMALL_BODY = 16 << 10  # .npy bodies up to 16 KiB (5 Fashion-MNIST float32 rows) are answered on the event loop
_limiter: anyio.CapacityLimiter | None = None


def install(runtime, threads: int) -> None:
    """Called by the service in each worker once its Runtime is ready."""
    global _runtime, _limiter
    _runtime, _limiter = runtime, anyio.CapacityLimiter(threads)


def _not_ready() -> JSONResponse:
    return JSONResponse({"error": "unavailable", "detail": "the model is still loading; retry"}, status_code=503,
                        headers={"Retry-After": "1"})


async def run(fn, *args, small: bool = False):
    """Small requests run on the event loop (a model call on a few rows takes well under a millisecond; a thread
    hop costs about as much); larger ones in a worker thread so that the loop keeps serving."""
    if small:
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args, limiter=_limiter)


async def predict_npy(request: Request) -> Response:
    if _runtime is None:
        return _not_ready()
    body = await request.body()
    try:
        answer = await run(_runtime.predict_npy, body, small=len(body) <= SMALL_BODY)
    except InputError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
    return Response(answer, media_type="application/octet-stream",
                    headers={"X-Output-Policy": json.dumps(_runtime.policy.as_dict())})


async def metadata(request: Request) -> Response:
    if _runtime is None:
        return _not_ready()
    meta = _runtime.metadata()
    meta["keys_required"] = bool(request.scope.get("state", {}).get("keys_required", False))
    return JSONResponse(meta)


app = Starlette(routes=[Route("/predict_npy", predict_npy, methods=["POST"]),
                        Route("/metadata", metadata, methods=["GET"])])
