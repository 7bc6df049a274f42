"""Atomic file writes: a reader sees the old file or the new one, never half of one (a crash mid-write leaves the old
file and a stray `NAME.tmp`). Torch-free, so that any package may use it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def replace_with(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the new content to a temporary file beside `path`, which then replaces `path` in one
    step (os.replace is atomic within a filesystem). For writers that want a path, such as `torch.save`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write bytes, or text as UTF-8, to `path` atomically."""
    payload = data.encode() if isinstance(data, str) else data
    replace_with(path, lambda tmp: tmp.write_bytes(payload))


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON with sorted keys (stable diffs), written atomically."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))
