"""User-facing errors: one line that names the config key (or file) and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class FlbenchError(Exception):
    """An error the user can act on: the CLI prints it as one line (no traceback) and exits with `exit_code`."""

    exit_code = 1


class ConfigError(FlbenchError, ValueError):
    """Bad input from the user. The CLI prints it as one line and exits non-zero before writing any result."""

    exit_code = 2


class DataFileError(FlbenchError):
    """A file flbench reads (checkpoint, cache, record) is unreadable as plain data; the message names it and the fix."""


class StorageError(FlbenchError):
    """Writing results failed (no space, no permission); the message names the path."""


class ClientError(FlbenchError):
    """A client failed deterministically (not an injected or transient failure): the run stops, nothing is written."""


def unknown_keys_message(prefix: str, unknown: Sequence[str], known: Iterable[str]) -> str:
    """'<prefix>.<key> is not a known key (did you mean …?); known: …' for the first unknown key (one line)."""
    known = sorted(set(known))
    key = unknown[0]

    def full(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(full(k) for k in close)}?)" if close else ""
    more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""
    name = full(key)
    return (f"{name} is not a known key{hint}{more}; known keys: {', '.join(known) or '(none)'}; remove it or fix "
            f"its spelling")


class BusyError(FlbenchError):
    """The same config is running in another process (its lock is held): exit 75 (EX_TEMPFAIL), try again later."""

    exit_code = 75
