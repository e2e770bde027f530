"""PLOT (Chen et al., ICLR 2023): N prompts per class matched to an image's local features by optimal transport.

Learns N context sets (CoOp-style, shared by all classes), giving N text features per class. An image is described
by its M local features (ViT: projected patch tokens; ResNet: the attention pool at each cell of the last map). The
class score is Σ T* ⊙ sim, with T* the entropic OT plan (Sinkhorn, uniform marginals 1/M and 1/N) for the cost
1 − sim; logits are that score times CLIP's logit scale. The plan is computed without gradients (flbench.algorithms.ot).
Paper defaults: N = 4, ε = 0.1, 100 iterations, tolerance 0.01, random N(0, 0.02) contexts of 16 tokens; here
n_ctx defaults to 4 so that prompts fit the tiny CLIP's 16-token context. Everything trainable is shared.

The image side is frozen, so local features are computed once and cached. Neither tiny CLIP gives OT much to work
with: the tiny ResNet has one local feature per image (1×1 map at 32 px), so OT reduces to averaging the N prompts;
the tiny ViT has 64 patch tokens, but CLIP pretraining aligns only the pooled token with text, and the tiny CLIP's
projected patch tokens carry almost no class signal (measured on 512 default-suite test images: zero-shot 4.7 % from
the mean patch token, 53 % from [CLS]), so PLOT starts near chance there. Meaningful transport needs a real backbone
(docs/methods_visual.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flbench.algorithms.base import PromptMethod
from flbench.algorithms.ot import ot_similarity
from flbench.algorithms.prompting import TextPrompt
from flbench.backbones import prompted
from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.errors import ConfigError


class PLOT(PromptMethod):
    name = "plot"
    paper = "PLOT (Chen et al., ICLR 2023)"
    extra_loss = "none (cross-entropy on OT-distance logits)"

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_prompts: int = 4, n_ctx: int = 4, class_token_position: str = "end", eps: float = 0.1,
                 max_iter: int = 100, tol: float = 0.01, init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        if n_prompts < 1 or n_ctx < 1:
            raise ConfigError("algorithm.n_prompts and algorithm.n_ctx must be at least 1")
        if eps <= 0:
            raise ConfigError(f"algorithm.eps={eps} must be > 0")
        generator = torch.Generator().manual_seed(init_seed)
        self.ctx = nn.Parameter(torch.randn(n_prompts, n_ctx, backbone.text_width, generator=generator) * 0.02)
        self.prompt = TextPrompt(backbone, classnames, n_ctx, class_token_position)
        self.eps, self.max_iter, self.tol = float(eps), int(max_iter), float(tol)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)

    def text_features(self) -> torch.Tensor:
        """[N, C, D]: every prompt for every class."""
        return self.prompt.encode(self.ctx.unsqueeze(1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Local image features [B, M, D] (frozen)."""
        with torch.no_grad():
            return prompted.encode_image_local(self.backbone, images)[1]

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        score = ot_similarity(normalize(encoded), normalize(self.text_features()), self.eps, self.max_iter, self.tol)
        return self.backbone.logit_scale * score
