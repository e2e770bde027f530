"""Zero-shot CLIP: hand-crafted templates, no training (the baseline every table starts from)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flbench.algorithms.base import PromptMethod, cosine_logits
from flbench.algorithms.prompting import handcrafted_text_features
from flbench.backbones.clip import FrozenCLIP


class ZeroShot(PromptMethod):
    name = "zeroshot"

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 ensemble: bool = False, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        self.ensemble = ensemble
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        templates = self.templates if self.ensemble else self.templates[:1]
        self.register_buffer("text_features", handcrafted_text_features(self.backbone, classnames, templates),
                             persistent=False)

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.backbone, encoded, self.text_features)
