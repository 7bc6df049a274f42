"""The model behind the API: ONNX Runtime session, input decoding and validation, softmax, output policy.

Nothing here knows about HTTP or BentoML except the error type; bench/serving.py uses it in-process too.
"""
from __future__ import annotations

import ast
import io
import logging
import math
import warnings

import numpy as np

from protect.card import ONNX, ModelCard, normalise, verify_model_dir
from protect.host import onnx_session
from serving.config import Settings
from serving.errors import InputError
from serving.policy import apply_array
from serving.routes import MODEL, NPY_HEADER_MAX, body_limit

logger = logging.getLogger("serving")

NPY_MAGIC = b"\x93NUMPY"
IMAGE_FORMATS = ("PNG", "JPEG")
MAX_IMAGE_PIXELS = 4096 * 4096
CHUNK_ROWS = 1024
SMALL_BATCH = 32  # at most this many rows run on a one-thread session: no thread-pool wake-ups per request


# ---------------------------------------------------------------- decoding client inputs

def to_npy(x: np.ndarray) -> bytes:
    """`numpy.save` into bytes (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def npy_header(body: bytes) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an .npy file, read without touching its data.
    Raises InputError on anything that is not a plain .npy array (pickled objects included)."""
    if len(body) < 10 or not body.startswith(NPY_MAGIC):
        raise InputError("bad_npy", "the body is not an .npy file (no \\x93NUMPY magic); send numpy.save() output")
    major = body[6]
    if major == 1:
        hlen, start = int.from_bytes(body[8:10], "little"), 10
    elif major in (2, 3):
        if len(body) < 12:
            raise InputError("bad_npy", "truncated .npy header")
        hlen, start = int.from_bytes(body[8:12], "little"), 12
    else:
        raise InputError("bad_npy", f"unsupported .npy format version {major}")
    if hlen > NPY_HEADER_MAX or start + hlen > len(body):
        raise InputError("bad_npy", f"truncated .npy header, or one over {NPY_HEADER_MAX} bytes (numpy writes 128)")
    encoding = "utf8" if major == 3 else "latin1"
    try:
        header = ast.literal_eval(body[start:start + hlen].decode(encoding))
        descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
        # `type(d) is int`: True is an int to isinstance, and (True, 1, 8, 8) must not reach reshape
        if type(shape) is not tuple or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError("shape")
        if type(fortran) is not bool:
            raise ValueError("fortran_order")
        dtype = np.lib.format.descr_to_dtype(descr)
    except InputError:
        raise
    except Exception as exc:
        raise InputError("bad_npy", f"unreadable .npy header: {type(exc).__name__}") from None
    if dtype.hasobject:
        raise InputError("pickled_npy", "the .npy holds Python objects (pickled data); it is refused, never unpickled. "
                         "Send float32 in [0,1] or uint8 0..255")
    return shape, dtype, fortran, start + hlen


def npy_rows(body: bytes) -> int | None:
    """Rows (first dimension) of an .npy body from its header alone, or None when it cannot be read."""
    try:
        shape, _, _, _ = npy_header(body)
    except InputError:
        return None
    return shape[0] if shape else None


def batch_too_large(rows: int, max_rows: int) -> InputError:
    return InputError("batch_too_large", f"{rows} rows; at most {max_rows} per request (see /metadata "
                      "max_batch_rows); split the batch", status=413)


def decode_npy(body: bytes, card: ModelCard, max_rows: int) -> np.ndarray:
    shape, dtype, fortran, offset = npy_header(body)
    _check_dtype(dtype)
    _check_shape(shape, card, max_rows)
    count = math.prod(shape)
    need = count * dtype.itemsize
    if len(body) - offset != need:
        raise InputError("bad_npy", f"the .npy data holds {len(body) - offset} bytes, its header promises {need} "
                         f"({shape} × {dtype.itemsize} bytes)")
    x = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    x = x.reshape(shape[::-1]).transpose() if fortran else x.reshape(shape)
    return _to_unit_float(x)


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.fields is not None or dtype.subdtype is not None:
        raise InputError("bad_dtype", f"structured dtype {dtype}; send a plain float32 or uint8 array")
    if not ((dtype.kind == "f" and dtype.itemsize == 4) or (dtype.kind == "u" and dtype.itemsize == 1)):
        raise InputError("bad_dtype", f"dtype {dtype} is not accepted; send float32 in [0,1] or uint8 0..255")


def _check_shape(shape: tuple[int, ...], card: ModelCard, max_rows: int) -> None:
    expected = tuple(card.input_shape)
    if shape and shape[0] > max_rows:  # first, as the guard does: a size refusal whatever else is wrong
        raise batch_too_large(shape[0], max_rows)
    if len(shape) != 4:
        raise InputError("bad_rank", f"input has rank {len(shape)} (shape {tuple(shape)}); expected rank 4: "
                         f"(N, {expected[0]}, {expected[1]}, {expected[2]})")
    if shape[0] == 0:
        raise InputError("empty_batch", "the batch has no rows")
    if shape[1] != expected[0]:
        raise InputError("bad_channels", f"{shape[1]} channels; the model takes {expected[0]} "
                         f"(expected shape (N, {expected[0]}, {expected[1]}, {expected[2]}))")
    if tuple(shape[2:]) != expected[1:]:
        raise InputError("bad_shape", f"images are {shape[2]}×{shape[3]}; the model takes {expected[1]}×{expected[2]} "
                         f"(expected shape (N, {expected[0]}, {expected[1]}, {expected[2]}))")


def _to_unit_float(x: np.ndarray) -> np.ndarray:
    """uint8 → /255; floats: finite and in [0, 1]. Returns float32."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise InputError("non_finite", f"{bad} values are NaN or infinite; pixels must be finite, in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError("out_of_range", f"values span [{lo:.4g}, {hi:.4g}]; send raw pixels in [0, 1] "
                         "(the service normalises them itself) or uint8 0..255 in an .npy")
    return np.ascontiguousarray(x, dtype=np.float32)


def decode_json(inputs, card: ModelCard, max_rows: int) -> np.ndarray:
    """Nested lists (N, C, H, W) of numbers in [0, 1] → float32."""
    if not isinstance(inputs, list):
        raise InputError("bad_rank", "inputs must be a nested list of shape (N, C, H, W)")
    if len(inputs) == 0:
        raise InputError("empty_batch", "the batch has no rows")
    if len(inputs) > max_rows:
        raise batch_too_large(len(inputs), max_rows)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x = np.array(inputs)
    except (ValueError, TypeError, np.exceptions.VisibleDeprecationWarning if hasattr(np, "exceptions") else ValueError):
        raise InputError("bad_shape", "inputs is ragged: every row must have the same shape (C, H, W) = "
                         f"{tuple(card.input_shape)}") from None
    except RecursionError:
        raise InputError("bad_rank", "inputs is nested too deeply; expected rank 4 (N, C, H, W)") from None
    if x.dtype.kind not in "fiu":
        raise InputError("bad_dtype", f"inputs must hold numbers only (got {'booleans' if x.dtype.kind == 'b' else 'non-numbers'})")
    _check_shape(x.shape, card, max_rows)
    if x.dtype.kind == "f":
        return _to_unit_float(x)
    return _to_unit_float(x.astype(np.float64))


def decode_image(data: bytes, card: ModelCard) -> np.ndarray:
    """A PNG or JPEG file → (1, C, H, W) float32 in [0, 1], converted to the model's channels and size."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("not_an_image", "the uploaded file is empty")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
            img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise InputError("not_an_image", "the upload is not a PNG or JPEG image") from None
        raise InputError("image_too_large", f"the image has more than {MAX_IMAGE_PIXELS} pixels", status=413) from None
    except Exception as exc:  # truncated or corrupt files raise OSError, SyntaxError, ValueError, …
        raise InputError("not_an_image", f"the image could not be decoded ({type(exc).__name__})") from None
    channels, height, width = card.input_shape
    if channels not in (1, 3):
        raise InputError("unsupported", f"image upload supports 1- or 3-channel models; this one takes {channels}", 422)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = arr[None, None] if channels == 1 else arr.transpose(2, 0, 1)[None]
    return np.ascontiguousarray(arr, dtype=np.float32)


def body_limits(settings: Settings, card: ModelCard) -> dict[str, int]:
    """Each prediction route's body limit in bytes: what max_rows rows take in its encoding, at most max_body_bytes."""
    return {route: body_limit(media, settings.max_rows, card.input_shape, settings.max_body_bytes)
            for route, media in MODEL.items()}


# ---------------------------------------------------------------- the model

def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


class Runtime:
    """One verified model directory and its ONNX Runtime session."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.card = verify_model_dir(settings.model_dir)  # ModelDirError on a missing file or sha256 mismatch
        self.session = onnx_session(settings.model_dir / ONNX, settings.ort_threads)
        self.providers = self.session.get_providers()
        # Small requests (people, single images) gain nothing from intra-op threads and lose to their wake-ups,
        # most of all on a busy machine; they get their own single-thread session.
        self.small_session = (onnx_session(settings.model_dir / ONNX, 1)
                              if settings.ort_threads > 1 and self.providers[0] == "CPUExecutionProvider"
                              else self.session)
        self.policy = settings.policy
        self.max_rows = settings.max_rows

    def logits(self, x: np.ndarray) -> np.ndarray:
        feeds = normalise(x, self.card)
        session = self.small_session if len(feeds) <= SMALL_BATCH else self.session
        outs = [session.run([self.card.output_name], {self.card.input_name: feeds[i:i + CHUNK_ROWS]})[0]
                for i in range(0, len(feeds), CHUNK_ROWS)]
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def probs(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))

    def predict_npy(self, body: bytes) -> bytes:
        """A raw .npy request body → the raw .npy answer (float32 (N, num_classes) under the policy)."""
        x = decode_npy(body, self.card, self.max_rows)
        return to_npy(apply_array(self.probs(x), self.policy))

    def metadata(self) -> dict:
        card = self.card
        meta = {
            "classes": card.classes, "num_classes": card.num_classes, "input_shape": card.input_shape,
            "normalization": card.normalization.model_dump(), "model_sha256": card.onnx_sha256,
            "mode": card.mode, "output_policy": self.policy.as_dict(), "max_batch_rows": self.max_rows,
            "max_body_bytes": self.settings.max_body_bytes, "body_limits": body_limits(self.settings, card),
            "dataset": card.dataset, "arch": card.arch,
            "test_accuracy": card.test_accuracy, "options": None if self.settings.hide_options else card.options,
            "input_dtypes": ["float32 in [0,1]", "uint8 0..255 (.npy only)"],
        }
        return meta
