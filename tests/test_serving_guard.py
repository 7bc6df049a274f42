"""The guard, as an attacker and a careless operator meet it: the API fails closed, the key CLI creates no database
by accident, no .npy header or body gets a 5xx, size refusals come before budget ones, and rows are billed only for
answers that exist and are delivered. Real `bentoml serve` processes over loopback HTTP, real SQLite."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

from serving_server import (MAX_ROWS, Server, assert_error, fuzz_openapi, keys_cli, npy, serve_until_exit, settings,
                            usage)

pytestmark = pytest.mark.slow
NPY_ROUTE = {"Content-Type": "application/octet-stream"}


# ---------------------------------------------------------------------------- fail closed

def test_revoking_the_last_key_leaves_the_api_closed(model_dir, digits_x, tmp_path):
    db = tmp_path / "keys.sqlite"
    key = keys_cli(db, "add", "solo").strip()
    srv = Server(settings(model_dir, tmp_path), tmp_path / "serve.log").start()  # no REQUIRE_KEYS: the default
    body = npy(digits_x[:2])
    try:
        with srv.client(key) as c:
            assert c.post("/predict_npy", content=body).status_code == 200
        keys_cli(db, "revoke", "solo")  # no active key is left
        with srv.client() as anonymous, srv.client(key) as revoked:
            assert anonymous.get("/metadata").json()["keys_required"] is True
            for c in (anonymous, revoked):
                assert_error(c.post("/predict_npy", content=body), 401, "unauthorized")
                assert_error(c.post("/predict", json={"inputs": digits_x[:1].tolist()}), 401, "unauthorized")
    finally:
        srv.stop()
    assert "running OPEN" not in srv.log_text() and "API keys required: 1 active keys" in srv.log_text()
    assert usage(db, "solo")["rows_served"] == 2


@pytest.mark.parametrize("problem", ["mistyped path", "not a database"])
def test_refuses_to_start_without_its_keys_database(problem, model_dir, tmp_path):
    db = tmp_path / "keys.sqlite"
    if problem == "not a database":
        db.write_bytes(b"these are not the keys you are looking for" * 100)
    status, out = serve_until_exit(settings(model_dir, tmp_path))
    assert status != 0 and "refusing to start" in out
    assert (f"{db} does not exist" if problem == "mistyped path" else "is not a keys database") in out
    assert "UNDISTILLABLE_REQUIRE_KEYS=off" in out or problem == "not a database"
    assert db.exists() == (problem == "not a database")  # a wrong path is never created


def test_keys_cli_creates_a_database_only_when_told(tmp_path, monkeypatch, capsys):
    from serving import keys

    default = tmp_path / "ledger" / "serving.sqlite"
    monkeypatch.setattr(keys, "DEFAULT_KEYS_DB", default)
    monkeypatch.delenv("UNDISTILLABLE_KEYS_DB", raising=False)
    for argv in (["list"], ["add", "acme"], ["--db", str(tmp_path / "typo.sqlite"), "list"],
                 ["--db", str(tmp_path / "typo.sqlite"), "revoke", "acme"]):
        assert keys.main(argv) == 2, argv
        assert "error: no keys database" in capsys.readouterr().err
    assert not default.exists() and not (tmp_path / "typo.sqlite").exists()
    assert keys.main(["init"]) == 0 and default.is_file()
    assert "created keys database" in capsys.readouterr().out
    assert keys.main(["add", "acme", "--budget", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("ud_") and "budget 0 rows" in out.err and "unlimited rows" not in out.err
    assert keys.main(["list", "--json"]) == 0
    assert [(k["name"], k["row_budget"]) for k in json.loads(capsys.readouterr().out)] == [("acme", 0)]
    monkeypatch.setenv("UNDISTILLABLE_KEYS_DB", str(tmp_path / "named.sqlite"))  # named: `add` may create it
    assert keys.main(["add", "beta", "--rate", "1"]) == 0 and (tmp_path / "named.sqlite").is_file()


@pytest.mark.parametrize("rate", ["0.5", "0", "-3", "nan", "inf"])
def test_keys_cli_refuses_a_rate_that_could_never_serve(rate, tmp_path, capsys):
    from serving import keys

    db = tmp_path / "keys.sqlite"
    assert keys.main(["--db", str(db), "add", "slow", "--rate", rate]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert not db.exists()


# ---------------------------------------------------------------------------- hostile .npy bodies

def npy_with_header(text: str, data: bytes = bytes(256)) -> bytes:
    """A version-1 .npy whose header is `text`, padded as numpy pads it, then `data`."""
    header = text.encode("latin1")
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


TRUE_AS_DIM = npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (True, 1, 8, 8), }")
HUGE = npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (%d, 1, 8, 8), }" % 10 ** 25)
DESCRS = ["<f4", "|u1", ">f4", "<f8", "|b1", "<i8", "|O", "<U3", "|V16", "<c8", "garbage", [("a", "<f4")],
          [("a", "<f4", (10 ** 12,))]]
DIMS = st.one_of(st.integers(-2, 10), st.integers(0, 10 ** 30), st.booleans(), st.none(), st.just(8.0),
                 st.just(np.int64(8)))


def _plain_dtype(descr) -> np.dtype | None:
    try:
        dtype = np.lib.format.descr_to_dtype(descr)
    except Exception:
        return None
    return None if dtype.hasobject else dtype


@st.composite
def npy_bodies(draw) -> tuple[bytes, int | None]:
    """An .npy body, well formed or not, and the rows its header declares when the header is well formed."""
    shape = draw(st.one_of(st.tuples(st.integers(1, 5), st.just(1), st.just(8), st.just(8)),
                           st.lists(DIMS, max_size=5).map(tuple), DIMS))
    descr = draw(st.sampled_from(DESCRS))
    fortran = draw(st.one_of(st.booleans(), st.sampled_from([0, 1, None])))
    fields = {"descr": descr, "fortran_order": fortran, "shape": shape}
    text = draw(st.one_of(st.just(repr(fields)), st.just(repr({k: v for k, v in fields.items() if k != "descr"})),
                          st.just(repr(fields)[:-3]), st.text(max_size=40)))
    header = text.encode("latin1", "replace")
    version = draw(st.sampled_from([1, 2, 3, 9]))
    length = max(0, len(header) + draw(st.sampled_from([0, 0, 0, 1, -1, 70000])))
    size_field = min(length, 65535).to_bytes(2, "little") if version == 1 else length.to_bytes(4, "little")
    dtype = _plain_dtype(descr)
    well_formed = (version in (1, 2, 3) and length == len(header) and text == repr(fields) and type(fortran) is bool
                   and type(shape) is tuple and len(shape) > 0 and all(type(d) is int and d >= 0 for d in shape)
                   and dtype is not None)
    size = int(np.prod(shape, dtype=object)) * dtype.itemsize if well_formed else 0
    if 0 < size <= 4096 and draw(st.booleans()):  # the data the header promises, in range half the time
        data = (np.full(size // 4, 0.5, "<f4").tobytes() if descr == "<f4" and draw(st.booleans())
                else draw(st.binary(min_size=size, max_size=size)))
    else:
        data = draw(st.binary(max_size=300))
    return b"\x93NUMPY" + bytes([version, 0]) + size_field + header + data, shape[0] if well_formed else None


def npy_property(max_examples: int):
    """The hypothesis setup of both .npy properties: generated bodies, plus two bodies that once broke the parser (a
    10^25-row shape, `True` as a dimension) as examples."""
    def wrap(check):
        for case in ((HUGE, 10 ** 25), (TRUE_AS_DIM, None)):
            check = example(case)(check)
        return hsettings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck),
                         database=None)(given(npy_bodies())(check))
    return wrap


def test_no_npy_header_or_body_raises_anything_but_an_input_error():
    """In-process and fast: the header parser and the decoder refuse every malformed .npy with an InputError."""
    from protect.card import ModelCard
    from serving.errors import InputError
    from serving.runtime import decode_npy, npy_rows

    card = ModelCard.model_validate({"classes": [str(i) for i in range(10)], "num_classes": 10, "input_shape": [1, 8, 8],
                                     "normalization": {"mean": [0.5], "std": [0.5]}, "onnx_sha256": "0" * 64,
                                     "mode": "ce", "dataset": "digits", "arch": "cnn-tiny"})

    @npy_property(max_examples=400)
    def check(case):
        body, rows = case
        if rows is not None:
            assert npy_rows(body) == rows
        try:
            x = decode_npy(body, card, MAX_ROWS)
        except InputError as exc:
            assert 400 <= exc.status < 500 and exc.error and exc.detail
            assert exc.error == "batch_too_large" or rows is None or rows <= MAX_ROWS
            return
        assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and 0 < len(x) <= MAX_ROWS

    check()


@pytest.fixture(scope="module")
def guarded(model_dir, tmp_path_factory):
    """A server that requires keys: `fuzz` has a budget of 10 × max rows, `tiny` of 5 rows."""
    tmp = tmp_path_factory.mktemp("guarded")
    db = tmp / "keys.sqlite"
    keys = {name: keys_cli(db, "add", name, "--budget", budget).strip()
            for name, budget in (("fuzz", str(10 * MAX_ROWS)), ("tiny", "5"))}
    srv = Server(settings(model_dir, tmp), tmp / "serve.log").start()
    yield srv, db, keys
    srv.stop()


def test_hostile_npy_bodies_get_a_4xx_or_an_answer_never_a_5xx(guarded):
    """Property-based over HTTP: every generated .npy gets 200 or a 4xx in the one error shape, and a header that
    declares more rows than the limit gets 413 batch_too_large, never a budget refusal."""
    srv, db, keys = guarded
    with srv.client(keys["fuzz"]) as c:
        @npy_property(max_examples=80)
        def check(case):
            body, rows = case
            r = c.post("/predict_npy", content=body, headers=NPY_ROUTE)
            if r.status_code == 200:
                assert np.load(io.BytesIO(r.content)).shape[1] == 10
                return
            error = assert_error(r, (400, 413))
            assert error["error"] == "batch_too_large" or rows is None or rows <= MAX_ROWS, error

        check()
        assert_error(c.post("/predict_npy", content=TRUE_AS_DIM, headers=NPY_ROUTE), 400, "bad_npy")
    assert "(status=5" not in srv.log_text()


def test_fuzzing_the_keyed_api_finds_no_server_error_and_no_open_door(guarded, tmp_path):
    """schemathesis with a key: no 5xx, answers match the spec, and requests without the key are refused."""
    srv, db, keys = guarded
    fuzz_openapi(srv.url, tmp_path, "-H", f"Authorization: Bearer {keys['fuzz']}")
    assert "(status=5" not in srv.log_text()


def test_size_refusals_come_before_the_budget(guarded, digits_x):
    srv, db, keys = guarded
    with srv.client(keys["tiny"]) as c:
        for r in (c.post("/predict_npy", content=HUGE, headers=NPY_ROUTE),
                  c.post("/predict", json={"inputs": [[[[0.0]]]] * (MAX_ROWS + 1)})):
            assert_error(r, 413, "batch_too_large")
        assert_error(c.post("/predict_npy", content=npy(digits_x[:6])), 429, "over_budget")
        assert c.post("/predict_npy", content=npy(digits_x[:5])).status_code == 200
    assert usage(db, "tiny")["rows_served"] == 5


# ---------------------------------------------------------------------------- billing

def test_rows_are_billed_only_for_answers_delivered(model_dir, digits_x, tmp_path):
    """A client that leaves before its answer is not billed (its reservation is refunded). A worker killed (-9) with
    six requests in flight never leaves an answer delivered without its rows charged, and charges at most the six
    requests it was running beyond what was delivered (their reservations are released once they expire, see
    test_gate.py)."""
    db = tmp_path / "keys.sqlite"
    key = keys_cli(db, "add", "meter").strip()
    srv = Server(settings(model_dir, tmp_path, workers=1), tmp_path / "serve.log").start()
    try:
        # 6000 rows run in a worker thread: the server sees the connection close before the answer is ready
        body = npy(np.resize(digits_x, (MAX_ROWS, 1, 8, 8)))
        head = (f"POST /predict_npy HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n")
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(head.encode() + body)
        deadline = time.monotonic() + 60
        while "not billed" not in srv.log_text():
            assert time.monotonic() < deadline, srv.log_text()[-2000:]
            time.sleep(0.1)
        assert usage(db, "meter")["rows_served"] == 0

        delivered: list[int] = []
        lock, killed = threading.Lock(), threading.Event()
        after_kill = [0]

        def client():
            with srv.client(key) as c:
                while after_kill[0] < 8:
                    try:  # the model's time on 6000 rows is most of each request's time in the worker
                        r = c.post("/predict_npy", content=body, headers=NPY_ROUTE)
                    except httpx.HTTPError:  # the worker died under this request: nothing delivered
                        time.sleep(0.1)
                        continue
                    assert r.status_code == 200, r.text
                    with lock:
                        delivered.append(len(np.load(io.BytesIO(r.content))))
                        after_kill[0] += killed.is_set()

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        while len(delivered) < 8:
            time.sleep(0.05)
        workers = [p for p in psutil.Process(srv.proc.pid).children(recursive=True)
                   if "_bentoml_impl.worker" in " ".join(p.cmdline())]
        assert len(workers) == 1
        os.kill(workers[0].pid, signal.SIGKILL)
        killed.set()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "no answer after the worker was restarted"
    finally:
        srv.stop()
    billed = usage(db, "meter")["rows_served"]
    assert sum(delivered) <= billed <= sum(delivered) + 6 * MAX_ROWS, (billed, sum(delivered))
    batches = json.loads(keys_cli(db, "ledger", "meter", "--json", "--limit", "1000"))
    assert sum(b["rows"] for b in batches) == billed
    # open at the end: the six requests in flight at the kill, and at most one delivered answer per client whose
    # settle the killed worker had not committed yet (the stopped server committed all of its own)
    assert len([b for b in batches if b["state"] == "reserved"]) <= 12
