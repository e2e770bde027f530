"""Everything one experiment needs at run time, built once per process from the resolved config.

The Flower apps (server and every simulated client in a process) look the experiment up by config hash, so the
dataset, the partition, the frozen backbone and the cached image features exist once per process, never per client.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch

from flbench.algorithms.base import Encoded, PromptMethod, build_method
from flbench.backbones.attention import attach_routers
from flbench.backbones.clip import FrozenCLIP, load_backbone
from flbench.backbones.weights import backbone_image_size
from flbench.datasets import load_dataset
from flbench.datasets.base import DatasetBundle, ImageSet
from flbench.datasets.partition import partition
from flbench.engine import encode_all, evaluate_accuracy
from flbench.errors import ConfigError
from flbench.scenarios import EvalSplit, ScenarioData, build_scenario

log = logging.getLogger(__name__)


def config_hash(cfg: Mapping[str, Any]) -> str:
    """Stable hash of a resolved config (plain dict), used for record names and the process cache."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, identical in every process (unlike Python's salted hash())."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Experiment:
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.seed = int(cfg["seed"])
        # the dataset first (a wrong data root fails before large weights load), at the backbone's resolution
        self.bundle: DatasetBundle = load_dataset(cfg["dataset"], image_size=backbone_image_size(cfg["backbone"]))
        self.scenario: ScenarioData = build_scenario(cfg["scenario"]["name"], self.bundle,
                                                     {k: v for k, v in cfg["scenario"].items() if k != "name"})
        if len(self.scenario.train) == 0:
            raise ConfigError(f"dataset {self.bundle.name} has no training images under scenario="
                              f"{cfg['scenario']['name']} (ImageNet-V2/-Sketch/-A/-R are test-only targets of a "
                              "cross-domain scenario, e.g. +experiment=real_imagenet_xdomain)")
        part = cfg["partition"]
        self.shards: list[np.ndarray] = partition(
            part["name"], self.scenario.train.labels, self.scenario.train.domains, int(cfg["num_clients"]),
            int(cfg["shots"]), self.seed, {k: v for k, v in part.items() if k != "name"})
        self.backbone: FrozenCLIP = load_backbone(cfg["backbone"])
        self._encoded: dict[str, Encoded] = {}

    # --- methods -----------------------------------------------------------------------------------------
    def new_method(self, name: str | None = None) -> PromptMethod:
        algo = dict(self.cfg["algorithm"])
        name = name or algo.pop("name")
        algo.pop("name", None)
        torch.manual_seed(derive_seed(self.seed, 0))
        return build_method(name, self.backbone, self.scenario.train_classnames, self.bundle.templates, algo)

    @cached_property
    def method(self) -> PromptMethod:
        """The one method instance of this process; `fresh()` resets it before each use."""
        return attach_routers(self.new_method(), self.backbone)  # backbone.attention.train_routers (routed_kv)

    @cached_property
    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.method.state_dict().items()}

    def fresh(self, classnames: list[str] | None = None) -> PromptMethod:
        """The process's method, reset to its initial state (so no client ever sees another client's leftovers)."""
        method = self.method
        method.load_state_dict(self.initial_state)
        if method.classnames != (classnames or self.scenario.train_classnames):
            method.set_classnames(classnames or self.scenario.train_classnames)
        return method

    # --- data --------------------------------------------------------------------------------------------
    def client_images(self, partition_id: int) -> ImageSet:
        return self.scenario.train.subset(self.shards[partition_id])

    def use_cache(self, train: bool) -> bool:
        augment = train and bool(self.cfg["train"].get("augment", False))
        return self.method.frozen_image_side and bool(self.cfg.get("cache_features", True)) and not augment

    def encoded(self, key: str, images: ImageSet) -> Encoded | None:
        """Frozen image features of `images`, computed on first use and kept for the life of the process."""
        if key not in self._encoded:
            self._encoded[key] = encode_all(self.method, images, int(self.cfg["eval"]["batch_size"]))
        return self._encoded[key]

    def client_cache(self, partition_id: int) -> Encoded | None:
        return self.encoded(f"client/{partition_id}", self.client_images(partition_id)) if self.use_cache(True) \
            else None

    # --- evaluation --------------------------------------------------------------------------------------
    def evaluate(self, method: PromptMethod, splits: Mapping[str, EvalSplit], prefix: str) -> dict[str, float]:
        """Accuracy of `method` on each split, switching class names as each split requires."""
        metrics = {}
        for name, split in splits.items():
            if method.classnames != split.classnames:
                method.set_classnames(split.classnames)
            cached = self.encoded(f"{prefix}/{name}", split.images) if self.use_cache(False) else None
            metrics[f"{prefix}/{name}"] = evaluate_accuracy(method, split.images, split.labels,
                                                            int(self.cfg["eval"]["batch_size"]), cached)
        return metrics

    def evaluate_state(self, history: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Validation and test metrics of the model the server reports after the latest aggregate in `history`
        (the aggregated shared states so far, oldest first; see PromptMethod.reported_state)."""
        method = self.fresh()
        method.load_partial(method.reported_state(history))
        metrics = {**self.evaluate(method, self.scenario.val, "val"), **self.evaluate(method, self.scenario.test, "test")}
        for name, value in self.scenario.derived({k: metrics[f"test/{k}"] for k in self.scenario.test}).items():
            metrics[f"test/{name}"] = value
        return metrics


_PROCESS_EXPERIMENTS: dict[str, Experiment] = {}


def get_experiment(cfg: Mapping[str, Any]) -> Experiment:
    key = config_hash(cfg)
    if key not in _PROCESS_EXPERIMENTS:
        _PROCESS_EXPERIMENTS.clear()  # one experiment per process at a time: sweeps must not pile up backbones
        _PROCESS_EXPERIMENTS[key] = Experiment(cfg)
    return _PROCESS_EXPERIMENTS[key]
