"""Every experiment grid names methods, protocols, scenarios and keys that exist: a misspelt or missing name fails
here in seconds rather than hours into a sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flbench.cli import CONF_DIR
from flbench.validation import validate

EXPERIMENTS = sorted((Path(CONF_DIR) / "experiment").glob("*.yaml"))


def grid(path: Path) -> dict[str, list[str]]:
    params = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("sweeper", {}).get("params") or {}
    return {key: [v.strip() for v in str(values).split(",")] for key, values in params.items()}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_grid_value_composes_and_validates(path):
    """Each value of each swept key, applied alone on top of the experiment, composes and passes validation."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="test"):
        for key, values in grid(path).items():
            for value in values:
                cfg = compose(config_name="config", overrides=[f"experiment={path.stem}", f"{key}={value}"])
                validate(OmegaConf.to_container(cfg, resolve=True))
