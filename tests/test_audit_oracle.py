"""The oracle's HTTP behaviour (retries, Retry-After, 401, bad answers), the answer cache and resumption."""
from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest

from audit.cache import AnswerCache, CacheMismatchError
from audit.oracle import (HttpOracle, OracleAuthError, OracleError, OracleInfo, OracleMismatchError,
                          OracleUnavailableError, apply_policy, check_compatible, collect_answers)

META = {"classes": [str(i) for i in range(3)], "num_classes": 3, "input_shape": [1, 2, 2],
        "normalization": {"mean": [0.5], "std": [0.25]}, "model_sha256": "ab" * 32, "mode": "ce",
        "output_policy": {"kind": "probs", "k": None, "decimals": None}, "max_batch_rows": 64}


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def answer_for(request: httpx.Request) -> np.ndarray:
    x = np.load(io.BytesIO(request.content))
    s = x.reshape(len(x), -1).sum(1)
    p = np.stack([s, s + 1, s + 2], 1).astype(np.float32)
    return p / p.sum(1, keepdims=True)


def make_oracle(handler, **kw) -> tuple[HttpOracle, list[float]]:
    sleeps: list[float] = []
    oracle = HttpOracle("http://oracle.test", "key", transport=httpx.MockTransport(handler), sleep=sleeps.append,
                        **kw)
    return oracle, sleeps


def test_metadata_and_query_send_npy_with_the_key():
    seen = []

    def handler(request):
        seen.append(request)
        if request.url.path == "/metadata":
            return httpx.Response(200, json=META)
        return httpx.Response(200, content=npy(answer_for(request)))

    oracle, _ = make_oracle(handler)
    info = oracle.metadata()
    assert info.num_classes == 3 and info.input_shape == [1, 2, 2] and info.max_batch_rows == 64
    out = oracle.query(np.ones((5, 1, 2, 2), np.float32))
    assert out.shape == (5, 3)
    post = seen[-1]
    assert post.headers["Authorization"] == "Bearer key"
    assert post.headers["Content-Type"] == "application/octet-stream"
    assert np.load(io.BytesIO(post.content)).shape == (5, 1, 2, 2)


def test_429_and_503_are_retried_honouring_retry_after():
    calls = {"n": 0}

    def handler(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(429, json={"error": "rate", "detail": "slow down"}, headers={"Retry-After": "3"})
        if calls["n"] == 2:
            return httpx.Response(503, json={"error": "busy", "detail": ""})
        return httpx.Response(200, content=npy(answer_for(request)))

    oracle, sleeps = make_oracle(handler, backoff=0.5)
    oracle.info = OracleInfo(3, [1, 2, 2], [], "x")
    assert oracle.query(np.zeros((2, 1, 2, 2), np.float32)).shape == (2, 3)
    assert sleeps == [3.0, 1.0]  # Retry-After first, then exponential backoff (0.5·2¹)


def test_retries_have_a_limit_then_a_clear_error():
    oracle, sleeps = make_oracle(lambda r: httpx.Response(503, json={"error": "overloaded", "detail": ""}), retries=3)
    with pytest.raises(OracleUnavailableError, match="503.*gave up after 3 retries"):
        oracle.metadata()
    assert len(sleeps) == 3


def test_a_retry_after_beyond_the_limit_fails_at_once():
    oracle, sleeps = make_oracle(lambda r: httpx.Response(429, json={"error": "budget exhausted", "detail": "key x"},
                                                          headers={"Retry-After": "86400"}), max_wait=60)
    with pytest.raises(OracleUnavailableError, match="budget exhausted.*wait 86400 s"):
        oracle.metadata()
    assert sleeps == []


def test_401_stops_at_once():
    calls = {"n": 0}

    def handler(request):
        calls["n"] += 1
        return httpx.Response(401, json={"error": "unauthorized", "detail": "unknown API key"})

    oracle, sleeps = make_oracle(handler)
    with pytest.raises(OracleAuthError, match="unknown API key.*--api-key"):
        oracle.metadata()
    assert calls["n"] == 1 and sleeps == []


def test_connection_errors_are_retried_then_reported():
    def handler(request):
        raise httpx.ConnectError("connection refused", request=request)

    oracle, sleeps = make_oracle(handler, retries=2)
    with pytest.raises(OracleUnavailableError, match="cannot connect to http://oracle.test"):
        oracle.metadata()
    assert len(sleeps) == 2


def test_a_malformed_answer_is_an_error():
    oracle, _ = make_oracle(lambda r: httpx.Response(200, content=npy(np.zeros((1, 3), np.float32))))
    oracle.info = OracleInfo(3, [1, 2, 2], [], "x")
    with pytest.raises(OracleError, match="answered shape"):
        oracle.query(np.zeros((2, 1, 2, 2), np.float32))


def test_mismatch_with_the_dataset_is_refused():
    info = OracleInfo(3, [1, 2, 2], ["a", "b", "c"], "x", source="http://oracle.test")
    check_compatible(info, "toy", 3, [1, 2, 2], ["a", "b", "c"])
    with pytest.raises(OracleMismatchError, match="3 classes, dataset toy has 10"):
        check_compatible(info, "toy", 10, [1, 2, 2], [])
    with pytest.raises(OracleMismatchError, match=r"input shape \[1, 2, 2\], dataset toy has \[1, 8, 8\]"):
        check_compatible(info, "toy", 3, [1, 8, 8], ["a", "b", "c"])
    with pytest.raises(OracleMismatchError, match="classes"):
        check_compatible(info, "toy", 3, [1, 2, 2], ["x", "y", "z"])


def test_output_policies():
    p = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], np.float32)
    assert np.array_equal(apply_policy(p, {"kind": "label"}), np.array([[0, 1, 0], [1, 0, 0]], np.float32))
    top2 = apply_policy(p, {"kind": "topk", "k": 2})
    assert np.array_equal(top2 == 0, np.array([[True, False, False], [False, True, False]]))
    assert np.allclose(apply_policy(p, {"kind": "probs", "decimals": 0}), np.round(p))


class CountingOracle:
    """Answers from a function of the row; counts how often each row was asked; may fail after n rows."""

    def __init__(self, fail_after: int | None = None):
        self.asked: dict[int, int] = {}
        self.fail_after = fail_after

    def query(self, raw):
        if self.fail_after is not None and sum(self.asked.values()) + len(raw) > self.fail_after:
            raise OracleUnavailableError("server went away")
        for row in raw:
            key = int(row.flat[0])
            self.asked[key] = self.asked.get(key, 0) + 1
        ids = raw[:, 0, 0, 0]
        return np.stack([ids, ids + 1], 1).astype(np.float32)


def test_an_interrupted_collection_resumes_without_asking_twice(tmp_path):
    raw = np.arange(100, dtype=np.float32).reshape(100, 1, 1, 1)
    fp = {"model_sha256": "s", "dataset": "toy"}
    oracle = CountingOracle(fail_after=45)
    with pytest.raises(OracleUnavailableError):
        collect_answers(oracle, AnswerCache(tmp_path, fp, 100, 2), raw, batch_rows=10, progress=False)
    assert sum(oracle.asked.values()) == 40  # four whole batches landed before the failure
    oracle.fail_after = None
    cache = AnswerCache(tmp_path, fp, 100, 2)  # a new process: reopen from disk
    assert len(cache.missing()) == 60
    assert collect_answers(oracle, cache, raw, batch_rows=10, progress=False) == 60
    assert oracle.asked == {i: 1 for i in range(100)}
    answers = cache.read()
    assert np.array_equal(answers[:, 0], np.arange(100)) and cache.counters["rows_sent"] == 100
    assert collect_answers(oracle, AnswerCache(tmp_path, fp, 100, 2), raw, 10, progress=False) == 0


def test_a_different_audits_cache_is_refused_and_kept(tmp_path):
    cache = AnswerCache(tmp_path, {"model_sha256": "aaa", "dataset": "toy"}, 10, 2)
    cache.store(np.arange(3), np.ones((3, 2), np.float32))
    before = (tmp_path / "cache" / "answers.npy").read_bytes()
    with pytest.raises(CacheMismatchError, match="model_sha256: cached 'aaa', now 'bbb'.*another --out"):
        AnswerCache(tmp_path, {"model_sha256": "bbb", "dataset": "toy"}, 10, 2)
    with pytest.raises(CacheMismatchError, match="rows: cached 10, now 20"):
        AnswerCache(tmp_path, {"model_sha256": "aaa", "dataset": "toy"}, 20, 2)
    assert (tmp_path / "cache" / "answers.npy").read_bytes() == before
    assert json.loads((tmp_path / "cache" / "fingerprint.json").read_text())["model_sha256"] == "aaa"
