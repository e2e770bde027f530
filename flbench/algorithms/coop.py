"""CoOp (Zhou et al., IJCV 2022): learn the context words of the prompt; under FedAvg this is PromptFL.

Trains n_ctx context vectors (shared by all classes, or one set per class with `class_specific`), inserted before,
around or after the class name. Everything trainable is shared with the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flbench.algorithms.base import PromptMethod, cosine_logits
from flbench.algorithms.cohort import ClientState, backward_sum, bound, stacked
from flbench.algorithms.prompting import TextPrompt, context_generator, context_length_of, init_context
from flbench.backbones.clip import FrozenCLIP
from flbench.errors import ConfigError


class CoOp(PromptMethod):
    name = "coop"
    extra_loss = "—"
    fidelity = """\
Reference: Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022; KaiyangZhou/CoOp,
`trainers/coop.py` (context after [SOS] in "X … X {name}.", N(0, 0.02) or word initialisation, class-specific
contexts, end/middle/front positions, cosine logits at CLIP's scale), `configs/trainers/CoOp/*_ctxv1.yaml` (CTX_INIT
"a photo of a"). Under FedAvg this is PromptFL (Guo et al., 2023).

flbench: the same prompt learner and loss; every trainable tensor is shared.

Deviations: none in the math. The default is the word-initialised 4-token prompt ("ctxv1", CoOp's base-to-new
setting); CoOp's main few-shot runs use 16 random vectors (`n_ctx=16 ctx_init=null`), which the tiny CLIP's 16-token
context cannot hold with a class name. FLIP starts from random vectors (`ctx_init=null`)."""

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 4, ctx_init: str | None = "a photo of a", class_token_position: str = "end",
                 class_specific: bool = False, init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        n_ctx = context_length_of(backbone, ctx_init, n_ctx)
        if n_ctx < 1:
            raise ConfigError("algorithm.n_ctx must be at least 1")
        ctx = init_context(backbone, n_ctx, ctx_init, context_generator(ctx_init, init_seed))
        if class_specific:
            ctx = ctx.unsqueeze(0).repeat(len(classnames), 1, 1)
        self.class_specific = class_specific
        self.ctx = nn.Parameter(ctx)
        self.prompt = TextPrompt(backbone, classnames, n_ctx, class_token_position)

    def text_features(self) -> torch.Tensor:
        return self.prompt.encode(self.ctx)

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.backbone, encoded, self.text_features())

    def loss(self, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.text_loss(self.text_features(), encoded, labels)

    def text_loss(self, text: torch.Tensor, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss given the class text features [C, D] of the current context."""
        return F.cross_entropy(cosine_logits(self.backbone, encoded, text), labels)

    # --- cohort training: K clients' contexts [K, (C,) n_ctx, width] in one text-tower call of K·C prompts -------
    stacks = True

    def cohort_text_features(self, states: Sequence[ClientState]) -> torch.Tensor:
        """[K, C, D]: every client's class text features."""
        ctx = stacked(states, "ctx")
        return self.prompt.encode(ctx if self.class_specific else ctx.unsqueeze(1))

    def cohort_backward(self, states: Sequence[ClientState], encoded: Sequence[torch.Tensor],
                        labels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        text = self.cohort_text_features(states)
        losses = []
        for state, text_k, x, y in zip(states, text, encoded, labels):
            with bound(self, state):
                losses.append(self.text_loss(text_k, x, y))
        return backward_sum(losses, self.loss_scale)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        if self.class_specific and len(classnames) != self.ctx.shape[0]:
            raise ConfigError("class-specific CoOp cannot be evaluated on other class names "
                             "(set algorithm.class_specific=false for base→novel or cross-dataset scenarios)")
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)
