"""FedPGP (Cui et al., ICML 2024): personalised prompt = global prompt σ + a low-rank personal part U·V, with a
prompt-wise contrastive term that keeps the global prompt close to CLIP's hand-crafted knowledge.

Trained per client: σ [n_ctx, width] (shared, FedAvg), U [n_ctx, r] and V [r, width] (personal, N(0, 0.02) init,
never leave the client; r = `rank`, 8). Classification uses the personalised context σ + UV.

Contrastive term, per class c, with normalised text features h_0 (hand-crafted template), h_σ (global prompt) and
h_p (personalised prompt σ + UV):

    L_con = −log  exp(cos(h_0, h_σ)/τ) / (exp(cos(h_0, h_σ)/τ) + exp(cos(h_σ, h_p)/τ))

averaged over classes: the global prompt is pulled toward the hand-crafted features (generalisation) and pushed away
from the personalised features, so that U·V carries the client-specific knowledge. Loss: CE + μ·L_con. μ = 1 and
τ = 0.5 are our choice (we could not check the paper's values offline); both are overridable. The server, which holds
no client's U·V, evaluates σ alone (see `personal.PersonalPromptMethod`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flbench.algorithms.base import cosine_logits
from flbench.algorithms.personal import PersonalPromptMethod
from flbench.algorithms.prompting import TextPrompt, context_length_of, init_context
from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.errors import ConfigError


class FedPGP(PersonalPromptMethod):
    name = "fedpgp"
    paper = "FedPGP (Cui et al., ICML 2024)"
    extra_loss = "μ·contrastive: h_σ pulled to hand-crafted h_0, pushed from personalised h_p (μ = 1, τ = 0.5)"
    global_keys = ("sigma",)

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 4, ctx_init: str | None = "a photo of a", rank: int = 8, mu: float = 1.0,
                 temperature: float = 0.5, class_token_position: str = "end", init_seed: int = 0,
                 **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        if rank < 1 or temperature <= 0:
            raise ConfigError("algorithm.rank must be at least 1 and algorithm.temperature positive")
        n_ctx = context_length_of(backbone, ctx_init, n_ctx)
        generator = torch.Generator().manual_seed(init_seed)
        self.sigma = nn.Parameter(init_context(backbone, n_ctx, ctx_init, generator))
        self.U = nn.Parameter(torch.randn(n_ctx, rank, generator=generator) * 0.02)
        self.V = nn.Parameter(torch.randn(rank, backbone.text_width, generator=generator) * 0.02)
        self.mu, self.temperature = float(mu), float(temperature)
        self.prompt = TextPrompt(backbone, classnames, n_ctx, class_token_position)
        self._init_personal()
        self.keep_handcrafted(self.templates[:1])

    def personal_context(self) -> torch.Tensor:
        return self.sigma + self.U @ self.V

    def text_features(self) -> torch.Tensor:
        return self.prompt.encode(self.personal_context() if self.uses_local() else self.sigma)

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.backbone, encoded, self.text_features())

    def contrastive_term(self, global_features: torch.Tensor, personal_features: torch.Tensor) -> torch.Tensor:
        h_sigma, h_p = normalize(global_features), normalize(personal_features)
        positive = (self.handcrafted * h_sigma).sum(-1) / self.temperature
        negative = (h_sigma * h_p).sum(-1) / self.temperature
        pairs = torch.stack([positive, negative], dim=1)
        return F.cross_entropy(pairs, torch.zeros(len(pairs), dtype=torch.long, device=pairs.device))

    def loss(self, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        both = self.prompt.encode(torch.stack([self.sigma, self.personal_context()]).unsqueeze(1))  # [2, C, D]
        ce = F.cross_entropy(cosine_logits(self.backbone, encoded, both[1]), labels)
        return ce + self.mu * self.contrastive_term(both[0], both[1])

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)
        self.keep_handcrafted(self.templates[:1])
