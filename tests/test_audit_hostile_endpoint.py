"""The audit client against a hostile endpoint: a real HTTP server on a loopback port whose /metadata and
/predict_npy answer what a broken or malicious server might. Each bad answer is a clear OracleError naming the
endpoint and what is wrong, never a crash, and nothing of the bad batch is cached (the batch before it is kept)."""
from __future__ import annotations

import gzip
import io
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

from audit.cache import AnswerCache, CacheMismatchError
from audit.cli import main
from audit.oracle import HttpOracle, OracleError, apply_policy, collect_answers
from audit.recover import recover_logp

CLASSES = 10
PROBS = {"kind": "probs", "k": None, "decimals": None}
SHA_A, SHA_B = "aa" * 32, "bb" * 32
FILLER = 64 << 20  # what an oversized answer carries: far more than (4 rows × 10 classes) can take


@dataclass
class Reply:
    body: bytes
    length: int | None = -1  # Content-Length: -1 the body's, None none (the body ends when the connection closes)
    filler: int = 0  # zero bytes streamed after the body
    headers: dict | None = None
    status: int = 200


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_with_header(text: str, data: bytes = b"") -> bytes:
    """A version-1 .npy whose header is `text`, padded as numpy pads it, then `data`."""
    header = text.encode("latin1")
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


def honest(x: np.ndarray, policy: dict) -> np.ndarray:
    """What a model under `policy` would answer: a softmax of a function of each row, then the policy."""
    z = np.outer(x.reshape(len(x), -1).mean(1) + 1, np.arange(CLASSES, dtype=np.float64)) % 7
    p = np.exp(z - z.max(1, keepdims=True))
    return apply_policy((p / p.sum(1, keepdims=True)).astype(np.float32), policy)


class Endpoint:
    """/metadata and /predict_npy on 127.0.0.1: request n (from 0) to /predict_npy is answered by `reply(x, n)`."""

    def __init__(self, reply=None, sha: str | None = SHA_A, policy: dict | None = None, port: int = 0):
        self.policy = policy or PROBS
        self.meta = {"num_classes": CLASSES, "input_shape": [1, 8, 8], "classes": [str(i) for i in range(CLASSES)],
                     "model_sha256": sha, "mode": "ce", "output_policy": self.policy, "max_batch_rows": 64}
        if sha is None:
            del self.meta["model_sha256"]
        self.reply = reply or (lambda x, n: Reply(npy(honest(x, self.policy))))
        self.posts, self.written, self.finished = 0, 0, threading.Event()
        end = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = json.dumps(end.meta).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                x = np.load(io.BytesIO(self.rfile.read(int(self.headers["Content-Length"]))), allow_pickle=False)
                reply = end.reply(x, end.posts)
                end.posts += 1
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/octet-stream")
                    if reply.length is not None:
                        size = len(reply.body) + reply.filler if reply.length == -1 else reply.length
                        self.send_header("Content-Length", str(size))
                    for k, v in (reply.headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(reply.body)
                    chunk = bytes(64 << 10)
                    while end.written < reply.filler:
                        self.wfile.write(chunk)
                        end.written += len(chunk)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading
                finally:
                    end.finished.set()

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    started = []

    def start(*args, **kw) -> Endpoint:
        started.append(Endpoint(*args, **kw))
        return started[-1]

    yield start
    for e in started:
        e.stop()


def transfer(rows: int = 8) -> np.ndarray:
    return np.random.default_rng(0).random((rows, 1, 8, 8), dtype=np.float32)


def open_cache(tmp_path: Path, info, rows: int = 8, **kw) -> AnswerCache:
    fingerprint = {"model_sha256": info.model_sha256, "output_policy": info.policy, "dataset": "toy"}
    return AnswerCache(tmp_path, fingerprint, rows, CLASSES, **kw)


def hostile(policy: dict, bad):
    """A reply function under `policy`: the first request honest, the second `bad(honest answer) -> Reply`."""
    def reply(x, n):
        good = honest(x, policy)
        return Reply(npy(good)) if n == 0 else bad(good)
    return reply


def edited(change):
    """The honest answer with `change(a)` applied in place, as an .npy reply."""
    def bad(a):
        a = a.copy()
        change(a)
        return Reply(npy(a))
    return bad


def set_entries(row, values):
    def change(a):
        a[row, :len(values)] = values
    return change


HUGE_SHAPE = npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (%d, 10), }" % 10 ** 12, bytes(160))
TOPK2 = {"kind": "topk", "k": 2, "decimals": None}
LABEL = {"kind": "label", "k": None, "decimals": None}
ROUND2 = {"kind": "probs", "k": None, "decimals": 2}

# name: (policy, the second batch's reply from the honest answer, what the error must say)
CASES = {
    "oversized, Content-Length announced": (PROBS, lambda a: Reply(npy(a), filler=FILLER), "announced a body of"),
    "oversized, no Content-Length": (PROBS, lambda a: Reply(npy(a), length=None, filler=FILLER), "sent more than"),
    "gzip bomb": (PROBS, lambda a: Reply(gzip.compress(npy(a) + bytes(FILLER), 1),
                                         headers={"Content-Encoding": "gzip"}), "Content-Encoding 'gzip'"),
    "header claims (10^12, 10)": (PROBS, lambda a: Reply(HUGE_SHAPE),
                                  r"shape \(1000000000000, 10\), expected \(4, 10\)"),
    "S4 strings": (PROBS, lambda a: Reply(npy(np.char.mod("%.2f", a).astype("S4"))), "dtype '|S4'"),
    "U8 strings": (PROBS, lambda a: Reply(npy(a.astype("U8"))), "dtype '<U8'"),
    "int64": (LABEL, lambda a: Reply(npy(a.astype(np.int64))), "dtype '<i8'"),
    "float16": (PROBS, lambda a: Reply(npy(a.astype(np.float16))), "dtype '<f2'"),
    "wrong shape": (PROBS, lambda a: Reply(npy(a[:, :9])), r"shape \(4, 9\), expected \(4, 10\)"),
    "trailing bytes": (PROBS, lambda a: Reply(npy(a) + bytes(1000)), "its header promises 160"),
    "NaN": (PROBS, edited(set_entries(2, [np.nan])), r"row 2 of the batch: entry 0 is nan \(non-finite\)"),
    "negative": (PROBS, edited(set_entries(1, [-0.25, 0.5, 0.5, 0.25, 0, 0, 0, 0, 0, 0])),
                 r"row 1 of the batch: entry 0 is -0.25 \(negative\)"),
    "above 1": (PROBS, edited(set_entries(3, [1.5, -0.5, 0, 0, 0, 0, 0, 0, 0, 0])), r"entry 0 is 1.5 \(above 1\)"),
    "unnormalised under probs": (PROBS, edited(lambda a: a.__imul__(np.float32(0.5))),
                                 r"row 0 of the batch: sums to 0.5 \(a probability row sums to 1 within 0.0001\)"),
    "off by more than rounding allows": (ROUND2, edited(set_entries(3, [0.5, 0.3] + [0] * 8)),
                                         r"row 3 of the batch: sums to 0.8 .* within 0.1\)"),
    "more than k non-zeros under topk": (TOPK2, lambda a: Reply(npy(honest_probs_like(a))),
                                         r"has 10 non-zero entries \(top-k with k=2 allows at most 2\)"),
    "topk row summing above 1": (TOPK2, edited(set_entries(0, [0.7, 0.7] + [0] * 8)),
                                 r"row 0 of the batch: sums to 1.4"),
    "not one-hot under label": (LABEL, edited(set_entries(2, [0.5, 0.5] + [0] * 8)),
                                r"row 2 of the batch: is not one-hot"),
}


def honest_probs_like(a: np.ndarray) -> np.ndarray:
    """Full probabilities where the policy promised the top 2: every entry non-zero."""
    p = np.full_like(a, 0.05)
    p[:, 0] = 0.55
    return p


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_answer_is_a_clear_error_and_nothing_of_it_is_cached(case, endpoint, tmp_path):
    policy, bad, says = CASES[case]
    server = endpoint(hostile(policy, bad), policy=policy)
    oracle = HttpOracle(server.url, "key", retries=0)
    cache = open_cache(tmp_path, oracle.metadata())
    with pytest.raises(OracleError, match=says) as caught:
        collect_answers(oracle, cache, transfer(), batch_rows=4, progress=False)
    message = str(caught.value)
    assert f"{server.url}/predict_npy" in message and "cached" in message
    have = np.load(tmp_path / "cache" / "have.npy")
    assert have.tolist() == [True] * 4 + [False] * 4  # the honest batch kept, the hostile one not
    assert not np.load(tmp_path / "cache" / "answers.npy")[4:].any()
    if "row" in says and "of the batch" in says:
        assert "transfer-set row" in message  # the batch's row, placed in the transfer set
    if case.startswith("oversized"):
        server.finished.wait(30)
        assert server.written < FILLER  # the client stopped reading long before the end
    oracle.close()


@pytest.mark.parametrize("field, value, says", [
    ("output_policy", {"kind": "softmax"}, "kind 'softmax'"), ("output_policy", {"kind": "topk", "k": 0}, "k=0"),
    ("output_policy", {"kind": "topk", "k": "2"}, "k='2'"), ("output_policy", {"kind": "probs", "decimals": -1},
                                                            "decimals=-1"),
    ("output_policy", "probs", "declares output_policy 'probs'"), ("max_batch_rows", "64", "max_batch_rows '64'"),
    ("max_batch_rows", 0, "max_batch_rows 0"), ("num_classes", 0, "num_classes 0")])
def test_metadata_the_client_cannot_check_answers_against_is_refused(field, value, says, endpoint):
    server = endpoint()
    server.meta[field] = value
    with pytest.raises(OracleError, match=rf"{server.url}/metadata.*{says}"):
        HttpOracle(server.url, retries=0).metadata()
    assert server.posts == 0


@pytest.mark.parametrize("sha", ["", None, "   "])
def test_an_endpoint_without_model_sha256_is_refused_unless_allowed(sha, endpoint, tmp_path):
    server = endpoint(sha=sha)
    oracle = HttpOracle(server.url, retries=0)
    info = oracle.metadata()
    with pytest.raises(CacheMismatchError, match=r"127\.0\.0\.1.*reports no model_sha256.*--allow-unidentified-model"):
        open_cache(tmp_path, info, source=info.source)
    assert not (tmp_path / "cache").exists() and server.posts == 0
    cache = open_cache(tmp_path, info, allow_unidentified=True, source=info.source)
    assert collect_answers(oracle, cache, transfer(), batch_rows=4, progress=False) == 8
    assert np.load(tmp_path / "cache" / "have.npy").all()


def test_audit_run_refuses_an_unidentified_model_before_any_query(endpoint, tmp_path, capsys):
    server = endpoint(sha="")
    out = tmp_path / "report"
    code = main(["run", "--endpoint", server.url, "--dataset", "digits", "--budget", "200", "--attacks",
                 "hard-label", "--seeds", "1", "--epochs", "1", "--ls-epsilons", "0.1", "--no-ce-reference",
                 "--jobs", "1", "--threads", "1", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "reports no model_sha256" in err and "--allow-unidentified-model" in err
    assert server.posts == 0 and not (out / "cache").exists()
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--allow-unidentified-model" in capsys.readouterr().out  # the way out is documented


def test_resuming_against_another_model_is_refused_naming_model_sha256(endpoint, tmp_path):
    def then_down(x, n):  # one batch, then a 503 the client gives up on
        return Reply(npy(honest(x, PROBS))) if n == 0 else Reply(b'{"error": "unavailable"}', status=503)
    first = endpoint(then_down)
    oracle = HttpOracle(first.url, retries=0)
    with pytest.raises(OracleError, match="503"):
        collect_answers(oracle, open_cache(tmp_path, oracle.metadata()), transfer(), 4, progress=False)
    first.stop()
    same = endpoint(sha=SHA_A)  # the same model on another port: the URL is not part of the audit's identity
    oracle = HttpOracle(same.url, retries=0)
    assert collect_answers(oracle, open_cache(tmp_path, oracle.metadata()), transfer(), 4, progress=False) == 4
    have = np.load(tmp_path / "cache" / "have.npy").copy()
    answers = np.load(tmp_path / "cache" / "answers.npy").copy()
    other = endpoint(sha=SHA_B)
    with pytest.raises(CacheMismatchError, match=f"model_sha256: cached '{SHA_A}', now '{SHA_B}'"):
        open_cache(tmp_path, HttpOracle(other.url, retries=0).metadata())
    other_policy = endpoint(sha=SHA_A, policy=TOPK2)
    with pytest.raises(CacheMismatchError, match="output_policy: cached"):
        open_cache(tmp_path, HttpOracle(other_policy.url, retries=0).metadata())
    assert other.posts == other_policy.posts == 0
    assert np.array_equal(np.load(tmp_path / "cache" / "have.npy"), have)
    assert np.array_equal(np.load(tmp_path / "cache" / "answers.npy"), answers)


def test_recovery_refuses_nan_and_negative_answers_and_floors_zeros():
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], np.float32)
    rec = recover_logp(p)
    assert rec.clamped_entries == 1 and rec.clamped_rows == 1  # a zero (top-k, rounding) is floored and counted
    for bad, what in ((np.nan, "nan"), (-0.1, "-0.1"), (np.inf, "inf")):
        q = p.copy()
        q[1, 2] = bad
        with pytest.raises(ValueError, match=rf"non-finite or negative \(first: row 1, class 2, {what}"):
            recover_logp(q)


@st.composite
def bodies(draw) -> bytes:
    """An .npy body of 4 rows × CLASSES as a server might send it: any dtype, shape, header, values."""
    # half the draws are the honest dtype, shape or values, so that answers the client must accept come up too
    dtype = draw(st.one_of(st.just("<f4"), st.sampled_from(["<f4", ">f4", "<f8", "<f2", "<i8", "|u1", "|b1", "|S4",
                                                            "<U3", "<c8"])))
    shape = draw(st.one_of(st.just((4, CLASSES)), st.sampled_from([(4, CLASSES - 1), (CLASSES, 4), (4,),
                                                                   (10 ** 12, CLASSES), ()])))
    values = draw(st.one_of(st.just("honest"), st.sampled_from(["uniform", "zeros", "nan", "negative", "garbage"])))
    if values == "garbage" or len(shape) != 2 or shape[0] > 4:
        text = repr({"descr": dtype, "fortran_order": draw(st.booleans()), "shape": shape})
        return npy_with_header(text, draw(st.binary(max_size=400)))
    a = {"honest": honest(transfer(4), PROBS), "uniform": np.full((4, CLASSES), 1 / CLASSES),
         "zeros": np.zeros((4, CLASSES)), "nan": np.full((4, CLASSES), np.nan),
         "negative": np.full((4, CLASSES), -0.1)}[values]
    with np.errstate(invalid="ignore"):  # NaN cast to an integer dtype: whatever it becomes is the test
        return npy(np.resize(a, shape).astype(dtype))


@pytest.fixture(scope="module")
def switchboard():
    """One endpoint for the property: it answers whatever body the example sets."""
    box = {"body": b""}
    server = Endpoint(lambda x, n: Reply(box["body"]))
    yield server, box
    server.stop()


@hsettings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(body=bodies())
@example(body=npy(honest(transfer(4), PROBS)))
@example(body=npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (%d, 10), }" % 10 ** 12))
def test_any_answer_is_a_checked_probability_array_or_an_oracle_error(switchboard, body):
    server, box = switchboard
    box["body"] = body
    oracle = HttpOracle(server.url, retries=0)
    try:
        answers = oracle.query(transfer(4))
    except OracleError as exc:
        assert server.url in str(exc)
    else:
        assert answers.dtype == np.float32 and answers.shape == (4, CLASSES)
        assert np.isfinite(answers).all() and (answers >= 0).all()
        assert np.allclose(answers.sum(1), 1, atol=1e-4)
    finally:
        oracle.close()
