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

import copy
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
    fidelity = """\
Reference: Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023; muzairkhattak/multimodal-prompt-learning:
`trainers/maple.py` (`MultiModalPromptLearner`: context from the first N_CTX tokens of CTX_INIT with the rest of the
phrase kept as fixed words, deeper text prompts N(0, 0.02), vision prompt of block i = Linear_i(text prompt of block
i) with the deeper Linear layers cloned from one), `clip/model.py` (`VisionTransformer_MaPLe`: block-0 prompts
appended after the positional embedding, before ln_pre; `ResidualAttentionBlock_MaPLe`: deeper prompts replace the
previous block's prompt outputs, text prompts at positions 1..N_CTX), `configs/trainers/MaPLe/
vit_b16_c2_ep5_batch4_2ctx.yaml` (N_CTX 2, CTX_INIT "a photo of a", PROMPT_DEPTH 9).

flbench: the same prompts, coupling functions (initial weights included) and insertion points; everything trainable
is shared (as FLIP's MaPLe server averages it).

Deviations: J is capped at the shallower tower's depth (the tiny CLIPs have 3 text and 4 image blocks); the widths are
the backbone's (the reference hard-codes ViT-B/16's 512 and 768); fp32 by default (`precision`), the reference
trains in fp16.

FLIP: `maple_flip` — FLIP's MaPLe (0-ml/flip `flcore/models/text/prompt.py`, `MaplePromptLearner`) runs its defaults:
prompt depth 1 (shallow), 4 random context tokens."""

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
                                      for _ in range(min(depth, 2)))
        # The reference clones one layer for all deeper couplings (`_get_clones`): they start identical.
        self.coupling.extend(copy.deepcopy(self.coupling[1]) for _ in range(depth - 2))

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
