"""Which route a request will run, asked of the app's own router, and what the guard makes of it.

The guard does not compare the path with a list of strings: uvicorn percent-decodes the path and Starlette's route
regexes end in `$`, which also matches before a final newline, so `/predict_npy%0A` reached the model while a string
check let it through. Instead the request is resolved against the routes the app will run (`resolve`), and:
- a path holding a control character, NUL or whitespace is refused before anything else (`bad_path`);
- a route in `OPEN` (health, metrics, metadata, the docs and the UI) is open to GET and HEAD;
- a route in `MODEL` is a prediction route: key, body limit, rows, budget and billing, by its canonical path;
- anything else (no route, another method, a route added later and not classified here) needs a valid key, and is
  then answered by the guard itself (404/405): it never reaches the app. Deny by default.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from starlette.routing import Match, Mount

OPEN_PATHS = frozenset({"/metadata", "/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json", "/"})
OPEN_MOUNTS = frozenset({"/static_content"})
OPEN_METHODS = frozenset({"GET", "HEAD"})
MODEL = {"/predict": "json", "/predict_npy": "npy", "/classify_image": "image"}
MEDIA = {"json": ("application/json",), "npy": ("application/octet-stream", "application/x-npy"),
         "image": ("multipart/form-data",)}


@dataclass(frozen=True)
class Resolved:
    """What the router would run: `kind` is open, model, unclassified, method_not_allowed or not_found."""

    kind: str
    path: str | None = None  # the canonical path of the route
    media: str | None = None  # json / npy / image for model routes


_ASCII_BAD = re.compile(r"[\x00-\x20\x7f]")


def bad_path(path: str) -> bool:
    """A path no client needs: control characters (percent-decoded `\\n`, `\\r`, NUL, …), whitespace, or a `.`/`..`
    segment."""
    if path.isascii():
        if _ASCII_BAD.search(path):
            return True
    elif any(ch.isspace() or unicodedata.category(ch)[0] in "CZ" for ch in path):
        return True
    segments = path.split("/")
    return "." in segments or ".." in segments


def _route_path(route) -> str | None:
    return getattr(route, "path", None)


def _match(routes, scope) -> tuple[Match, object, dict]:
    """The first route matching fully (as Starlette's router picks it), else the first partial match."""
    partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return match, route, child
        if match == Match.PARTIAL and partial is None:
            partial = (match, route, child)
    return partial or (Match.NONE, None, {})


def resolve(app, scope) -> Resolved:
    """Resolve an HTTP scope against `app`'s router (descending into mounted Starlette apps)."""
    routes = getattr(getattr(app, "router", None), "routes", None)
    if routes is None:  # not a Starlette app: nothing can be said of it, so nothing is open
        return Resolved("unclassified")
    scope = dict(scope)
    while True:
        match, route, child = _match(routes, scope)
        if match == Match.NONE:
            return Resolved("not_found")
        if isinstance(route, Mount):
            inner = getattr(route.app, "routes", None)
            if inner is None:  # a mounted ASGI app that routes itself (static files)
                mount = route.path
                return Resolved("open" if mount in OPEN_MOUNTS else "unclassified", mount)
            scope.update(child)
            routes = inner
            continue
        if match == Match.PARTIAL:
            return Resolved("method_not_allowed", _route_path(route))
        path = _route_path(route)
        if path in MODEL:
            return Resolved("model", path, MODEL[path])
        if path in OPEN_PATHS:
            return Resolved("open", path)
        return Resolved("unclassified", path)


def classify_all(app) -> dict[str, str]:
    """Every route path of `app` (mounts descended) → open / model / unclassified: for the start-up check and tests."""
    out: dict[str, str] = {}

    def walk(routes, prefix: str) -> None:
        for route in routes:
            path = prefix + (_route_path(route) or "")
            if isinstance(route, Mount) and getattr(route.app, "routes", None) is not None:
                walk(route.app.routes, path)
            elif isinstance(route, Mount):
                out[path] = "open" if path in OPEN_MOUNTS else "unclassified"
            else:
                out[path] = "model" if path in MODEL else "open" if path in OPEN_PATHS else "unclassified"

    walk(app.router.routes, "")
    return out


# ---------------------------------------------------------------- body limits

JSON_BYTES_PER_VALUE = 32  # "-0.0039215688593685627, " is 24; slack for exponents and spacing
# numpy writes a rank-4 array's header in 128 bytes; a longer one is refused before it is parsed (ast.literal_eval
# of a 64 KiB header took ~125 ms on the event loop, for free, since the request is then refused and refunded)
NPY_HEADER_MAX = 1024
IMAGE_BODY = 16 << 20  # one upload: a PNG or JPEG of up to 16 Mpixel, compressed
SLACK = 4096


def body_limit(media: str, max_rows: int, input_shape: list[int], ceiling: int) -> int:
    """The most bytes a request of `max_rows` rows can take in the route's encoding (never above `ceiling`)."""
    values = 1
    for d in input_shape:
        values *= int(d)
    if media == "npy":
        need = 12 + NPY_HEADER_MAX + max_rows * values * 4  # float32 is the widest dtype accepted
    elif media == "json":
        c, h = int(input_shape[0]), int(input_shape[1])
        brackets = 2 * (1 + c + c * h)  # per row: the row's, each channel's and each image row's [ ]
        need = 64 + max_rows * (values * JSON_BYTES_PER_VALUE + brackets)
    else:
        need = IMAGE_BODY
    return min(ceiling, need + SLACK)
