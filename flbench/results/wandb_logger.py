"""Weights & Biases logging of one run: config, per-round metrics, final named metrics. Offline unless configured.

`logger.mode=offline` (the default) writes the run locally (sync it later with `wandb sync`); `online` needs an
account; `disabled` writes nothing. Every run ends with `wandb.finish()` so Hydra multirun jobs stay separate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


def log_run(cfg: Mapping[str, Any], history: Sequence[Mapping[str, float]], record: Mapping[str, Any]) -> str | None:
    """Log a finished run; returns the local run folder (or None when logging is off)."""
    logger = cfg.get("logger") or {}
    if logger.get("name", "none") != "wandb" or logger.get("mode") == "disabled":
        return None
    import wandb

    run_dir = Path(logger.get("dir") or Path(cfg["results_dir"]) / "wandb")
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=logger.get("project", "flbench"), entity=logger.get("entity"),
                     group=sweep_group(logger), name=record["name"], mode=logger.get("mode", "offline"),
                     dir=str(run_dir), config=dict(cfg), job_type="run", reinit="finish_previous")
    try:
        for row in history:
            run.log({k: v for k, v in row.items() if k != "round"}, step=int(row["round"]))
        for metric, selections in record["metrics"].items():
            for selection, value in selections.items():
                run.summary[f"{metric}/{selection}"] = value
        for key, value in record["costs"].items():
            run.summary[f"cost/{key}"] = value
        run.summary["config_hash"] = record["config_hash"]
        return str(Path(run.dir).parent)
    finally:
        run.finish()
