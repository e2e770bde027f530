"""PromptSRC (Khattak et al., ICCV 2023): deep vision+language prompts that regulate themselves toward frozen CLIP.

Prompts: independent deep prompts on both towers (text: context from "a photo of a" plus N(0, 0.02) deeper prompts;
image: N(0, 0.02) tokens), `n_ctx_text`/`n_ctx_vision` tokens over the first `depth_text`/`depth_vision` blocks
(`n_ctx_vision: 0`: no image prompts, as FLIP's version). Loss: cross-entropy plus self-regulation toward the frozen
model —
    λ_text  · L1(prompted class text features, teacher)               (both normalised)
    λ_image · L1(prompted image features, frozen image features)      (both normalised)
    + KL(zero-shot logits ‖ prompted logits)                          (summed, divided by the number of logits)
where the teacher is the mean of CLIP's *unnormalised* text features over the 60 ImageNet templates, normalised, for
every dataset, and the zero-shot logits score the frozen image features against it. Paper defaults (ViT-B/16): 4+4
tokens, depth 9 on both towers, λ_text = 25, λ_image = 10.

Gaussian prompt aggregation (GPA), federated: rounds 1..R play the reference's epochs 1..N. The model the server
reports after the last round R is Σ_{r=1..R} w_r θ_r over the aggregates θ_r, w_r ∝ exp(−(r−μ)²/2σ²) normalised over
r = 1..R, μ = `gpa_mean` (default 0.75·R, the reference's 15 of 20 epochs), σ = `gpa_std` (1 round); the initial
prompt θ_0 takes no weight. Before round R the live aggregate θ_t is reported, as the reference's model is until its
last epoch. Clients always continue from the live aggregate: the Gaussian average is never written into training.
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
from flbench.algorithms.prompting import handcrafted_text_features
from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.datasets.templates import IMAGENET_TEMPLATES_60
from flbench.errors import ConfigError


TEACHERS = ("imagenet", "dataset")


def gaussian_weights(rounds: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Weights ∝ exp(−(r−mean)²/2std²) over the given rounds, normalised over them (in log-space, so that far tails
    do not underflow to an all-zero vector)."""
    return torch.softmax(-(rounds.double() - mean) ** 2 / (2 * std ** 2), dim=0)


class PromptSRC(PromptMethod):
    name = "promptsrc"
    needs_vit = True
    paper = "PromptSRC (Khattak et al., ICCV 2023)"
    extra_loss = ("25·L1(text features, frozen) + 10·L1(image features, frozen) + KL(zero-shot ‖ prompted); "
                  "Gaussian prompt aggregation of the reported model")
    frozen_image_side = False
    fidelity = """\
Reference: Khattak et al., "Self-regulating Prompts: Foundational Model Adaptation without Forgetting", ICCV 2023;
muzairkhattak/PromptSRC, `trainers/promptsrc.py` (teacher: unnormalised `encode_text` of the 60
`trainers/imagenet_templates.py` prompts averaged, then normalised, for every dataset; L1 text/image terms and the
summed KL over `logits.numel()`; GPA weights `gauss(e)` for epochs e = 1..N normalised over all N, accumulated after
each epoch and loaded once, after the last), `configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml`
(4+4 tokens, depth 9/9, weights 25/10, GPA μ 15, σ 1 of 20 epochs, CTX_INIT "a photo of a").

flbench: those losses and that teacher; GPA over rounds as defined in the module notes (rounds for epochs, the
final model is the Gaussian average, μ = 0.75·R).

Deviations: rounds stand in for epochs (a round may hold several local epochs; the average is over the server's
aggregates, the only prompts the federation has); intermediate evaluations report the live aggregate. `teacher:
dataset` (non-default) uses the dataset's own templates, normalised each (CLIP's ensembling). Prompt depths are
capped at the tower's depth (the tiny CLIPs have 3–4 blocks).

FLIP: `promptsrc_flip` — FLIP's PromptSRC (0-ml/flip `flcore/models/clip/PromptSRC.py`) learns a shallow text prompt
(depth 1) from random vectors, no image prompts, the same teacher and weights, and GPA with an absolute μ = 15. FLIP's
GPA also weights round 0 and writes the running weighted sum back into the live prompt after every round (so the
clients restart from a prompt scaled by the small early weights); that is not reproduced: clients here always
continue from the live aggregate."""

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx_text: int = 4, n_ctx_vision: int = 4, ctx_init: str | None = "a photo of a",
                 depth_text: int = 9, depth_vision: int = 9, text_loss_weight: float = 25.0,
                 image_loss_weight: float = 10.0, teacher: str = "imagenet", gpa_mean: float | None = None,
                 gpa_std: float = 1.0, num_rounds: int | None = None, init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        prompted.require_vit(backbone, self.name)
        if gpa_std <= 0:
            raise ConfigError(f"algorithm.gpa_std={gpa_std} must be > 0")
        if n_ctx_vision < 0:
            raise ConfigError(f"algorithm.n_ctx_vision={n_ctx_vision} must be ≥ 0 (0: no image prompts)")
        if teacher not in TEACHERS:
            raise ConfigError(f"algorithm.teacher={teacher!r} is unknown; choose one of {TEACHERS}")
        generator = torch.Generator().manual_seed(init_seed)
        depth_text = clamp_depth(depth_text, prompted.text_layers(backbone), "depth_text")
        self.text = DeepTextPrompt(backbone, classnames, n_ctx_text, ctx_init, depth_text, generator)
        self.vision = None
        if n_ctx_vision:
            depth_vision = clamp_depth(depth_vision, prompted.vision_layers(backbone), "depth_vision")
            self.vision = nn.Parameter(torch.randn(depth_vision, n_ctx_vision, prompted.vision_width(backbone),
                                                   generator=generator) * 0.02)
        self.text_loss_weight, self.image_loss_weight = float(text_loss_weight), float(image_loss_weight)
        self.teacher = teacher
        if gpa_mean is None and num_rounds:
            gpa_mean = 0.75 * float(num_rounds)
        # No round count known (e.g. a method built outside an experiment): the live aggregate is reported.
        self.num_rounds = int(num_rounds) if num_rounds else None
        self.gpa_mean, self.gpa_std = (None if gpa_mean is None else float(gpa_mean)), float(gpa_std)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.text.set_classnames(classnames)
        self._teacher_for: tuple[str, ...] | None = None  # encoded on first use: evaluation never needs it

    @property
    def handcrafted(self) -> torch.Tensor:
        """The frozen text teacher [C, D] of the current class names (cached per process and class list)."""
        if self._teacher_for != tuple(self.classnames):
            if self.teacher == "imagenet":  # unnormalised features averaged over the 60 prompts, then normalised
                features = handcrafted_text_features(self.backbone, self.classnames, IMAGENET_TEMPLATES_60,
                                                     normalise_each=False)
            else:
                features = handcrafted_text_features(self.backbone, self.classnames, self.templates)
            self._teacher, self._teacher_for = features, tuple(self.classnames)
        return self._teacher

    # --- forward -----------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Encoded:
        """Prompted image features; while training also the frozen ones, which the self-regulation needs."""
        if self.vision is None:
            with torch.no_grad():
                features = self.backbone.encode_image(images)
            return (features, features) if self.training else features
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
        """After the last round R: the Gaussian average of the aggregates of rounds 1..R (history[r] is round r's);
        before it, or without a round count, the live aggregate."""
        last = len(history) - 1
        if self.gpa_mean is None or self.num_rounds is None or last < self.num_rounds or not all(history[1:]):
            return dict(history[-1])
        states = history[1:self.num_rounds + 1]
        weights = gaussian_weights(torch.arange(1, len(states) + 1), self.gpa_mean, self.gpa_std)
        return {key: sum(float(w) * s[key].double() for w, s in zip(weights, states)).to(states[-1][key].dtype)
                for key in states[-1]}
