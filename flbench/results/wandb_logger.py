"""Weights & Biases logging of one run, live: the run starts before the federation and logs each round as it ends.

`logger.mode=offline` (the default) writes the run locally — `<results_dir>/wandb/offline-run-*`, or
`<logger.dir>/wandb/...` — and prints the `wandb sync` command that uploads it; `online` needs W&B credentials;
`disabled` writes nothing. A run carries tags for method, protocol, scenario, dataset and backbone (plus
`logger.tags`), zero-shot numbers in its summary from the start, and in a Hydra multirun the sweep's group. A job
whose record already exists is skipped, yet still logged (job type `skipped`, replayed from its record), so a sweep's
group in W&B is always complete. Every run ends with `wandb.finish()` (Hydra multirun jobs stay separate), and its
run file is read back: an incomplete one (a full disk leaves 0-byte files without any error from wandb) is an error.
"""

from __future__ import annotations

import logging
import netrc
import os
import struct
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from flbench.errors import ConfigError, StorageError
from flbench.io import check_writable

log = logging.getLogger("flbench")

MODES = ("offline", "online", "disabled")
TAG_GROUPS = (("method", "algorithm"), ("protocol", "protocol"), ("scenario", "scenario"), ("dataset", "dataset"),
              ("backbone", "backbone"))


# --- settings, checked before any work ------------------------------------------------------------------------------
def logging_enabled(cfg: Mapping[str, Any]) -> bool:
    logger = cfg.get("logger") or {}
    return logger.get("name", "none") == "wandb" and logger.get("mode", "offline") != "disabled"


def check_logger(cfg: Mapping[str, Any]) -> None:
    """Refuse logger settings that would fail only after the run (W&B starts before the federation, but the
    record's hash does not cover `logger`: a run that crashed on them would be skipped on rerun, never logged)."""
    logger = cfg.get("logger") or {}
    name = logger.get("name", "none")
    if name not in ("wandb", "none"):
        raise ConfigError(f"logger.name={name!r} is unknown; choose logger=wandb or logger=none")
    if name == "none":
        return
    mode = logger.get("mode", "offline")
    if mode not in MODES:
        raise ConfigError(f"logger.mode={mode!r} is unknown; choose one of {', '.join(MODES)}")
    if mode == "disabled":
        return
    for key in ("project", "entity", "group", "dir"):
        value = logger.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"logger.{key}={value!r} must be a non-empty string (or null)")
    tags = logger.get("tags") or []
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise ConfigError(f"logger.tags={tags!r} must be a list of strings, e.g. logger.tags=[ablation]")
    _check_with_wandb("logger.project", project=logger.get("project") or "flbench")
    _check_with_wandb("logger.tags", run_tags=tuple(run_tags(cfg)))
    if mode == "online" and not _has_credentials():
        raise ConfigError("logger.mode=online needs W&B credentials (run `wandb login` or set WANDB_API_KEY); "
                          "or keep logger.mode=offline and upload later with `wandb sync`")
    check_writable("logger.dir" if logger.get("dir") else "results_dir", wandb_root(cfg))


def _check_with_wandb(key: str, **setting: Any) -> None:
    """W&B's own rules for the value (project names, tag lengths), so they match what wandb.init would refuse."""
    from wandb.sdk.wandb_settings import Settings

    try:
        Settings(**setting)
    except Exception as error:  # wandb raises UsageError or pydantic's ValidationError
        reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
        reason = reason.split(" [type=")[0].removeprefix("Value error, ")
        raise ConfigError(f"{key}: {reason}; fix or remove it") from None


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_root(cfg: Mapping[str, Any]) -> Path:
    """The folder handed to wandb.init(dir=...): W&B puts its runs in `<it>/wandb/`. By default the results folder
    itself, so runs land in `<results_dir>/wandb/offline-run-*` (not `<results_dir>/wandb/wandb/...`)."""
    logger = cfg.get("logger") or {}
    return Path(logger.get("dir") or cfg["results_dir"]).expanduser()


def run_tags(cfg: Mapping[str, Any]) -> list[str]:
    """`method:coop`, `protocol:fedavg`, `scenario:...`, `dataset:...`, `backbone:...`, then `logger.tags`."""
    tags = [f"{label}:{(cfg.get(group) or {}).get('name')}" for label, group in TAG_GROUPS
            if (cfg.get(group) or {}).get("name")]
    return tags + [str(t) for t in (cfg.get("logger") or {}).get("tags") or []]


def sweep_group(logger: Mapping[str, Any]) -> str | None:
    """The W&B group of a run: `logger.group` if set; in a Hydra multirun, the experiment's name (else the sweep
    folder's name), so that all jobs of one sweep land in one group; None for a single run."""
    if logger.get("group"):
        return str(logger["group"])
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency; library use without it still logs
        return None
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    experiment = hydra_cfg.runtime.choices.get("experiment")
    return str(experiment) if experiment else Path(hydra_cfg.sweep.dir).name


# --- one run --------------------------------------------------------------------------------------------------------
class WandbSession:
    """The W&B run of one experiment. With logging off every method does nothing, so callers need no branches."""

    def __init__(self, run: Any = None, mode: str = "offline") -> None:
        self.run = run
        self.mode = mode
        self.logged_round = -1

    @property
    def folder(self) -> str | None:
        return str(Path(self.run.dir).parent) if self.run is not None else None

    def info(self) -> dict[str, Any] | None:
        """What a record keeps about its W&B run (so a report's leaderboard can join the sweep's group)."""
        if self.run is None:
            return None
        return {"id": self.run.id, "group": self.run.group or None, "project": self.run.project,
                "mode": "offline" if self.run.offline else "online"}

    def log_rounds(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Log every row not logged yet (rows restored from a checkpoint first, then the round that just ended)."""
        if self.run is None:
            return
        for row in rows:
            step = int(row["round"])
            if step > self.logged_round:
                self.run.log({k: v for k, v in row.items() if k != "round"}, step=step)
                self.logged_round = step

    def finish(self, record: Mapping[str, Any]) -> str | None:
        """Final metrics and costs into the summary, finish, and check that the run file is complete."""
        if self.run is None:
            return None
        self.log_rounds(record.get("history") or [])
        summary = self.run.summary
        for metric, selections in record["metrics"].items():
            for selection, value in selections.items():
                summary[f"{metric}/{selection}"] = value
        for key, value in record["costs"].items():
            summary[f"cost/{key}"] = value
        summary["config_hash"] = record["config_hash"]
        folder = self.folder
        self.run.finish()
        self.run = None
        check_run_folder(folder)
        log.debug("W&B run (%s) in %s%s", self.mode, folder,
                 f" — upload it with: wandb sync {folder}" if self.mode == "offline" else "")
        return folder

    def abort(self, exit_code: int = 1) -> None:
        """The run failed or was interrupted: mark the W&B run failed (never leave it 'running' or 'finished')."""
        if self.run is not None:
            run, self.run = self.run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as error:  # the original failure is the one to report
                log.warning("W&B run could not be closed: %s", error)


def start_session(cfg: Mapping[str, Any], name: str, zeroshot: Mapping[str, float] | None = None,
                  job_type: str = "run") -> WandbSession:
    """Start the W&B run of one experiment (before its federation, so rounds appear as they end)."""
    if not logging_enabled(cfg):
        return WandbSession()
    import wandb

    logger = cfg["logger"]
    root = wandb_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        run = wandb.init(project=logger.get("project") or "flbench", entity=logger.get("entity"),
                         group=sweep_group(logger), name=name, mode=logger.get("mode", "offline"), dir=str(root),
                         config=dict(cfg), job_type=job_type, tags=run_tags(cfg) + ([job_type] if job_type != "run"
                                                                                    else []),
                         reinit="finish_previous")
    except Exception as error:
        raise StorageError(f"W&B could not start a run in {root}: {error}") from error
    if run.disabled:  # WANDB_MODE=disabled in the environment overrides logger.mode
        return WandbSession()
    session = WandbSession(run, "offline" if run.offline else "online")
    for metric, value in (zeroshot or {}).items():
        run.summary[f"zeroshot/{metric}"] = value
    return session


def log_skipped(cfg: Mapping[str, Any], record: Mapping[str, Any]) -> str | None:
    """A skipped job's W&B run, replayed from its record: the sweep's group then holds every job."""
    session = start_session(cfg, record["name"], record.get("zeroshot"), job_type="skipped")
    if session.run is not None:
        session.run.summary["skipped"] = True
    return session.finish(record)


# --- reading a run file back ----------------------------------------------------------------------------------------
WANDB_MAGIC = b":W&B"
BLOCK_SIZE, RECORD_HEADER = 32768, 7  # W&B's run file: a LevelDB-style log of protobuf records in 32 KiB blocks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def run_file_records(path: str | Path) -> list[bytes]:
    """The records of a `.wandb` run file (data only: protobuf bytes, nothing executed). Raises ValueError when the
    file is not a W&B run file or ends inside a record."""
    data = Path(path).read_bytes()
    if data[:4] != WANDB_MAGIC:
        raise ValueError("not a W&B run file (0 bytes or a foreign header)")
    records, pending, pos = [], b"", RECORD_HEADER
    while pos + RECORD_HEADER <= len(data):
        left = BLOCK_SIZE - pos % BLOCK_SIZE
        if left < RECORD_HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + RECORD_HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + RECORD_HEADER:pos + RECORD_HEADER + length]
        if len(chunk) < length or kind not in (FULL, FIRST, MIDDLE, LAST):
            raise ValueError(f"the file ends inside a record at byte {pos}")
        pos += RECORD_HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        else:
            records.append(pending + chunk)
    return records


def run_file_complete(path: str | Path) -> bool:
    """True when the run file holds W&B's exit record (written by wandb.finish once everything before it is in)."""
    from wandb.proto import wandb_internal_pb2

    try:
        records = run_file_records(path)
    except (OSError, ValueError):
        return False
    for data in reversed(records):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(data)
        except Exception:  # protobuf's DecodeError: a damaged record
            return False
        if record.WhichOneof("record_type") == "exit":
            return True
    return False


def check_run_folder(folder: str | Path, wait_s: float = 5.0) -> None:
    """Raise StorageError unless the run folder's `.wandb` file is complete (full disk, failed write). W&B's service
    process may still be writing the last records when `finish()` returns: wait up to `wait_s` for them."""
    deadline = time.monotonic() + wait_s
    files = sorted(Path(folder).glob("run-*.wandb"))
    while not (files and run_file_complete(files[0])):
        if time.monotonic() > deadline:
            name = files[0].name if files else "run-*.wandb"
            raise StorageError(f"the W&B run in {folder} is incomplete ({name} is empty or truncated: is the disk "
                           f"full?); the record was written; free space, delete that folder and rerun the same "
                           f"command: the run is skipped and logged to W&B from its record")
        time.sleep(0.1)
        files = sorted(Path(folder).glob("run-*.wandb"))
