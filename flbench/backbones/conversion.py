"""Attention conversion as a build step: convert → calibrate → uptrain → cache → load.

`apply_attention(backbone, backbone_cfg)` turns a loaded FrozenCLIP into the backbone `backbone.attention` asks for:

1. **convert** (`attention.swap_attention`): dense | gqa | routed_kv layers in place, sharing the pretrained weights;
2. **calibrate** (`calibration.calibrate`, routed_kv with ``routers: calibrated``): routers distilled toward the dense
   model, backbone frozen — the *training-free* variant;
3. **uptrain** (`uptrain.uptrain`, ``uptrain.steps > 0``, gqa or routed_kv): continued contrastive training of the
   converted layers' K/V projections (and routers), the same recipe for both kinds;
4. **cache**: each trained result is stored once under ``$FLBENCH_CACHE/routers/`` and ``.../uptrained/``, keyed by
   (architecture, weights fingerprint, attention settings, recipe, procedure version), with a JSON report beside it;
   files are read back as plain data (``weights_only``), and a corrupt or foreign file is one line naming it;
5. **load**: the state goes into the model, everything ends frozen, and the realised-KV measurement starts afresh.

Plain functions of a backbone, its settings and (inside the steps) the synthetic pretraining data; nothing here
knows about the command line, Hydra or federations (`python -m flbench.calibrate` is a thin command over it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from flbench.backbones.attention import attention_settings, reset_kv_measurement, swap_attention
from flbench.backbones.calibration import CALIBRATION_VERSION, calibrate
from flbench.backbones.clip import FrozenCLIP
from flbench.backbones.layers import router_parameters
from flbench.backbones.uptrain import UPTRAIN_VERSION, uptrain, uptrained_parameters
from flbench.errors import DataFileError
from flbench.io import atomic_write, atomic_write_json, cache_dir, load_torch_data

log = logging.getLogger(__name__)

LAYOUT_KEYS = {"gqa": ("kind", "towers", "group_size"),
               "routed_kv": ("kind", "towers", "group_sizes", "ratios", "capacity", "pin_cls", "aux_weight")}


def _layout(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: settings[k] for k in LAYOUT_KEYS[settings["kind"]]}


def _data_version() -> dict[str, Any]:
    from flbench.datasets.render import RENDER_VERSION
    from flbench.datasets.synthetic import CAPTIONS

    return {"render": RENDER_VERSION, "captions": CAPTIONS}


def _cache_path(backbone: FrozenCLIP, backbone_cfg: Mapping[str, Any], folder: str, blob: Mapping[str, Any]) -> Path:
    key = hashlib.sha1(json.dumps({**blob, **_data_version()}, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = backbone.name.replace("/", "_")
    return cache_dir(backbone_cfg.get("cache")) / folder / f"{name}-{backbone.fingerprint()}-{key}.pt"


# Calibration settings added after CALIBRATION_VERSION 2, with the value that reproduces version 2: they enter the
# caches' keys only when set to something else, so the routers (and uptrainings) cached before stay valid.
_CALIBRATION_KEYS_SINCE_V2 = {"prompts": "template"}


def _calibration_key(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if not (k in _CALIBRATION_KEYS_SINCE_V2
                                                        and _CALIBRATION_KEYS_SINCE_V2[k] == v)}


def router_cache_path(backbone: FrozenCLIP, backbone_cfg: Mapping[str, Any]) -> Path:
    """Where the calibrated routers of this backbone (weights fingerprint) and layout are cached."""
    s = attention_settings(backbone_cfg.get("attention"))
    return _cache_path(backbone, backbone_cfg, "routers", {"layout": _layout(s),
                                                           "calibration": _calibration_key(s["calibration"]),
                                                           "version": CALIBRATION_VERSION})


def uptrain_cache_path(backbone: FrozenCLIP, backbone_cfg: Mapping[str, Any]) -> Path:
    """Where the uptrained weights are cached: the key also holds how the routers started (init or calibrated)."""
    s = attention_settings(backbone_cfg.get("attention"))
    start = {}
    if s["kind"] == "routed_kv":
        calibrated = {"calibration": _calibration_key(s["calibration"]), "calibration_version": CALIBRATION_VERSION}
        start = {"routers": s["routers"], **(calibrated if s["routers"] == "calibrated" else {})}
    return _cache_path(backbone, backbone_cfg, "uptrained", {"layout": _layout(s), "start": start,
                                                             "uptrain": s["uptrain"], "version": UPTRAIN_VERSION})


def _load_state(path: Path, expected: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """A cached state dict, checked against the tensors it must replace (names and shapes)."""
    fix = "delete it and it is computed again on the next run"
    state = load_torch_data(path, what=what, fix=fix)
    if not isinstance(state, dict) or set(state) != set(expected) or any(
            not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape for k in expected):
        raise DataFileError(f"{what} {path} does not hold this model's tensors; {fix}")
    return state


def _cached(path: Path, expected: Mapping[str, torch.Tensor], what: str, compute: Callable[[], dict[str, Any]],
            force: bool) -> dict[str, torch.Tensor]:
    """The cached state at `path`, or `compute()` it now (it trains `expected` in place), then cache it."""
    if path.exists() and not force:
        return _load_state(path, expected, what)
    log.info("computing the %s (first time only, cached at %s)", what, path)
    report = compute()
    state = {name: p.detach().to("cpu").clone() for name, p in expected.items()}
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write_json(path.with_suffix(".json"), report)
    log.info("%s: before %s  after %s  (%.0f s)", what, report["before"], report["after"], report["seconds"])
    return state


def calibrated_routers(backbone: FrozenCLIP, backbone_cfg: Mapping[str, Any], force: bool = False
                       ) -> dict[str, torch.Tensor]:
    """Router state for this backbone and layout: from the cache, or calibrated now (first time only) and cached."""
    settings = attention_settings(backbone_cfg.get("attention"))

    def compute() -> dict[str, Any]:
        return {**calibrate(backbone, settings["calibration"]), "backbone": backbone.name,
                "layout": _layout(settings)}

    return _cached(router_cache_path(backbone, backbone_cfg), router_parameters(backbone.model),
                   "router calibration", compute, force)


def uptrained_weights(backbone: FrozenCLIP, backbone_cfg: Mapping[str, Any], force: bool = False
                      ) -> dict[str, torch.Tensor]:
    """Uptrained K/V projections (and routers) for this backbone and settings: cached, or trained now and cached."""
    settings = attention_settings(backbone_cfg.get("attention"))

    def compute() -> dict[str, Any]:
        return {**uptrain(backbone, settings["uptrain"]), "backbone": backbone.name, "layout": _layout(settings),
                "routers": settings.get("routers") if settings["kind"] == "routed_kv" else None}

    return _cached(uptrain_cache_path(backbone, backbone_cfg), uptrained_parameters(backbone), "uptrained attention",
                   compute, force)


def _load_into(backbone: FrozenCLIP, state: Mapping[str, torch.Tensor]) -> None:
    params = dict(backbone.model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def apply_attention(backbone: FrozenCLIP, backbone_cfg: Mapping[str, Any], force: bool = False) -> FrozenCLIP:
    """Convert a loaded FrozenCLIP as `backbone_cfg.attention` asks: convert → calibrate → uptrain (each cached).

    Everything ends frozen; `train_routers` (FL) unfreezes the routers where the method is built (`attach_routers`).
    `force` recomputes the cached steps (the calibrate command's force=true).
    """
    settings = attention_settings(backbone_cfg.get("attention"))
    if settings["kind"] != "dense":
        backbone.remember_build()
    swap_attention(backbone.model, settings)
    if settings["kind"] == "routed_kv" and settings["routers"] == "calibrated":
        _load_into(backbone, calibrated_routers(backbone, backbone_cfg, force))
    if settings["kind"] != "dense" and settings["uptrain"]["steps"] > 0:
        _load_into(backbone, uptrained_weights(backbone, backbone_cfg, force))
        backbone.forget_fingerprint()  # the weights changed: records must name the uptrained ones
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    reset_kv_measurement(backbone.model)
    backbone.attention = settings
    return backbone


__all__ = ["apply_attention", "calibrated_routers", "router_cache_path", "uptrain_cache_path", "uptrained_weights"]
