"""Checks a resolved config before any work starts, so bad input fails in one line that names the key.

Every key must be known (`check_keys`): the schema of a config group's option is its YAML file under conf/ (the
files whose `name:` is the option's name), widened by what its code declares — a method's hyper-parameters are the
keyword arguments of its `__init__` (`PromptMethod.hyperparameters`). A key nothing reads would otherwise ride
along into the record and its hash: a "tuned" run that used the defaults.
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from flbench.algorithms.base import method_class
from flbench.backbones.attention import attention_settings, refuse_unread
from flbench.datasets import DATASETS
from flbench.datasets.partition import PARTITIONS
from flbench.errors import ConfigError, unknown_keys_message
from flbench.io import check_writable
from flbench.fl.protocols import PROTOCOLS
from flbench.scenarios import SCENARIOS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("dataset", "backbone", "algorithm", "protocol", "partition", "scenario", "backend", "logger")
# Keys an option's code reads that its YAML leaves out (set with +key=...), by (group, option name).
OPTIONAL_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    ("backbone", "tiny"): ("pretrain", "cache", "attention"),
    ("backbone", "tiny-vit"): ("pretrain", "cache", "attention"),
    ("backbone", "open_clip"): ("cache", "attention"),
}


@lru_cache(maxsize=None)
def _yaml(relative: str) -> dict[str, Any]:
    """A YAML under conf/ as plain data, unresolved (read once per process; callers must not modify it)."""
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / relative), resolve=False) or {}


def _yaml_keys(relative: str) -> frozenset[str]:
    return frozenset(k for k in _yaml(relative) if k not in ("defaults", "hydra"))


@lru_cache(maxsize=None)
def _option_files(group: str, name: str) -> tuple[str, ...]:
    """The YAML option(s) of `group` whose `name:` is `name` (several files may share a name: backbones)."""
    return tuple(f"{group}/{path.name}" for path in sorted((CONF_DIR / group).glob("*.yaml"))
                 if _yaml(f"{group}/{path.name}").get("name") == name)


@lru_cache(maxsize=None)
def option_keys(group: str, name: str) -> frozenset[str]:
    """Keys of the YAML option(s) of `group` whose `name:` is `name`, with the ones its code reads beside them."""
    keys = set().union(*(_yaml_keys(f) for f in _option_files(group, name)))
    return frozenset(keys | set(OPTIONAL_KEYS.get((group, name), ())))


# Arguments the code passes itself to a registered part (never config keys).
PASSED_BY_CODE = {"dataset": (), "partition": ("labels", "domains", "num_clients", "shots", "seed"),
                  "scenario": ("bundle", "dataset_cfg")}


def declared_keys(group: str, name: str) -> set[str]:
    """The keys a registered part declares in its signature: a method's hyper-parameters, a dataset loader's,
    partition's or scenario's keyword arguments (none known when it takes **kwargs)."""
    if group == "algorithm":
        return {"name", *method_class(name).hyperparameters()}
    registry = {"dataset": DATASETS, "partition": PARTITIONS, "scenario": SCENARIOS}.get(group)
    if registry is None:
        return set()
    params = inspect.signature(registry.get(name)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return set()
    return {"name"} | {p.name for p in params if p.name not in PASSED_BY_CODE[group]}


def _group_keys(group: str, section: Mapping[str, Any]) -> frozenset[str] | None:
    name = str(section.get("name"))
    keys = set(option_keys(group, name)) | declared_keys(group, name)
    return frozenset(keys) if keys else None


def check_keys(cfg: Mapping[str, Any]) -> None:
    """Every top-level key, every key of train/eval/checkpoint and of each group's option must be known."""
    top = _yaml_keys("config.yaml") | set(GROUPS)
    _refuse_unknown("", cfg, top)
    for section in ("train", "eval", "checkpoint"):
        if isinstance(cfg.get(section), Mapping):
            _refuse_unknown(section, cfg[section], set(_yaml("config.yaml")[section]))
    for group in GROUPS:
        section = cfg.get(group)
        if not isinstance(section, Mapping):
            continue
        known = _group_keys(group, section)
        if known is None:  # an unknown option name: _named() says so with the list of options
            continue
        _refuse_unknown(group, section, known, f" for {group}.name={section.get('name')}")


def _refuse_unknown(prefix: str, section: Mapping[str, Any], known: set[str] | frozenset[str], where: str = "") -> None:
    unknown = sorted(k for k in section if k not in known)
    if unknown:
        message = unknown_keys_message(prefix, unknown, known)
        raise ConfigError(message.replace(" is not a known key", f" is not a known key{where}", 1))


def check_values(value: Any, path: str = "") -> None:
    """NaN and ±inf are refused everywhere (every range check compares, and every comparison with NaN is false), and
    so is a mandatory value left unset (`???` in a YAML, e.g. dataset=coop_layout's directory)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}={value} must be a finite number")
    if value == "???":
        raise ConfigError(f"{path} must be set (it is ??? in its YAML): add {path}=...")
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_values(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_values(item, f"{path}[{i}]")


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


def _value(cfg: Mapping[str, Any], path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _at_most(cfg: Mapping[str, Any], path: str, high: float, inclusive: bool = True) -> None:
    value = _value(cfg, path)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            value > high or (value == high and not inclusive)):
        raise ConfigError(f"{path}={value} must be {'≤' if inclusive else '<'} {high}")


# (path, low, low inclusive, integer, high, high inclusive): the FL layer's keys (protocols, partitions, scenarios).
# Keys a config does not have are skipped, so each applies only where its protocol/partition/scenario uses it.
FL_RANGES = (
    ("protocol.fraction", 0, False, False, 1, True), ("protocol.min_clients", 1, True, True, None, True),
    ("protocol.mu", 0, True, False, None, True),
    ("protocol.eta", 0, False, False, None, True), ("protocol.eta_l", 0, False, False, None, True),
    ("protocol.tau", 0, False, False, None, True), ("protocol.beta_1", 0, True, False, 1, False),
    ("protocol.beta_2", 0, True, False, 1, False), ("protocol.server_lr", 0, False, False, None, True),
    ("protocol.server_momentum", 0, True, False, 1, False), ("protocol.stragglers", 0, True, False, 1, True),
    ("protocol.straggler_work", 0, False, False, 1, True), ("protocol.failure_prob", 0, True, False, 1, False),
    ("partition.classes_per_client", 1, True, True, None, True), ("partition.domains_per_client", 1, True, True, None, True),
    ("partition.beta", 0, False, False, None, True), ("scenario.fraction", 0, False, False, 1, False),
    ("scenario.finetune_epochs", 1, True, True, None, True),
)
# Keys that only some code paths read: (key, whether this config's path reads it, why not when it does not). Set to
# anything but its YAML default where it is not read, a key would change nothing but the record and its hash: a
# "tuned" row that ran the default. So such a value is refused (`check_read`).
CONDITIONAL_KEYS: tuple[tuple[str, Callable[[Mapping[str, Any]], bool], str], ...] = (
    ("train.momentum", lambda c: _value(c, "train.optimizer") == "sgd", "it is SGD's (train.optimizer=sgd)"),
    ("cache_views", lambda c: bool(_value(c, "train.augment")), "it is read only with train.augment=true"),
    ("checkpoint.dir", lambda c: bool(_value(c, "checkpoint.every")), "checkpoints are off (checkpoint.every=0)"),
    ("protocol.straggler_work", lambda c: bool(_value(c, "protocol.stragglers")),
     "there are no stragglers (protocol.stragglers=0)"),
    ("protocol.eta_l", lambda c: False, "Flower only logs it; the clients' learning rate is train.lr"),
    ("partition.min_samples",  # every partition that has it reads it, but domain only for its Dirichlet skew
     lambda c: c["partition"].get("name") != "domain" or _value(c, "partition.alpha") is not None,
     "it is read only with partition.alpha set (Dirichlet label skew)"),
    ("backend.num_cpus", lambda c: not _value(c, "backend.address"), "backend.address joins a running Ray cluster"),
    ("backend.temp_dir", lambda c: not _value(c, "backend.address"), "backend.address joins a running Ray cluster"),
    ("backend.cohort_memory_mb", lambda c: _value(c, "backend.cohort_size") != 1,
     "clients train one at a time (backend.cohort_size=1)"),
)


def _default(cfg: Mapping[str, Any], path: str) -> Any:
    """`path`'s value in the YAML it comes from: its group option's file, else conf/config.yaml."""
    section, _, key = path.rpartition(".")
    if section in GROUPS:
        files = _option_files(section, str(cfg[section].get("name")))
        return _yaml(files[0]).get(key) if files else None
    root = _yaml("config.yaml")
    return (root.get(section) or {}).get(key) if section else root.get(key)


def check_read(cfg: Mapping[str, Any]) -> None:
    """Refuse a key set away from its default on a path that never reads it (CONDITIONAL_KEYS)."""
    for path, read, why in CONDITIONAL_KEYS:
        section, _, key = path.rpartition(".")
        holder = cfg.get(section) if section else cfg
        if not isinstance(holder, Mapping) or key not in holder or read(cfg):
            continue
        default = _default(cfg, path)
        if holder[key] != default:
            shown = "null" if default is None else default
            raise ConfigError(f"{path}={holder[key]} changes nothing here: {why}; remove it (default: {shown})")
    attention = (cfg.get("backbone") or {}).get("attention")
    if isinstance(attention, Mapping):
        refuse_unread(attention_settings(attention))


# Scenarios that evaluate the learned prompt under class names it was not trained with.
NEW_CLASSNAMES = ("base2novel", "xdataset")


def _fl_checks(cfg: Mapping[str, Any]) -> None:
    for path, low, low_inclusive, integer, high, high_inclusive in FL_RANGES:
        _number(cfg, path, low, low_inclusive, integer)
        if high is not None:
            _at_most(cfg, path, high, high_inclusive)
    protocol, scenario = cfg["protocol"], cfg["scenario"]
    from flbench.fl.protocols.scaffold import UPDATES

    if protocol.get("name") == "scaffold" and protocol.get("control_update", "gradient") not in UPDATES:
        raise ConfigError(f"protocol.control_update={protocol.get('control_update')!r} is unknown; choose one of "
                          f"{UPDATES}")
    if scenario.get("name") in NEW_CLASSNAMES and cfg["algorithm"].get("class_specific"):
        raise ConfigError(f"algorithm.class_specific=true cannot be evaluated on new class names under "
                          f"scenario={scenario['name']}; set algorithm.class_specific=false")
    if scenario.get("name") == "multidomain" and cfg["partition"].get("name") != "domain":
        raise ConfigError(f"partition.name={cfg['partition'].get('name')!r} does not give clients domains; "
                          "scenario=multidomain needs partition=domain")
    domains = (cfg.get("dataset") or {}).get("domains")
    if scenario.get("name") == "xdomain" and isinstance(domains, list):
        target = scenario.get("target")
        targets = [target] if isinstance(target, str) else list(target or domains[-1:])
        unknown = [t for t in targets if t not in domains]
        if unknown:
            raise ConfigError(f"scenario.target={unknown} is not among dataset.domains {domains}")
        if len(set(targets)) >= len(domains):
            raise ConfigError("scenario.target leaves no source domain to train on; hold out fewer domains")
    if scenario.get("name") == "xdataset" and not scenario.get("targets"):
        raise ConfigError("scenario.targets is empty; list target datasets, e.g. scenario.targets=[{family: patterns}]")


def _execution_checks(cfg: Mapping[str, Any]) -> None:
    """device / precision / cache_views: a GPU that is not there, a precision the device or method cannot run."""
    from flbench.engine import check_precision, resolve_device

    _number(cfg, "cache_views", 0, True, True)
    precision = str(cfg.get("precision", "fp32"))
    check_precision(precision, resolve_device(cfg.get("device", "auto")))
    backend = cfg.get("backend") or {}
    if backend.get("name") == "ray" and float(backend.get("client_gpus") or 0) > 0 and not backend.get("address"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"backend.client_gpus={backend['client_gpus']} but this machine has no CUDA GPU; "
                              "set backend.client_gpus=0")
    _image_tower_checks(cfg)
    name = cfg["algorithm"].get("name")
    if precision == "fp16" and not method_class(name).loss_scaling:
        raise ConfigError(f"precision=fp16 needs loss scaling, which algorithm.name={name} (own gradient computation) "
                          "does not support; use precision=bf16")


def _image_tower_checks(cfg: Mapping[str, Any]) -> None:
    """Image-side methods need a ViT tower; CLIP image towers take one resolution (fixed positional embeddings).
    Both mistakes would otherwise fail deep inside the model. The synthetic suite defaults to the tiny CLIPs' 32 px."""
    from flbench.backbones.weights import backbone_image_size, backbone_is_vit

    name = cfg["algorithm"].get("name")
    if method_class(name).needs_vit and backbone_is_vit(cfg["backbone"]) is False:
        raise ConfigError(f"algorithm.name={name} needs a ViT image tower, but the backbone's is a ResNet; use "
                          "backbone=tiny-vit (offline) or backbone=vit_b16")
    wanted, given = backbone_image_size(cfg["backbone"]), cfg["dataset"].get("image_size")
    if given is not None and wanted is not None and int(given) != wanted:
        raise ConfigError(f"dataset.image_size={given} but the backbone takes {wanted}-px images; set "
                          f"dataset.image_size={wanted} (or null: the backbone's resolution)")


def _named(cfg: Mapping[str, Any], group: str, known: Mapping[str, Any] | list[str]) -> None:
    name = (cfg.get(group) or {}).get("name")
    if name not in known:
        raise ConfigError(f"{group}.name={name!r} is unknown; choose one of {sorted(known)}")


def validate(cfg: Mapping[str, Any]) -> None:
    missing = [key for key in REQUIRED if key not in cfg]
    if missing:
        raise ConfigError(f"config is missing {missing}; start from conf/config.yaml or `python -m flbench --cfg job`")
    check_values(cfg)
    _at_most(cfg, "seed", 2**63 - 1)
    for path, low, inclusive, integer in (("seed", 0, True, True), ("shots", 1, True, True),
                                          ("num_clients", 1, True, True), ("num_rounds", 0, True, True),
                                          ("train.lr", 0, False, False), ("train.batch_size", 1, True, True),
                                          ("train.epochs", 1, True, True), ("eval.batch_size", 1, True, True),
                                          ("partition.alpha", 0, False, False), ("partition.min_samples", 1, True, True),
                                          ("protocol.fraction", 0, False, False),
                                          ("backend.cohort_size", 1, True, True),
                                          ("backend.cohort_memory_mb", 0, False, False)):
        _number(cfg, path, low, inclusive, integer)
    _named(cfg, "dataset", DATASETS)
    _named(cfg, "partition", PARTITIONS)
    _named(cfg, "protocol", PROTOCOLS)
    _named(cfg, "scenario", SCENARIOS)
    _named(cfg, "backend", ["inprocess", "ray"])
    method_class(cfg["algorithm"].get("name"))
    check_keys(cfg)
    check_read(cfg)
    check_writable("results_dir", cfg.get("results_dir"))
    from flbench.results.wandb_logger import check_logger

    check_logger(cfg)
    _fl_checks(cfg)
    _execution_checks(cfg)
    position = cfg["algorithm"].get("class_token_position", "end")
    if position not in ("end", "middle", "front"):
        raise ConfigError(f"algorithm.class_token_position={position!r} is unknown; choose end, middle or front")


def preflight(cfg: Mapping[str, Any]) -> None:
    """What a valid config needs from this machine beyond a writable results folder (validate), checked in seconds
    before any work: the checkpoint folder, and the backbone's weights (before a dataset is rendered or read: a
    missing tag then costs seconds, not the minutes of rendering a suite at 224 px)."""
    from flbench.backbones.weights import check_weights

    check_ray_address((cfg.get("backend") or {}).get("address") if cfg["backend"].get("name") == "ray" else None)
    checkpoint_dir = (cfg.get("checkpoint") or {}).get("dir")
    if checkpoint_dir is not None:
        check_writable("checkpoint.dir", checkpoint_dir)
    check_weights(cfg["backbone"])


def check_ray_address(address: str | None) -> None:
    """An existing Ray cluster answers (ray.init would otherwise retry for minutes on a wrong address)."""
    from urllib.parse import urlparse

    from flbench.backbones.weights import reachable

    if not address:
        return
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        if env:
            return check_ray_address(env)
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if not current.is_file():
            raise ConfigError("backend.address=auto but no Ray cluster runs on this machine (start one with `ray "
                              "start --head`, or leave backend.address=null for a private one)")
        return check_ray_address(current.read_text().strip() or None)
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if not parsed.hostname or not parsed.port:
        raise ConfigError(f"backend.address={address!r} must be auto, host:port or ray://host:port")
    if not reachable(parsed.hostname, parsed.port, timeout=3.0):
        raise ConfigError(f"backend.address={address}: nothing answers at {parsed.hostname}:{parsed.port} within 3 s; "
                          "check the address and that the cluster is up (`ray status`), or leave backend.address=null")
