"""CoCoOp (Zhou et al., CVPR 2022): instance-conditional prompts — a meta-net maps each image's feature to a bias
added to every context token, so each image is classified with its own prompt.

Trained: the context vectors and the meta-net (Linear(D, D/16) → ReLU → Linear(D/16, width), on the L2-normalised
image feature, as the paper). Shared: both. The loss is plain cross-entropy.

Batching: the paper's code loops over the images of a batch (and its recipe uses batch size 1). Here the prompts of a
whole batch are one tensor [B, 1, n_ctx, width], expanded to every class and encoded in one text-encoder call of
B·C sequences; `instance_chunk` caps B·C per call so evaluation batches do not exhaust memory. Training memory
still grows with B·C (every (image, class) prompt is back-propagated through the text encoder): the paper trains with
batch size 1 at ViT-B/16, and a small `train.batch_size` is the knob here too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flbench.algorithms.base import PromptMethod
from flbench.algorithms.cohort import ClientState, backward_sum, bound
from flbench.algorithms.prompting import TextPrompt, context_generator, context_length_of, init_context
from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.errors import ConfigError


class CoCoOp(PromptMethod):
    name = "cocoop"
    paper = "CoCoOp (Zhou et al., CVPR 2022)"
    extra_loss = "—"
    fidelity = """\
Reference: Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022; KaiyangZhou/CoOp,
`trainers/cocoop.py` (meta-net Linear(D, D/16) → ReLU → Linear(D/16, width) on the *normalised* image feature, its
output added to every context token, one prompt set per image),
`configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml` (4 tokens from "a photo of a").

flbench: the same network, initialisation and loss; the per-image loop is batched (see the notes), which changes
no number. Everything trainable is shared.

Deviations: none in the math. FLIP starts from random vectors (`ctx_init=null`)."""

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 4, ctx_init: str | None = "a photo of a", class_token_position: str = "end",
                 meta_hidden_ratio: int = 16, instance_chunk: int = 8192, init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        n_ctx = context_length_of(backbone, ctx_init, n_ctx)
        if n_ctx < 1:
            raise ConfigError("algorithm.n_ctx must be at least 1")
        if meta_hidden_ratio < 1:
            raise ConfigError("algorithm.meta_hidden_ratio must be at least 1")
        self.ctx = nn.Parameter(init_context(backbone, n_ctx, ctx_init, context_generator(ctx_init, init_seed)))
        vis_dim, hidden = backbone.embed_dim, max(1, backbone.embed_dim // meta_hidden_ratio)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, hidden)), ("relu", nn.ReLU()),
            ("linear2", nn.Linear(hidden, backbone.text_width))]))
        self.instance_chunk = max(1, int(instance_chunk))
        self.prompt = TextPrompt(backbone, classnames, n_ctx, class_token_position)

    def instance_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """Context per image [B, n_ctx, width]: the shared context shifted by the meta-net's bias."""
        bias = self.meta_net(normalize(image_features))
        return self.ctx.unsqueeze(0) + bias.unsqueeze(1)

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.instance_logits(normalize(encoded), self.instance_context(encoded))

    def instance_logits(self, images: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of normalised image features [B, D] against their own prompts' class features (contexts
        [B, n_ctx, width]), in text-tower calls of at most `instance_chunk` sequences."""
        rows = max(1, self.instance_chunk // self.prompt.num_classes)
        chunks = []
        for start in range(0, len(images), rows):
            text = normalize(self.prompt.encode(ctx[start:start + rows].unsqueeze(1)))  # [b, C, D]
            chunks.append(torch.einsum("bd,bcd->bc", images[start:start + rows], text))
        return self.backbone.logit_scale * torch.cat(chunks)

    # --- cohort training: every client's per-image contexts (its own meta-net) in the same text-tower calls -------
    stacks = True

    def cohort_backward(self, states: Sequence[ClientState], encoded: Sequence[torch.Tensor],
                        labels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        contexts = []
        for state, x in zip(states, encoded):
            with bound(self, state):
                contexts.append(self.instance_context(x))
        logits = self.instance_logits(normalize(torch.cat(list(encoded))), torch.cat(contexts))
        losses = [F.cross_entropy(part, y) for part, y in zip(logits.split([len(y) for y in labels]), labels)]
        return backward_sum(losses, self.loss_scale)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)
