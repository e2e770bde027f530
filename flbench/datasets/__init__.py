"""Dataset families, found by `dataset.name`. Each family module registers a loader returning a DatasetBundle."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from flbench.datasets.base import DatasetBundle
from flbench.errors import ConfigError

Loader = Callable[..., DatasetBundle]

# name → "module:function"; imported lazily so a user without (say) torchvision datasets still runs the suite.
LOADERS: dict[str, str] = {
    "synthetic": "flbench.datasets.synthetic:load_synthetic",
}


def load_dataset(cfg: Mapping[str, Any]) -> DatasetBundle:
    options = dict(cfg)
    name = options.pop("name", None)
    if name not in LOADERS:
        raise ConfigError(f"dataset.name={name!r} is unknown; choose one of {sorted(LOADERS)}")
    module, function = LOADERS[name].split(":")
    return getattr(importlib.import_module(module), function)(**options)
