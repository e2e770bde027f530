"""Where flbench keeps caches, and how it writes files so that a killed process never leaves a half-written one."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from flbench.errors import ConfigError, DataFileError, StorageError


def switched_on(env: str) -> bool:
    """An on/off environment switch that is on unless set to 0/false/no/off (the exact shortcuts' old-vs-new switches:
    FLBENCH_TRIM_TEXT, FLBENCH_SHARE_PREFIX, FLBENCH_PACK_TEXT, FLBENCH_FEATURE_STORE, FLBENCH_TEXT_MEMO)."""
    return os.environ.get(env, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: explicit override, else $FLBENCH_CACHE, else ~/.cache/flbench."""
    root = override or os.environ.get("FLBENCH_CACHE") or Path.home() / ".cache" / "flbench"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Any, mode: str = "wb") -> Path:
    """Write through `write(file)` to a temp file in the same folder, fsync, then rename over `path`.

    The file gets the permissions of a plainly created one (0666 less the umask), not mkstemp's 0600, so colleagues
    sharing a results folder can read it. A full disk or a missing permission is a StorageError naming the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise StorageError(_storage_message(path, error)) from error
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if _is_storage_failure(error):
            raise StorageError(_storage_message(path, error)) from error
        raise
    return path


def _is_storage_failure(error: BaseException) -> bool:
    """ENOSPC and friends, also when a writer (torch.save) wrapped them in a RuntimeError of its own."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS,
                                                          errno.EPERM):
            return True
        text = str(error)
        if isinstance(error, RuntimeError) and ("unexpected pos" in text or "No space left" in text):
            return True
        error = error.__cause__ or error.__context__
    return False


def _storage_message(path: Path, error: BaseException) -> str:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
        reason = "the write stopped short (is the disk full?)"
    return f"cannot write {path}: {reason}; free space or choose another folder (results_dir=..., cache_dir=...)"


def load_torch_data(path: str | os.PathLike, what: str, fix: str) -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, so no file can run code when read.
    Anything else — a corrupt file, or a pickle that names a class or function — is a DataFileError naming the
    file, the kind of file (`what`) and the `fix`."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 — unpickling errors have many types
        raise DataFileError(f"{what} {path} is not a plain-data file ({_load_failure(error)}); {fix}") from error


def _load_failure(error: Exception) -> str:
    """Why torch refused a file, in a few words (torch's own text advises turning the safety off: never repeat it)."""
    import pickle

    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "GLOBAL" in text:
        blocked = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
        name = blocked.split("GLOBAL", 1)[1].split()[0] if blocked else "an object"
        return f"it names {name}, which is code, not data"
    return f"{type(error).__name__}: {(text.strip().splitlines() or [''])[0][:120]}"


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    return atomic_write(path, lambda f: json.dump(payload, f, indent=2, sort_keys=True, default=str), mode="w")


def check_writable(key: str, folder: Any) -> None:
    """`folder` (or the nearest folder above it that exists, where it would be created) is writable."""
    if folder is None or not str(folder).strip():
        raise ConfigError(f"{key}={folder!r} must name a folder (e.g. {key}=results)")
    path = Path(str(folder)).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={folder}: {existing} is a file, not a folder; choose another {key}")
    try:  # an anonymous temporary file: gone when closed, so nothing is left behind (root ignores mode bits, and a
        # read-only mount says so only when written to)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(f"{key}={folder}: {existing} is not writable ({error.strerror}); choose another {key} or fix "
                          "its permissions") from None
