"""Load a backbone by config: the tiny offline CLIPs or an open_clip architecture, then its attention conversion.

`load_backbone(cfg.backbone)` is the one entry point runs use: built once per process and shared by every client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flbench.backbones.attention import reset_kv_measurement
from flbench.backbones.clip import FrozenCLIP
from flbench.backbones.conversion import apply_attention
from flbench.backbones.tiny import build_tiny
from flbench.backbones.weights import create_model


def build_open_clip(arch: str, pretrained: str | None = None, checkpoint: str | None = None,
                    quick_gelu: bool | None = None) -> FrozenCLIP:
    """An open_clip architecture, with a pretrained tag, a local checkpoint, or random weights (both None).
    Offline failures, checkpoint formats and QuickGELU: flbench/backbones/weights.py."""
    model, mean, std = create_model(arch, pretrained, checkpoint, quick_gelu)
    return FrozenCLIP(model, arch, mean, std)


_PROCESS_BACKBONES: dict[str, FrozenCLIP] = {}


def load_backbone(cfg: Mapping[str, Any]) -> FrozenCLIP:
    """The process-wide backbone for this config: built once, then shared by every client in the process."""
    key = json.dumps(dict(cfg), sort_keys=True, default=str)
    if key not in _PROCESS_BACKBONES:
        if cfg.get("name", "").startswith("tiny"):
            backbone = build_tiny(cfg["name"], cfg.get("pretrain"), cfg.get("cache"))
        else:
            backbone = build_open_clip(cfg["arch"], cfg.get("pretrained"), cfg.get("checkpoint"), cfg.get("quick_gelu"))
        if cfg.get("attention"):  # dense | gqa | routed_kv: convert → calibrate → uptrain, cached (conversion.py)
            apply_attention(backbone, cfg)
        _PROCESS_BACKBONES[key] = backbone
    backbone = _PROCESS_BACKBONES[key]
    reset_kv_measurement(backbone.model)  # each taker (a run) measures the K/V budget of what it encodes
    return backbone


__all__ = ["build_open_clip", "build_tiny", "load_backbone"]
