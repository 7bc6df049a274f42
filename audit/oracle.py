"""The black box the audit plays against: one interface, two implementations.

`HttpOracle` talks to a served model (`GET /metadata`, `POST /predict_npy` with raw .npy bodies, see
docs/interfaces.md); `OnnxOracle` runs an exported model directory in-process. Both answer raw [0, 1]
pixels (N, C, H, W) with probability-like rows (N, num_classes) under the model's output policy, each answer
checked against that policy (`audit.answers`) before it is returned. `collect_answers` fills an `AnswerCache`
batch by batch, asking only for the rows it lacks; a batch that fails the checks raises and is never stored.
"""
from __future__ import annotations

import email.utils
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from audit.answers import check_answers, parse_policy
from audit.errors import (OracleAnswerError, OracleAuthError, OracleError, OracleMismatchError,  # noqa: F401
                          OracleUnavailableError)
from audit.npy_answer import decode_answer, max_answer_bytes
from serving.policy import reveal

METADATA_LIMIT = 4 << 20  # /metadata is a few hundred bytes (a class list of thousands of names fits too)
ERROR_LIMIT = 64 << 10  # an error body is read this far for its message, no further


@dataclass
class OracleInfo:
    num_classes: int
    input_shape: list[int]
    classes: list[str]
    model_sha256: str
    mode: str | None = None
    policy: dict = field(default_factory=lambda: {"kind": "probs", "k": None, "decimals": None})
    max_batch_rows: int | None = None
    source: str = ""

    @property
    def label_only(self) -> bool:
        return self.policy.get("kind") == "label"

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "input_shape": self.input_shape, "model_sha256": self.model_sha256,
                "mode": self.mode, "output_policy": self.policy, "max_batch_rows": self.max_batch_rows,
                "source": self.source}


class Oracle(Protocol):
    def metadata(self) -> OracleInfo: ...

    def query(self, raw: np.ndarray) -> np.ndarray:
        """Raw [0, 1] pixels (n, C, H, W) float32 → answers (n, num_classes) float32."""
        ...

    def close(self) -> None: ...


def check_compatible(info: OracleInfo, dataset: str, num_classes: int, input_shape: list[int],
                     classes: list[str]) -> None:
    """Raise OracleMismatchError if the model cannot be audited with this dataset."""
    problems = []
    if info.num_classes != num_classes:
        problems.append(f"{info.num_classes} classes, dataset {dataset} has {num_classes}")
    if list(info.input_shape) != list(input_shape):
        problems.append(f"input shape {list(info.input_shape)}, dataset {dataset} has {list(input_shape)}")
    if not problems and info.classes and list(info.classes) != list(classes):
        problems.append(f"classes {info.classes[:3]}…, dataset {dataset} has {classes[:3]}…")
    if problems:
        raise OracleMismatchError(f"the model at {info.source} does not fit --dataset {dataset}: the model has "
                                  + "; ".join(problems) + ". Pick the dataset the model was trained on. "
                                  "Nothing was queried.")


def apply_policy(probs: np.ndarray, policy: dict) -> np.ndarray:
    """What a server with this output policy (a /metadata `output_policy` dict) returns for these probabilities:
    the service's own `serving.policy.reveal`, so that the simulation cannot drift from the server."""
    kind = policy.get("kind", "probs")
    k = int(policy.get("k") or 1) if kind == "topk" else None
    decimals = None if policy.get("decimals") is None else int(policy["decimals"])
    return reveal(probs, kind, k, decimals)


class OnnxOracle:
    """An exported model directory, run in-process with ONNX Runtime (CUDA only when a GPU is present)."""

    def __init__(self, model_dir: str | Path, policy: dict | None = None, intra_threads: int | None = None):
        from protect.card import ModelDirError
        from protect.predict import OnnxPredictor

        try:
            self.predictor = OnnxPredictor(model_dir, intra_threads=intra_threads)
        except ModelDirError as exc:
            raise OracleError(str(exc)) from exc
        card = self.predictor.card
        self.policy = parse_policy(policy, f"--model {model_dir}")
        self.info = OracleInfo(card.num_classes, list(card.input_shape), list(card.classes), card.onnx_sha256,
                               card.mode, self.policy, None, str(Path(model_dir).resolve()))
        self.card = card

    def metadata(self) -> OracleInfo:
        return self.info

    def query(self, raw: np.ndarray) -> np.ndarray:
        logits = self.predictor.logits(np.asarray(raw, dtype=np.float32)).astype(np.float64)
        logits -= logits.max(1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(1, keepdims=True)
        answers = apply_policy(probs.astype(np.float32), self.policy)
        return check_answers(answers, len(raw), self.info.num_classes, self.policy, self.info.source)

    def close(self) -> None:
        pass


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HttpOracle:
    """A served model over HTTP. Retries connection errors, 429 and 503 with exponential backoff (honouring
    Retry-After) up to `retries` times; 401/403 stop at once. Every body is read within a bound (an answer:
    what rows × classes float64 take), uncompressed, and every answer is checked (`audit.answers`)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.5, max_wait: float = 60.0, transport=None,
                 sleep: Callable[[float], None] = time.sleep):
        import httpx

        self.url = url.rstrip("/")
        # identity: a compressed body could inflate past any bound the client sets on the bytes it reads
        headers = {"Accept-Encoding": "identity", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self.retries, self.backoff, self.max_wait, self.sleep = retries, backoff, max_wait, sleep
        self.requests = 0
        self.retried = 0
        self.info: OracleInfo | None = None

    def _send(self, method: str, path: str, limit: int, **kwargs) -> tuple[int, object, bytes]:
        """(status, headers, body) of one request: a success's body within `limit` (OracleAnswerError beyond),
        an error's first ERROR_LIMIT bytes (for its message)."""
        response = self.client.send(self.client.build_request(method, path, **kwargs), stream=True)
        self.requests += 1
        try:
            ok = response.status_code < 400
            body = _read_bounded(response, limit if ok else ERROR_LIMIT, f"{self.url}{path}", truncate=not ok)
        finally:
            response.close()  # unread bytes are never fetched: the connection is dropped
        return response.status_code, response.headers, body

    def _request(self, method: str, path: str, limit: int, **kwargs) -> bytes:
        """The body of a successful answer, at most `limit` bytes, after retries."""
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            wait = min(self.max_wait, self.backoff * 2**attempt)
            try:
                status, headers, body = self._send(method, path, limit, **kwargs)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last = f"cannot connect to {self.url}: {type(exc).__name__}: {exc}"
            else:
                if status < 400:
                    return body
                detail = _error_text(body)
                if status in (401, 403):
                    raise OracleAuthError(f"{self.url}{path}: HTTP {status} ({detail}). The API key is missing or "
                                          "not accepted: pass a valid one with --api-key. Stopped at once.")
                if status not in (429, 503):
                    raise OracleError(f"{self.url}{path}: HTTP {status}: {detail}")
                asked = _retry_after(headers.get("Retry-After"))
                if asked is not None:
                    if asked > self.max_wait:
                        raise OracleUnavailableError(
                            f"{self.url}{path}: HTTP {status} ({detail}); the server asks to wait {asked:.0f} s, "
                            f"more than the {self.max_wait:.0f} s limit. Rerun the same command later.")
                    wait = asked
                last = f"HTTP {status} from {self.url}{path}: {detail}"
            if attempt < self.retries:
                self.retried += 1
                self.sleep(wait)
        raise OracleUnavailableError(f"{last} (gave up after {self.retries} retries)")

    def metadata(self) -> OracleInfo:
        body = self._request("GET", "/metadata", METADATA_LIMIT)
        try:
            meta = json.loads(body)
            num_classes, max_rows = int(meta["num_classes"]), meta.get("max_batch_rows")
            if num_classes < 1:
                raise ValueError(f"num_classes {num_classes}")
            if max_rows is not None and not (type(max_rows) is int and max_rows >= 1):
                raise ValueError(f"max_batch_rows {max_rows!r}, not a whole number ≥ 1")
            self.info = OracleInfo(num_classes, [int(v) for v in meta["input_shape"]],
                                   list(meta.get("classes") or []), str(meta.get("model_sha256") or "").strip(),
                                   meta.get("mode"), parse_policy(meta.get("output_policy"), f"{self.url}/metadata"),
                                   max_rows, self.url)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise OracleError(f"{self.url}/metadata did not return the expected JSON ({exc}); is this an "
                              "undistillable serving endpoint?") from exc
        return self.info

    def query(self, raw: np.ndarray) -> np.ndarray:
        info = self.info or self.metadata()  # the answer is checked against the policy /metadata declares
        rows, classes, source = len(raw), info.num_classes, f"{self.url}/predict_npy"
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(raw, dtype=np.float32), allow_pickle=False)
        body = self._request("POST", "/predict_npy", max_answer_bytes(rows, classes), content=buf.getvalue(),
                             headers={"Content-Type": "application/octet-stream"})
        return check_answers(decode_answer(body, rows, classes, source), rows, classes, info.policy, source)

    def close(self) -> None:
        self.client.close()


def _read_bounded(response, limit: int, source: str, truncate: bool = False) -> bytes:
    """At most `limit` bytes of a streamed body: beyond, the first `limit` (truncate) or an OracleAnswerError.
    A compressed body is refused (the client asked for none): its size says nothing about what it inflates to."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        if truncate:
            return b""
        raise OracleAnswerError(f"{source} answered with Content-Encoding {encoding!r} though the client asked for "
                                "an uncompressed body (Accept-Encoding: identity); refused unread, nothing of this "
                                "batch was cached.")
    declared = response.headers.get("Content-Length", "")
    if not truncate and declared.strip().isdigit() and int(declared) > limit:
        raise OracleAnswerError(f"{source} announced a body of {int(declared)} bytes, more than the {limit} an "
                                "answer to this request can take; refused unread, nothing of this batch was cached.")
    chunks, size = [], 0
    for chunk in response.iter_bytes():  # identity only (checked above): the bytes as sent
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if truncate:
                return b"".join(chunks)[:limit]
            raise OracleAnswerError(f"{source} sent more than {limit} bytes, the most an answer to this request "
                                    "can take; stopped reading, nothing of this batch was cached.")
    return b"".join(chunks)


def _error_text(body: bytes) -> str:
    try:
        obj = json.loads(body)
        if isinstance(obj, dict):
            return "; ".join(str(obj[k]) for k in ("error", "detail") if obj.get(k)) or json.dumps(obj)[:200]
    except (ValueError, UnicodeDecodeError):
        pass
    return body[:200].decode("utf-8", "replace")


def collect_answers(oracle: Oracle, cache, raw: np.ndarray, batch_rows: int, progress: bool = True) -> int:
    """Ask the oracle for every row the cache lacks, `batch_rows` at a time, storing each batch as it arrives.
    Returns the number of rows asked in this call. Errors propagate with everything answered so far kept."""
    from tqdm import tqdm

    missing = cache.missing()
    if len(missing) == 0:
        return 0
    asked = 0
    with tqdm(total=len(missing), desc="querying", unit="row", disable=not progress, dynamic_ncols=True,
              mininterval=0.5) as bar:
        for start in range(0, len(missing), batch_rows):
            idx = missing[start:start + batch_rows]
            try:
                answers = oracle.query(raw[idx])  # checked there: a bad batch raises before it is stored
            except OracleAnswerError as exc:
                where = f" (transfer-set row {int(idx[exc.row])})" if exc.row is not None else ""
                raise OracleAnswerError(f"{exc}{where}", exc.row) from None
            cache.store(idx, answers)
            asked += len(idx)
            bar.update(len(idx))
    return asked
