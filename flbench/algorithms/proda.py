"""ProDA (Lu et al., CVPR 2022): prompt distribution learning — K learned prompts whose class text features are
modelled as a Gaussian, trained with an upper bound of the expected cross-entropy under that Gaussian.

Prompts: K context sets (n_ctx vectors each, N(0, 0.02) init); a quarter put the class name in front, a quarter in
the middle, half at the end, so the collection is diverse by construction (as the paper). Per class c the K
normalised text features w_{k,c} give a mean μ_c and a covariance over prompts; classes are jointly Gaussian because
every class is described by the same K prompts, so cross-class covariances Σ_{jy} are used too.

Loss (the paper's surrogate, with logit scale s and normalised image feature x):

    L = −log  exp(s μ_yᵀx) / Σ_j exp(s μ_jᵀx + ½ s² xᵀ(Σ_jj + Σ_yy − 2Σ_jy)x)

computed without forming any D×D matrix: xᵀ(Σ_jj + Σ_yy − 2Σ_jy)x = (1/(K−1)) Σ_k (a_kj − a_ky)², a_kc = xᵀ(w_kc − μ_c)
(unbiased covariance). Diversity term: mean |cos| between the class-free text features of different prompts
(prompts without a class name), weight 0.1, so prompts do not collapse onto one another. Prediction uses s μ_jᵀx,
the expected logit, in training and evaluation alike (μ is not renormalised). All prompts are shared.

`prompt_batch` (default: all K) trains a random subset of prompts per step, for large backbones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flbench.algorithms.base import PromptMethod
from flbench.algorithms.prompting import TextPrompt
from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.errors import ConfigError


def prompt_positions(n_prompts: int) -> list[str]:
    """ProDA's mix of class-token positions: ¼ front, ¼ middle, ½ end."""
    quarter = n_prompts // 4
    return ["front"] * quarter + ["middle"] * quarter + ["end"] * (n_prompts - 2 * quarter)


def gaussian_surrogate_loss(features: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                            scale: torch.Tensor) -> torch.Tensor:
    """ProDA's upper bound of E_w[CE] for prompt features [K, C, D] and normalised images [B, D]."""
    K = features.shape[0]
    mean = features.mean(0)                                        # [C, D]
    logits = scale * images @ mean.t()                             # [B, C]
    centred = scale * torch.einsum("bd,kcd->bkc", images, features - mean)   # s·a_kc, [B, K, C]
    at_label = centred.gather(2, labels.view(-1, 1, 1).expand(-1, K, 1))     # [B, K, 1]
    variance = (centred - at_label).pow(2).sum(1) / (K - 1)        # s² xᵀ(Σ_jj + Σ_yy − 2Σ_jy)x, 0 at j = y
    return F.cross_entropy(logits + 0.5 * variance, labels)


class ProDA(PromptMethod):
    name = "proda"
    paper = "ProDA (Lu et al., CVPR 2022)"
    extra_loss = "Gaussian upper bound of expected CE over K prompts; 0.1·mean |cos| between prompts (diversity)"

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_prompts: int = 32, n_ctx: int = 4, diversity_weight: float = 0.1, prompt_batch: int | None = None,
                 init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        if n_prompts < 2:
            raise ConfigError("algorithm.n_prompts must be at least 2 (ProDA estimates a covariance over prompts)")
        if n_ctx < 2:
            raise ConfigError("algorithm.n_ctx must be at least 2 (ProDA's middle position splits the context)")
        if prompt_batch is not None and not 2 <= prompt_batch <= n_prompts:
            raise ConfigError(f"algorithm.prompt_batch={prompt_batch} must be between 2 and n_prompts={n_prompts}")
        generator = torch.Generator().manual_seed(init_seed)
        self.ctx = nn.Parameter(torch.randn(n_prompts, n_ctx, backbone.text_width, generator=generator) * 0.02)
        self.positions = prompt_positions(n_prompts)
        self.diversity_weight, self.prompt_batch = float(diversity_weight), prompt_batch
        self.prompts = nn.ModuleDict({pos: TextPrompt(backbone, classnames, n_ctx, pos)
                                      for pos in sorted(set(self.positions))})
        self.classfree = TextPrompt(backbone, [""], n_ctx, "end")

    def class_features(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised class text features [K', C, D] of the prompts at `index` (all by default), in that order."""
        index = torch.arange(self.ctx.shape[0]) if index is None else index
        out: list[torch.Tensor | None] = [None] * len(index)
        for pos, prompt in self.prompts.items():
            rows = [i for i, k in enumerate(index.tolist()) if self.positions[k] == pos]
            if rows:
                feats = normalize(prompt.encode(self.ctx[index[rows]].unsqueeze(1)))
                for r, f in zip(rows, feats):
                    out[r] = f
        return torch.stack(out)  # type: ignore[arg-type]

    def diversity(self, index: torch.Tensor) -> torch.Tensor:
        """Mean |cos| between the class-free text features of different prompts."""
        feats = normalize(self.classfree.encode(self.ctx[index].unsqueeze(1))[:, 0])  # [K', D]
        sims = feats @ feats.t()
        off_diagonal = ~torch.eye(len(index), dtype=torch.bool, device=sims.device)
        return sims[off_diagonal].abs().mean()

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        mean = self.class_features().mean(0)
        return self.backbone.logit_scale * normalize(encoded) @ mean.t()

    def loss(self, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        K = self.ctx.shape[0]
        index = torch.randperm(K)[:self.prompt_batch] if self.prompt_batch and self.prompt_batch < K \
            else torch.arange(K)
        surrogate = gaussian_surrogate_loss(self.class_features(index), normalize(encoded), labels,
                                            self.backbone.logit_scale)
        return surrogate + self.diversity_weight * self.diversity(index)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        for prompt in self.prompts.values():
            prompt.set_classnames(classnames)
