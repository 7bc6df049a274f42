"""The ASGI middleware in front of every route: keys, row budgets, rates, the query ledger, body limits,
one error shape for every 4xx/5xx, and the OpenAPI additions for the routes BentoML does not describe.

Prediction routes (POST): the key is checked first (401), then the body is read up to the size limit (413),
its rows are counted (from the .npy header, the JSON `inputs` list, 1 per image) and held against the row
limit (413) before any budget question, then against the key's budget and rate (429, nothing charged). The
model's answer is held back until it is billed: budget, rate and charge in one SQLite transaction, then the
answer is sent. An answer refused by the model (4xx), or one whose client has gone, is never billed.
Everything else (health, metrics, metadata, docs) stays open.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import sqlite3
from http import HTTPStatus

from serving.config import PREFIX, ConfigError, Settings
from serving.errors import error_body
from serving.ledger import Decision, Ledger
from serving.runtime import batch_too_large, npy_rows

logger = logging.getLogger("bentoml.undistillable")

GUARDED = {"/predict": "json", "/predict_npy": "npy", "/classify_image": "image"}
MEDIA = {"json": ("application/json",), "npy": ("application/octet-stream", "application/x-npy"),
         "image": ("multipart/form-data",)}
BEARER = "bearer "


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin1")
    return None


def api_key(scope) -> str | None:
    auth = _header(scope, b"authorization")
    if auth and auth.lower().startswith(BEARER):
        return auth[len(BEARER):].strip() or None
    key = _header(scope, b"x-api-key")
    return key.strip() if key and key.strip() else None


async def respond(send, status: int, error: str, detail: str, headers: dict | None = None) -> None:
    body = error_body(error, detail)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _status_code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return f"http_{status}"


def normalise_error(status: int, body: bytes) -> bytes:
    """Any error body (BentoML's list-wrapped `[{"error": ...}]`, its pydantic validation errors, Starlette's
    plain text) → `{"error": code, "detail": text}`."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if isinstance(data, dict):
        error, detail = data.get("error"), data.get("detail")
        if isinstance(error, str):
            try:  # serving.errors.InputError travels as JSON inside BentoML's message
                inner = json.loads(error)
                if isinstance(inner, dict) and "error" in inner:
                    return error_body(str(inner["error"]), str(inner.get("detail", "")))
            except ValueError:
                pass
        if isinstance(detail, list):  # pydantic errors
            kinds = {d.get("type") for d in detail if isinstance(d, dict)}
            parts = []
            for d in detail[:5]:
                if isinstance(d, dict):
                    loc = ".".join(str(p) for p in d.get("loc", ()))
                    parts.append(f"{loc}: {d.get('msg', '')}" if loc else str(d.get("msg", "")))
            code = "invalid_json" if "json_invalid" in kinds else "validation_error"
            return error_body(code, "; ".join(parts) or str(error))
        if isinstance(error, str) and isinstance(detail, str):
            return error_body(error, detail)
        if isinstance(error, str):
            return error_body(_status_code(status), error)
    text = body.decode("utf-8", "replace").strip()[:500] if body else ""
    if not text:
        try:
            text = HTTPStatus(status).phrase
        except ValueError:
            text = f"HTTP {status}"
    return error_body(_status_code(status), text)


class _Capture:
    """Wraps `send`: error responses (and /docs.json) are buffered and rewritten; others stream through."""

    def __init__(self, send, rewrite_ok=None):
        self.send, self.rewrite_ok = send, rewrite_ok
        self.status: int | None = None
        self._start = None
        self._chunks: list[bytes] = []

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.status >= 400 or (self.rewrite_ok and self.status == 200):
                self._start = message
                return
            await self.send(message)
            return
        if message["type"] == "http.response.body" and self._start is not None:
            self._chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(self._chunks)
            if self.status >= 400:
                body = normalise_error(self.status, body)
                ctype = b"application/json"
            else:
                body, ctype = self.rewrite_ok(body), b"application/json"
            await _send_whole(self.send, self._start, body, ctype)
            return
        await self.send(message)


async def _send_whole(send, start: dict, body: bytes, ctype: bytes | None = None) -> None:
    """Send `start` (with Content-Length, and Content-Type when given, set for `body`) and then `body`."""
    drop = (b"content-length", b"content-type") if ctype else (b"content-length",)
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in drop]
    headers += ([(b"content-type", ctype)] if ctype else []) + [(b"content-length", str(len(body)).encode())]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Held:
    """Stands in for `send` on prediction routes: the whole answer is kept until the guard has billed it."""

    def __init__(self):
        self.start: dict | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))

    @property
    def status(self) -> int | None:
        return None if self.start is None else self.start["status"]

    async def release(self, send) -> None:
        body = b"".join(self.chunks)
        if self.status >= 400:
            await _send_whole(send, self.start, normalise_error(self.status, body), b"application/json")
        else:
            await _send_whole(send, self.start, body)


async def _client_gone(receive) -> None:
    """Returns once the server reports the client disconnected (uvicorn also says so after the response)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


class BodyTooLarge(Exception):
    pass


async def read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def json_rows(body: bytes) -> int | None:
    """Rows of a JSON prediction body (len of `inputs`), parsed with pydantic's fast JSON reader (the same
    parser BentoML's request model uses, so both sides see the same rows); None when unreadable."""
    from pydantic_core import from_json

    try:
        data = from_json(body)
        inputs = data.get("inputs") if isinstance(data, dict) else None
        return len(inputs) if isinstance(inputs, list) else None
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None


def auth_at_start(settings: Settings) -> tuple[int, str]:
    """(log level, line) saying how the API is guarded; ConfigError when keys are required and the keys
    database is missing or unreadable (a wrong path must stop the server, not open it)."""
    db = settings.keys_db
    if not settings.require_keys:
        return logging.WARNING, (f"running OPEN: no API keys are required ({PREFIX}REQUIRE_KEYS=off); anyone who "
                                 f"reaches this port gets answers with no budget (ledger: {db if settings.ledger else 'off'})")
    where = f"{PREFIX}KEYS_DB={db}" if settings.keys_db_configured else f"the default keys database {db}"
    if not db.is_file():
        raise ConfigError(f"API keys are required but {where} does not exist. Create it and a key with "
                          f"`python -m serving.keys --db {db} add NAME` (or fix the path), or set "
                          f"{PREFIX}REQUIRE_KEYS=off to serve without keys")
    ledger = Ledger(db)
    try:
        active = ledger.active_keys()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"API keys are required but {where} is not a keys database ({exc})") from None
    finally:
        ledger.close()
    if active == 0:
        return logging.WARNING, (f"API keys required, and {where} holds no active key: every prediction is refused "
                                 f"(401) until one is added with `python -m serving.keys --db {db} add NAME`")
    return logging.INFO, f"API keys required: {active} active keys in {db}"


class GuardMiddleware:
    def __init__(self, app, settings: Settings | None = None):
        self.app = app
        self.settings = settings or Settings.from_env()
        self.ledger = Ledger(self.settings.keys_db, serving=True)

    def keys_required(self) -> bool:
        return self.settings.require_keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path in GUARDED and method == "POST":
            return await self._guarded(scope, receive, send, GUARDED[path])
        if path == "/docs.json" and method == "GET":
            return await self.app(scope, receive, _Capture(send, rewrite_ok=patch_openapi))
        if path == "/metadata" and method == "GET":
            scope = {**scope, "state": {**scope.get("state", {}), "keys_required": self.keys_required()}}
        return await self.app(scope, receive, _Capture(send))

    async def _guarded(self, scope, receive, send, kind: str):
        settings = self.settings
        ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if ctype and ctype not in MEDIA[kind]:
            return await respond(send, 415, "unsupported_media_type",
                                 f"Content-Type {ctype!r}; {scope['path']} takes {' or '.join(MEDIA[kind])}")
        if kind == "image" and not ctype:
            return await respond(send, 415, "unsupported_media_type",
                                 "send the image as multipart/form-data with a file field named 'image'")
        key_id = None
        if self.keys_required():
            key = api_key(scope)
            if key is None:
                return await respond(send, 401, "unauthorized", "this endpoint needs an API key: send "
                                     "'Authorization: Bearer KEY' or 'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})
            key_id = self.ledger.lookup(key)
            if key_id is None:
                return await respond(send, 401, "unauthorized", "unknown or revoked API key",
                                     {"WWW-Authenticate": "Bearer"})
        length = _header(scope, b"content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            return await respond(send, 413, "body_too_large",
                                 f"the body has {length} bytes; the limit is {settings.max_body_bytes}")
        try:
            body = await read_body(receive, settings.max_body_bytes)
        except BodyTooLarge:
            return await respond(send, 413, "body_too_large", f"the body exceeds {settings.max_body_bytes} bytes")
        except ConnectionError:
            return
        if kind == "image":
            problem = await _check_upload(scope, body)
            if problem:
                return await respond(send, 400, *problem)
        rows = {"npy": npy_rows, "json": json_rows}.get(kind, lambda b: 1)(body)
        if rows is not None and rows > settings.max_rows:  # a size refusal, before any budget question
            too_large = batch_too_large(rows, settings.max_rows)
            return await respond(send, too_large.status, too_large.error, too_large.detail)
        rows = max(1, rows or 1)  # unreadable inputs are refused by the model, and never billed
        if key_id is not None:
            refusal = self.ledger.precheck(key_id, rows)
            if not refusal.allowed:
                return await _refuse(send, refusal)
        gone = asyncio.ensure_future(_client_gone(receive))
        try:
            held = _Held()
            await self.app(scope, _replay(body), held)
            if held.status is None:  # nothing to send or bill
                return
            if held.status >= 400:
                return await held.release(send)
            if gone.done():
                logger.info("%s: the client left before its answer of %d rows was ready; not billed",
                            scope["path"], rows)
                return
            decision = None
            if key_id is not None or settings.ledger:
                decision = self.ledger.charge(key_id, rows, scope["path"], hashlib.sha256(body).hexdigest())
                if not decision.allowed:  # a concurrent request spent the budget first
                    return await _refuse(send, decision)
            try:
                await held.release(send)
            except BaseException:
                if decision is not None:
                    self.ledger.refund(decision, rows)
                raise
        finally:
            gone.cancel()


async def _refuse(send, decision: Decision) -> None:
    headers = {"Retry-After": decision.retry_after} if decision.retry_after else None
    await respond(send, decision.status, decision.error, decision.detail, headers)


async def _check_upload(scope, body: bytes) -> tuple[str, str] | None:
    """The upload must carry the image as a file part: BentoML would fetch a URL given as a text field."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    try:
        form = await Request(scope, _replay(body)).form(max_files=2, max_fields=8)
    except Exception as exc:
        return "bad_upload", f"unreadable multipart/form-data body ({type(exc).__name__})"
    try:
        image = form.get("image")
        if not isinstance(image, UploadFile):
            return "bad_upload", "send the image as a file part named 'image' (URLs and text fields are not fetched)"
        extra = set(form.keys()) - {"image", "top_k"}
        if extra:
            return "bad_upload", f"unexpected form fields {sorted(extra)}; send 'image' and optionally 'top_k'"
    finally:
        await form.close()
    return None


# ---------------------------------------------------------------- OpenAPI additions

def _schema(model) -> tuple[dict, dict]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return schema, defs


def _error_response(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


ERRORS = {
    "400": "malformed input: invalid JSON or .npy, wrong rank, shape, channels or dtype, NaN/inf, values "
           "outside [0,1], empty batch, not an image, pickled .npy",
    "401": "missing, unknown or revoked API key",
    "413": "batch above max_batch_rows or body above max_body_bytes",
    "415": "wrong Content-Type",
    "429": "over the key's row budget or rate (Retry-After says when to retry a rate refusal)",
    "503": "overloaded; retry",
}


def patch_openapi(body: bytes) -> bytes:
    from serving.schemas import ErrorResponse, MetadataResponse

    spec = json.loads(body)
    comps = spec.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    for model in (ErrorResponse, MetadataResponse):
        schema, defs = _schema(model)
        schemas[model.__name__] = schema
        schemas.update(defs)
    comps.setdefault("securitySchemes", {}).update({
        "bearer": {"type": "http", "scheme": "bearer", "description": "API key (when keys are configured)"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    })
    paths = spec.setdefault("paths", {})
    paths["/metadata"] = {"get": {
        "tags": ["Service APIs"], "operationId": "metadata", "description": "What the model takes and answers; open.",
        "responses": {"200": {"description": "model and policy description", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/MetadataResponse"}}}}}}}
    paths["/predict_npy"] = {"post": {
        "tags": ["Service APIs"], "operationId": "predict_npy",
        "description": "Bulk prediction. Body: raw .npy (numpy.save) float32 in [0,1] or uint8 0..255, shape "
                       "(N, C, H, W). Answer: raw .npy float32 (N, num_classes): probabilities (policy probs); "
                       "top-k with the other entries 0 (topk); one-hot rows (label); rounded when decimals is set. "
                       "Header X-Output-Policy repeats the policy as JSON.",
        "requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": {"description": "float32 (N, num_classes) .npy", "headers": {
            "X-Output-Policy": {"schema": {"type": "string"}, "description": "the output policy as JSON"}},
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}}}
    security = [{"bearer": []}, {"apiKey": []}, {}]
    for route in GUARDED:
        op = paths.get(route, {}).get("post")
        if op is None:
            continue
        op["security"] = copy.deepcopy(security)
        responses = op.setdefault("responses", {})
        for code in list(responses):
            if code not in ("200",) and str(code).startswith(("4", "5")):
                del responses[code]
        for code, text in ERRORS.items():
            responses[code] = _error_response(text)
    return json.dumps(spec).encode()
