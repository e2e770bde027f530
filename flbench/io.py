"""Where flbench keeps caches, and how it writes files so that a killed process never leaves a half-written one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: explicit override, else $FLBENCH_CACHE, else ~/.cache/flbench."""
    root = override or os.environ.get("FLBENCH_CACHE") or Path.home() / ".cache" / "flbench"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | os.PathLike, write: Any, mode: str = "wb") -> Path:
    """Write through `write(file)` to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    return atomic_write(path, lambda f: json.dump(payload, f, indent=2, sort_keys=True, default=str), mode="w")
