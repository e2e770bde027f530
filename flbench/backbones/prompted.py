"""Prompted forward passes through a frozen open_clip CLIP: visual prompt tokens, deep text prompts, local features.

Prompt methods that reach inside the towers (VPT, MaPLe, PromptSRC on the image side; PLOT and FedOTP for local
features, PLOT++ for its visual-prompt groups) go through these functions instead of `FrozenCLIP.encode_image`. Each
one walks the tower's blocks itself but calls every block through its normal `forward`, so an attention variant
swapped into the blocks (`backbones/attention.py`) keeps working; nothing here reimplements a transformer block.

Conventions, shared by VPT, MaPLe and PromptSRC:
- visual prompts are tokens appended after the [CLS] and patch tokens at the *input of a block*, without positional
  embeddings. Prompts of block 0 pass through `ln_pre` like the patch embeddings (as MaPLe's and PromptSRC's CLIP
  code insert them before it); deeper prompts enter their block as they are. Attention has no order and pooling reads
  [CLS], so where they sit in the sequence does not change the result; appending keeps patches at positions 1..P.
- `prompts[i]` is inserted at the input of block i. At block 0 the tokens are added; at a later block they replace
  the previous block's outputs at the prompt positions (VPT-deep, MaPLe, PromptSRC). Blocks past the last entry carry
  the prompt outputs along (VPT-shallow is `prompts=[p]`). Prompt outputs are dropped before pooling.
- deep text prompts replace the context slots (positions `start:start+n_ctx`) at the input of text blocks 1, 2, ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flbench.backbones.attention import sequence_lengths
from flbench.backbones.clip import FrozenCLIP
from flbench.backbones.text import project_eot, text_inputs
from flbench.errors import ConfigError


def require_vit(backbone: FrozenCLIP, method: str) -> None:
    """Methods with visual prompt tokens need a transformer image tower."""
    if not backbone.is_vit:
        raise ConfigError(f"algorithm.name={method} needs a ViT image tower, but backbone {backbone.name!r} is a "
                          "ResNet; use backbone=tiny-vit (offline) or backbone=vit_b16")


def vision_width(backbone: FrozenCLIP) -> int:
    return int(backbone.model.visual.transformer.width)


def vision_layers(backbone: FrozenCLIP) -> int:
    return len(backbone.model.visual.transformer.resblocks)


def text_layers(backbone: FrozenCLIP) -> int:
    return len(backbone.model.transformer.resblocks)


def _blocks(transformer: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None,
            before_block: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run `transformer`'s blocks on batch-first `x`, letting `before_block(i, x)` edit the input of block i."""
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        x = before_block(i, x)
        if batch_first:
            x = block(x, attn_mask=attn_mask)
        else:  # old open_clip layouts run blocks sequence-first
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


def _expand(prompt: torch.Tensor, batch: int) -> torch.Tensor:
    """[P, W] (shared by all images) or [B, P, W] (per image) → [B, P, W]."""
    return prompt.unsqueeze(0).expand(batch, -1, -1) if prompt.dim() == 2 else prompt


def encode_image_prompted(backbone: FrozenCLIP, images: torch.Tensor,
                          prompts: Sequence[torch.Tensor | None] = (), return_tokens: bool = False,
                          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Image features [B, D] of a ViT with visual prompt tokens (see the module docstring for `prompts`).

    With `return_tokens`, also the patch tokens after `ln_post`, projected to the joint space [B, P, D] (CLIP's local
    features, as PLOT and FedOTP use them). With no prompts this equals `backbone.encode_image(images)`.
    """
    if not backbone.is_vit:
        raise ConfigError(f"visual prompts need a ViT image tower; backbone {backbone.name!r} is a ResNet "
                          "(use backbone=tiny-vit or backbone=vit_b16)")
    visual = backbone.model.visual
    x = visual._embeds((images - backbone.mean) / backbone.std)  # [CLS]+patches, positions, ln_pre (open_clip 3.x)
    num_tokens = x.shape[1]

    def insert(i: int, h: torch.Tensor) -> torch.Tensor:
        if i >= len(prompts) or prompts[i] is None:
            return h
        prompt = _expand(prompts[i], h.shape[0]).to(h.dtype)
        if i == 0:
            prompt = visual.ln_pre(prompt)
        return torch.cat([h[:, :num_tokens], prompt], dim=1)  # adds at block 0, replaces the old prompts later

    x = _blocks(visual.transformer, x, None, insert)[:, :num_tokens]
    pooled, tokens = visual._pool(x)
    if visual.proj is not None:
        pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
    return (pooled, tokens) if return_tokens else pooled


def encode_image_prompt_groups(backbone: FrozenCLIP, images: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """PLOT++'s local features of a ViT [B, M, D]: one pass per visual-prompt group, each with its own shallow prompt
    `groups[m]` ([M, P, W]) at block 0, read at [CLS] (ln_post, projection) — M global views of each image.

    The patch embedding runs once; the M prompted sequences go through the blocks as one batch of M·B.
    """
    require_vit(backbone, "plot")
    visual = backbone.model.visual
    x = visual._embeds((images - backbone.mean) / backbone.std)  # [B, 1+P, W], through ln_pre
    batch, groups_n = x.shape[0], groups.shape[0]
    prompts = visual.ln_pre(groups.to(x.dtype))  # block-0 prompts pass through ln_pre, as the patch tokens
    x = torch.cat([x.unsqueeze(0).expand(groups_n, -1, -1, -1),
                   prompts.unsqueeze(1).expand(-1, batch, -1, -1)], dim=2).flatten(0, 1)  # [M·B, 1+P+n, W]
    x = _blocks(visual.transformer, x, None, lambda i, h: h)
    pooled, _ = visual._pool(x[:, :-groups.shape[1]])
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled.view(groups_n, batch, -1).transpose(0, 1)


def _attnpool_all(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLIP's attention pooling evaluated at every position: [HW+1, B, D], row 0 the usual pooled feature.

    open_clip's AttentionPool2d returns only row 0 (the mean-token query); PLOT's local features of a ResNet are the
    other rows, i.e. each spatial feature sent through the same value and output projections with its own query.
    """
    x = x.flatten(2).permute(2, 0, 1)  # NCHW → (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out


def encode_image_local(backbone: FrozenCLIP, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global [B, D] and local [B, M, D] image features in the joint space (PLOT, FedOTP).

    ViT: [CLS] and the M patch tokens, both through `ln_post` and the projection. ModifiedResNet: the attention pool's
    output at the mean token and at each of the M = H·W cells of the last feature map. The tiny ResNet CLIP has a 1×1
    map at 32 px, so M = 1 there and optimal transport has nothing to match: use tiny-vit or a real backbone.
    """
    visual = backbone.model.visual
    if backbone.is_vit:
        return encode_image_prompted(backbone, images, (), return_tokens=True)
    x = visual.stem((images - backbone.mean) / backbone.std)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    out = _attnpool_all(visual.attnpool, x)
    return out[0], out[1:].permute(1, 0, 2)


def encode_text_prompted(backbone: FrozenCLIP, embeddings: torch.Tensor, eot_index: torch.Tensor,
                         deep_prompts: Sequence[torch.Tensor] = (), start: int = 1) -> torch.Tensor:
    """Text features [N, D] from token embeddings [N, L, W], with `deep_prompts[j]` ([n, W] or [N, n, W]) replacing
    positions `start:start+n` at the input of text block j+1 (MaPLe, PromptSRC). With no deep prompts this equals
    `backbone.encode_text_embeddings(embeddings, eot_index)`; as there, a causal tower computes only the positions up
    to the last EOT (and at least the deep prompts' slots, which sit before it in every prompt)."""
    m = backbone.model
    slots = start + max((p.shape[-2] for p in deep_prompts), default=0)
    x, mask = text_inputs(m, embeddings, eot_index, minimum=slots if deep_prompts else 0)

    def replace(i: int, h: torch.Tensor) -> torch.Tensor:
        if i == 0 or i > len(deep_prompts):
            return h
        prompt = _expand(deep_prompts[i - 1], h.shape[0]).to(h.dtype)
        return torch.cat([h[:, :start], prompt, h[:, start + prompt.shape[1]:]], dim=1)

    with sequence_lengths(eot_index + 1):  # as FrozenCLIP: routed-KV attention spends no capacity on padding
        x = _blocks(m.transformer, x, mask, replace)
    return project_eot(m, x, eot_index)
