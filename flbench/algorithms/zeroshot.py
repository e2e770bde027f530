"""Zero-shot CLIP: hand-crafted templates, no training (the baseline every table starts from).

Class features come from the dataset's first template, or with `ensemble: true` from CLIP's prompt ensemble over all
the dataset's templates (`DatasetBundle.templates`; for the synthetic suite one per rendering domain of the config):
each template's normalised features, averaged and renormalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flbench.algorithms.base import PromptMethod, cosine_logits
from flbench.backbones.clip import FrozenCLIP


class ZeroShot(PromptMethod):
    name = "zeroshot"
    paper = "Zero-shot CLIP (Radford et al., ICML 2021)"
    extra_loss = "— (nothing is trained)"
    fidelity = """\
Reference: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021
(prompt ensembling: per-template normalised features averaged, renormalised); KaiyangZhou/CoOp `trainers/zsclip.py`
(ZeroshotCLIP: one hand-crafted template per dataset, CUSTOM_TEMPLATES).

flbench: the dataset's first template (`datasets/templates.py`, CoOp's per-dataset prompts), or with `ensemble` all
its templates averaged as CLIP does. Deviations: none; the ensemble's template list is flbench's per dataset (the
reference's ZeroshotCLIP2 uses 7 selected ImageNet templates plus the dataset's)."""

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 ensemble: bool = False, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        self.ensemble = ensemble
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.keep_handcrafted(self.templates if self.ensemble else self.templates[:1])

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.backbone, encoded, self.handcrafted)
