"""Scenarios: which data trains, which data evaluates, under which class names, and what gets reported.

A scenario turns a `DatasetBundle` into a `ScenarioData`. Evaluation splits come in pairs — validation (used only to
select the reported round) and test (reported) — under the same metric names, so no number is ever test-selected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flbench.datasets.base import DatasetBundle, ImageSet
from flbench.metrics import harmonic_mean
from flbench.errors import ConfigError


@dataclass
class EvalSplit:
    """Images evaluated under `classnames`; `labels` index into `classnames`."""

    images: ImageSet
    classnames: list[str]
    labels: np.ndarray


@dataclass
class ScenarioData:
    name: str
    train: ImageSet  # the pool that partitions split over clients
    train_classnames: list[str]
    val: dict[str, EvalSplit]  # metric name → validation split (selection only)
    test: dict[str, EvalSplit]  # metric name → test split (reported)
    selection: str  # the validation metric that picks the reported round
    derived: Callable[[Mapping[str, float]], dict[str, float]] = field(default=lambda metrics: {})

    @property
    def reported(self) -> list[str]:
        return list(self.test) + list(self.derived({k: 0.0 for k in self.test}))


SCENARIOS: dict[str, Callable[..., ScenarioData]] = {}


def register(name: str) -> Callable[[Callable[..., ScenarioData]], Callable[..., ScenarioData]]:
    def wrap(fn: Callable[..., ScenarioData]) -> Callable[..., ScenarioData]:
        SCENARIOS[name] = fn
        return fn
    return wrap


def whole(images: ImageSet, classnames: list[str]) -> EvalSplit:
    return EvalSplit(images, classnames, images.labels)


def class_subset(images: ImageSet, classnames: list[str], keep: list[int]) -> EvalSplit:
    """The images of classes `keep`, relabelled 0..len(keep)-1 and named accordingly."""
    lookup = np.full(len(classnames), -1)
    lookup[keep] = np.arange(len(keep))
    idx = np.flatnonzero(np.isin(images.labels, keep))
    subset = images.subset(idx)
    return EvalSplit(subset, [classnames[k] for k in keep], lookup[subset.labels])


@register("global")
def global_(bundle: DatasetBundle, **_: Any) -> ScenarioData:
    """The aggregated model on the full test split; per-domain accuracy as well when there are several domains."""
    test = {"global": whole(bundle.test, bundle.classnames)}
    if len(bundle.domain_names) > 1:
        for d, domain in enumerate(bundle.domain_names):
            idx = np.flatnonzero(bundle.test.domains == d)
            test[f"domain/{domain}"] = whole(bundle.test.subset(idx), bundle.classnames)
    return ScenarioData("global", bundle.train, bundle.classnames, val={"global": whole(bundle.val, bundle.classnames)},
                        test=test, selection="val/global")


@register("base2novel")
def base2novel(bundle: DatasetBundle, **_: Any) -> ScenarioData:
    """Train on base classes (first ⌈C/2⌉ labels); test base and novel separately, each under its own names."""
    C = bundle.num_classes
    base, novel = list(range((C + 1) // 2)), list(range((C + 1) // 2, C))
    train_idx = np.flatnonzero(np.isin(bundle.train.labels, base))
    return ScenarioData(
        "base2novel", bundle.train.subset(train_idx), [bundle.classnames[i] for i in base],
        val={"base": class_subset(bundle.val, bundle.classnames, base)},
        test={"base": class_subset(bundle.test, bundle.classnames, base),
              "novel": class_subset(bundle.test, bundle.classnames, novel)},
        selection="val/base",
        derived=lambda m: {"hm": harmonic_mean(m["base"], m["novel"])})


def build_scenario(name: str, bundle: DatasetBundle, options: Mapping[str, Any] | None = None) -> ScenarioData:
    if name not in SCENARIOS:
        raise ConfigError(f"scenario.name={name!r} is unknown; choose one of {sorted(SCENARIOS)}")
    return SCENARIOS[name](bundle, **dict(options or {}))
