"""Swap the attention of every transformer block of a loaded open_clip model, in place, reusing its weights.

    dense      unchanged (open_clip's nn.MultiheadAttention)
    gqa        grouped-query attention made from a multi-head checkpoint by mean-pooling K/V heads in groups of g
               (Ainslie et al. 2023) — the baseline of the mixSGA paper
    routed_kv  mixSGA (arXiv 2506.13541): each token's K/V stored at a granularity chosen by a router
               (flbench/backbones/routed_kv.py)

This is the *convert* step of the conversion (convert → calibrate → uptrain → cache → load, see
`backbones/conversion.py`): `attention_settings` checks `backbone.attention` (unknown keys, also inside
`calibration` and `uptrain`, are a ConfigError), `swap_attention` replaces the layers (the layers themselves are in
`layers.py` and `routed_kv.py`). ResNet image towers (open_clip's ModifiedResNet) are left dense: their single
attention-pool layer is not a transformer block.

Routed-KV needs to know where each text row ends (padding after the end-of-text token must not take expert
capacity): the backbone announces it with ``sequence_lengths(...)`` around the text transformer (see FrozenCLIP).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from flbench.backbones.costs import attention_costs
from flbench.backbones.layers import (TOWERS, GroupedKVAttention, SharedWeightAttention, current_text_lengths,
                                      dense_attention, is_causal_mask, pooled_projection, router_parameters,
                                      sequence_lengths, swapped_modules, transformer_blocks)
from flbench.backbones.routed_kv import CAPACITY_RULES, ORACLE_ROWS, RoutedKVAttention, check_routing, routed_layers
from flbench.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("dense", "gqa", "routed_kv")

# Router calibration (routers=calibrated, backbones/calibration.py). oracle_rows: which query rows weigh a token's
# K/V pooling error in the oracle routing — "pooled" (the row the tower pools: end-of-text / CLS), "rollout" (rows
# by their attention-rollout relevance to the pooled row), "all" (every row: the first version; favours sinks).
# prompts: which text the routers see — "template" (the suite's "a <domain> of a <class>." prompts) or
# "template+captions" (those and the pretraining corpus's caption templates: routers that do not depend on one
# template; calibration.calibration_prompts).
CALIBRATION_PROMPTS = ("template", "template+captions")
CALIBRATION_DEFAULTS: dict[str, Any] = dict(steps=150, batch_size=64, lr=3e-3, images=4096, seed=0,
                                            oracle_weight=1.0, oracle_rows="pooled", prompts="template")
# Uptraining (backbones/uptrain.py): continued contrastive training of the converted towers' K/V projections (and
# routers) on the synthetic pretraining corpus; steps=0 is training-free. The same recipe for gqa and routed_kv.
UPTRAIN_DEFAULTS: dict[str, Any] = dict(steps=0, batch_size=128, lr=1e-3, warmup=5, images=8192, seed=0)
# `name` is a label for tables (`--rows backbone.attention.name`): it never changes the model and stays out of the
# conversion caches' keys (conversion.LAYOUT_KEYS), so rows that differ only in name share calibrations.
DEFAULTS: dict[str, Any] = dict(kind="dense", name=None, towers=list(TOWERS), group_size=2, group_sizes=[1, 2, 4],
                                ratios=[3, 1, 6], capacity="ceil", pin_cls=True, aux_weight=0.01, backend="auto",
                                routers="init", train_routers=False, calibration=CALIBRATION_DEFAULTS,
                                uptrain=UPTRAIN_DEFAULTS)
_NUMBERS = {"steps": int, "batch_size": int, "images": int, "seed": int, "warmup": int, "lr": float,
            "oracle_weight": float}
_CHOICES = {"oracle_rows": ORACLE_ROWS, "prompts": CALIBRATION_PROMPTS}


def _nested(cfg: Mapping[str, Any], name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`backbone.attention.<name>` with defaults filled in; unknown keys and bad numbers are ConfigErrors."""
    given = dict(cfg.get(name) or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise ConfigError(f"backbone.attention.{name} has unknown keys {sorted(unknown)}; known: {sorted(defaults)}")
    settings = {**defaults, **given}
    for key, kind in _NUMBERS.items():
        if key in settings:
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ConfigError(f"backbone.attention.{name}.{key}={value!r} must be a{'n integer' if kind is int else ' number'}")
            if value < 0 or (key in ("batch_size", "images", "lr") and value == 0):
                raise ConfigError(f"backbone.attention.{name}.{key}={value!r} must be positive")
            settings[key] = kind(value)
    for key, choices in _CHOICES.items():
        if key in settings and settings[key] not in choices:
            raise ConfigError(f"backbone.attention.{name}.{key}={settings[key]!r} must be one of {list(choices)}")
    return settings


def attention_settings(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """`backbone.attention` with defaults filled in and checked (ConfigError names the key)."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"backbone.attention has unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **cfg}
    if settings["kind"] not in KINDS:
        raise ConfigError(f"backbone.attention.kind={settings['kind']!r} is unknown; choose one of {list(KINDS)}")
    if settings["name"] is not None and (not isinstance(settings["name"], str) or not settings["name"]):
        raise ConfigError(f"backbone.attention.name={settings['name']!r} must be a non-empty string (a table label)")
    towers = list(settings["towers"])
    if not towers or any(t not in TOWERS for t in towers):
        raise ConfigError(f"backbone.attention.towers={towers} must be a non-empty subset of {list(TOWERS)}")
    settings["towers"] = towers
    settings["calibration"] = _nested(cfg, "calibration", CALIBRATION_DEFAULTS)
    settings["uptrain"] = _nested(cfg, "uptrain", UPTRAIN_DEFAULTS)
    if settings["kind"] == "routed_kv":
        if settings["capacity"] not in CAPACITY_RULES:
            raise ConfigError(f"backbone.attention.capacity={settings['capacity']!r} must be one of "
                              f"{list(CAPACITY_RULES)} (ceil: ⌈ρ·n⌉ as the paper; cap: never above the nominal KV)")
        check_routing(settings["group_sizes"], settings["ratios"], settings["capacity"])
        if settings["routers"] not in ("init", "calibrated"):
            raise ConfigError(f"backbone.attention.routers={settings['routers']!r} must be init (fresh He-initialised "
                              "routers) or calibrated (python -m flbench.calibrate)")
    if settings["kind"] == "dense" and settings["uptrain"]["steps"] > 0:
        raise ConfigError("backbone.attention.uptrain.steps > 0 needs kind=gqa or routed_kv (dense is the pretrained "
                          "model itself)")
    return settings


def refuse_unread(settings: Mapping[str, Any]) -> None:
    """Refuse calibration settings of routers that are not calibrated and uptraining settings of a tower that is not
    uptrained, away from their defaults: they would change only a run's record and hash (validation.check_read; the
    calibration functions themselves take any settings). kind=dense and kind=gqa never read `calibration` either,
    but the backbone experiment files set it for every row, so it is not refused there."""
    unread = []
    if settings["kind"] == "routed_kv" and settings["routers"] != "calibrated":
        unread.append(("calibration", CALIBRATION_DEFAULTS, "routers=calibrated"))
    if settings["uptrain"]["steps"] == 0:
        unread.append(("uptrain", {k: v for k, v in UPTRAIN_DEFAULTS.items() if k != "steps"}, "uptrain.steps > 0"))
    for section, defaults, condition in unread:
        for key, default in defaults.items():
            if settings[section][key] != default:
                raise ConfigError(f"backbone.attention.{section}.{key}={settings[section][key]!r} changes nothing "
                                  f"here: it is read only with backbone.attention.{condition}; remove it (default: "
                                  f"{default!r})")


def _pooled_row(model: nn.Module, tower: str) -> str:
    """Which row the tower's output is read from: end-of-text (text), CLS ("cls"), or all rows averaged ("mean")."""
    if tower == "text":
        return "eot"
    visual = getattr(model, "visual", None)
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        return "mean"
    return "cls"


def _tower_mask_is_causal(model: nn.Module, tower: str) -> bool:
    """Checked once here, so the layers never read the mask's values in their forward pass (a host sync)."""
    if tower != "text":
        return False
    mask = getattr(model, "attn_mask", None)
    if mask is None:
        return False
    if not is_causal_mask(mask, int(mask.shape[0])):
        raise ConfigError("backbone.attention: the text tower's attn_mask is not open_clip's causal mask; only "
                          "kind=dense can run it")
    return True


def swap_attention(model: nn.Module, cfg: Mapping[str, Any] | None) -> nn.Module:
    """Replace the attention of every transformer block of `model` (in the towers asked for), in place."""
    settings = attention_settings(cfg)
    kind = settings["kind"]
    if kind == "dense":
        return model
    swapped = 0
    for tower, block in transformer_blocks(model):
        if tower not in settings["towers"]:
            continue
        mha = block.attn
        if not isinstance(mha, nn.MultiheadAttention):
            raise ConfigError(f"backbone.attention.kind={kind}: a {tower} block's attention is already "
                              f"{type(mha).__name__}; swap a freshly loaded model")
        if kind == "gqa":
            layer: SharedWeightAttention = GroupedKVAttention(mha, tower, int(settings["group_size"]))
        else:
            layer = RoutedKVAttention(mha, tower, group_sizes=settings["group_sizes"], ratios=settings["ratios"],
                                      pin_cls=bool(settings["pin_cls"]) and tower == "vision",
                                      aux_weight=float(settings["aux_weight"]), backend=settings["backend"],
                                      capacity=settings["capacity"])
            layer.pooled_row = _pooled_row(model, tower)
        layer.causal_mask = _tower_mask_is_causal(model, tower)
        block.attn = layer
        swapped += 1
    if swapped == 0:
        log.warning("backbone.attention.kind=%s: no transformer block in towers %s (ResNet towers stay dense)", kind,
                    settings["towers"])
    if kind == "routed_kv":
        for tower in TOWERS:  # the auxiliary loss is α/N·Σ_l over each tower's N routed layers
            layers = routed_layers(model, tower)
            for layer in layers:
                layer.aux_scale = 1.0 / len(layers)
        seed_routers(model)
    return model


class RouterBank(nn.Module):
    """The backbone's routers as a submodule of a prompt method (the same Parameter objects, not copies)."""

    def __init__(self, routers: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({name.replace(".", "_"): router for name, router in routers.items()})


def attach_routers(method: nn.Module, backbone: nn.Module) -> nn.Module:
    """`backbone.attention.train_routers`: make the routers part of `method`'s trainable (hence shared) state.

    Registered under `method.backbone_routers`, they join everything the FL layer already does with a method's
    parameters — local optimisation, `shared_state()` (FedAvg'd with the prompt unless the method's own
    `shared_keys` keeps them local), the reset in `Experiment.fresh()`, communication costs — with no change to the
    method's code. A method whose image side is frozen (`frozen_image_side`) encodes images without gradients, so
    only its text-tower routers can learn and only those are attached (its cached image features stay valid).
    """
    settings = getattr(backbone, "attention", None) or {}
    if settings.get("kind") != "routed_kv" or not settings.get("train_routers"):
        return method
    towers = {"text"} if getattr(method, "frozen_image_side", True) else set(TOWERS)
    routers = {name: module.router for name, module in backbone.model.named_modules()
               if isinstance(module, RoutedKVAttention) and module.tower in towers}
    if not routers:
        log.warning("backbone.attention.train_routers: no routers in towers %s to train", sorted(towers))
        return method
    for router in routers.values():
        router.requires_grad_(True)
    method.add_module("backbone_routers", RouterBank(routers))
    log.info("training and sharing %d routers (%s towers) with the prompt", len(routers), "/".join(sorted(towers)))
    return method


def restore_attention(model: nn.Module) -> nn.Module:
    """Undo `swap_attention`: put every block's original nn.MultiheadAttention back (routers are dropped)."""
    for _, block in transformer_blocks(model):
        if isinstance(block.attn, SharedWeightAttention):
            block.attn = block.attn.original
    return model


def seed_routers(model: nn.Module, seed: int = 0) -> None:
    """Re-initialise every router from one seed, layer by layer: the same model always gets the same routers."""
    generator = torch.Generator().manual_seed(seed)
    for module in routed_layers(model):
        module.router.reset_parameters(generator)


def reset_kv_measurement(model: nn.Module) -> None:
    """Start measuring the realised K/V budget afresh (each run measures what it encodes: `attention_costs`)."""
    for module in routed_layers(model):
        module.reset_measurement()


__all__ = ["CALIBRATION_DEFAULTS", "CALIBRATION_PROMPTS", "DEFAULTS", "KINDS", "UPTRAIN_DEFAULTS",
           "GroupedKVAttention", "RouterBank", "SharedWeightAttention", "attach_routers", "attention_costs",
           "attention_settings", "current_text_lengths", "dense_attention", "is_causal_mask", "pooled_projection",
           "reset_kv_measurement", "restore_attention", "router_parameters", "seed_routers", "sequence_lengths",
           "swap_attention", "swapped_modules", "transformer_blocks"]
