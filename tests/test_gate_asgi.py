"""The gate against the real BentoML-built ASGI app, in-process: any path (as uvicorn hands it over, percent-decoded)
and any method reaches the model only with a valid key, and is then billed to the canonical route; every route the
app serves is classified as open or as a prediction route, so a route added later cannot slip past the gate."""
from __future__ import annotations

import asyncio
import importlib
import io
import json
import os
import sys
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

from serving_server import keys_cli

ROUTES = ["/predict_npy", "/predict", "/classify_image"]
METHODS = ["POST", "GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"]
DECORATIONS = ["", "\n", "\r", "\t", "\x00", " ", "/", "/.", "/..", ";x", ".", "#x", "%0A", "\u00a0", "\u200b",
               "\u2028", "?", "\x7f", "\\"]


@pytest.fixture(scope="module")
def app(model_dir, tmp_path_factory):
    """(ASGI app of serving.service with the gate, keys database, valid key, calls of the model)."""
    tmp = tmp_path_factory.mktemp("asgi")
    db = tmp / "keys.sqlite"
    valid = keys_cli(db, "add", "valid").strip()
    revoked = keys_cli(db, "add", "revoked").strip()
    keys_cli(db, "revoke", "revoked")
    saved = dict(os.environ)
    os.environ.update(UNDISTILLABLE_MODEL_DIR=str(model_dir), UNDISTILLABLE_KEYS_DB=str(db), UNDISTILLABLE_WORKERS="1",
                      UNDISTILLABLE_MAX_ROWS="64")
    from serving import runtime

    calls: list[int] = []
    original = runtime.Runtime.logits
    runtime.Runtime.logits = lambda self, x: calls.append(len(x)) or original(self, x)
    try:
        service = importlib.reload(sys.modules["serving.service"]) if "serving.service" in sys.modules else \
            importlib.import_module("serving.service")
        asgi = service.Undistillable.to_asgi(is_main=True)
        loop = asyncio.new_event_loop()
        lifespan = Lifespan(asgi)
        loop.run_until_complete(lifespan.start())
        yield asgi, loop, db, {"valid": valid, "revoked": revoked, "unknown": "ud_notakey"}, calls
        loop.run_until_complete(lifespan.stop())
        loop.close()
    finally:
        runtime.Runtime.logits = original
        os.environ.clear()
        os.environ.update(saved)


class Lifespan:
    def __init__(self, app):
        self.app, self.inbox = app, asyncio.Queue()

    async def start(self):
        self.started, self.task = asyncio.Event(), None

        async def send(message):
            if message["type"].startswith("lifespan.startup"):
                assert message["type"] == "lifespan.startup.complete", message
                self.started.set()

        self.task = asyncio.ensure_future(self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                                   self.inbox.get, send))
        await self.inbox.put({"type": "lifespan.startup"})
        await self.started.wait()

    async def stop(self):
        await self.inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(self.task, 30)


def http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> dict:
    """An HTTP scope as uvicorn hands it to the app: `path` decoded, `raw_path` as sent."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": quote(path, safe="/;?#").encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"test"), (b"content-length", str(len(body)).encode()), *headers],
            "client": ("127.0.0.1", 1234), "server": ("test", 80), "state": {}}


async def call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, bytes]:
    """One HTTP request to the app; (status, body)."""
    scope = http_scope(method, path, headers, body)
    sent = False
    out = {"status": None, "body": b""}

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client stays connected

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    await asyncio.wait_for(app(scope, receive, send), 60)
    return out["status"], out["body"]


def bodies(digits: np.ndarray) -> dict[str, tuple[bytes, bytes]]:
    """Content type and a valid body of 2 rows for each encoding."""
    buf = io.BytesIO()
    np.save(buf, digits[:2], allow_pickle=False)
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray((digits[0, 0] * 255).astype(np.uint8), mode="L").save(png, format="PNG")
    boundary = "b0undary"
    upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"d.png\"\r\n"
              f"Content-Type: image/png\r\n\r\n").encode() + png.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    return {"npy": (b"application/octet-stream", buf.getvalue()),
            "json": (b"application/json", json.dumps({"inputs": digits[:2].tolist()}).encode()),
            "image": (f"multipart/form-data; boundary={boundary}".encode(), upload)}


ENCODING = {"/predict_npy": "npy", "/predict": "json", "/classify_image": "image"}


@st.composite
def requests(draw) -> tuple[str, str]:
    """(decoded path, body encoding): spellings of a route with its own encoding most of the time, or any path."""
    route = draw(st.sampled_from(ROUTES))
    path = draw(st.one_of(
        st.just(route),
        st.builds(lambda pre, post: pre + route + post, st.sampled_from(["", "/", "/.", "//"]),
                  st.sampled_from(DECORATIONS)),
        st.builds(lambda i, ch: route[:i] + ch + route[i:], st.integers(1, 12), st.sampled_from(DECORATIONS)),
        st.just(route.upper()),
        st.text(min_size=0, max_size=30).map(lambda t: "/" + t)))
    encoding = draw(st.one_of(st.just(ENCODING[route]), st.sampled_from(["npy", "json", "image"])))
    return path, encoding


def test_only_a_valid_key_reaches_the_model_whatever_the_path_or_method(app, digits_x):
    asgi, loop, db, keys, calls = app
    encoded = bodies(digits_x)
    billed = {"rows": 0}

    @hsettings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=requests(), method=st.sampled_from(METHODS),
           who=st.sampled_from(["none", "valid", "revoked", "unknown"]), header=st.sampled_from(["bearer", "x-api-key"]))
    @example(request=("/predict_npy\n", "npy"), method="POST", who="none", header="bearer")
    @example(request=("/predict\n", "json"), method="POST", who="none", header="bearer")
    @example(request=("/classify_image\n", "image"), method="POST", who="none", header="bearer")
    @example(request=("/predict_npy", "npy"), method="POST", who="valid", header="x-api-key")
    def check(request, method, who, header):
        path, encoding = request
        ctype, body = encoded[encoding]
        headers = [(b"content-type", ctype)]
        if who != "none":
            headers.append((b"authorization", f"Bearer {keys[who]}".encode()) if header == "bearer"
                           else (b"x-api-key", keys[who].encode()))
        before = len(calls)
        status, answer = loop.run_until_complete(call(asgi, method, path, headers, body))
        reached = len(calls) > before
        assert not reached or who == "valid", (path, method, who, status)
        if reached and status == 200:
            billed["rows"] += 1 if encoding == "image" else 2
        assert status != 200 or who == "valid" or path in ("/metadata", "/livez", "/readyz", "/healthz", "/metrics",
                                                           "/docs.json", "/schema.json", "/") or \
            path.startswith("/static_content/"), (path, method, who, status)

    check()
    loop.run_until_complete(asyncio.sleep(1.0))  # the background thread commits the settles
    rows = json.loads(keys_cli(db, "list", "--json"))
    assert {k["name"]: k["rows_served"] for k in rows} == {"valid": billed["rows"], "revoked": 0}
    assert billed["rows"] > 0, "no generated request reached the model with a valid key: the property said nothing"
    ledger = json.loads(keys_cli(db, "ledger", "valid", "--json", "--limit", "100000"))
    assert {b["endpoint"] for b in ledger} <= set(ROUTES) and all(b["state"] == "served" for b in ledger)


def test_every_route_the_app_serves_is_classified(app):
    """A route added to the service later fails here until serving/routes.py says whether it is open or a
    prediction route (until then the gate refuses it, with a key or without)."""
    from serving.routes import MODEL, classify_all

    asgi = app[0]
    classes = classify_all(asgi)
    assert [path for path, kind in classes.items() if kind == "unclassified"] == []
    assert {path for path, kind in classes.items() if kind == "model"} == set(MODEL)


def test_no_bentoml_route_takes_a_file_field(app):
    """BentoML's multipart reader fetches a text part given for a file field as a URL: no BentoML API of the service
    may have one (the upload route is served by serving/bulk.py, which reads exactly one file part)."""
    service = sys.modules["serving.service"].Undistillable
    assert {name: api.input_spec.multipart_fields for name, api in service.apis.items()} == {"predict": []}


def test_an_answer_is_billed_before_it_is_sent(app, digits_x):
    """A client that does not read stalls the send (flow control has no timeout): the batch must already be settled,
    so that it can neither expire into a release nor wait for a refund while the send hangs."""
    asgi, loop, db, keys, calls = app
    ctype, body = bodies(digits_x)["npy"]
    stalled = asyncio.Event()

    async def run():
        scope_headers = [(b"content-type", ctype), (b"authorization", f"Bearer {keys['valid']}".encode())]
        scope = http_scope("POST", "/predict_npy", scope_headers, body)
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)

        async def send(message):
            if message["type"] == "http.response.body":
                stalled.set()
                await asyncio.sleep(3600)  # the client never reads

        task = asyncio.ensure_future(asgi(scope, receive, send))
        await asyncio.wait_for(stalled.wait(), 30)
        for _ in range(40):  # the background thread commits pending settles every half second
            await asyncio.sleep(0.5)
            latest = json.loads(keys_cli(db, "ledger", "valid", "--json", "--limit", "1"))[0]
            if latest["state"] != "reserved":
                break
        assert not task.done(), "the send was meant to stay stalled"
        task.cancel()
        return latest

    latest = loop.run_until_complete(run())
    assert latest["endpoint"] == "/predict_npy" and latest["state"] == "served", latest
