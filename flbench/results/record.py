"""RunRecords: one JSON file per run, named by the hash of the resolved config, written atomically.

A record is the unit every table is computed from, so it carries everything needed to trust and reproduce a
number: the resolved config and its hash, the seed, the code version, per-round metrics, the final named metrics
(best-by-validation and last round), costs, and the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import socket
import subprocess
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from flbench import __version__
from flbench.errors import BusyError
from flbench.io import atomic_write_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Keys that change where or how a run is executed or logged, but never its numbers (the device changes the last
# bits of floating-point sums, not what a run measures; the record's environment names the GPU).
NON_RESULT_KEYS = ("results_dir", "force", "logger", "backend", "verbose", "cache_dir", "eval", "checkpoint", "device")
# Keys added after records existed, at the values that reproduce those records: left out of the hash there, so
# older records keep their hashes (and are still found, skipped and resumed).
LATER_DEFAULTS = {"precision": "fp32", "cache_views": 0}


def result_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that determines the results (what the record hash covers)."""
    return {k: v for k, v in cfg.items()
            if k not in NON_RESULT_KEYS and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


def record_path(results_dir: str | Path, config_hash: str) -> Path:
    return Path(results_dir) / "records" / f"{config_hash}.json"


def load_record(path: str | Path) -> dict[str, Any] | None:
    """A complete record, or None when the file is missing or not a complete record (never trust a partial one)."""
    try:  # JSON: a record is data, never code (a crafted file is at most an unreadable one)
        record = json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return record if isinstance(record, dict) and record.get("complete") is True else None


def write_record(path: str | Path, record: Mapping[str, Any]) -> Path:
    return atomic_write_json(path, {**record, "complete": True})


@contextlib.contextmanager
def run_lock(results_dir: str | Path, config_hash: str) -> Iterator[None]:
    """Hold `<results_dir>/locks/<hash>.lock` (an flock: released by the kernel when the process dies, kill -9
    included) for as long as this config runs, so that two identical runs never both do the work; the second
    stops at once, saying who holds the lock."""
    path = Path(results_dir) / "locks" / f"{config_hash}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BusyError(f"this config (hash {config_hash}) is already running: {holder} holds {path}; wait for "
                            "it to finish (its record is then reused) or choose another results_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def code_version() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    version: dict[str, Any] = {"flbench": __version__, "git_commit": None, "git_dirty": None}
    try:
        version["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                               text=True, timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=5, check=True).stdout
        version["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (installed package): the version string is all there is
    return version


def environment() -> dict[str, Any]:
    import torch

    packages = {}
    for name in ("torch", "torchvision", "triton", "open_clip_torch", "flwr", "ray", "hydra-core", "wandb", "numpy"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": packages,
            "cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
