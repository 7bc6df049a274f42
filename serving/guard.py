"""The gate: the ASGI middleware in front of every route. Deny by default, on the route the app will run.

Every request is resolved against the app's own router first (serving/routes.py): a path with control characters
or whitespace is refused (400); open routes (health, metrics, metadata, docs, UI) pass; prediction routes go through
admission below; everything else needs a valid key and is then answered here (404/405), never by the app.

Admission of a prediction (POST): the key (401), a key that cannot afford one row (429) before a byte of the body is
read, the body up to the route's limit (413), its rows (from the .npy header, the JSON `inputs` list, 1 per image)
against the row limit (413), then one transaction that checks budget and rate and reserves the rows (429, nothing
charged). Only then does the model run. An answer refused by the model (4xx), one whose client has gone, one that
could not be sent or a cancelled request is refunded; a delivered one is settled (marked served) in the worker's next
ledger transaction. The ledger never makes the event loop wait (serving/admission.py): busy or gone, it answers 503.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3

import anyio

from protect.card import load_card
from serving.admission import RETRY_AFTER, Admission
from serving.config import PREFIX, ConfigError, Settings
from serving.ledger_rules import Decision, LedgerBusy, LedgerUnavailable, is_url, open_ledger, redact
from serving.openapi import patch_openapi
from serving.responses import Capture, Held, respond
from serving.routes import MEDIA, MODEL, OPEN_METHODS, Resolved, bad_path, body_limit, resolve
from serving.runtime import batch_too_large, npy_rows

logger = logging.getLogger("bentoml.undistillable")

BEARER = "bearer "
SMALL_BODY = 64 << 10  # bodies up to this size are counted and hashed on the event loop; larger ones in a thread


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


def rows_and_digest(media: str, body: bytes) -> tuple[int | None, str]:
    rows = npy_rows(body) if media == "npy" else json_rows(body) if media == "json" else 1
    return rows, hashlib.sha256(body).hexdigest()


def auth_at_start(settings: Settings) -> tuple[int, str]:
    """(log level, line) saying how the API is guarded; ConfigError when keys are required and the keys
    database is missing, unreachable or unreadable (a wrong path or URL must stop the server, not open it)."""
    db = settings.keys_db
    shown = redact(db) if is_url(db) else db
    if not settings.require_keys:
        return logging.WARNING, (f"running OPEN: no API keys are required ({PREFIX}REQUIRE_KEYS=off); anyone who "
                                 f"reaches this port gets answers with no budget (ledger: "
                                 f"{shown if settings.ledger else 'off'})")
    where = f"{PREFIX}KEYS_DB={shown}" if settings.keys_db_configured else f"the default keys database {shown}"
    if not is_url(db) and not db.is_file():
        raise ConfigError(f"API keys are required but {where} does not exist. Create it and a key with "
                          f"`python -m serving.keys --db {db} add NAME` (or fix the path), or set "
                          f"{PREFIX}REQUIRE_KEYS=off to serve without keys")
    ledger = open_ledger(db, create=False)
    try:
        active = ledger.active_keys()
    except (LedgerBusy, LedgerUnavailable) as exc:
        if is_url(db):
            raise ConfigError(f"API keys are required but {where} cannot be used: {exc}. Start the server or fix the "
                              f"URL; create the tables with `python -m serving.keys --db URL init`") from None
        raise ConfigError(f"API keys are required but {where} is not a keys database ({exc})") from None
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"API keys are required but {where} is not a keys database ({exc})") from None
    finally:
        ledger.close()
    if active == 0:
        return logging.WARNING, (f"API keys required, and {where} holds no active key: every prediction is refused "
                                 f"(401) until one is added with `python -m serving.keys --db {shown} add NAME`")
    return logging.INFO, f"API keys required: {active} active keys in {shown}"


async def _refuse(send, decision: Decision) -> None:
    headers = {"Retry-After": decision.retry_after} if decision.retry_after else None
    await respond(send, decision.status, decision.error, decision.detail, headers)


async def _unavailable(send, exc: Exception) -> None:
    logger.warning("ledger unavailable, request refused with 503: %s", exc)
    await respond(send, 503, "ledger_unavailable", "the keys database is busy or unavailable; retry shortly",
                  {"Retry-After": RETRY_AFTER})


class GuardMiddleware:
    def __init__(self, app, settings: Settings | None = None):
        self.app = app
        self.settings = settings or Settings.from_env()
        self.ledger = open_ledger(self.settings.keys_db, serving=True, create=not self.settings.require_keys)
        self.admission = Admission(self.ledger)
        shape = load_card(self.settings.model_dir).input_shape
        self.limits = {media: body_limit(media, self.settings.max_rows, shape, self.settings.max_body_bytes)
                       for media in MEDIA}
        self._routes: dict[tuple[str, str], Resolved] = {}
        self._warned: set[str] = set()

    def _flushing_at_shutdown(self, receive):
        """The worker is stopping: commit the settles of the answers it delivered before it goes."""
        async def wrapped():
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await anyio.to_thread.run_sync(self.admission.close)
            return message
        return wrapped

    def _resolve(self, scope) -> Resolved:
        """The app's router's answer, cached per (method, path): routes do not change while serving."""
        cache_key = (scope.get("method", "GET"), scope.get("path", ""))
        hit = self._routes.get(cache_key)
        if hit is None:
            hit = resolve(scope.get("app"), scope)
            if len(self._routes) < 4096:
                self._routes[cache_key] = hit
        return hit

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "lifespan":
            return await self.app(scope, self._flushing_at_shutdown(receive), send)
        if kind != "http":  # no websocket route is served: refused without reaching the app
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if bad_path(path):
            return await respond(send, 400, "bad_path", "the path holds a control character, whitespace or a dot "
                                 "segment; no route has one")
        route = self._resolve(scope)
        if route.kind == "open" and method in OPEN_METHODS:
            if route.path == "/docs.json":
                return await self.app(scope, receive, Capture(send, rewrite_ok=patch_openapi))
            if route.path == "/metadata":
                scope = {**scope, "state": {**scope.get("state", {}), "keys_required": self.settings.require_keys}}
            return await self.app(scope, receive, Capture(send))
        key_id, refused = await self._authenticate(scope, send)
        if refused:
            return
        if route.kind == "model" and method == "POST":
            return await self._admit(scope, receive, send, route, key_id)
        if route.kind == "unclassified" and route.path not in self._warned:
            self._warned.add(route.path)
            logger.error("route %s is neither open nor a prediction route in serving/routes.py: refused", route.path)
        if route.kind in ("method_not_allowed", "open", "model"):
            allowed = "POST" if route.path in MODEL else "GET, HEAD"
            return await respond(send, 405, "method_not_allowed", f"{method} is not served on {route.path}; use "
                                 f"{allowed}", {"Allow": allowed})
        return await respond(send, 404, "not_found", "no such route; see /docs.json")

    async def _authenticate(self, scope, send) -> tuple[int | None, bool]:
        """(key id, refused): the key's id when keys are required, after answering 401/503 when it is not good."""
        if not self.settings.require_keys:
            return None, False
        key = api_key(scope)
        if key is None:
            await respond(send, 401, "unauthorized", "this endpoint needs an API key: send 'Authorization: Bearer KEY' "
                          "or 'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})
            return None, True
        try:
            key_id = await self.admission.lookup(key)
        except (LedgerBusy, LedgerUnavailable) as exc:
            await _unavailable(send, exc)
            return None, True
        if key_id is None:
            await respond(send, 401, "unauthorized", "unknown or revoked API key", {"WWW-Authenticate": "Bearer"})
            return None, True
        return key_id, False

    async def _admit(self, scope, receive, send, route: Resolved, key_id: int | None):
        settings, media = self.settings, route.media
        ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if (ctype and ctype not in MEDIA[media]) or (media == "image" and not ctype):
            return await respond(send, 415, "unsupported_media_type",
                                 f"Content-Type {ctype or 'missing'!r}; {route.path} takes {' or '.join(MEDIA[media])}"
                                 + (" with a file part named 'image'" if media == "image" else ""))
        try:
            if key_id is not None and (refusal := await self.admission.can_afford(key_id)) is not None:
                return await _refuse(send, refusal)  # before a byte of the body is read
        except (LedgerBusy, LedgerUnavailable) as exc:
            return await _unavailable(send, exc)
        limit = self.limits[media]
        length = _header(scope, b"content-length")
        if length and length.isdigit() and int(length) > limit:
            return await respond(send, 413, "body_too_large", f"the body has {length} bytes; {route.path} takes at most "
                                 f"{limit} (what max_batch_rows rows take; /metadata body_limits)")
        try:
            body = await read_body(receive, limit)
        except BodyTooLarge:
            return await respond(send, 413, "body_too_large", f"the body exceeds {limit} bytes, the limit of "
                                 f"{route.path} (/metadata body_limits)")
        except ConnectionError:
            return
        if len(body) <= SMALL_BODY:
            rows, digest = rows_and_digest(media, body)
        else:
            rows, digest = await anyio.to_thread.run_sync(rows_and_digest, media, body)
        if rows is not None and rows > settings.max_rows:  # a size refusal, before any budget question
            too_large = batch_too_large(rows, settings.max_rows)
            return await respond(send, too_large.status, too_large.error, too_large.detail)
        rows = max(1, rows or 1)  # unreadable inputs are refused by the model, and refunded
        decision = None
        if key_id is not None or settings.ledger:
            try:
                decision = await self.admission.reserve(key_id, rows, route.path, digest)
            except (LedgerBusy, LedgerUnavailable) as exc:
                return await _unavailable(send, exc)
            if not decision.allowed:
                return await _refuse(send, decision)
        scope = {**scope, "path": route.path, "raw_path": route.path.encode()}  # the app runs the canonical route
        await self._run(scope, receive, send, body, decision)

    async def _run(self, scope, receive, send, body: bytes, decision: Decision | None) -> None:
        """Run the model route with its reservation made. The reservation is settled or refunded before a byte of
        the answer is sent: a send held up by a client that does not read (flow control, no timeout) must not keep
        it open, nor find it released and refunded once it finishes."""
        gone = asyncio.ensure_future(_client_gone(receive))
        settled = False
        try:
            held = Held()
            await self.app(scope, _replay(body), held)
            if held.status is None:  # nothing to send
                return
            if held.status >= 400:
                if decision is not None:
                    await self._refund(decision)
                    decision = None
                return await held.release(send)
            if gone.done():
                logger.info("%s: the client left before its answer of %d rows was ready; not billed",
                            scope["path"], decision.rows if decision else 0)
                return
            if decision is not None:
                self.admission.settle(decision)  # billed from here on: the answer goes to the server to send
                settled = True
            await held.release(send)
        finally:
            gone.cancel()
            if decision is not None and not settled:
                await self._refund(decision)

    async def _refund(self, decision: Decision) -> None:
        try:
            with anyio.CancelScope(shield=True):  # a cancelled request (timeout, shutdown) is refunded too
                await self.admission.refund(decision)
        except (LedgerBusy, LedgerUnavailable):
            self.admission.refund_later(decision)
