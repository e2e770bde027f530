"""The attention layers every variant is built from, and the few helpers that find them in a model.

This is the bottom of `flbench/backbones/`: it imports nothing of flbench but `errors`, so the routed-KV layer, the
conversion steps (`convert.py`, `calibration.py`, `uptrain.py`), `FrozenCLIP` and the cost accounting can all
build on it without importing one another.

open_clip's ResidualAttentionBlock calls ``self.attn(q, k, v, need_weights=False, attn_mask=mask)`` on an
``nn.MultiheadAttention``; the replacements keep that call signature and hold the *same* Parameter objects
(``in_proj_weight``, ``in_proj_bias``, ``out_proj``) under the same names, so state-dict keys of the pretrained
weights do not change. The text tower is causal (open_clip passes its causal ``attn_mask``, possibly sliced to a
trimmed length); whether a tower's mask is causal is checked once, when the layer is swapped in (`causal_mask`),
never in the forward pass (that check reads the mask's values: a host synchronisation per layer per call).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flbench.errors import ConfigError

TOWERS = ("text", "vision")

# Valid (non-padding) length of each row of the text batch now being encoded; None = every position is a token.
_TEXT_LENGTHS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("flbench_text_lengths",
                                                                                     default=None)


@contextlib.contextmanager
def sequence_lengths(lengths: torch.Tensor | None) -> Iterator[None]:
    """Within this block, text-tower attention treats positions >= lengths[row] of each row as padding."""
    token = _TEXT_LENGTHS.set(lengths)
    try:
        yield
    finally:
        _TEXT_LENGTHS.reset(token)


def current_text_lengths() -> torch.Tensor | None:
    return _TEXT_LENGTHS.get()


def is_causal_mask(mask: torch.Tensor, length: int) -> bool:
    """True for open_clip's causal mask: [L, L], -inf (or True for bool masks) strictly above the diagonal only."""
    if mask.dim() != 2 or tuple(mask.shape) != (length, length):
        return False
    upper = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    blocked = mask if mask.dtype == torch.bool else torch.isneginf(mask) | (mask < -1e4)
    if not torch.equal(blocked, upper):
        return False
    return mask.dtype == torch.bool or bool((mask[~upper] == 0).all())


def pooled_projection(weight: torch.Tensor, bias: torch.Tensor | None, heads: int, group: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights of the K (or V) projection whose head j is the mean of original heads j*g .. j*g+g-1.

    The mean of the heads' outputs equals the output of the mean of their weights (the projection is linear), so
    pooling the weights lets a token's compact K/V be computed directly, at 1/g of the projection cost.
    """
    width = weight.shape[1]
    head_dim = weight.shape[0] // heads
    pooled_w = weight.reshape(heads // group, group, head_dim, width).mean(1).reshape(-1, width)
    pooled_b = None if bias is None else bias.reshape(heads // group, group, head_dim).mean(1).reshape(-1)
    return pooled_w, pooled_b


def sdpa_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """open_clip's float masks add to the scores; bool masks there mean "blocked" (SDPA's bool means "allowed")."""
    if attn_mask is None:
        return None
    return ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype)


class SharedWeightAttention(nn.Module):
    """Base for attention variants built from an ``nn.MultiheadAttention``: same parameters, same call signature."""

    def __init__(self, mha: nn.MultiheadAttention, tower: str) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ConfigError("backbone.attention: only packed-QKV attention (open_clip's default blocks) can be "
                              "swapped; use backbone.attention.kind=dense for this model")
        if tower not in TOWERS:
            raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.tower = tower
        # The very Parameter objects of the pretrained block: no copy, same state-dict names.
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.use_dense = False  # teacher mode for router calibration: exactly the original attention
        # Set by the conversion after checking the tower's mask once (convert.swap_attention): a mask this layer is
        # given is then that causal mask (or a leading slice of it, for trimmed text).
        self.causal_mask = False
        object.__setattr__(self, "original", mha)  # not a submodule: its parameters are already ours

    # --- pieces shared by every variant -------------------------------------------------------------------
    def _split_weights(self) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
        w, b = self.in_proj_weight, self.in_proj_bias
        ws = w.chunk(3)
        bs = b.chunk(3) if b is not None else (None, None, None)
        return tuple(zip(ws, bs))

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, L, heads*d] -> [B, heads, L, d]."""
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _is_causal(self, attn_mask: torch.Tensor | None, length: int) -> bool:
        """Whether this call is causal, from shapes only (no look at the mask's values: no host sync)."""
        if attn_mask is None:
            return False
        if not self.causal_mask or tuple(attn_mask.shape) != (length, length):
            raise NotImplementedError(f"{type(self).__name__} takes no mask or the tower's causal mask "
                                      f"(got shape {tuple(attn_mask.shape)} for {length} tokens)")
        return True

    def dense_attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """The original multi-head attention (batch-first x), for teacher mode and as a reference."""
        (wq, bq), (wk, bk), (wv, bv) = self._split_weights()
        q = self._heads(F.linear(x, wq, bq), self.num_heads)
        k = self._heads(F.linear(x, wk, bk), self.num_heads)
        v = self._heads(F.linear(x, wv, bv), self.num_heads)
        mask = sdpa_mask(attn_mask, x.dtype)
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, **_: Any) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError(f"{type(self).__name__} supports self-attention only (key is query)")
        if key_padding_mask is not None:
            raise NotImplementedError(f"{type(self).__name__} does not take key_padding_mask")
        x = query if self.batch_first else query.transpose(0, 1)
        out = self.dense_attention(x, attn_mask) if self.use_dense else self.attend(x, attn_mask)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def kv_heads_per_token(self) -> float:
        """Average number of K (= V) heads stored per token (the nominal budget)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, tower={self.tower}"


class GroupedKVAttention(SharedWeightAttention):
    """GQA from a multi-head checkpoint: K/V heads mean-pooled in groups of ``group_size`` (Ainslie et al. 2023)."""

    def __init__(self, mha: nn.MultiheadAttention, tower: str, group_size: int) -> None:
        super().__init__(mha, tower)
        if group_size < 1 or self.num_heads % group_size:
            raise ConfigError(f"backbone.attention.group_size={group_size} must divide the {tower} tower's "
                              f"{self.num_heads} heads")
        self.group_size = group_size

    def attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        (wq, bq), (wk, bk), (wv, bv) = self._split_weights()
        kv_heads = self.num_heads // self.group_size
        q = self._heads(F.linear(x, wq, bq), self.num_heads)
        k = self._heads(F.linear(x, *pooled_projection(wk, bk, self.num_heads, self.group_size)), kv_heads)
        v = self._heads(F.linear(x, *pooled_projection(wv, bv, self.num_heads, self.group_size)), kv_heads)
        # Query head h reads K/V head h // g: repeat each compact head g times.
        k = k.repeat_interleave(self.group_size, dim=1)
        v = v.repeat_interleave(self.group_size, dim=1)
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(attn_mask, x.dtype)))

    def kv_heads_per_token(self) -> float:
        return self.num_heads / self.group_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


# ----------------------------------------------------------------------------------------------------------------
# Finding the layers in a model
# ----------------------------------------------------------------------------------------------------------------
def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(tower, block) for every block of an open_clip CLIP whose attention can be swapped; ResNet towers give none."""
    blocks: list[tuple[str, nn.Module]] = []
    visual_transformer = getattr(getattr(model, "visual", None), "transformer", None)
    if visual_transformer is not None:
        blocks += [("vision", b) for b in visual_transformer.resblocks]
    text_transformer = getattr(model, "transformer", None)
    if text_transformer is None and hasattr(model, "text"):  # CustomTextCLIP keeps its text tower in .text
        text_transformer = getattr(model.text, "transformer", None)
    if text_transformer is not None:
        blocks += [("text", b) for b in text_transformer.resblocks]
    return blocks


def swapped_modules(model: nn.Module) -> list[SharedWeightAttention]:
    return [m for m in model.modules() if isinstance(m, SharedWeightAttention)]


def router_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every router parameter of `model`, by its state-dict name (empty unless routed_kv is swapped in)."""
    return {name: p for name, p in model.named_parameters() if ".router." in f".{name}"}


@contextlib.contextmanager
def dense_attention(model: nn.Module) -> Iterator[None]:
    """Within this block every swapped layer computes the original dense attention (the calibration teacher)."""
    modules = swapped_modules(model)
    previous = [m.use_dense for m in modules]
    for m in modules:
        m.use_dense = True
    try:
        yield
    finally:
        for m, p in zip(modules, previous):
            m.use_dense = p


__all__ = ["TOWERS", "GroupedKVAttention", "SharedWeightAttention", "current_text_lengths", "dense_attention",
           "is_causal_mask", "pooled_projection", "router_parameters", "sdpa_mask", "sequence_lengths", "swapped_modules",
           "transformer_blocks"]
