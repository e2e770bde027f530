"""MaPLe (Khattak et al., CVPR 2023): multi-modal prompt learning with vision prompts coupled to language prompts.

Language branch: a deep text prompt of `n_ctx` tokens over the first J = `prompt_depth` text blocks (the context at
block 0 initialised from `ctx_init`, deeper prompts N(0, 0.02)). Vision branch: no free parameters of its own — the
prompt of image block i is F_i(P_i), a linear coupling function (text width → vision width) of the language prompt
of block i, so both towers are tuned together and stay in step. Paper defaults (ViT-B/16): n_ctx=2, J=9,
ctx_init "a photo of a", ~3.55 M parameters of which the coupling functions hold almost all. Everything trainable is
shared with the server (as in FLIP).

Needs a ViT image tower; J is capped at the shallower tower's depth (the tiny CLIPs have 3 text and 4 image blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flbench.algorithms.base import PromptMethod, cosine_logits
from flbench.algorithms.deep_prompting import DeepTextPrompt, clamp_depth
from flbench.backbones import prompted
from flbench.backbones.clip import FrozenCLIP


class MaPLe(PromptMethod):
    name = "maple"
    needs_vit = True
    paper = "MaPLe (Khattak et al., CVPR 2023)"
    extra_loss = "none"
    frozen_image_side = False

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 2, ctx_init: str | None = "a photo of a", prompt_depth: int = 9, init_seed: int = 0,
                 **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        prompted.require_vit(backbone, self.name)
        depth = clamp_depth(prompt_depth, min(prompted.text_layers(backbone), prompted.vision_layers(backbone)),
                            "prompt_depth")
        generator = torch.Generator().manual_seed(init_seed)
        self.text = DeepTextPrompt(backbone, classnames, n_ctx, ctx_init, depth, generator)
        self.coupling = nn.ModuleList(nn.Linear(backbone.text_width, prompted.vision_width(backbone))
                                      for _ in range(depth))

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)

    def vision_prompts(self) -> list[torch.Tensor]:
        """The prompt of image block i is F_i of the language prompt of text block i."""
        return [couple(p) for couple, p in zip(self.coupling, self.text.layer_prompts())]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return prompted.encode_image_prompted(self.backbone, images, self.vision_prompts())

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.backbone, encoded, self.text.encode())
