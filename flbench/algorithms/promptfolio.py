"""PromptFolio (Pan et al., NeurIPS 2024): a portfolio of a global prompt (shared, aggregated) and a local prompt
(personal, never leaves the client); class text features are mixed (1 − θ)·global + θ·local.

Both prompts are CoOp contexts; each is encoded separately, L2-normalised, and the normalised features are mixed with
θ = 0.2 (the mixing weight the FLiP benchmark uses for PromptFolio; the paper studies θ as a trade-off). Only the
global prompt is sent to the server; the local prompt lives in the client's Context.state. The loss is plain
cross-entropy on the mixed features. The server, which holds no client's local prompt, evaluates the global prompt
alone (see `personal.PersonalPromptMethod`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flbench.algorithms.base import cosine_logits
from flbench.algorithms.personal import PersonalPromptMethod
from flbench.algorithms.prompting import TextPrompt, context_length_of, init_context
from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.errors import ConfigError


class PromptFolio(PersonalPromptMethod):
    name = "promptfolio"
    paper = "PromptFolio (Pan et al., NeurIPS 2024)"
    extra_loss = "—"
    global_keys = ("global_ctx",)

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 4, ctx_init: str | None = "a photo of a", theta: float = 0.2,
                 class_token_position: str = "end", init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        if not 0.0 <= theta <= 1.0:
            raise ConfigError(f"algorithm.theta={theta} must be in [0, 1]")
        n_ctx = context_length_of(backbone, ctx_init, n_ctx)
        generator = torch.Generator().manual_seed(init_seed)
        self.global_ctx = nn.Parameter(init_context(backbone, n_ctx, ctx_init, generator))
        self.local_ctx = nn.Parameter(init_context(backbone, n_ctx, ctx_init, generator))
        self.theta = float(theta)
        self.prompt = TextPrompt(backbone, classnames, n_ctx, class_token_position)
        self._init_personal()

    def text_features(self) -> torch.Tensor:
        if not self.uses_local():
            return normalize(self.prompt.encode(self.global_ctx))
        both = normalize(self.prompt.encode(torch.stack([self.global_ctx, self.local_ctx]).unsqueeze(1)))  # [2, C, D]
        return (1.0 - self.theta) * both[0] + self.theta * both[1]

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.backbone, encoded, self.text_features())

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)
