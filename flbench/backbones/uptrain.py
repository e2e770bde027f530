"""The *uptrain* step of the conversion: continued contrastive training of a converted backbone, as GQA's authors
(Ainslie et al. 2023) and mixSGA do after converting a checkpoint.

What trains: in every swapped layer, the K and V rows of the packed input projection (for routed-KV these are the
weights all experts share: each expert projects with their group means) and, for routed-KV, the routers — through
the straight-through factor and the auxiliary loss (α/N·Σ_l) each layer injects. Nothing else moves: queries, the
output projection, MLPs, norms, embeddings and the logit scale keep their pretrained values (the Q-row gradients are
zeroed and AdamW runs without weight decay, so their update is exactly zero). GQA and routed-KV get the same recipe:
the same steps, batch, learning-rate schedule, data and seed (`backbone.attention.uptrain`).

Data: the synthetic pretraining corpus (`datasets.synthetic.pretraining_corpus`, never a benchmark image) at its own
corpus seed, with captions drawn from the pretraining caption templates; CLIP's contrastive loss (open_clip's
ClipLoss). A tower that is not converted (the tiny CLIP's ResNet) encodes without gradients.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from open_clip.loss import ClipLoss

from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.backbones.layers import swapped_modules
from flbench.backbones.routed_kv import RoutedKVAttention, routing_stats

log = logging.getLogger(__name__)

UPTRAIN_VERSION = 1  # bump when the procedure changes: cached uptrained weights are then not reused
UPTRAIN_CORPUS_SEED = 13  # pretraining used 7, router calibration 11: fresh images of the same distribution


def uptrained_parameters(backbone: FrozenCLIP, routers: bool = True) -> dict[str, torch.nn.Parameter]:
    """What uptraining changes, by state-dict name: each swapped layer's packed in-projection (only its K/V rows
    move) and, unless `routers` is false, its router."""
    names = {id(p): n for n, p in backbone.model.named_parameters()}
    params: dict[str, torch.nn.Parameter] = {}
    for layer in swapped_modules(backbone.model):
        routed = routers and isinstance(layer, RoutedKVAttention)
        for p in (layer.in_proj_weight, layer.in_proj_bias, *(layer.router.parameters() if routed else ())):
            if p is not None:
                params[names[id(p)]] = p
    return params


def _freeze_query_rows(backbone: FrozenCLIP) -> None:
    """Zero the gradient of the Q rows of every swapped in-projection (its first third)."""
    for layer in swapped_modules(backbone.model):
        for p in (layer.in_proj_weight, layer.in_proj_bias):
            if p is not None and p.grad is not None:
                p.grad[: layer.embed_dim].zero_()


def _contrastive_loss(backbone: FrozenCLIP, images: torch.Tensor, tokens: torch.Tensor, vision_trains: bool
                      ) -> torch.Tensor:
    with torch.set_grad_enabled(vision_trains and torch.is_grad_enabled()):
        image_features = normalize(backbone.encode_image(images))
    text_features = normalize(backbone.encode_text_embeddings(backbone.token_embeddings(tokens), tokens.argmax(-1)))
    return ClipLoss()(image_features, text_features, backbone.logit_scale.detach())


Objective = Callable[[FrozenCLIP, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def uptrain(backbone: FrozenCLIP, settings: Mapping[str, Any], objective: Objective = _contrastive_loss,
            train_routers: bool = True, captions: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Uptrain the converted `backbone` in place (settings: backbone.attention.uptrain, checked); return the recipe
    and the held-out loss before and after. `objective` (backbone, images, tokens, vision trains), `train_routers=
    False` and `captions` (caption templates by domain instead of the pretraining ones) are for studies of other
    recipes (experiments/backbones/analysis.py); the conversion always uses the defaults."""
    from flbench.backbones.pretrain import sample_captions
    from flbench.datasets.synthetic import CAPTIONS, pretraining_corpus

    templates = CAPTIONS if captions is None else captions

    params = uptrained_parameters(backbone, routers=train_routers)
    if not params:
        raise RuntimeError("uptraining needs a converted backbone (backbone.attention.kind=gqa or routed_kv)")
    steps, batch = int(settings["steps"]), int(settings["batch_size"])
    images, meta = pretraining_corpus(int(settings["images"]), suite_seed=UPTRAIN_CORPUS_SEED,
                                      image_size=backbone.image_size)
    rng = np.random.default_rng(int(settings["seed"]))
    held = np.arange(min(batch, len(images)))  # the first batch is held out for the before/after loss
    held_images = images[torch.as_tensor(held)].float().div(255.0)
    held_tokens = backbone.tokenize(sample_captions(meta, held, np.random.default_rng(0), templates))
    vision_trains = any(layer.tower == "vision" for layer in swapped_modules(backbone.model))

    def held_out_loss() -> float:
        with torch.no_grad():
            return round(float(objective(backbone, held_images, held_tokens, vision_trains)), 5)

    before = held_out_loss()
    warmup, lr = max(1, int(settings["warmup"])), float(settings["lr"])
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    label = "contrastive_loss" if objective is _contrastive_loss else "loss"
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            idx = rng.choice(np.arange(len(held), len(images)), size=batch, replace=False)
            x = images[torch.as_tensor(idx)].float().div_(255.0)
            loss = objective(backbone, x, backbone.tokenize(sample_captions(meta, idx, rng, templates)), vision_trains)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # + the routers' aux loss, injected by each routed layer
            _freeze_query_rows(backbone)
            optimizer.step()
            schedule.step()
            if step % 20 == 0 or step == steps - 1:
                log.info("uptraining step %d/%d  %s %.4f  %s", step + 1, steps, label, float(loss.detach()),
                         "  ".join(f"{k} {v:.3f}" for k, v in routing_stats(backbone.model).items()))
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    return {"settings": dict(settings), "before": {label: before}, "after": {label: held_out_loss()}, "steps": steps,
            "seconds": round(time.perf_counter() - t0, 1)}


__all__ = ["UPTRAIN_VERSION", "uptrain", "uptrained_parameters"]
