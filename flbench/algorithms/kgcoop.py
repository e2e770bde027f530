"""KgCoOp (Yao et al., CVPR 2023): CoOp plus a knowledge-guided term that keeps the learned class text embeddings
close to the hand-crafted ones, so the prompt keeps CLIP's general knowledge (better on unseen classes).

Loss: CE + λ · (1/C) Σ_c ||ŵ_c − ŵ_c^clip||², with ŵ the L2-normalised text features of the learned prompt and ŵ^clip
those of the dataset's hand-crafted template (its first template). λ = 8 as in the paper.

Choice: the paper's squared Euclidean distance between normalised embeddings. The authors' code computes 1 − cos
instead, which is exactly half of it (||a − b||² = 2 − 2 cos for unit vectors), so λ = 8 here weighs the term like
λ = 16 there. Everything trainable (the context) is shared, as in CoOp.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from flbench.algorithms.base import cosine_logits
from flbench.algorithms.coop import CoOp
from flbench.backbones.clip import FrozenCLIP, normalize


class KgCoOp(CoOp):
    name = "kgcoop"
    paper = "KgCoOp (Yao et al., CVPR 2023)"
    extra_loss = "λ·mean_c ‖ŵ_c − ŵ_c^clip‖² to hand-crafted text features (λ = 8)"

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 lam: float = 8.0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        self.lam = float(lam)
        self.keep_handcrafted(self.templates[:1])

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.keep_handcrafted(self.templates[:1])

    def knowledge_term(self, text_features: torch.Tensor) -> torch.Tensor:
        """Mean squared distance between normalised learned and hand-crafted class embeddings."""
        return (normalize(text_features) - self.handcrafted).pow(2).sum(-1).mean()

    def loss(self, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        text = self.text_features()
        logits = cosine_logits(self.backbone, encoded, text)
        return F.cross_entropy(logits, labels) + self.lam * self.knowledge_term(text)
