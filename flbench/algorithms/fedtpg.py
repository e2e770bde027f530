"""FedTPG (Qiu et al., ICLR 2024): federated text-driven prompt generation — a shared network *generates* the context
vectors from the task's class names, so it also writes prompts for class names it never trained on.

Generator (the authors' `PromptTranslator`): n_ctx learned queries (N(0, 0.02)) cross-attend, 4 heads, to the
class-name embeddings of the current task — CLIP's normalised text features of the bare class names. The attention
output *replaces* the queries (no residual); a pre-norm GEGLU feed-forward (LayerNorm → Linear(W, 2·4W) → GEGLU →
Linear(4W, W)) follows with a residual; `depth` residual self-attention blocks may follow (0, the authors' default).
The output is one context [n_ctx, width] shared by all classes of the task, in "[SOS] ctx name. [EOT]". The whole
generator is shared (FedAvg); nothing is kept local; the loss is plain cross-entropy. Switching class names
(base→novel, cross-dataset) re-conditions the generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flbench.algorithms.base import PromptMethod, cosine_logits
from flbench.algorithms.prompting import TextPrompt, handcrafted_text_features
from flbench.backbones.clip import FrozenCLIP
from flbench.errors import ConfigError


class GEGLU(nn.Module):
    """x·GELU(gate) over the two halves of the last dimension (Shazeer 2020)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


def feed_forward(width: int, mult: int) -> nn.Sequential:
    """Pre-norm GEGLU feed-forward: LayerNorm → Linear(W, 2·mult·W) → GEGLU → Linear(mult·W, W)."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * mult * width), GEGLU(),
                         nn.Linear(mult * width, width))


class SelfAttentionBlock(nn.Module):
    """x + SelfAttn(LN(x)), then x + FF(x): the blocks the authors' `depth` (MODEL.DEPTH) adds after cross-attention."""

    def __init__(self, width: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ff = feed_forward(width, ffn_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(x)


class PromptGenerator(nn.Module):
    """Class-name embeddings [C, D] → context vectors [n_ctx, width]."""

    def __init__(self, n_ctx: int, width: int, context_dim: int, heads: int, ffn_mult: int, depth: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"algorithm.heads={heads} must divide the text width {width}")
        self.queries = nn.Parameter(torch.randn(n_ctx, width, generator=generator) * 0.02)
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(context_dim)
        self.attn = nn.MultiheadAttention(width, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ff = feed_forward(width, ffn_mult)
        self.self_blocks = nn.ModuleList(SelfAttentionBlock(width, heads, ffn_mult) for _ in range(depth))

    def forward(self, name_embeddings: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(name_embeddings).unsqueeze(0)
        x = self.attn(self.norm_q(self.queries).unsqueeze(0), kv, kv, need_weights=False)[0]  # replaces the queries
        x = x + self.ff(x)
        for block in self.self_blocks:
            x = block(x)
        return x[0]


class FedTPG(PromptMethod):
    name = "fedtpg"
    paper = "FedTPG (Qiu et al., ICLR 2024)"
    extra_loss = "—"
    fidelity = """\
Reference: Qiu et al., "Text-driven Prompt Generation for Vision-Language Models in Federated Learning", ICLR 2024;
boschresearch/FedTPG, `model/prompt_net.py` (PromptTranslator, CrossAttention, FeedForward/GEGLU, SelfAttention),
`model/FedTPG.py` (bare class names encoded by CLIP and normalised; "X X X X {name}." with the generated context
after [SOS]), `config/defaults.py` and `Launch_FL.py` (N_CTX 4, D_CTX 1, DEPTH 0, random init; cross/self heads 4).

flbench: that generator, initialisation and prompt. The key/value width is CLIP's joint embedding and the query
width the text width (both 512 at ViT-B/16, where the authors hard-code 512).

Deviations: the authors' D_CTX > 1 (deep text prompts from the same generator) is not implemented (their default is
1); `class_token_position` other than `end` is a flbench option (the authors' prompt is end-only).

FLIP: FLIP's FedTPG (0-ml/flip `flcore/models/text/utils.py`, `flcore/models/clip/FedTPG.py`) is the same network at
the same settings, so there is no separate preset."""

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 4, heads: int = 4, ffn_mult: int = 4, depth: int = 0, class_token_position: str = "end",
                 init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        if n_ctx < 1 or ffn_mult < 1 or depth < 0:
            raise ConfigError("algorithm.n_ctx and algorithm.ffn_mult must be at least 1, algorithm.depth at least 0")
        # The queries draw from `init_seed`; the layers, as CoCoOp's meta-net, from the global generator (seeded by
        # the experiment before it builds a method).
        self.generator = PromptGenerator(n_ctx, backbone.text_width, backbone.embed_dim, heads, ffn_mult, depth,
                                         torch.Generator().manual_seed(init_seed))
        self.prompt = TextPrompt(backbone, classnames, n_ctx, class_token_position)
        self._set_name_embeddings(classnames)

    def _set_name_embeddings(self, classnames: Sequence[str]) -> None:
        """CLIP's normalised text features of the bare class names (no template), as the authors condition on."""
        self.register_buffer("name_embeddings", handcrafted_text_features(self.backbone, classnames, ["{}"]),
                             persistent=False)

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
