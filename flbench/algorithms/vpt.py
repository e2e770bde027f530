"""VPT (Jia et al., ECCV 2022): visual prompt tuning, the image-side baseline of the zoo.

Learns `n_tokens` prompt tokens in the ViT image tower: *shallow* inserts them once, at the input of the first block;
*deep* gives every block its own tokens, replacing the previous block's prompt outputs. The text side is CLIP's
frozen zero-shot classifier (the dataset's first template, or the template ensemble). Prompts start uniform in
±sqrt(6 / (3·patch² + width)) as in the paper. Everything trainable is shared with the server.

The image tower now depends on trained parameters, so image features are never cached (`frozen_image_side=False`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flbench.algorithms.base import PromptMethod, cosine_logits
from flbench.algorithms.deep_prompting import vpt_init_range
from flbench.backbones import prompted
from flbench.backbones.clip import FrozenCLIP
from flbench.errors import ConfigError


class VPT(PromptMethod):
    name = "vpt"
    needs_vit = True
    paper = "VPT (Jia et al., ECCV 2022)"
    extra_loss = "none"
    frozen_image_side = False
    fidelity = """\
Reference: Jia et al., "Visual Prompt Tuning", ECCV 2022; KMnP/vpt: `src/models/vit_prompt/vit.py` (prompts after
[CLS]; uniform ±√(6 / (3·patch² + width)) init; VPT-deep: a new set replaces the previous prompt outputs at every
block after the first, for all blocks; no projection, dropout 0 by default), `src/configs/config.py` (NUM_TOKENS 5,
the code's default; the paper tunes the length per task and reports VPT-deep as its main variant).

flbench: the same prompts, initialisation and deep replacement on CLIP's ViT; `deep: true` (VPT-deep), 5 tokens.

Deviations, from moving VPT onto CLIP (the authors release no CLIP version): the classifier is CLIP's frozen zero-shot
text classifier, not a trained linear head, so only the prompts train; CLIP's ViT normalises its input (ln_pre), and
block-0 prompts go through it with the patch embeddings (as MaPLe's CLIP code does); prompts sit after the patch
tokens instead of before them, which changes nothing (no positional embedding on prompts, no mask, pooling at [CLS]).

FLIP: no VPT in FLIP."""

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_tokens: int = 5, deep: bool = True, ensemble: bool = False, init_seed: int = 0,
                 **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        prompted.require_vit(backbone, self.name)
        if n_tokens < 1:
            raise ConfigError(f"algorithm.n_tokens={n_tokens} must be at least 1")
        self.deep, self.ensemble = bool(deep), bool(ensemble)
        depth = prompted.vision_layers(backbone) if self.deep else 1
        bound = vpt_init_range(backbone)
        generator = torch.Generator().manual_seed(init_seed)
        prompts = torch.rand(depth, n_tokens, prompted.vision_width(backbone), generator=generator) * 2 * bound - bound
        self.prompts = nn.Parameter(prompts)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.keep_handcrafted(self.templates if self.ensemble else self.templates[:1])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return prompted.encode_image_prompted(self.backbone, images, list(self.prompts.unbind(0)))

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.backbone, encoded, self.handcrafted)
