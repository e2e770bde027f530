"""The package's own tiny offline CLIPs: open_clip configs (not new model classes), pretrained by the package on
the synthetic corpus the first time they are asked for (backbones/pretrain.py), then loaded from the cache."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import open_clip
import torch

from flbench.backbones.clip import FrozenCLIP
from flbench.errors import ConfigError, DataFileError
from flbench.io import atomic_write, cache_dir, load_torch_data

log = logging.getLogger(__name__)

_TEXT_TOWER = dict(context_length=16, vocab_size=49408, width=128, heads=4, layers=3)

# Tiny CLIPs are configs, not new model classes (as open_clip's model_configs/*.json).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # ModifiedResNet learns shape within the 2-minute budget (SYNTHETIC.md); it is the default.
    "tiny": dict(embed_dim=128, vision_cfg=dict(layers=[1, 1, 1, 1], width=32, image_size=32, head_width=64),
                 text_cfg=_TEXT_TOWER),
    # A ViT image tower, for methods and attention variants that need transformer internals on the image side.
    # Patch 4 (64 patches + CLS): patch 8 hardly learns shape (SYNTHETIC.md). Width 64 in 4 heads of 16 halves the
    # step time of width 128, so 600 pretraining steps (pretrain.MODEL_PRETRAIN) fit in minutes (docs/backbones.md).
    "tiny-vit": dict(embed_dim=128, vision_cfg=dict(layers=4, width=64, patch_size=4, image_size=32, head_width=16),
                     text_cfg=_TEXT_TOWER),
}


# Bump when the build changes in a way the rest of the key cannot see, so that stale cached models are rebuilt
# everywhere. 2: initial weights seeded from the pretraining seed; pretraining on a pinned thread count. 3: the text
# pass trimmed to the batch's last EOT, fused AdamW (same procedure, other floating-point rounding: other weights).
TINY_BUILD_VERSION = 3


def _tiny_key(name: str, pretrain: Mapping[str, Any]) -> str:
    """Cache key: model config, pretraining settings, the version of the corpus (renderer and captions) and of the
    build procedure."""
    from flbench.backbones.pretrain import PRETRAIN_THREADS
    from flbench.datasets.render import RENDER_VERSION
    from flbench.datasets.synthetic import CAPTIONS

    blob = json.dumps({"config": TINY_CONFIGS[name], "pretrain": dict(pretrain), "render": RENDER_VERSION,
                       "captions": CAPTIONS, "build": TINY_BUILD_VERSION, "threads": PRETRAIN_THREADS},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def build_tiny(name: str = "tiny", pretrain: Mapping[str, Any] | None = None,
               cache: str | None = None) -> FrozenCLIP:
    """The tiny CLIP `name`, pretrained by the package on the synthetic corpus the first time, then loaded from cache."""
    from flbench.backbones.pretrain import DEFAULT_PRETRAIN, MODEL_PRETRAIN, pretrain_tiny_clip  # cache miss only

    if name not in TINY_CONFIGS:
        raise ConfigError(f"backbone.name={name!r} is not a tiny CLIP; choose one of {sorted(TINY_CONFIGS)}")
    settings = {**DEFAULT_PRETRAIN, **MODEL_PRETRAIN.get(name, {}), **(pretrain or {})}
    path = cache_dir(cache) / "tiny_clip" / f"{name}-{_tiny_key(name, settings)}.pt"
    with torch.random.fork_rng(devices=[]):  # initial weights from the pretraining seed, not the caller's RNG
        torch.manual_seed(int(settings["seed"]))
        model = open_clip.CLIP(**TINY_CONFIGS[name])
    if path.exists():
        state = load_torch_data(path, what="tiny-CLIP cache", fix="delete it and it is rebuilt on the next run")
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as error:
            raise DataFileError(f"tiny-CLIP cache {path} does not hold this model's weights; delete it and it is "
                                "rebuilt on the next run") from error
    else:
        log.info("building the tiny CLIP %r (first time only, cached at %s)", name, path)
        pretrain_tiny_clip(model, **settings)
        atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    return FrozenCLIP(model, name)
