"""Building blocks of the deep-prompt methods (VPT, MaPLe, PromptSRC): a deep text prompt and visual prompt sizes.

A deep text prompt is CoOp's context in the first `n_ctx` slots after [SOS] plus, for text blocks 1..depth−1, a
fresh set of vectors that replaces those slots at the block's input (MaPLe's and PromptSRC's language branch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from flbench.algorithms.prompting import TextPrompt, init_context
from flbench.backbones import prompted
from flbench.backbones.clip import FrozenCLIP
from flbench.errors import ConfigError

log = logging.getLogger(__name__)


def clamp_depth(depth: int, layers: int, key: str) -> int:
    """Prompt depth on this backbone: the paper's depth counts ViT-B/16's 12 layers; a shallower tower gets all of
    its layers (the tiny CLIPs have 3–4)."""
    if depth < 1:
        raise ConfigError(f"algorithm.{key}={depth} must be at least 1")
    if depth > layers:
        log.info("algorithm.%s=%d exceeds the %d layers of this backbone's tower; using %d", key, depth, layers, layers)
    return min(depth, layers)


def vpt_init_range(backbone: FrozenCLIP) -> float:
    """VPT's uniform init bound: Xavier on the patch embedding's fan-in plus the width, sqrt(6 / (3·p² + width))."""
    patch = backbone.model.visual.patch_size
    patch_area = patch[0] * patch[1] if isinstance(patch, (tuple, list)) else patch * patch
    return math.sqrt(6.0 / (3 * patch_area + prompted.vision_width(backbone)))


class DeepTextPrompt(nn.Module):
    """Learned context (`ctx`) and deeper text prompts (`deep`, [depth−1, n_ctx, width]).

    With `ctx_init`, the first `n_ctx` words initialise the context and any remaining words stay in the prompt as
    fixed tokens (MaPLe: n_ctx=2 with "a photo of a" learns "a photo" and keeps "of a"). Without, N(0, 0.02).
    Deeper prompts start from N(0, 0.02), as in both papers.
    """

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], n_ctx: int, ctx_init: str | None,
                 depth: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "backbone", backbone)
        if n_ctx < 1:
            raise ConfigError("algorithm.n_ctx must be at least 1")
        words = (ctx_init or "").split()
        if ctx_init:
            learned = " ".join(words[:n_ctx])
            if len(words) < n_ctx or len(backbone.tokenizer.encode(learned)) != n_ctx:
                raise ConfigError(f"algorithm.ctx_init={ctx_init!r} must start with n_ctx={n_ctx} single-token words; "
                                  "change algorithm.n_ctx or algorithm.ctx_init (null: random init)")
            ctx = init_context(backbone, n_ctx, learned)
        else:
            ctx = init_context(backbone, n_ctx, None, generator)
        self.fixed_words = " ".join(words[n_ctx:])
        self.ctx = nn.Parameter(ctx)
        self.deep = nn.Parameter(torch.randn(depth - 1, n_ctx, backbone.text_width, generator=generator) * 0.02) \
            if depth > 1 else None
        self.prompt = TextPrompt(backbone, self._names(classnames), n_ctx, "end")

    def _names(self, classnames: Sequence[str]) -> list[str]:
        return [f"{self.fixed_words} {name}" if self.fixed_words else name for name in classnames]

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.prompt.set_classnames(self._names(classnames))

    def layer_prompts(self) -> list[torch.Tensor]:
        """Prompts of text blocks 0..depth−1 ([n_ctx, width] each): the context, then the deeper ones."""
        return [self.ctx] + (list(self.deep.unbind(0)) if self.deep is not None else [])

    def encode(self, layer_prompts: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Class text features [C, D]."""
        layer_prompts = list(layer_prompts) if layer_prompts is not None else self.layer_prompts()
        return prompted.encode_text_prompted(self.backbone, self.prompt.assemble(layer_prompts[0]),
                                             self.prompt.eot(), layer_prompts[1:], start=1)
