"""FedTPG (Qiu et al., ICLR 2024): federated text-driven prompt generation — a shared network *generates* the context
vectors from the task's class names, so it also writes prompts for class names it never trained on.

Generator: n_ctx learned query vectors cross-attend to the class-name embeddings of the current task (the frozen CLIP
text features of the dataset's first template filled with each class name, normalised), followed by a feed-forward
layer; the output is one context [n_ctx, width] shared by all classes of that task, inserted like CoOp's. The whole
generator is shared (FedAvg); nothing is kept local; the loss is plain cross-entropy. Switching class names
(base→novel, cross-dataset) re-conditions the generator, which is what makes it generalise to unseen names.

Choices where the paper leaves room: one pre-norm cross-attention block (`depth` blocks if asked) with `heads` heads
and a feed-forward of `ffn_mult`·width; the queries start from the word embeddings of `ctx_init` when given (the
benchmark's "a photo of a", otherwise N(0, 0.02)), and the attention and feed-forward output projections start at
zero, so the untrained generator emits exactly the initial context and training adds the class-name conditioning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flbench.algorithms.base import PromptMethod, cosine_logits
from flbench.algorithms.prompting import TextPrompt, context_length_of, handcrafted_text_features, init_context
from flbench.backbones.clip import FrozenCLIP
from flbench.errors import ConfigError


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention (queries ← class-name embeddings) plus a feed-forward layer, both residual."""

    def __init__(self, width: int, context_dim: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(width), nn.LayerNorm(context_dim), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))
        for layer in (self.attn.out_proj, self.ff[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(context)
        x = queries + self.attn(self.norm_q(queries), kv, kv, need_weights=False)[0]
        return x + self.ff(self.norm_ff(x))


class PromptGenerator(nn.Module):
    """Class-name embeddings [C, D] → context vectors [n_ctx, width]."""

    def __init__(self, queries: torch.Tensor, context_dim: int, heads: int, ffn_mult: int, depth: int) -> None:
        super().__init__()
        width = queries.shape[-1]
        if width % heads:
            raise ConfigError(f"algorithm.heads={heads} must divide the text width {width}")
        self.queries = nn.Parameter(queries)
        self.blocks = nn.ModuleList(CrossAttentionBlock(width, context_dim, heads, ffn_mult) for _ in range(depth))

    def forward(self, name_embeddings: torch.Tensor) -> torch.Tensor:
        x, context = self.queries.unsqueeze(0), name_embeddings.unsqueeze(0)
        for block in self.blocks:
            x = block(x, context)
        return x[0]


class FedTPG(PromptMethod):
    name = "fedtpg"
    paper = "FedTPG (Qiu et al., ICLR 2024)"
    extra_loss = "—"

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 4, ctx_init: str | None = "a photo of a", heads: int = 8, ffn_mult: int = 4,
                 depth: int = 1, class_token_position: str = "end", init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        n_ctx = context_length_of(backbone, ctx_init, n_ctx)
        if n_ctx < 1 or depth < 1 or ffn_mult < 1:
            raise ConfigError("algorithm.n_ctx, algorithm.depth and algorithm.ffn_mult must be at least 1")
        queries = init_context(backbone, n_ctx, ctx_init, torch.Generator().manual_seed(init_seed))
        self.generator = PromptGenerator(queries, backbone.embed_dim, heads, ffn_mult, depth)
        self.prompt = TextPrompt(backbone, classnames, n_ctx, class_token_position)
        self._set_name_embeddings(classnames)

    def _set_name_embeddings(self, classnames: Sequence[str]) -> None:
        self.register_buffer("name_embeddings", handcrafted_text_features(self.backbone, classnames,
                                                                          self.templates[:1]), persistent=False)

    def generated_context(self) -> torch.Tensor:
        return self.generator(self.name_embeddings)

    def text_features(self) -> torch.Tensor:
        return self.prompt.encode(self.generated_context())

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.backbone, encoded, self.text_features())

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)
        self._set_name_embeddings(classnames)
