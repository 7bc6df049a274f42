"""The one error shape on the wire: every 4xx/5xx answer becomes `{"error": code, "detail": text}`, whoever made it
(the guard, BentoML's list-wrapped errors, pydantic's validation lists, Starlette's plain text)."""
from __future__ import annotations

import json
from http import HTTPStatus

from serving.errors import error_body


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


class Capture:
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
            await send_whole(self.send, self._start, body, ctype)
            return
        await self.send(message)


async def send_whole(send, start: dict, body: bytes, ctype: bytes | None = None) -> None:
    """Send `start` (with Content-Length, and Content-Type when given, set for `body`) and then `body`."""
    drop = (b"content-length", b"content-type") if ctype else (b"content-length",)
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in drop]
    headers += ([(b"content-type", ctype)] if ctype else []) + [(b"content-length", str(len(body)).encode())]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Held:
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
            await send_whole(send, self.start, normalise_error(self.status, body), b"application/json")
        else:
            await send_whole(send, self.start, body)
