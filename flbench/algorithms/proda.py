"""ProDA (Lu et al., CVPR 2022): prompt distribution learning — K learned prompts whose class text features are
modelled as a Gaussian, trained with an upper bound of the expected cross-entropy under that Gaussian.

Prompts: K context sets (n_ctx vectors each, N(0, 0.02) init); a quarter put the class name in front, a quarter in
the middle, half at the end, so the collection is diverse by construction (as the paper). Per class c the K
normalised text features w_{k,c} give a mean μ_c; classes are jointly Gaussian because every class is described by the
same K prompts, so cross-class covariances enter too.

Loss (the surrogate of every public implementation, with logit scale s and normalised image feature x):

    L = −log  exp(s μ_yᵀx) / Σ_j exp(s μ_jᵀx + ½ s² σ_j(x)),
    σ_j(x) = (1/(K+1)) Σ_k Σ_d x_d² ((w_kj − μ_j)_d − (w_ky − μ_y)_d)²

— the covariance kept per feature dimension (diagonal in d, full across classes), weighted by x² (`covariance:
full`, non-default, uses the whole D×D covariance: (1/(K+1)) Σ_k (xᵀ(w_kj − μ_j) − xᵀ(w_ky − μ_y))²). Diversity term:
mean |cos| between the class-free text features of different prompts ("X X X X." with each context), over all K
prompts, weight 0.1. Prediction uses s μ_jᵀx, the expected logit, in training and evaluation alike (μ is not
renormalised). All prompts are shared.

`prompt_batch` (default: all K) trains the prompts in batches that walk a fresh random permutation of the K prompts
(each prompt once per K / prompt_batch steps), for large backbones; the diversity term still covers all K. In a
federation every local training starts a new walk (drawn from the client's seeded stream), as one run of the
reference's training loop.
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


COVARIANCES = ("diagonal", "full")


def gaussian_surrogate_loss(features: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                            scale: torch.Tensor, covariance: str = "diagonal") -> torch.Tensor:
    """ProDA's upper bound of E_w[CE] for prompt features [K, C, D] and normalised images [B, D]."""
    K = features.shape[0]
    mean = features.mean(0)                                        # [C, D]
    logits = scale * images @ mean.t()                             # [B, C]
    dev = features - mean                                          # [K, C, D]
    if covariance == "full":
        centred = torch.einsum("bd,kcd->bkc", images, dev)         # xᵀ(w_kc − μ_c), [B, K, C]
        at_label = centred.gather(2, labels.view(-1, 1, 1).expand(-1, K, 1))
        spread = (centred - at_label).pow(2).sum(1)                # Σ_k (a_kj − a_ky)², 0 at j = y
    else:  # Σ_k Σ_d x_d² (dev_kj − dev_ky)²_d, expanded so that no [K, B, C, D] tensor is formed
        # The label rows are picked by a one-hot product, not by indexing: with repeated labels, indexing's backward
        # (index_put with accumulation) adds with parallel atomics on CPU from 32,768 elements on, in a racing order
        # that made ProDA's gradients differ run to run (index_select's, index_add, does so on CUDA, as PyTorch
        # documents). A product's reduction has a fixed order, and its forward is exact (x·1 plus zeros).
        weights = images.pow(2)                                    # [B, D]
        energy = dev.pow(2).sum(0)                                 # Σ_k dev_kc², [C, D]
        pick = F.one_hot(labels, dev.shape[1]).to(dev.dtype)       # [B, C]
        at_label = torch.einsum("bc,kcd->kbd", pick, dev)          # dev_ky, [K, B, D]
        spread = ((weights * (pick @ energy)).sum(-1, keepdim=True) + weights @ energy.t()
                  - 2 * torch.einsum("kbd,kcd->bc", at_label * weights, dev))
    return F.cross_entropy(logits + 0.5 * scale ** 2 * spread / (K + 1), labels)


class ProDA(PromptMethod):
    name = "proda"
    _order: torch.Tensor  # the permutation of the prompts being walked (drawn when the cursor is back at 0)
    paper = "ProDA (Lu et al., CVPR 2022)"
    extra_loss = "Gaussian upper bound of expected CE over K prompts; 0.1·mean |cos| between prompts (diversity)"
    fidelity = """\
Reference: Lu et al., "Prompt Distribution Learning", CVPR 2022. The authors released no code; every public
implementation computes the same surrogate: 0-ml/flip `flcore/models/clip/ProDA.py` with `flcore/models/text/prompt.py`
(ProDAPromptLearner), and the Dassl-based ProDA trainers (e.g. the copy whose config sets N_PROMPT 32, PROMPT_BS 4,
ALPHA 0.1, N_CTX 16): per-dimension covariance `Σ_k (w_k − μ)(w_k − μ)` over prompts divided by K + 1, weighted by
x², the ¼ front / ¼ middle / ½ end positions, the class-free "X … X." diversity prompts over all K prompts, the mean
of the normalised features as the classifier, prompt batches walking a random permutation.

flbench: that surrogate, K = 32, diversity weight 0.1 (the Dassl copy's ALPHA), prompt batches as the reference.

Deviations: n_ctx = 4 (the benchmark's prompt length; the Dassl copy uses 16). `covariance: full` (non-default) uses
the whole D×D covariance xᵀΣx (the exact variance of the logit difference under a Gaussian over the features), same
divisor; the diagonal form keeps only Σ_d x_d² Σ_dd.

FLIP: `proda_flip` — FLIP weighs the diversity term by 1.0 (`ortho_loss_ratio`). FLIP's ProDA builds only the
end-position prompts (its `construct_prompts`) and its batch script passes `--num_prompt=1`, which leaves no
covariance or diversity at all; those are not reproduced (K = 32 and the three positions stay)."""

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_prompts: int = 32, n_ctx: int = 4, diversity_weight: float = 0.1, prompt_batch: int | None = None,
                 covariance: str = "diagonal", init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        if n_prompts < 2:
            raise ConfigError("algorithm.n_prompts must be at least 2 (ProDA estimates a covariance over prompts)")
        if n_ctx < 2:
            raise ConfigError("algorithm.n_ctx must be at least 2 (ProDA's middle position splits the context)")
        if prompt_batch is not None and not (2 <= prompt_batch <= n_prompts and n_prompts % prompt_batch == 0):
            raise ConfigError(f"algorithm.prompt_batch={prompt_batch} must be at least 2 and divide "
                              f"n_prompts={n_prompts} (batches walk a permutation of the prompts); null: all prompts")
        if covariance not in COVARIANCES:
            raise ConfigError(f"algorithm.covariance={covariance!r} is unknown; choose one of {COVARIANCES}")
        generator = torch.Generator().manual_seed(init_seed)
        self.ctx = nn.Parameter(torch.randn(n_prompts, n_ctx, backbone.text_width, generator=generator) * 0.02)
        self.positions = prompt_positions(n_prompts)
        self.diversity_weight, self.prompt_batch, self.covariance = float(diversity_weight), prompt_batch, covariance
        self.prompts = nn.ModuleDict({pos: TextPrompt(backbone, classnames, n_ctx, pos)
                                      for pos in sorted(set(self.positions))})
        self.classfree = TextPrompt(backbone, [""], n_ctx, "end")
        self.reset_walk()

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

    def diversity(self) -> torch.Tensor:
        """Mean |cos| between the class-free text features of different prompts (all K of them)."""
        feats = normalize(self.classfree.encode(self.ctx.unsqueeze(1))[:, 0])  # [K, D]
        sims = feats @ feats.t()
        off_diagonal = ~torch.eye(len(feats), dtype=torch.bool, device=sims.device)
        return sims[off_diagonal].abs().mean()

    def reset_walk(self) -> None:
        self._cursor = 0  # the next prompt batch starts a new permutation

    def next_prompt_batch(self) -> torch.Tensor:
        """The prompts this step trains: all K, or the next `prompt_batch` of a random permutation (a new one each
        time the last is used up)."""
        K = self.ctx.shape[0]
        if not self.prompt_batch or self.prompt_batch >= K:
            return torch.arange(K)
        if self._cursor == 0:
            self._order = torch.randperm(K)
        index = self._order[self._cursor:self._cursor + self.prompt_batch]
        self._cursor = (self._cursor + self.prompt_batch) % K
        return index

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        mean = self.class_features().mean(0)
        return self.backbone.logit_scale * normalize(encoded) @ mean.t()

    def loss(self, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        surrogate = gaussian_surrogate_loss(self.class_features(self.next_prompt_batch()), normalize(encoded), labels,
                                            self.backbone.logit_scale, self.covariance)
        return surrogate + self.diversity_weight * self.diversity()

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        for prompt in self.prompts.values():
            prompt.set_classnames(classnames)
