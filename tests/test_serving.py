"""serving over real HTTP: a `bentoml serve` subprocess on a loopback port with a digits model made by
`protect train` + `protect export`. One server per module for the open service; the policy, key and restart
tests start their own."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving_server import (BENTOML, MAX_BODY, MAX_ROWS, ROOT, Server, assert_error, fuzz_openapi, keys_cli, npy,
                            serve_until_exit, settings, usage)

pytestmark = pytest.mark.slow


def reference_probs(model_dir: Path, x: np.ndarray) -> np.ndarray:
    """What `protect eval` computes: protect.predict's ONNX predictor, then softmax."""
    import torch

    from protect.predict import OnnxPredictor

    return torch.softmax(torch.from_numpy(OnnxPredictor(model_dir).logits(x)), 1).numpy()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("open_server")
    srv = Server(settings(model_dir, tmp, require_keys="off"), tmp / "serve.log").start()
    yield srv
    srv.stop()


def png(arr01: np.ndarray, fmt: str = "PNG", size: int | None = None) -> bytes:
    img = Image.fromarray((arr01 * 255).round().astype(np.uint8), mode="L")
    if size:
        img = img.resize((size, size))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------- the open service

def test_metadata_matches_card_and_contract(server, model_dir):
    card = json.loads((model_dir / "model.json").read_text())
    with server.client() as c:
        meta = c.get("/metadata").json()
        for path in ("/livez", "/readyz", "/metrics"):
            assert c.get(path).status_code == 200
    assert {"classes", "num_classes", "input_shape", "normalization", "model_sha256", "mode", "output_policy",
            "max_batch_rows"} <= set(meta)
    assert meta["classes"] == card["classes"] and meta["num_classes"] == 10 and meta["input_shape"] == [1, 8, 8]
    assert meta["normalization"] == card["normalization"]
    assert meta["model_sha256"] == card["onnx_sha256"] == hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest()
    assert meta["mode"] == "ce" and meta["output_policy"] == {"kind": "probs", "k": None, "decimals": None}
    assert meta["max_batch_rows"] == MAX_ROWS and meta["keys_required"] is False
    assert "running OPEN" in server.log_text()


def test_workers_do_not_load_torch(server):
    """torch in a worker costs it about 600 MB and makes each full garbage collection, which stalls every request
    the worker holds, four times longer."""
    import psutil

    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if "_bentoml_impl.worker" in " ".join(p.cmdline())]
    assert workers
    for p in workers:
        assert "libtorch" not in Path(f"/proc/{p.pid}/maps").read_text(), "a serving worker imported torch"


def test_probabilities_equal_onnx_eval_on_every_endpoint(server, model_dir, digits_x):
    x = digits_x[:300]
    ref = reference_probs(model_dir, x)
    with server.client() as c:
        r = c.post("/predict_npy", content=npy(x), headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        assert json.loads(r.headers["X-Output-Policy"]) == {"kind": "probs", "k": None, "decimals": None}
        p = np.load(io.BytesIO(r.content), allow_pickle=False)
        assert p.dtype == np.float32 and p.shape == (300, 10)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(p, ref, atol=2e-6)

        r = c.post("/predict", json={"inputs": x[:20].tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["policy"]["kind"] == "probs"
        pj = np.array([row["probs"] for row in body["predictions"]])
        np.testing.assert_allclose(pj, ref[:20], atol=2e-6)
        assert [row["label"] for row in body["predictions"]] == ref[:20].argmax(1).tolist()
        assert all(row["topk"] == [] for row in body["predictions"])

        # uint8 .npy: the service divides by 255
        u8 = (x[:50] * 255).round().astype(np.uint8)
        r = c.post("/predict_npy", content=npy(u8))
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.load(io.BytesIO(r.content)), reference_probs(model_dir, u8 / np.float32(255)),
                                   atol=2e-6)


def test_bulk_endpoint_answers_thousands_of_rows(server, digits_x):
    x = np.resize(digits_x, (5000, 1, 8, 8))
    with server.client() as c:
        r = c.post("/predict_npy", content=npy(x), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    p = np.load(io.BytesIO(r.content))
    assert p.shape == (5000, 10)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


def test_image_upload_gives_top_k(server, model_dir, digits_x):
    x = digits_x[:1]
    data = png(x[0, 0])
    ref = reference_probs(model_dir, (np.asarray(Image.open(io.BytesIO(data)), np.float32) / 255)[None, None])[0]
    with server.client() as c:
        r = c.post("/classify_image", files={"image": ("d.png", data, "image/png")}, data={"top_k": "3"})
        assert r.status_code == 200, r.text
        top = r.json()["top"]
        assert [t["index"] for t in top] == np.argsort(-ref, kind="stable")[:3].tolist()
        assert [t["class_name"] for t in top] == [str(t["index"]) for t in top]
        np.testing.assert_allclose([t["prob"] for t in top], np.sort(ref)[::-1][:3], atol=2e-6)
        # a larger JPEG is converted and resized, and answered
        r = c.post("/classify_image", files={"image": ("d.jpg", png(x[0, 0], "JPEG", size=32), "image/jpeg")})
        assert r.status_code == 200 and len(r.json()["top"]) == 5, r.text


def _pickle_bomb(marker: Path) -> bytes:
    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    np.save(buf, np.array([Bomb()], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_every_bad_input_gets_its_4xx_and_the_next_request_works(server, digits_x, tmp_path):
    good = npy(digits_x[:4])
    marker = tmp_path / "unpickled"
    h_npy = {"Content-Type": "application/octet-stream"}
    h_json = {"Content-Type": "application/json"}
    nan = digits_x[:2].copy()
    nan[0, 0, 0, 0] = np.nan
    inf = digits_x[:2].copy()
    inf[1, 0, 3, 3] = np.inf
    truncated = npy(digits_x[:4])[:-10]
    cases = [
        ("malformed JSON", "/predict", dict(content=b'{"inputs": [[[', headers=h_json), 400, "invalid_json"),
        ("JSON without inputs", "/predict", dict(json={"pixels": []}), 400, "validation_error"),
        ("JSON rank 3", "/predict", dict(json={"inputs": digits_x[:2, 0].tolist()}), 400, "bad_rank"),
        ("JSON ragged", "/predict", dict(json={"inputs": [[[[0.1, 0.2], [0.3]]]]}), 400, "bad_shape"),
        ("JSON strings", "/predict", dict(json={"inputs": [[[["a"] * 8] * 8]]}), 400, "bad_dtype"),
        ("JSON NaN", "/predict", dict(content=json.dumps({"inputs": nan.tolist()}).encode(), headers=h_json), 400,
         "non_finite"),
        ("JSON out of range", "/predict", dict(json={"inputs": (digits_x[:2] * 3 - 1).tolist()}), 400, "out_of_range"),
        ("JSON empty batch", "/predict", dict(json={"inputs": []}), 400, "empty_batch"),
        ("npy rank 3", "/predict_npy", dict(content=npy(digits_x[:4, 0]), headers=h_npy), 400, "bad_rank"),
        ("npy wrong size", "/predict_npy", dict(content=npy(np.zeros((2, 1, 28, 28), np.float32))), 400, "bad_shape"),
        ("npy wrong channels", "/predict_npy", dict(content=npy(np.zeros((2, 3, 8, 8), np.float32))), 400,
         "bad_channels"),
        ("npy float64", "/predict_npy", dict(content=npy(digits_x[:2].astype(np.float64))), 400, "bad_dtype"),
        ("npy int64", "/predict_npy", dict(content=npy(np.zeros((2, 1, 8, 8), np.int64))), 400, "bad_dtype"),
        ("npy NaN", "/predict_npy", dict(content=npy(nan)), 400, "non_finite"),
        ("npy inf", "/predict_npy", dict(content=npy(inf)), 400, "non_finite"),
        ("npy out of range", "/predict_npy", dict(content=npy(digits_x[:2] * 2)), 400, "out_of_range"),
        ("npy empty batch", "/predict_npy", dict(content=npy(np.zeros((0, 1, 8, 8), np.float32))), 400, "empty_batch"),
        ("npy above max rows", "/predict_npy", dict(content=npy(np.zeros((MAX_ROWS + 1, 1, 8, 8), np.uint8))), 413,
         "batch_too_large"),
        ("JSON above max rows", "/predict", dict(json={"inputs": [[[[0.0]]]] * (MAX_ROWS + 1)}), 413,
         "batch_too_large"),
        ("body above limit", "/predict_npy", dict(content=b"\0" * (MAX_BODY + 1)), 413, "body_too_large"),
        ("not an npy", "/predict_npy", dict(content=b"hello, world", headers=h_npy), 400, "bad_npy"),
        ("truncated npy", "/predict_npy", dict(content=truncated), 400, "bad_npy"),
        ("pickled npy", "/predict_npy", dict(content=_pickle_bomb(marker)), 400, "pickled_npy"),
        ("wrong content type", "/predict_npy", dict(content=good, headers={"Content-Type": "text/csv"}), 415,
         "unsupported_media_type"),
        ("not an image", "/classify_image", dict(files={"image": ("x.png", b"GIF89a not a png", "image/png")}), 400,
         "not_an_image"),
        ("image field as URL", "/classify_image", dict(files={"image": (None, "http://127.0.0.1:1/x.png")}), 400,
         "bad_upload"),
        ("image as JSON", "/classify_image", dict(json={"image": "x"}), 415, "unsupported_media_type"),
        ("GET on a POST route", "/predict", dict(method="GET"), 405, None),
    ]
    with server.client() as c:
        for name, path, kw, status, code in cases:
            method = kw.pop("method", "POST")
            r = c.request(method, path, **kw)
            body = assert_error(r, status, code)
            assert body["detail"], name
            ok = c.post("/predict_npy", content=good, headers=h_npy)
            assert ok.status_code == 200, f"after {name}: {ok.status_code} {ok.text[:200]}"
    assert not marker.exists(), "the pickled .npy was unpickled"


def test_openapi_spec_describes_every_route(server):
    with server.client() as c:
        spec = c.get("/docs.json").json()
    paths = spec["paths"]
    for route in ("/predict", "/predict_npy", "/classify_image", "/metadata", "/livez", "/readyz", "/metrics"):
        assert route in paths, route
    schemas = spec["components"]["schemas"]
    ok = paths["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"policy", "predictions"} <= set(ok["properties"])
    assert "inputs" in paths["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"probs", "topk", "label"} <= set(schemas["RowPrediction"]["properties"])
    assert {"model_sha256", "output_policy", "max_batch_rows"} <= set(schemas["MetadataResponse"]["properties"])
    assert "application/octet-stream" in paths["/predict_npy"]["post"]["requestBody"]["content"]
    for route in ("/predict", "/predict_npy", "/classify_image"):
        responses = paths[route]["post"]["responses"]
        assert {"200", "400", "401", "413", "429"} <= set(map(str, responses)), route
        assert responses["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def test_fuzzing_the_openapi_spec_finds_no_server_error(server, digits_x, tmp_path):
    """schemathesis: a bounded property-based run over every operation of /docs.json; no 5xx, and every answer
    matches the spec (status, content type, headers, schema)."""
    fuzz_openapi(server.url, tmp_path)
    with server.client() as c:
        assert c.post("/predict_npy", content=npy(digits_x[:2])).status_code == 200
    assert "(status=5" not in server.log_text(), "the access log shows a 5xx"


# ---------------------------------------------------------------------------- output policies

@pytest.mark.parametrize("policy", ["topk", "label"])
def test_output_policy(policy, model_dir, digits_x, tmp_path):
    extra = {"output_policy": policy, "require_keys": "off"} | ({"decimals": 2} if policy == "topk" else {})  # k: 3
    srv = Server(settings(model_dir, tmp_path, **extra), tmp_path / "serve.log").start()
    x = digits_x[:40]
    ref = reference_probs(model_dir, x)
    order = np.argsort(-ref, axis=1, kind="stable")
    try:
        with srv.client() as c:
            meta = c.get("/metadata").json()
            r = c.post("/predict_npy", content=npy(x))
            rj = c.post("/predict", json={"inputs": x[:5].tolist()})
            ri = c.post("/classify_image", files={"image": ("d.png", png(x[0, 0]), "image/png")}, data={"top_k": "5"})
    finally:
        srv.stop()
    assert r.status_code == rj.status_code == ri.status_code == 200, (r.text, rj.text, ri.text)
    p = np.load(io.BytesIO(r.content))
    assert json.loads(r.headers["X-Output-Policy"]) == meta["output_policy"] == rj.json()["policy"]
    rows = rj.json()["predictions"]
    if policy == "topk":
        assert meta["output_policy"] == {"kind": "topk", "k": 3, "decimals": 2}
        assert ((p > 0).sum(1) <= 3).all()
        for i in range(len(x)):
            np.testing.assert_array_equal(p[i, order[i, 3:]], 0)
            np.testing.assert_allclose(p[i, order[i, :3]], np.round(ref[i, order[i, :3]], 2), atol=1e-6)
        assert all(row["probs"] == [] and len(row["topk"]) == 3 for row in rows)
        assert [[t["index"] for t in row["topk"]] for row in rows] == order[:5, :3].tolist()
        assert all(round(t["prob"], 2) == t["prob"] for row in rows for t in row["topk"])
        assert len(ri.json()["top"]) == 3  # the policy's k caps the upload's top_k
    else:
        assert meta["output_policy"] == {"kind": "label", "k": None, "decimals": None}
        np.testing.assert_array_equal(p, np.eye(10, dtype=np.float32)[order[:, 0]])
        assert all(row["probs"] == [] and row["topk"] == [] for row in rows)
        assert [row["label"] for row in rows] == order[:5, 0].tolist()
        top = ri.json()["top"]
        assert len(top) == 1 and top[0]["prob"] is None


# ---------------------------------------------------------------------------- keys, budgets, ledger

@pytest.fixture(scope="module")
def keyed(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keyed_server")
    db = tmp / "keys.sqlite"
    keys = {name: keys_cli(db, "add", name, *flags).strip() for name, flags in
            {"alice": ["--budget", "100"], "bob": ["--rate", "60"], "carol": [], "burst": ["--budget", "100"]}.items()}
    srv = Server(settings(model_dir, tmp), tmp / "serve.log").start()
    yield srv, db, keys
    srv.stop()


def test_keys_are_required_and_health_stays_open(keyed, digits_x):
    srv, db, keys = keyed
    body = npy(digits_x[:3])
    with srv.client() as c:
        assert c.get("/metadata").json()["keys_required"] is True
        for path in ("/livez", "/readyz", "/metrics", "/docs.json"):
            assert c.get(path).status_code == 200, path
        r = c.post("/predict_npy", content=body)
        assert_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert_error(c.post("/predict", json={"inputs": digits_x[:1].tolist()}), 401, "unauthorized")
        assert_error(c.post("/predict_npy", content=body, headers={"Authorization": "Bearer ud_nope"}), 401)
        assert c.post("/predict_npy", content=body, headers={"Authorization": f"Bearer {keys['carol']}"}).status_code == 200
        assert c.post("/predict_npy", content=body, headers={"X-API-Key": keys["carol"]}).status_code == 200
        assert c.post("/predict", json={"inputs": digits_x[:2].tolist()},
                      headers={"X-API-Key": keys["carol"]}).status_code == 200
    import bentoml  # BentoML's own client sends the key as a bearer token

    with bentoml.SyncHTTPClient(srv.url, token=keys["carol"]) as bc:
        answer = bc.predict(inputs=digits_x[:2].tolist())
    assert len(answer["predictions"]) == 2 and len(answer["predictions"][0]["probs"]) == 10
    with bentoml.SyncHTTPClient(srv.url) as bc:
        with pytest.raises(bentoml.exceptions.BentoMLException, match="unauthorized"):
            bc.predict(inputs=digits_x[:2].tolist())
    assert "API keys required" in srv.log_text()
    stored = (db.read_bytes() + (db.with_name(db.name + "-wal").read_bytes() if db.with_name(db.name + "-wal").exists() else b""))
    assert keys["carol"].encode() not in stored, "keys must be stored hashed"
    u = usage(db, "carol")
    assert u["rows_served"] == 3 + 3 + 2 + 2 and u["requests"] == 4
    keys_cli(db, "revoke", "carol")
    with srv.client(keys["carol"]) as c:
        assert_error(c.post("/predict_npy", content=body), 401, "unauthorized")


def test_budget_counts_rows_and_refuses_with_429(keyed, digits_x):
    srv, db, keys = keyed
    with srv.client(keys["alice"]) as c:
        assert c.post("/predict_npy", content=npy(digits_x[:60])).status_code == 200
        assert_error(c.post("/predict_npy", content=npy(digits_x[:5] * 2)), 400, "out_of_range")  # not charged
        assert c.post("/predict", json={"inputs": digits_x[:30].tolist()}).status_code == 200
        r = c.post("/predict_npy", content=npy(digits_x[:20]))
        assert_error(r, 429, "over_budget")
        assert "10 of 100" in r.json()["detail"]
        assert c.post("/predict_npy", content=npy(digits_x[:10])).status_code == 200
        assert_error(c.post("/predict_npy", content=npy(digits_x[:1])), 429, "over_budget")
    u = usage(db, "alice")
    assert (u["rows_served"], u["requests"], u["refused"]) == (100, 3, 2)
    assert u["first_seen"] <= u["last_seen"]
    batches = json.loads(keys_cli(db, "ledger", "alice", "--json"))
    assert [b["rows"] for b in batches] == [10, 30, 60]
    assert batches[-1]["digest"] == hashlib.sha256(npy(digits_x[:60])).hexdigest()


def test_rate_limit_refuses_with_retry_after(keyed, digits_x):
    srv, db, keys = keyed
    with srv.client(keys["bob"]) as c:
        assert c.post("/predict_npy", content=npy(digits_x[:50])).status_code == 200
        r = c.post("/predict_npy", content=npy(digits_x[:30]))
        assert_error(r, 429, "over_rate")
        assert int(r.headers["Retry-After"]) >= 1
        r = c.post("/predict_npy", content=npy(digits_x[:61]))  # never fits in one minute's rows
        assert_error(r, 429, "over_rate")
        assert "Retry-After" not in r.headers
    assert usage(db, "bob")["rows_served"] == 50


def test_concurrent_burst_cannot_overspend(keyed, digits_x):
    srv, db, keys = keyed
    body = npy(digits_x[:1])
    codes: list[int] = []
    lock = threading.Lock()

    def hammer():
        with srv.client(keys["burst"]) as c:
            for _ in range(20):
                code = c.post("/predict_npy", content=body).status_code
                with lock:
                    codes.append(code)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(codes)) == [200, 429]
    assert codes.count(200) == 100 and codes.count(429) == 60
    assert usage(db, "burst")["rows_served"] == 100


def test_ledger_and_budgets_survive_a_restart(model_dir, digits_x, tmp_path):
    db = tmp_path / "keys.sqlite"
    key = keys_cli(db, "add", "dora", "--budget", "50").strip()
    env = settings(model_dir, tmp_path)
    srv = Server(env, tmp_path / "serve.log").start()
    try:
        with srv.client(key) as c:
            assert c.post("/predict_npy", content=npy(digits_x[:40])).status_code == 200
    finally:
        srv.stop()
    before = usage(db, "dora")
    assert before["rows_served"] == 40
    late = keys_cli(db, "add", "eve").strip()  # added while the server is down
    srv = Server(env, tmp_path / "serve.log").start()
    try:
        with srv.client(key) as c:
            assert_error(c.post("/predict_npy", content=npy(digits_x[:11])), 429, "over_budget")
            assert c.post("/predict_npy", content=npy(digits_x[:10])).status_code == 200
            assert_error(c.post("/predict_npy", content=npy(digits_x[:1])), 429, "over_budget")
        with srv.client(late) as c:
            assert c.post("/predict_npy", content=npy(digits_x[:1])).status_code == 200
    finally:
        srv.stop()
    after = usage(db, "dora")
    assert (after["rows_served"], after["requests"]) == (50, 2)
    assert after["first_seen"] == before["first_seen"]


# ---------------------------------------------------------------------------- start-up and packaging

@pytest.mark.parametrize("damage", ["tampered", "missing"])
def test_refuses_to_start_on_a_bad_model_dir(damage, model_dir, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    if damage == "tampered":
        with open(bad / "model.onnx", "ab") as fh:
            fh.write(b"\0")
    else:
        (bad / "model.onnx").unlink()
    status, out = serve_until_exit(settings(bad, tmp_path, require_keys="off"))
    assert status != 0
    assert "refusing to start" in out
    assert ("does not match the card" if damage == "tampered" else "no model.onnx") in out


def test_bentoml_build_includes_the_model(model_dir, tmp_path):
    src = tmp_path / "project"
    (src / "protect").mkdir(parents=True)
    shutil.copytree(ROOT / "serving", src / "serving", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("__init__.py", "card.py", "host.py"):
        shutil.copy(ROOT / "protect" / name, src / "protect" / name)
    shutil.copy(ROOT / "bentofile.yaml", src)
    shutil.copytree(model_dir, src / "models" / "default")
    home = tmp_path / "bentoml_home"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("UNDISTILLABLE_MODEL_DIR", None)
    proc = subprocess.run([BENTOML, "build", "--output", "tag"], cwd=src, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bentos = list((home / "bentos" / "undistillable").glob("*/src/models/default/model.onnx"))
    assert len(bentos) == 1
    assert bentos[0].read_bytes() == (model_dir / "model.onnx").read_bytes()
    bento_src = bentos[0].parents[2]
    assert (bento_src / "serving" / "service.py").exists() and (bento_src / "protect" / "card.py").exists()
    assert (bento_src / "protect" / "host.py").exists()
    assert (bento_src / "models/default/model.json").exists()
    # the bento serves its packed model: no UNDISTILLABLE_MODEL_DIR, started outside the project
    srv = Server({"BENTOML_HOME": str(home), "UNDISTILLABLE_MODEL_DIR": None, "UNDISTILLABLE_REQUIRE_KEYS": "off",
                  "UNDISTILLABLE_KEYS_DB": str(tmp_path / "keys.sqlite")}, tmp_path / "serve.log",
                 target="undistillable:latest", cwd=tmp_path).start()
    try:
        with srv.client() as c:
            assert c.get("/metadata").json()["model_sha256"] == hashlib.sha256(bentos[0].read_bytes()).hexdigest()
            assert c.post("/predict_npy", content=npy(np.zeros((2, 1, 8, 8), np.uint8))).status_code == 200
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- pieces, in-process

def test_policy_arrays_and_npy_header_in_process(digits_x):
    from serving.config import OutputPolicy
    from serving.errors import InputError
    from serving.policy import apply_array
    from serving.runtime import npy_header, npy_rows

    p = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]], np.float32)
    np.testing.assert_array_equal(apply_array(p, OutputPolicy("topk", 1)),
                                  np.array([[0, 0.6, 0], [0.5, 0, 0]], np.float32))
    np.testing.assert_array_equal(apply_array(p, OutputPolicy("label")), [[0, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(apply_array(p, OutputPolicy("probs", decimals=0)), [[0, 1, 0], [0, 0, 0]])
    assert npy_rows(npy(digits_x[:7])) == 7 and npy_rows(b"junk") is None
    from serving.guard import json_rows

    # the guard counts rows with the parser BentoML's request model uses: a duplicated key counts as served
    assert json_rows(b'{"inputs": [1], "inputs": [1, 2, 3]}') == 3 and json_rows(b"[" * 100000) is None
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError) as exc:
        npy_header(obj.getvalue())
    assert exc.value.error == "pickled_npy"


def test_a_port_taken_before_bentoml_binds_it_is_retried_on_a_fresh_one(model_dir, tmp_path, monkeypatch):
    """free_port() hands out a port that is free when chosen; a Ray node or another server may bind it before
    `bentoml serve` does. The launcher retries that start on a fresh port instead of failing the caller."""
    from serving import launcher

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        real = launcher.free_port
        monkeypatch.setattr(launcher, "free_port", lambda: next(ports, None) or real())
        srv = Server(settings(model_dir, tmp_path, require_keys="off"), tmp_path / "serve.log").start()
        try:
            assert srv.port != taken.getsockname()[1]
            with srv.client() as c:
                assert c.get("/metadata").status_code == 200
            assert "Address already in use" in srv.log_text()  # the first start did meet the taken port
        finally:
            srv.stop()
