"""The gate as an attacker meets it, over a real `bentoml serve` and raw sockets (uvicorn decodes the path, Starlette
routes it): no spelling of a prediction route answers without a key, and with a key every spelling is billed as its
canonical route or refused; a key with nothing left is refused before its body is read; concurrent requests never run
the model beyond a budget; a stuck ledger lock answers 503 instead of freezing the worker; a replaced keys database is
followed; uploads are exactly one file part and no route fetches a URL. The model's calls are recorded by
tests/instrumented_service.py."""
from __future__ import annotations

import fcntl
import http.client
import io
import json
import os
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from serving_server import ROOT, Server, assert_error, keys_cli, npy, settings, usage

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
ROUTES = {"/predict_npy": "npy", "/predict": "json", "/classify_image": "image"}
# Wire spellings of a route R: {R} is the route without its leading slash. Percent-encoded control characters,
# whitespace, separators and dots, doubled or dotted slashes, case, fragments and parameters.
SPELLINGS = ["/{R}%0A", "/{R}%0a", "/{R}%0D", "/{R}%0D%0A", "/{R}%09", "/{R}%00", "/{R}%20", "/{R}%2F", "/{R}/",
             "/{R}/.", "/{R}/..", "/{R};x", "/{R}.", "//{R}", "/./{R}", "/{U}", "/{R}#x", "/{R}%23", "/{R}%2e",
             "/{R}%C2%A0", "/{R}%E2%80%8B", "/%2F{R}", "/{R}%0A%0A", "/{R}%3B", "/{R}%7F"]
# Spellings that uvicorn decodes to the canonical path itself: with a key they are the route, billed as it.
CANONICAL = ["/{E}", "/{R}?x=1"]


def wire(template: str, route: str) -> str:
    name = route[1:]
    return template.format(R=name, U=name.upper(), E="%" + format(ord(name[0]), "02X") + name[1:])


def raw_request(port: int, method: str, target: str, headers: dict, body: bytes, timeout: float = 30):
    """One HTTP/1.1 request with the target sent exactly as given: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        head = f"{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        s.sendall(head.encode("latin1") + body)
        response = http.client.HTTPResponse(s)
        response.begin()
        return response.status, response.headers, response.read()  # headers: case-insensitive


def png_bytes(x: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((x * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of multipart/form-data with (name, filename or None for a text field, data) parts."""
    boundary = "gateboundary7d3f"
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        out += (b"Content-Type: image/png\r\n" if filename else b"") + b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request_for(route: str, x: np.ndarray) -> tuple[dict, bytes, int]:
    """(headers, body, rows) of a valid request for `route`."""
    if ROUTES[route] == "npy":
        return {"Content-Type": "application/octet-stream"}, npy(x), len(x)
    if ROUTES[route] == "json":
        return {"Content-Type": "application/json"}, json.dumps({"inputs": x.tolist()}).encode(), len(x)
    body, ctype = multipart([("image", "d.png", png_bytes(x[0, 0]))])
    return {"Content-Type": ctype}, body, 1


def model_rows(log: Path) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


def start(model_dir: Path, tmp: Path, target: str = "instrumented_service:Undistillable", **extra) -> Server:
    env = {**settings(model_dir, tmp, workers=1, **extra), "UNDISTILLABLE_TEST_MODEL_LOG": str(tmp / "model.log"),
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    return Server(env, tmp / "serve.log", target=target).start()


@pytest.fixture(scope="module")
def gate(model_dir, tmp_path_factory):
    """One instrumented server with keys required; the keys are made by each test."""
    tmp = tmp_path_factory.mktemp("gate")
    db = tmp / "keys.sqlite"
    keys_cli(db, "init")
    srv = start(model_dir, tmp)
    yield srv, db, tmp / "model.log"
    srv.stop()


def test_no_spelling_of_a_prediction_route_answers_without_a_key(gate, digits_x):
    srv, db, log = gate
    before = model_rows(log)
    seen = {}
    for route in ROUTES:
        headers, body, _ = request_for(route, digits_x[:2])
        for template in SPELLINGS + CANONICAL:
            target = wire(template, route)
            status, _, answer = raw_request(srv.port, "POST", target, headers, body)
            seen[target] = status
            assert status != 200 and 400 <= status < 500, (target, status, answer[:200])
            assert b"probs" not in answer and not answer.startswith(b"\x93NUMPY"), target
    assert model_rows(log) == before, "a request without a key reached the model"
    assert len(SPELLINGS) >= 20
    print(json.dumps(seen, indent=1))


def test_with_a_key_every_spelling_is_billed_as_its_route_or_refused(gate, digits_x):
    srv, db, log = gate
    key = keys_cli(db, "add", "spellings").strip()
    served = 0
    for route in ROUTES:
        headers, body, rows = request_for(route, digits_x[:3])
        headers = {**headers, "Authorization": f"Bearer {key}"}
        for template in SPELLINGS:
            target = wire(template, route)
            status, _, answer = raw_request(srv.port, "POST", target, headers, body)
            assert status in (400, 404, 405), (target, status, answer[:200])
            assert set(json.loads(answer)) == {"error", "detail"}, target
        for template in CANONICAL:
            target = wire(template, route)
            status, _, answer = raw_request(srv.port, "POST", target, headers, body)
            assert status == 200, (target, status, answer[:200])
            served += rows
    assert usage(db, "spellings")["rows_served"] == served
    batches = json.loads(keys_cli(db, "ledger", "spellings", "--json", "--limit", "1000"))
    assert {b["endpoint"] for b in batches} == set(ROUTES) and sum(b["rows"] for b in batches) == served


def test_a_key_with_nothing_left_is_refused_before_its_body_is_read(gate):
    """The request announces 8 MB and sends 1 KB: the answer can only come before the body was read."""
    srv, db, log = gate
    key = keys_cli(db, "add", "broke", "--budget", "0").strip()
    for route in ("/predict", "/predict_npy"):
        ctype = "application/json" if route == "/predict" else "application/octet-stream"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
            s.sendall((f"POST {route} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\nContent-Type: {ctype}\r\n"
                       f"Content-Length: {8 << 20}\r\n\r\n").encode() + b"[" * 1024)
            response = http.client.HTTPResponse(s)
            response.begin()  # raises a timeout if the server waits for the rest of the body
            assert response.status == 429, response.read()[:200]
            assert json.loads(response.read())["error"] == "over_budget"


def test_concurrent_requests_never_run_the_model_beyond_the_budget(gate, digits_x):
    srv, db, log = gate
    key = keys_cli(db, "add", "crowd", "--budget", "900").strip()
    body = npy(np.resize(digits_x, (300, 1, 8, 8)))  # large enough to run in a worker thread, so requests overlap
    before = model_rows(log)

    def post(_):
        status, _, _ = raw_request(srv.port, "POST", "/predict_npy", {"Authorization": f"Bearer {key}",
                                                                     "Content-Type": "application/octet-stream"}, body)
        return status

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(post, range(12)))
    assert statuses.count(200) == 3 and statuses.count(429) == 9, statuses
    assert model_rows(log) - before == 900, "the model ran on rows no budget paid for"
    assert usage(db, "crowd")["rows_served"] == 900


def test_a_stuck_ledger_lock_answers_503_and_the_worker_keeps_serving(gate, digits_x):
    """Another process holds the writers' lock (a suspended key CLI), then SQLite's own write lock (an open
    `sqlite3` shell): predictions get 503 with Retry-After, health checks still answer, and service resumes."""
    srv, db, log = gate
    key = keys_cli(db, "add", "patient").strip()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"}
    body = npy(digits_x[:2])
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT)
    shell = sqlite3.connect(db, isolation_level=None)
    try:
        for hold in ("flock", "sqlite"):
            if hold == "flock":
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                shell.execute("BEGIN IMMEDIATE")
            with ThreadPoolExecutor(2) as pool:
                prediction = pool.submit(raw_request, srv.port, "POST", "/predict_npy", headers, body)
                status, _, _ = raw_request(srv.port, "GET", "/livez", {}, b"")
                assert status == 200, "the worker's event loop froze on the ledger lock"
                status, answer_headers, answer = prediction.result(60)
            assert status == 503 and int(answer_headers["Retry-After"]) >= 1, (hold, status, answer)
            assert json.loads(answer)["error"] == "ledger_unavailable"
    finally:
        shell.close()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert raw_request(srv.port, "POST", "/predict_npy", headers, body)[0] == 200
    assert usage(db, "patient")["rows_served"] == 2
    assert "ledger unavailable, request refused with 503" in srv.log_text()


class _Counter(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        _Counter.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(png_bytes(np.zeros((8, 8), np.float32)))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def url_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/x.png"
    httpd.shutdown()


UPLOAD_PARTS = st.lists(st.sampled_from(["image-file", "image-text-url", "image-text", "top_k", "top_k-bad",
                                         "extra", "image-file-notpng"]), min_size=0, max_size=5)


def _parts(kinds: list[str], url: str, image: bytes) -> list[tuple[str, str | None, bytes]]:
    table = {"image-file": ("image", "d.png", image), "image-text-url": ("image", None, url.encode()),
             "image-text": ("image", None, b"hello"), "top_k": ("top_k", None, b"3"),
             "top_k-bad": ("top_k", None, b"many"), "extra": ("other", None, b"1"),
             "image-file-notpng": ("image", "d.png", b"GIF89a")}
    return [table[k] for k in kinds]


def test_uploads_are_one_file_part_and_nothing_is_ever_fetched(gate, digits_x, url_server):
    srv, db, log = gate
    key = keys_cli(db, "add", "uploader").strip()
    image = png_bytes(digits_x[0, 0])

    @hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(UPLOAD_PARTS)
    def check(kinds):
        body, ctype = multipart(_parts(kinds, url_server, image))
        status, _, answer = raw_request(srv.port, "POST", "/classify_image",
                                        {"Authorization": f"Bearer {key}", "Content-Type": ctype}, body)
        assert status < 500, (kinds, status, answer[:300])
        if status == 200:
            assert kinds.count("image-file") == 1 and len([k for k in kinds if k.startswith("image")]) == 1
            assert all(k in ("image-file", "top_k") for k in kinds) and kinds.count("top_k") <= 1, kinds
        else:
            assert json.loads(answer)["error"] in ("bad_upload", "validation_error", "not_an_image"), answer

    check()
    # the case that reached BentoML's URL fetch: a text part `image` (a URL) before a file part `image`
    body, ctype = multipart(_parts(["image-text-url", "image-file"], url_server, image))
    status, _, answer = raw_request(srv.port, "POST", "/classify_image",
                                    {"Authorization": f"Bearer {key}", "Content-Type": ctype}, body)
    assert status == 400 and json.loads(answer)["error"] == "bad_upload", answer
    assert _Counter.hits == []
    billed = json.loads(keys_cli(db, "ledger", "uploader", "--json", "--limit", "1000"))
    assert all(b["rows"] == 1 and b["endpoint"] == "/classify_image" for b in billed)


def test_without_the_gate_the_upload_route_still_fetches_nothing(model_dir, digits_x, url_server, tmp_path):
    """The route's own input is a file part: with the guard removed, a URL in a text part is refused, not fetched."""
    srv = start(model_dir, tmp_path, target="instrumented_service:Ungated", require_keys="off")
    try:
        for kinds in (["image-text-url"], ["image-text-url", "image-file"], ["image-file", "image-text-url"]):
            body, ctype = multipart(_parts(kinds, url_server, png_bytes(digits_x[0, 0])))
            status, _, answer = raw_request(srv.port, "POST", "/classify_image", {"Content-Type": ctype}, body)
            assert status == 400 and json.loads(answer)["error"] == "bad_upload", (kinds, status, answer[:300])
    finally:
        srv.stop()
    assert _Counter.hits == []


def test_a_replaced_keys_database_is_followed_and_a_removed_one_refuses(model_dir, digits_x, tmp_path):
    db = tmp_path / "keys.sqlite"
    old = keys_cli(db, "add", "old").strip()
    srv = start(model_dir, tmp_path)
    body = npy(digits_x[:1])
    try:
        with srv.client(old) as c:
            assert c.post("/predict_npy", content=body).status_code == 200
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            assert_error(c.post("/predict_npy", content=body), 503, "ledger_unavailable")  # removed: refuse
            new = keys_cli(db, "add", "new").strip()  # `rm` + a new database with other keys
            assert_error(c.post("/predict_npy", content=body), 401, "unauthorized")
        with srv.client(new) as c:
            assert c.post("/predict_npy", content=body).status_code == 200
            keys_cli(db, "revoke", "new")
            assert_error(c.post("/predict_npy", content=body), 401, "unauthorized")
    finally:
        srv.stop()
    assert usage(db, "new")["rows_served"] == 1


def test_a_reservation_left_by_a_killed_worker_is_released_when_a_worker_starts(model_dir, tmp_path):
    from serving.ledger import RESERVATION_TTL, Ledger

    db = tmp_path / "keys.sqlite"
    keys_cli(db, "add", "victim", "--budget", "10")
    ledger = Ledger(db)
    key_id = ledger.find("victim")[0]["id"]
    stale = ledger.reserve(key_id, 7, "/predict_npy", "0" * 64)
    fresh = ledger.reserve(key_id, 2, "/predict_npy", "1" * 64)  # a live worker's request: kept
    ledger._tx(lambda c: c.execute("UPDATE batches SET ts = ts - ? WHERE id=?", (RESERVATION_TTL + 1, stale.batch_id)))
    ledger.close()
    assert usage(db, "victim")["rows_served"] == 9
    srv = start(model_dir, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while usage(db, "victim")["rows_served"] != 2:
            assert time.monotonic() < deadline, srv.log_text()[-2000:]
            time.sleep(0.2)
    finally:
        srv.stop()
    states = {b["digest"][0]: b["state"] for b in json.loads(keys_cli(db, "ledger", "victim", "--json"))}
    assert states == {"0": "released", "1": "reserved"} and "released 1 reservations" in srv.log_text()
    assert fresh.allowed


def test_revoke_refuses_an_argument_that_names_two_keys(tmp_path, capsys):
    from serving import keys

    db = tmp_path / "keys.sqlite"
    assert keys.main(["--db", str(db), "add", "first"]) == 0
    prefix = capsys.readouterr().out.strip()[:8]
    assert keys.main(["--db", str(db), "add", prefix]) == 0  # a key named like the first key's prefix
    capsys.readouterr()
    assert keys.main(["--db", str(db), "revoke", prefix]) == 1
    err = capsys.readouterr().err
    assert "matches 2 keys" in err and "'first'" in err and f"'{prefix}'" in err
    assert keys.main(["--db", str(db), "list", "--json"]) == 0
    assert [k["revoked"] for k in json.loads(capsys.readouterr().out)] == [None, None]
    assert keys.main(["--db", str(db), "revoke", "first"]) == 0
    assert keys.main(["--db", str(db), "revoke", prefix]) == 0  # now only the key of that name is active


def test_a_refund_or_a_settle_after_a_release_neither_refunds_twice_nor_leaves_an_answer_unbilled(tmp_path):
    """A reservation held past its expiry by a live request (a send stalled by a client that does not read) is
    released; the late refund must not give its rows back a second time (the key's usage went below zero, so its
    budget grew without bound), and a late settle charges it again."""
    from serving.ledger import Ledger

    db = tmp_path / "keys.sqlite"
    keys_cli(db, "add", "late", "--budget", "10")
    ledger = Ledger(db)
    key_id = ledger.find("late")[0]["id"]
    refused = ledger.reserve(key_id, 10, "/predict_npy", "a" * 64)
    assert ledger.release_expired(ttl=-1) == 1 and usage(db, "late")["rows_served"] == 0
    ledger.refund(refused)
    assert usage(db, "late")["rows_served"] == 0, "a released reservation was refunded a second time"
    delivered = ledger.reserve(key_id, 10, "/predict_npy", "b" * 64)
    assert ledger.release_expired(ttl=-1) == 1
    ledger.settle(delivered)
    ledger.flush()
    assert usage(db, "late")["rows_served"] == 10, "an answer handed to the client was left unbilled"
    assert not ledger.reserve(key_id, 1, "/predict_npy", "c" * 64).allowed
    ledger.close()
    states = {b["digest"][0]: b["state"] for b in json.loads(keys_cli(db, "ledger", "late", "--json"))}
    assert states == {"a": "released", "b": "served"}


def test_an_npy_header_longer_than_numpy_writes_is_refused_before_it_is_parsed():
    """ast.literal_eval of a 64 KiB header cost ~125 ms of the event loop per request, for free."""
    from serving.errors import InputError
    from serving.routes import NPY_HEADER_MAX
    from serving.runtime import npy_header

    body = npy(np.zeros((1, 1, 8, 8), np.float32))
    hlen = int.from_bytes(body[8:10], "little")
    header = body[10:10 + hlen].rstrip(b"\n") + b" " * (NPY_HEADER_MAX + 64) + b"\n"  # valid, padded
    padded = body[:8] + len(header).to_bytes(2, "little") + header + body[10 + hlen:]
    assert np.load(io.BytesIO(padded)).shape == (1, 1, 8, 8)  # numpy itself reads it
    with pytest.raises(InputError) as exc:
        npy_header(padded)
    assert exc.value.error == "bad_npy" and str(NPY_HEADER_MAX) in exc.value.detail
