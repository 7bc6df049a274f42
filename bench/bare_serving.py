"""The bare baseline of bench/serving.py: POST /predict on plain Starlette under uvicorn, answered by the service's
own Runtime (same ONNX Runtime sessions, decoder, policy and thread hand-off) and nothing else: no keys, ledger,
metrics, tracing, access log or pydantic models. It measures what the model path costs without the service.

    UNDISTILLABLE_MODEL_DIR=DIR python -m bench.bare_serving --port 3001 --workers 2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import socket

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from serving import bulk
from serving.config import Settings
from serving.errors import InputError
from serving.policy import rows_json
from serving.runtime import SMALL_BATCH, Runtime, decode_json

_runtime: Runtime | None = None


@contextlib.asynccontextmanager
async def lifespan(app):
    global _runtime
    settings = Settings.from_env()
    _runtime = Runtime(settings)
    bulk.install(_runtime, settings.api_threads)
    yield


async def predict(request: Request) -> JSONResponse:
    try:
        inputs = json.loads(await request.body())["inputs"]
        x = decode_json(inputs, _runtime.card, _runtime.max_rows)
    except InputError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "invalid_json", "detail": "send {\"inputs\": [...]}"}, status_code=400)
    probs = await bulk.run(_runtime.probs, x, small=len(x) <= SMALL_BATCH)
    return JSONResponse({"policy": _runtime.policy.as_dict(),
                         "predictions": rows_json(probs, _runtime.policy, _runtime.card.classes)})


async def readyz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", readyz)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    """uvicorn's own worker processes on a socket made here: `uvicorn --workers N` binds one with protocol 0, on
    which asyncio leaves Nagle's algorithm on, and every answer then waits 40 ms for a delayed ACK. BentoML's
    workers get a TCP socket, so this is the like-for-like setting."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    config = uvicorn.Config("bench.bare_serving:app", workers=args.workers, log_level="warning", access_log=False)
    Multiprocess(config, sockets=[sock]).run()


if __name__ == "__main__":
    main()
