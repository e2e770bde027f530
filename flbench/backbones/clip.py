"""Frozen CLIP backbones: open_clip models by name/tag or checkpoint, and the package's own tiny offline CLIP.

`FrozenCLIP` is the only thing prompt methods see. It exposes image encoding and text encoding *from token
embeddings*, so a method can put learned context vectors where words used to be. One instance per process is
shared by every simulated client (see `load_backbone`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from flbench.backbones.attention import sequence_lengths
from flbench.backbones.text import project_eot, text_inputs, text_length
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


class FrozenCLIP(nn.Module):
    """A frozen open_clip CLIP with the hooks prompt learning needs."""

    def __init__(self, model: open_clip.CLIP, name: str, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> None:
        super().__init__()
        self.model = model.eval()
        self.name = name
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.context_length = int(model.context_length)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)

    def fingerprint(self) -> str:
        """SHA-1 (12 hex digits) of the frozen weights, routers excluded (they are trained on top of these weights):
        which backbone a record used (two tiny CLIPs built from the same settings on different CPUs may differ in
        the last bits), and the key of the routers calibrated for it. Computed once; the weights never change."""
        if "_fingerprint" not in self.__dict__:
            digest = hashlib.sha1()
            for name, tensor in sorted(self.model.state_dict().items()):
                if ".router." in f".{name}":
                    continue
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self.__dict__["_fingerprint"] = digest.hexdigest()[:12]
        return self.__dict__["_fingerprint"]

    def train(self, mode: bool = True) -> "FrozenCLIP":
        # The backbone never leaves eval mode (no dropout, no BN updates), whatever its owner does.
        return super().train(False)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def is_vit(self) -> bool:
        return hasattr(self.model.visual, "transformer")

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def device(self) -> torch.device:
        """Where the backbone lives (`Experiment` moves it there once per process; methods follow it)."""
        return self.mean.device

    def text_signature(self) -> tuple:
        """Changes whenever the text tower's output could: a weight modified in place (trained or calibrated routers
        bump the tensor's version counter) or moved, attention swapped, dense-teacher mode switched. Frozen text
        features cached under one signature (`prompting.handcrafted_text_features`) are valid while it holds."""
        m = self.model
        tensors = [*m.transformer.parameters(), *m.token_embedding.parameters(), *m.ln_final.parameters(),
                   m.positional_embedding]
        if isinstance(m.text_projection, torch.Tensor):
            tensors.append(m.text_projection)
        else:
            tensors += list(m.text_projection.parameters())
        modes = tuple(getattr(module, "use_dense", None) for module in m.transformer.modules())
        return tuple((t.data_ptr(), t._version) for t in tensors) + modes

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.model.token_embedding.weight.device)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image features (unnormalised) from float images in [0, 1] at `image_size`."""
        return self.model.encode_image((images - self.mean) / self.std)

    def encode_text_embeddings(self, embeddings: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Text features from token embeddings [N, context_length, width]; pooled at each row's end-of-text token.

        This mirrors open_clip's `encode_text` after its embedding lookup, so with the embeddings of real tokens
        it returns `encode_text(tokens)`. Only the first `max(eot_index) + 1` positions are computed when the tower
        is causal: nothing later can reach an EOT token (exact up to rounding; flbench/backbones/text.py).
        """
        m = self.model
        x, mask = text_inputs(m, embeddings, eot_index)
        with sequence_lengths(eot_index + 1):  # routed-KV attention: padding after EOT takes no expert capacity
            x = m.transformer(x, attn_mask=mask)
        return project_eot(m, x, eot_index)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        eot_index = tokens.argmax(dim=-1)
        tokens = tokens[:, :text_length(self.model, eot_index)]  # no embedding lookup for positions never computed
        return self.encode_text_embeddings(self.token_embeddings(tokens), eot_index)


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


def build_open_clip(arch: str, pretrained: str | None = None, checkpoint: str | None = None,
                    quick_gelu: bool | None = None) -> FrozenCLIP:
    """An open_clip architecture, with a pretrained tag, a local checkpoint, or random weights (both None).
    Offline failures, checkpoint formats and QuickGELU: flbench/backbones/weights.py."""
    from flbench.backbones.weights import create_model

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
        if cfg.get("attention"):  # dense | gqa | routed_kv, swapped in place (flbench/backbones/attention.py)
            from flbench.backbones.attention import apply_attention

            apply_attention(backbone, cfg)
        _PROCESS_BACKBONES[key] = backbone
    return _PROCESS_BACKBONES[key]


def normalize(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features, dim=-1)
