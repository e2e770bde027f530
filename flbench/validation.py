"""Checks a resolved config before any work starts, so bad input fails in one line that names the key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flbench.algorithms.base import method_class
from flbench.datasets import LOADERS
from flbench.datasets.partition import PARTITIONS
from flbench.errors import ConfigError
from flbench.fl.protocols import PROTOCOLS
from flbench.scenarios import SCENARIOS

REQUIRED = ("seed", "shots", "num_clients", "num_rounds", "dataset", "backbone", "algorithm", "protocol", "partition",
            "scenario", "backend", "train", "eval", "results_dir")


def _number(cfg: Mapping[str, Any], path: str, low: float, inclusive: bool = True, integer: bool = False) -> None:
    value: Any = cfg
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ConfigError(f"{path}={value!r} must be {'an integer' if integer else 'a number'}")
    if value < low or (value == low and not inclusive):
        raise ConfigError(f"{path}={value} must be {'≥' if inclusive else '>'} {low}")


def _named(cfg: Mapping[str, Any], group: str, known: Mapping[str, Any] | list[str]) -> None:
    name = (cfg.get(group) or {}).get("name")
    if name not in known:
        raise ConfigError(f"{group}.name={name!r} is unknown; choose one of {sorted(known)}")


def validate(cfg: Mapping[str, Any]) -> None:
    missing = [key for key in REQUIRED if key not in cfg]
    if missing:
        raise ConfigError(f"config is missing {missing}; start from conf/config.yaml or `python -m flbench --cfg job`")
    for path, low, inclusive, integer in (("seed", 0, True, True), ("shots", 1, True, True),
                                          ("num_clients", 1, True, True), ("num_rounds", 0, True, True),
                                          ("train.lr", 0, False, False), ("train.batch_size", 1, True, True),
                                          ("train.epochs", 1, True, True), ("eval.batch_size", 1, True, True),
                                          ("partition.alpha", 0, False, False), ("partition.min_samples", 1, True, True),
                                          ("protocol.fraction", 0, False, False)):
        _number(cfg, path, low, inclusive, integer)
    _named(cfg, "dataset", LOADERS)
    _named(cfg, "partition", PARTITIONS)
    _named(cfg, "protocol", PROTOCOLS)
    _named(cfg, "scenario", SCENARIOS)
    _named(cfg, "backend", ["inprocess", "ray"])
    method_class(cfg["algorithm"].get("name"))
    position = cfg["algorithm"].get("class_token_position", "end")
    if position not in ("end", "middle", "front"):
        raise ConfigError(f"algorithm.class_token_position={position!r} is unknown; choose end, middle or front")
