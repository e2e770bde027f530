"""Small, fast configurations for tests, composed from the real conf/ files through Hydra's compose API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch

from flbench.backbones.clip import FrozenCLIP
from flbench.backbones.tiny import TINY_CONFIGS
from flbench.cli import compose

# A short pretraining (~15 s, cached): far weaker than the default tiny CLIP, but above chance.
TEST_PRETRAIN = "{steps: 40, batch_size: 64, corpus: 2048, warmup: 5}"

SMALL = [
    "dataset.domains=[photo,noisy]", "dataset.train_per_class=4", "dataset.val_per_class=1",
    "dataset.test_per_class=2", "shots=2", "num_clients=4", "num_rounds=2", "logger.mode=disabled",
    f"+backbone.pretrain={TEST_PRETRAIN}",
]


def compose_config(overrides: list[str] | None = None, results_dir: Path | None = None,
                   small: bool = True) -> dict[str, Any]:
    extra = list(overrides or [])
    if results_dir is not None:
        extra.append(f"results_dir={results_dir}")
    return compose((SMALL if small else []) + extra, job_name="test")


def random_tiny(name: str = "tiny", seed: int = 0) -> FrozenCLIP:
    """An untrained tiny CLIP: enough for tests of mechanics (gradients, states, shapes)."""
    torch.manual_seed(seed)
    return FrozenCLIP(open_clip.CLIP(**TINY_CONFIGS[name]), name)
