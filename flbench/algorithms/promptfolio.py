"""PromptFolio (Pan et al., NeurIPS 2024): a portfolio of a global prompt (shared, aggregated) and a local prompt
(personal, never leaves the client); class text features are mixed (1 − θ)·global + θ·local.

Both prompts are CoOp contexts (independent N(0, 0.02) draws); each is encoded separately and L2-normalised, and the
normalised features are mixed with θ = 0.4. The mixture is used as it is, *not* renormalised: it is shorter than a
unit vector wherever the two prompts disagree, which lowers the effective temperature of those classes' logits (the
authors' formulation; `renormalise: true` is the non-default alternative). Only the global prompt is sent to the
server; the local prompt lives in the client's Context.state. The loss is plain cross-entropy on the mixed features.
The server, which holds no client's local prompt, evaluates the global prompt alone (see
`personal.PersonalPromptMethod`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flbench.algorithms.cohort import ClientState, global_local_backward
from flbench.algorithms.personal import PersonalPromptMethod
from flbench.algorithms.prompting import TextPrompt, context_length_of, init_context
from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.errors import ConfigError


class PromptFolio(PersonalPromptMethod):
    name = "promptfolio"
    paper = "PromptFolio (Pan et al., NeurIPS 2024)"
    extra_loss = "—"
    global_keys = ("global_ctx",)
    fidelity = """\
Reference: Pan et al., "Federated Learning from Vision-Language Foundation Models: Theoretical Analysis and Method",
NeurIPS 2024; PanBikang/PromptFolio, `trainers/PromptFolio.py` (CustomCLIP.forward: features of prompt 0 (global)
and prompt 1 (local) normalised, mixed `(1 − frac)·g + frac·l`, logits against the normalised image features with no
renormalisation; prompts N(0, 0.02) when CTX_INIT is empty), `federated_main.py` (`--frac_p` 0.4, `--n_ctx` 8,
`--num_prompt` 2, `--avg_prompt` 1: only the first prompt is averaged).

flbench: that mixture, θ = 0.4, random initialisation; the local prompt stays on the client.

Deviations: n_ctx = 4 (the benchmark's prompt length; the authors' default is 8). `renormalise: true` (non-default)
renormalises the mixture to unit length, a plain cosine classifier. `ctx_init` (non-default) starts both prompts from
the same words, as the authors' code does when given a CTX_INIT.

FLIP: `promptfolio_flip` — FLIP (0-ml/flip `flcore/models/clip/PromptFolio.py`, main.py `--folio_frac`) mixes the same
way with θ = 0.2."""

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 4, ctx_init: str | None = None, theta: float = 0.4, renormalise: bool = False,
                 class_token_position: str = "end", init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        if not 0.0 <= theta <= 1.0:
            raise ConfigError(f"algorithm.theta={theta} must be in [0, 1]")
        n_ctx = context_length_of(backbone, ctx_init, n_ctx)
        generator = torch.Generator().manual_seed(init_seed)
        self.global_ctx = nn.Parameter(init_context(backbone, n_ctx, ctx_init, generator))
        self.local_ctx = nn.Parameter(init_context(backbone, n_ctx, ctx_init, generator))
        self.theta, self.renormalise = float(theta), bool(renormalise)
        self.prompt = TextPrompt(backbone, classnames, n_ctx, class_token_position)
        self._init_personal()

    def text_features(self) -> torch.Tensor:
        """Class text features: the global prompt's (normalised) on the server, the θ-mixture on a client."""
        if not self.uses_local():
            return normalize(self.prompt.encode(self.global_ctx))
        return self.mixture(self.prompt.encode(torch.stack([self.global_ctx, self.local_ctx]).unsqueeze(1)))

    def mixture(self, both: torch.Tensor) -> torch.Tensor:
        """(1 − θ)·global + θ·local of the two prompts' class features [2, C, D], each normalised first."""
        both = normalize(both)
        mixture = (1.0 - self.theta) * both[0] + self.theta * both[1]
        return normalize(mixture) if self.renormalise else mixture

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.text_logits(self.text_features(), encoded)

    def text_logits(self, text: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        # base.cosine_logits would renormalise the text features; the authors' mixture keeps its length.
        return self.backbone.logit_scale * normalize(encoded) @ text.t()

    # --- cohort training: both prompts of every client, [K·2] contexts, in one text-tower call ------------------
    stacks = True

    def cohort_backward(self, states: Sequence[ClientState], encoded: Sequence[torch.Tensor],
                        labels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return global_local_backward(self, states, encoded, labels,
                                     lambda both, x: self.text_logits(self.mixture(both), x))

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)
