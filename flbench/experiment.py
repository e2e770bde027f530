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
from flbench.algorithms.prompting import text_features_memo
from flbench.backbones.attention import attach_routers
from flbench.backbones.build import load_backbone
from flbench.backbones.clip import FrozenCLIP
from flbench.backbones.weights import backbone_image_size
from flbench.datasets import load_dataset
from flbench.datasets.base import DatasetBundle, ImageSet
from flbench.datasets.partition import partition
from flbench.engine import (AugmentedViews, check_precision, encode_views, evaluate_accuracy, predict,
                            resolve_device, train_local)
from flbench.errors import ConfigError
from flbench.features import image_features
from flbench.fl.protocols import Protocol, get_protocol
from flbench.scenarios import EvalSplit, ScenarioData, build_scenario, personal_split, summarise_clients

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
                                                     {k: v for k, v in cfg["scenario"].items() if k != "name"},
                                                     dataset_cfg=cfg["dataset"])
        if len(self.scenario.train) == 0:
            raise ConfigError(f"dataset {self.bundle.name} has no training images under scenario="
                              f"{cfg['scenario']['name']} (ImageNet-V2/-Sketch/-A/-R are test-only targets of a "
                              "cross-domain scenario, e.g. +experiment=real_imagenet_xdomain)")
        part = cfg["partition"]
        self.shards: list[np.ndarray] = partition(
            part["name"], self.scenario.train.labels, self.scenario.train.domains, int(cfg["num_clients"]),
            int(cfg["shots"]), self.seed, {k: v for k, v in part.items() if k != "name"})
        self._layout_nodes(get_protocol(cfg["protocol"]["name"]))
        # One backbone per process, moved to the device once; every method (hence every client) runs there.
        self.device = resolve_device(cfg.get("device", "auto"))
        self.precision = str(cfg.get("precision", "fp32"))
        check_precision(self.precision, self.device)
        self.backbone: FrozenCLIP = load_backbone(cfg["backbone"]).to(self.device)
        self._encoded: dict[str, Encoded | AugmentedViews] = {}
        self._personal: dict[int, tuple[EvalSplit, EvalSplit]] = {}

    # --- methods -----------------------------------------------------------------------------------------
    def new_method(self, name: str | None = None) -> PromptMethod:
        """The configured method, or method `name` at its own defaults (the zero-shot baseline): the configured
        method's hyper-parameters are its own, not another method's."""
        algo = dict(self.cfg["algorithm"])
        if name is not None and name != algo["name"]:
            algo = {}
        name = name or algo["name"]
        algo.pop("name", None)
        torch.manual_seed(derive_seed(self.seed, 0))
        method = build_method(name, self.backbone, self.scenario.train_classnames, self.bundle.templates, algo)
        method.precision = self.precision
        return method.to(self.device)  # parameters are created on the CPU (seeded generators), then moved

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
        method.reset_walk()
        if method.classnames != (classnames or self.scenario.train_classnames):
            method.set_classnames(classnames or self.scenario.train_classnames)
        return method

    # --- data --------------------------------------------------------------------------------------------
    def _layout_nodes(self, protocol: Protocol) -> None:
        """Which data clients (one per shard) train, and which federation node trains on which shards.

        Usually node i is training client i. Under unseen-clients a seeded share of the clients is held out (they
        never train; the server evaluates them); under protocol=centralized one node holds every training shard.
        """
        num_clients = len(self.shards)
        heldout: list[int] = []
        if self.scenario.unseen_fraction > 0:
            count = max(1, int(round(self.scenario.unseen_fraction * num_clients)))
            if count >= num_clients:
                raise ConfigError(f"scenario.fraction={self.scenario.unseen_fraction} with num_clients={num_clients} "
                                  "holds out every client; lower the fraction or raise num_clients")
            rng = np.random.default_rng(derive_seed(self.seed, 8))
            heldout = sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))
        self.heldout_clients: list[int] = heldout
        self.training_clients: list[int] = [c for c in range(num_clients) if c not in heldout]
        groups = [self.training_clients] if protocol.centralized else [[c] for c in self.training_clients]
        self.node_clients: list[list[int]] = groups
        self.node_shards: list[np.ndarray] = [np.sort(np.concatenate([self.shards[c] for c in g])) for g in groups]

    @property
    def num_nodes(self) -> int:
        """Federation nodes (Flower supernodes): training clients, or one under protocol=centralized."""
        return len(self.node_shards)

    def client_images(self, partition_id: int) -> ImageSet:
        """The training images of federation node `partition_id` (Flower's partition-id)."""
        return self.scenario.train.subset(self.node_shards[partition_id])

    def shard_images(self, client: int) -> ImageSet:
        """Data client `client`'s shard (== client_images(client) unless clients are held out or pooled)."""
        return self.scenario.train.subset(self.shards[client])

    @property
    def cache_views(self) -> int:
        """Augmented views cached per training image when `train.augment` is on (0: no cache while augmenting)."""
        return int(self.cfg.get("cache_views", 0) or 0) if self.cfg["train"].get("augment", False) else 0

    def use_cache(self, train: bool) -> bool:
        """Whether frozen image features can stand in for the images: the method's image side must not depend on
        trained parameters (VPT, MaPLe, PromptSRC bypass), and augmented training needs `cache_views` > 0."""
        augment = train and bool(self.cfg["train"].get("augment", False))
        return (self.method.frozen_image_side and bool(self.cfg.get("cache_features", True))
                and (not augment or self.cache_views > 0))

    def encoded(self, key: str, images: ImageSet) -> Encoded | None:
        """Frozen image features of `images`, computed on first use (or read from the feature store, which keeps
        them between processes: flbench/features.py) and kept (on the device) for the life of the process."""
        if key not in self._encoded:
            self._encoded[key] = image_features(self.method, images, int(self.cfg["eval"]["batch_size"]))
        return self._encoded[key]

    def _training_cache(self, key: str, images: ImageSet, seed_part: int) -> Encoded | AugmentedViews | None:
        if not self.use_cache(True):
            return None
        if not self.cache_views:
            return self.encoded(key, images)
        key = f"{key}/views"
        if key not in self._encoded:  # the same views in every process and round: seeded by (seed, client)
            self._encoded[key] = encode_views(self.method, images, int(self.cfg["eval"]["batch_size"]),
                                              self.cache_views, derive_seed(self.seed, 10, seed_part))
        return self._encoded[key]

    def client_cache(self, partition_id: int) -> Encoded | AugmentedViews | None:
        return self._training_cache(f"client/{partition_id}", self.client_images(partition_id), partition_id)

    def shard_cache(self, client: int) -> Encoded | AugmentedViews | None:
        return self._training_cache(f"shard/{client}", self.shard_images(client), 1_000_000 + client)

    def personal_splits(self, client: int) -> tuple[EvalSplit, EvalSplit]:
        """Client `client`'s personal (val, test) splits: drawn from the scenario's pools to match its shard's
        (class, domain) distribution, seeded per client so every process draws the same ones."""
        if client not in self._personal:
            pools = self.scenario.personal_pools
            if pools is None:
                raise ValueError(f"scenario {self.scenario.name} has no personal splits")
            shard = self.shard_images(client)
            self._personal[client] = tuple(  # type: ignore[assignment]
                personal_split(shard, pool, self.scenario.train_classnames,
                               np.random.default_rng(derive_seed(self.seed, 9, client, which)))
                for which, pool in enumerate(pools))
        return self._personal[client]

    # --- evaluation --------------------------------------------------------------------------------------
    def evaluate(self, method: PromptMethod, splits: Mapping[str, EvalSplit], prefix: str) -> dict[str, float]:
        """Accuracy of `method` on each split, switching class names as each split requires."""
        metrics = {}
        for name, split in splits.items():
            if method.classnames != split.classnames:
                method.set_classnames(split.classnames)
            cached = self._eval_cache(method, f"{prefix}/{name}", split.images)
            metrics[f"{prefix}/{name}"] = evaluate_accuracy(method, split.images, split.labels,
                                                            int(self.cfg["eval"]["batch_size"]), cached)
        return metrics

    def _shares_encoding(self, method: PromptMethod) -> bool:
        """Cached features are the process method's encodings; another method (zero-shot) may reuse them only
        when both use the default image side (the frozen CLIP image embedding)."""
        return method is self.method or (type(method).encode is PromptMethod.encode
                                         and type(self.method).encode is PromptMethod.encode)

    def _eval_cache(self, method: PromptMethod, key: str, images: ImageSet) -> Encoded | None:
        if not (self.use_cache(False) and self._shares_encoding(method)):
            return None
        for which, pool in enumerate(self.scenario.personal_pools or ()):
            if getattr(images, "parent", None) is pool:  # a personal split: rows of its pool, encoded once for all
                pooled = self.encoded(f"pool/{which}", pool)
                idx = torch.as_tensor(images.indices, device=self.device)
                return tuple(e[idx] for e in pooled) if isinstance(pooled, tuple) else pooled[idx]
        return self.encoded(key, images)

    def evaluate_personal(self, method: PromptMethod, clients: Sequence[int]) -> list[dict[str, float]]:
        """Correct/total counts of `method` (a client's own model) on each client's personal val and test split.

        Val and test go through one prediction when their features are cached, so a prompt method encodes its
        class texts once per client, not once per split."""
        results = []
        for client in clients:
            splits = self.personal_splits(client)
            if method.classnames != splits[0].classnames:
                method.set_classnames(splits[0].classnames)
            cached = [self._eval_cache(method, "", split.images) for split in splits]
            sizes = [len(split.labels) for split in splits]
            if all(c is not None for c in cached) and sum(sizes):
                joined = (tuple(torch.cat(parts) for parts in zip(*cached)) if isinstance(cached[0], tuple)
                          else torch.cat(cached))
                predicted = np.split(predict(method, None, int(self.cfg["eval"]["batch_size"]), joined), [sizes[0]])
            else:
                predicted = [predict(method, split.images, int(self.cfg["eval"]["batch_size"])) if n else
                             np.zeros(0, np.int64) for split, n in zip(splits, sizes)]
            row: dict[str, float] = {"client": client}
            for name, split, guess in zip(("val", "test"), splits, predicted):
                row[f"{name}_correct"], row[f"{name}_n"] = int((guess == split.labels).sum()), len(split.labels)
            results.append(row)
        return results

    def evaluate_unseen(self, state: Mapping[str, torch.Tensor], server_round: int) -> dict[str, float]:
        """Held-out clients (unseen-clients): the reported global model on each one's personal splits, then the
        same after local fine-tuning on its own shard (seeded per round and client)."""
        before, after = [], []
        train_cfg = dict(self.cfg["train"])
        if self.scenario.finetune_epochs is not None:
            train_cfg["epochs"] = int(self.scenario.finetune_epochs)
        for client in self.heldout_clients:
            method = self.fresh()
            method.load_partial(state)
            before += self.evaluate_personal(method, [client])
            generator = torch.Generator().manual_seed(derive_seed(self.seed, server_round, client, 5))
            method = self.fresh()
            method.load_partial(state)
            train_local(method, self.shard_images(client), train_cfg, generator, cached=self.shard_cache(client))
            after += self.evaluate_personal(method, [client])
        return {**summarise_clients(before, "unseen"), **summarise_clients(after, "unseen_finetuned")}

    def evaluate_state(self, history: Sequence[Mapping[str, torch.Tensor]], server_round: int | None = None,
                       with_personal: bool = False) -> dict[str, float]:
        """Validation and test metrics of the model the server reports after the latest aggregate in `history`
        (the aggregated shared states so far, oldest first; see PromptMethod.reported_state).

        Personal metrics are the clients' own business (they hold their local state) except before any training,
        when every client's model is the initial one: `with_personal` then computes them here. Held-out clients
        (unseen-clients) are always evaluated here: they never join the federation.
        """
        server_round = len(history) - 1 if server_round is None else server_round
        method = self.fresh()
        state = method.reported_state(history)
        method.load_partial(state)
        with text_features_memo():  # the class features of every split and batch encoded once
            metrics = {**self.evaluate(method, self.scenario.val, "val"),
                       **self.evaluate(method, self.scenario.test, "test")}
        if with_personal and self.scenario.personal:
            metrics.update(summarise_clients(self.evaluate_personal(method, self.training_clients), "personal"))
        if self.heldout_clients:
            metrics.update(self.evaluate_unseen(state, server_round))
        return self.scenario.complete(metrics)

    def zeroshot_metrics(self) -> dict[str, float]:
        """Zero-shot CLIP (the dataset's first template) on every split the scenario reports, by metric name."""
        zeroshot = self.new_method("zeroshot")
        metrics = self.evaluate(zeroshot, self.scenario.test, "test")
        if self.scenario.personal:
            metrics.update(summarise_clients(self.evaluate_personal(zeroshot, self.training_clients), "personal"))
        if self.heldout_clients:
            metrics.update(summarise_clients(self.evaluate_personal(zeroshot, self.heldout_clients), "unseen"))
        metrics = self.scenario.complete(metrics)
        return {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/") and "/client/" not in k}


_PROCESS_EXPERIMENTS: dict[str, Experiment] = {}


def get_experiment(cfg: Mapping[str, Any]) -> Experiment:
    key = config_hash(cfg)
    if key not in _PROCESS_EXPERIMENTS:
        _PROCESS_EXPERIMENTS.clear()  # one experiment per process at a time: sweeps must not pile up backbones
        _PROCESS_EXPERIMENTS[key] = Experiment(cfg)
    return _PROCESS_EXPERIMENTS[key]
