"""FedOTP (Li et al., CVPR 2024): a global and a local prompt per client, matched to patches by unbalanced OT.

Each client trains two CoOp-style contexts: a *global* one, averaged by the server, and a *local* one that never
leaves the client (it is `local_state()`, kept in the client's Flower Context between rounds). Each class gets two
text features; an image's M local features are transported onto them with the image-side marginal relaxed to an
inequality and total mass γ (`mass`), so each prompt may attend to the patches it explains best
(flbench.algorithms.ot). Score = Σ T* ⊙ sim, logits = CLIP's logit scale × score.
Paper defaults: γ = 0.8 ("top_percent"), ε = 0.01, 100 iterations, tolerance 1e-3, random N(0, 0.02) contexts of 16
tokens; n_ctx defaults to 4 here so prompts fit the tiny CLIP's 16-token context.

On the server, `global` evaluation sees the global prompt with the initial local prompt (the server never holds a
client's local prompt). Local features: ViT patch tokens; neither tiny CLIP has useful ones (see plot.py).
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


class FedOTP(PromptMethod):
    name = "fedotp"
    paper = "FedOTP (Li et al., CVPR 2024)"
    extra_loss = "none (cross-entropy on unbalanced-OT logits)"

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 4, class_token_position: str = "end", mass: float = 0.8, eps: float = 0.01,
                 max_iter: int = 100, tol: float = 1e-3, init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        if n_ctx < 1:
            raise ConfigError("algorithm.n_ctx must be at least 1")
        if not 0.0 < mass <= 1.0:
            raise ConfigError(f"algorithm.mass={mass} must be in (0, 1] (the fraction of patch mass transported)")
        if eps <= 0:
            raise ConfigError(f"algorithm.eps={eps} must be > 0")
        generator = torch.Generator().manual_seed(init_seed)
        self.global_ctx = nn.Parameter(torch.randn(n_ctx, backbone.text_width, generator=generator) * 0.02)
        self.local_ctx = nn.Parameter(torch.randn(n_ctx, backbone.text_width, generator=generator) * 0.02)
        self.prompt = TextPrompt(backbone, classnames, n_ctx, class_token_position)
        self.mass, self.eps, self.max_iter, self.tol = float(mass), float(eps), int(max_iter), float(tol)

    def shared_keys(self) -> list[str]:
        """Everything trainable but the local prompt (routers attached by `backbone.attention.train_routers` too)."""
        return [k for k in super().shared_keys() if k != "local_ctx"]

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)

    def text_features(self) -> torch.Tensor:
        """[2, C, D]: the global prompt's class features, then the local prompt's."""
        return self.prompt.encode(torch.stack([self.global_ctx, self.local_ctx]).unsqueeze(1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Local image features [B, M, D] (frozen)."""
        with torch.no_grad():
            return prompted.encode_image_local(self.backbone, images)[1]

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        score = ot_similarity(normalize(encoded), normalize(self.text_features()), self.eps, self.max_iter, self.tol,
                              mass=self.mass)
        return self.backbone.logit_scale * score
