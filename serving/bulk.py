"""Routes that BentoML's @bentoml.api cannot express safely: a raw .npy body in and out (POST /predict_npy), the
image upload (POST /classify_image) and a GET (/metadata). A small Starlette app, mounted on the service; it shares
the worker's Runtime.

The upload is parsed here, not by BentoML: BentoML's multipart reader fetches any text part given for a file field
as a URL (a server-side fetch the client chooses). Here the upload is exactly one file part named `image` and at
most one `top_k` field; anything else is a 400 that names the problem, and nothing is ever fetched."""
from __future__ import annotations

import json

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.errors import InputError
from serving.policy import topk_json
from serving.runtime import decode_image

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


TOP_K_DEFAULT, TOP_K_MAX = 5, 1000


async def _upload(request: Request) -> tuple[bytes, int]:
    """(image bytes, top_k) of an upload, or InputError: exactly one file part `image`, at most one `top_k`."""
    from starlette.datastructures import UploadFile

    try:  # bounded: a third file or a fourth field is refused by the parser itself
        form = await request.form(max_files=2, max_fields=3)
    except Exception as exc:
        raise InputError("bad_upload", f"unreadable multipart/form-data body ({getattr(exc, 'detail', exc)}); send "
                         "one file part named 'image' and optionally 'top_k'") from None
    try:
        parts = form.multi_items()
        names = [name for name, _ in parts]
        extra = sorted(set(names) - {"image", "top_k"})
        if extra:
            raise InputError("bad_upload", f"unexpected form fields {extra}; send 'image' and optionally 'top_k'")
        images = [value for name, value in parts if name == "image"]
        if len(images) != 1:
            raise InputError("bad_upload", f"{len(images)} parts named 'image'; send exactly one file part named "
                             "'image'")
        if not isinstance(images[0], UploadFile):
            raise InputError("bad_upload", "'image' is a text field; send the image as a file part (URLs and text "
                             "fields are not fetched)")
        top = [value for name, value in parts if name == "top_k"]
        if len(top) > 1 or (top and not isinstance(top[0], str)):
            raise InputError("validation_error", "top_k: send at most one text field 'top_k'")
        top_k = TOP_K_DEFAULT
        if top:
            try:
                top_k = int(top[0])
            except ValueError:
                raise InputError("validation_error", f"top_k: {top[0][:40]!r} is not an integer") from None
            if not 1 <= top_k <= TOP_K_MAX:
                raise InputError("validation_error", f"top_k: {top_k} is outside 1…{TOP_K_MAX}")
        return await images[0].read(), top_k
    finally:
        await form.close()


async def classify_image(request: Request) -> Response:
    if _runtime is None:
        return _not_ready()
    try:
        data, top_k = await _upload(request)
        probs = await run(lambda: _runtime.probs(decode_image(data, _runtime.card))[0])
    except InputError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
    return JSONResponse({"policy": _runtime.policy.as_dict(),
                         "top": topk_json(probs, _runtime.policy, _runtime.card.classes, top_k)})


async def metadata(request: Request) -> Response:
    if _runtime is None:
        return _not_ready()
    meta = _runtime.metadata()
    meta["keys_required"] = bool(request.scope.get("state", {}).get("keys_required", False))
    return JSONResponse(meta)


app = Starlette(routes=[Route("/predict_npy", predict_npy, methods=["POST"]),
                        Route("/classify_image", classify_image, methods=["POST"]),
                        Route("/metadata", metadata, methods=["GET"])])
