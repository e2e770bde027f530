"""PromptSRC (Khattak et al., ICCV 2023): deep vision+language prompts that regulate themselves toward frozen CLIP.

Prompts: independent deep prompts on both towers (text: context from "a photo of a" plus N(0, 0.02) deeper prompts;
image: N(0, 0.02) tokens), `n_ctx_text`/`n_ctx_vision` tokens over the first `depth_text`/`depth_vision` blocks.
Loss: cross-entropy plus self-regulation toward the frozen model —
    λ_text  · L1(prompted class text features, frozen ones)      (both normalised; frozen = template ensemble)
    λ_image · L1(prompted image features, frozen image features)
    + KL(zero-shot logits ‖ prompted logits)                          (summed, divided by the number of logits)
Paper defaults (ViT-B/16): 4+4 tokens, depth 9 on both towers, λ_text = 25, λ_image = 10.

Gaussian prompt aggregation (GPA): the paper averages the prompts of every epoch with Gaussian weights
N(μ=15, σ=1) over 20 epochs. Here rounds play the part of epochs: the model the server *reports* after round t is
Σ_r w_r θ_r over the aggregates θ_0..θ_t with w ∝ exp(−(r−μ)²/2σ²), μ = `gpa_mean` (default 0.75 × num_rounds, the
paper's 15/20) and σ = `gpa_std` (default 1 round). Clients always continue from the live aggregate θ_t: the
Gaussian average is never written back into training (FLIP's version zeroes the live prompt).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flbench.algorithms.base import Encoded, PromptMethod, cosine_logits
from flbench.algorithms.deep_prompting import DeepTextPrompt, clamp_depth
from flbench.backbones import prompted
from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.errors import ConfigError


def gaussian_weights(num: int, mean: float, std: float) -> torch.Tensor:
    """Weights of states 0..num−1 ∝ exp(−(r−mean)²/2std²), normalised over the states that exist (log-space, so far
    tails do not underflow to an all-zero vector)."""
    rounds = torch.arange(num, dtype=torch.float64)
    return torch.softmax(-(rounds - mean) ** 2 / (2 * std ** 2), dim=0)


class PromptSRC(PromptMethod):
    name = "promptsrc"
    needs_vit = True
    paper = "PromptSRC (Khattak et al., ICCV 2023)"
    extra_loss = ("25·L1(text features, frozen) + 10·L1(image features, frozen) + KL(zero-shot ‖ prompted); "
                  "Gaussian prompt aggregation of the reported model")
    frozen_image_side = False

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx_text: int = 4, n_ctx_vision: int = 4, ctx_init: str | None = "a photo of a",
                 depth_text: int = 9, depth_vision: int = 9, text_loss_weight: float = 25.0,
                 image_loss_weight: float = 10.0, gpa_mean: float | None = None, gpa_std: float = 1.0,
                 num_rounds: int | None = None, init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        prompted.require_vit(backbone, self.name)
        if gpa_std <= 0:
            raise ConfigError(f"algorithm.gpa_std={gpa_std} must be > 0")
        if n_ctx_vision < 1:
            raise ConfigError(f"algorithm.n_ctx_vision={n_ctx_vision} must be at least 1")
        generator = torch.Generator().manual_seed(init_seed)
        depth_text = clamp_depth(depth_text, prompted.text_layers(backbone), "depth_text")
        depth_vision = clamp_depth(depth_vision, prompted.vision_layers(backbone), "depth_vision")
        self.text = DeepTextPrompt(backbone, classnames, n_ctx_text, ctx_init, depth_text, generator)
        self.vision = nn.Parameter(torch.randn(depth_vision, n_ctx_vision, prompted.vision_width(backbone),
                                               generator=generator) * 0.02)
        self.text_loss_weight, self.image_loss_weight = float(text_loss_weight), float(image_loss_weight)
        if gpa_mean is None and num_rounds:
            gpa_mean = 0.75 * float(num_rounds)
        # None (no round count known, e.g. a method built outside an experiment): report the live aggregate.
        self.gpa_mean, self.gpa_std = (None if gpa_mean is None else float(gpa_mean)), float(gpa_std)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)
        # Frozen targets: the template ensemble (the paper's "textual diversity").
        self.keep_handcrafted(self.templates)

    # --- forward -----------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Encoded:
        """Prompted image features; while training also the frozen ones, which the self-regulation needs."""
        features = prompted.encode_image_prompted(self.backbone, images, list(self.vision.unbind(0)))
        if not self.training:
            return features
        with torch.no_grad():
            return features, self.backbone.encode_image(images)

    def logits(self, encoded: Encoded) -> torch.Tensor:
        features = encoded[0] if isinstance(encoded, tuple) else encoded
        return cosine_logits(self.backbone, features, self.text.encode())

    def loss(self, encoded: Encoded, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(encoded, tuple):
            raise RuntimeError("PromptSRC.loss needs the frozen image features: call encode() in training mode")
        features, frozen_features = encoded
        text_features = self.text.encode()
        logits = cosine_logits(self.backbone, features, text_features)
        zero_shot = cosine_logits(self.backbone, frozen_features, self.handcrafted)
        ce = F.cross_entropy(logits, labels)
        l1_text = F.l1_loss(normalize(text_features), self.handcrafted)
        l1_image = F.l1_loss(normalize(features), normalize(frozen_features))
        kl = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(zero_shot, dim=-1), reduction="sum",
                      log_target=True) / logits.numel()
        return ce + self.text_loss_weight * l1_text + self.image_loss_weight * l1_image + kl

    # --- server side -------------------------------------------------------------------------------------------
    def reported_state(self, history: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Gaussian prompt aggregation over the aggregates of rounds 0..t (history[r] is round r's aggregate)."""
        states = [s for s in history if s]
        if self.gpa_mean is None or len(states) < len(history) or not states:
            return dict(history[-1])  # nothing aggregated yet (e.g. a zero-round evaluation)
        weights = gaussian_weights(len(states), self.gpa_mean, self.gpa_std)
        return {key: sum(float(w) * s[key].double() for w, s in zip(weights, states)).to(states[-1][key].dtype)
                for key in states[-1]}
