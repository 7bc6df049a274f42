"""An endpoint's .npy answer, read within bounds: the body may hold at most what (rows, classes) float64 takes,
and the header is checked (dtype, shape) before a byte of the array is allocated, so a tiny body whose header
claims shape (10^12, 10) is an `OracleAnswerError`, never a MemoryError."""
from __future__ import annotations

import io

import numpy as np

from audit.answers import check_dtype_shape
from audit.errors import OracleAnswerError

NPY_HEADER_LIMIT = 4096  # numpy writes a 2-D float array's header in 128 bytes; 4 KiB bounds the header parse
WIDEST_ITEM = 8  # float64, the widest dtype an answer may have


def max_answer_bytes(rows: int, classes: int) -> int:
    """The most bytes an honest answer to `rows` rows of `classes` classes takes: header + float64 data."""
    return NPY_HEADER_LIMIT + rows * classes * WIDEST_ITEM


def decode_answer(body: bytes, rows: int, classes: int, source: str) -> np.ndarray:
    """The (rows, classes) float array in an .npy body, or an OracleAnswerError saying what is wrong with it."""
    fp = io.BytesIO(body)
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp, max_header_size=NPY_HEADER_LIMIT)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp, max_header_size=NPY_HEADER_LIMIT)
        else:  # 3.0 exists only for structured dtypes with non-latin-1 names, never a float array
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except (ValueError, SyntaxError, TypeError, KeyError) as exc:
        raise OracleAnswerError(f"{source} returned something that is not a readable .npy array ({exc}); "
                                "nothing of this batch was cached.") from None
    check_dtype_shape(dtype, shape, rows, classes, source)
    offset, need = fp.tell(), rows * classes * dtype.itemsize
    if len(body) - offset != need:
        raise OracleAnswerError(f"{source} returned an .npy whose data holds {len(body) - offset} bytes; its header "
                                f"promises {need} ({shape} × {dtype.itemsize} bytes). Nothing of this batch was "
                                "cached.")
    data = np.frombuffer(body, dtype=dtype, count=rows * classes, offset=offset)
    return data.reshape(shape, order="F" if fortran else "C")
