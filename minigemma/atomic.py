"""Atomic writes: a file is either its old self or its whole new self, never half-written.

Every file the package writes (checkpoints, caches, fetched weights, benchmark tables, notebooks)
goes through `write_atomic`: the bytes go to a temporary file beside the target, are flushed to
disk, and the file is renamed over the target with `os.replace` (atomic on POSIX and Windows). A crash or Ctrl-C in the middle
leaves the old file, or none, and no temporary file behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[Path], object]) -> Path:
    """Write `data` to `path` atomically and return the path.

    data: bytes, a str (written as UTF-8), or a function `write(tmp_path)` that writes the file
          itself (e.g. `lambda tmp: save_file(state, str(tmp))`). The parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        with open(tmp, "rb+") as f:  # on disk before the rename: a power cut leaves the old file, not an empty one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
