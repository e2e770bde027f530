"""`python -m flbench`: Hydra composes conf/ into one config and runs it (or a sweep of them with --multirun)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from flbench.errors import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("flbench")


def compose(overrides: Sequence[str] = (), job_name: str = "flbench") -> dict[str, Any]:
    """The resolved config `python -m flbench <overrides>` would run, as a plain dict (for scripts, tests and the
    deployment engine, which run experiments without Hydra's command line)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name=job_name):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    return resolved


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    quiet = logging.INFO if verbose else logging.ERROR
    for name in ("flwr", "ray", "urllib3", "filelock", "wandb"):
        logging.getLogger(name).setLevel(quiet)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def main_from_config(cfg: DictConfig) -> dict:
    """Resolve, run, print the summary table. Bad input: one line on stderr, exit code 2, nothing written."""
    from flbench.summary import print_summary  # after logging is configured: heavy imports follow
    from flbench.run import run

    setup_logging(bool(cfg.get("verbose", False)))
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if resolved.get("cache_dir"):
            os.environ["FLBENCH_CACHE"] = str(resolved["cache_dir"])
        record = run(resolved)
    except ConfigError as error:
        print(f"flbench: error: {error}", file=sys.stderr)
        sys.exit(2)
    print_summary(record)
    return record


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    main_from_config(cfg)
