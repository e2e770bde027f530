"""Attention cores and whole attention layers compared by ``benchmarks/attention.py``.

Cores take what the routed-KV kernel takes (q ``[B, H, L, d]``, per-expert compact K/V and slot positions), except
the dense and GQA baselines, which take full-length K/V. Layers take ``x [B, L, width]`` and return the attention
block's output; the routed ones are the model's own ``RoutedKVAttention`` (flbench/backbones/routed_kv.py), with
its attention core swapped where a baseline needs it, so projections, routing and sorts are the model's.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = create_block_mask = None


def flash_sdpa(q, k, v, causal: bool, math: bool = False):
    """SDPA restricted to flash attention on CUDA (the math kernel on CPU, or when ``math``: the fp32 references)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if q.is_cuda and not math else SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def repeat_heads(t: torch.Tensor, group: int) -> torch.Tensor:
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def scatter_to_position(q, keys, values, positions, groups, causal: bool, **_):
    """Every expert's compact K/V expanded to all H heads and scattered back to token order, then dense flash.

    Exact for rows that see only held positions: every image row, and text rows before their end (causal). A position
    no expert holds (text padding) gets zero K/V there, which rows past the end see; those rows are not compared.
    """
    batch, heads, seq_len, head_dim = q.shape
    k_full = q.new_zeros(batch, heads, seq_len + 1, head_dim)  # column L collects padding slots
    v_full = q.new_zeros(batch, heads, seq_len + 1, head_dim)
    for k, v, pos, g in zip(keys, values, positions, groups):
        index = torch.where(pos >= 0, pos, seq_len).long()[:, None, :, None].expand(batch, heads, -1, head_dim)
        k_full = k_full.scatter(2, index, repeat_heads(k, g))
        v_full = v_full.scatter(2, index, repeat_heads(v, g))
    return flash_sdpa(q, k_full[:, :, :seq_len], v_full[:, :, :seq_len], causal)


class FlexMerge:
    """One FlexAttention call per expert (GQA over its compact heads), outputs merged by their log-sum-exps.

    Block masks depend on the slot positions: with ``static_positions`` (the attention-core benchmark, one fixed set)
    they are built on the first call and reused, the best case for FlexAttention; otherwise (inside the layer, where
    routing makes new positions every call) they are rebuilt on every call, as a model would have to. Compiled on
    CUDA (eager FlexAttention is a slow reference); eager on CPU, where it has no backward.
    """

    def __init__(self, compiled: bool, static_positions: bool):
        if flex_attention is None:
            raise RuntimeError("torch.nn.attention.flex_attention is unavailable in this torch")
        self.fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
        self.aux = "return_aux" in inspect.signature(flex_attention).parameters
        self.static = static_positions
        self.masks: list | None = None

    def _build_masks(self, q, positions, causal):
        batch, _, seq_len, _ = q.shape
        masks = []
        for pos in positions:
            cap = pos.shape[1]

            def mask_mod(b, h, q_idx, kv_idx, pos=pos, cap=cap):
                p = pos[b, torch.clamp(kv_idx, max=cap - 1)]  # clamp: kernels may probe past the last slot
                ok = (kv_idx < cap) & (p >= 0)
                return ok & (p <= q_idx) if causal else ok

            masks.append(create_block_mask(mask_mod, batch, None, seq_len, cap, device=pos.device))
        return masks

    def __call__(self, q, keys, values, positions, groups, causal: bool, **_):
        if self.masks is None or not self.static:
            self.masks = self._build_masks(q, positions, causal)
        if q.device.type == "cpu":  # CPU FlexAttention refuses inputs that require grad
            q, keys, values = q.detach(), [k.detach() for k in keys], [v.detach() for v in values]
        outs, lses = [], []
        for k, v, mask in zip(keys, values, self.masks):
            if self.aux:
                from torch.nn.attention.flex_attention import AuxRequest

                out, aux = self.fn(q, k, v, block_mask=mask, enable_gqa=True, return_aux=AuxRequest(lse=True))
                lse = aux.lse
            else:
                out, lse = self.fn(q, k, v, block_mask=mask, enable_gqa=True, return_lse=True)
            outs.append(out)
            lses.append(lse)
        lse = torch.stack(lses)
        weights = torch.exp(lse - torch.logsumexp(lse, dim=0)).nan_to_num(0.0)  # [E, B, H, L]
        return (weights[..., None] * torch.stack(outs).float()).sum(0).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Whole layers
# ----------------------------------------------------------------------------------------------------------------
def causal_mask(seq_len: int, device) -> torch.Tensor:
    """open_clip's text mask: -inf strictly above the diagonal (what the text tower passes to attention)."""
    return torch.full((seq_len, seq_len), float("-inf"), device=device).triu(1)


class DenseLayer(nn.Module):
    """Fused QKV projection + flash SDPA + output projection, on the weights of an ``nn.MultiheadAttention``."""

    def __init__(self, mha: nn.MultiheadAttention, math: bool = False):
        super().__init__()
        self.heads, self.math = mha.num_heads, math
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj

    def forward(self, x, causal: bool):
        batch, seq_len, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(batch, seq_len, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = flash_sdpa(q, k, v, causal, self.math)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq_len, width))


class GQALayer(nn.Module):
    """GQA from the same weights: K/V heads mean-pooled in groups of g (weights pooled once: they are frozen),
    repeated to every query head, flash SDPA (what flbench's ``gqa`` attention computes, with flash's causal flag)."""

    def __init__(self, mha: nn.MultiheadAttention, group: int, math: bool = False):
        super().__init__()
        self.heads, self.group, self.math = mha.num_heads, group, math
        width = mha.embed_dim
        wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
        bq, bk, bv = mha.in_proj_bias.detach().chunk(3)
        def pool(t: torch.Tensor) -> torch.Tensor:  # [H, ...] -> [H // g, ...]: mean over each group of g heads
            return t.unflatten(0, (self.heads // group, group)).mean(1)

        self.register_buffer("w", torch.cat([wq, pool(wk.view(self.heads, -1, width)).reshape(-1, width),
                                             pool(wv.view(self.heads, -1, width)).reshape(-1, width)]))
        self.register_buffer("b", torch.cat([bq, pool(bk.view(self.heads, -1)).reshape(-1),
                                             pool(bv.view(self.heads, -1)).reshape(-1)]))
        self.out_proj = mha.out_proj

    def forward(self, x, causal: bool):
        batch, seq_len, width = x.shape
        kv_width = width // self.group
        q, k, v = F.linear(x, self.w, self.b).split([width, kv_width, kv_width], dim=-1)
        q = q.view(batch, seq_len, self.heads, -1).transpose(1, 2)
        k, v = (t.view(batch, seq_len, self.heads // self.group, -1).transpose(1, 2) for t in (k, v))
        out = flash_sdpa(q, repeat_heads(k, self.group), repeat_heads(v, self.group), causal, self.math)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq_len, width))


@contextlib.contextmanager
def swapped_core(core):
    """Within this block, RoutedKVAttention calls ``core`` (same signature as flbench.kernels.routed_attention)."""
    from flbench.backbones import routed_kv

    if not hasattr(routed_kv, "routed_attention"):
        raise RuntimeError("flbench.backbones.routed_kv no longer calls routed_attention: cannot swap its core")
    saved = routed_kv.routed_attention
    routed_kv.routed_attention = core
    try:
        yield
    finally:
        routed_kv.routed_attention = saved


class RoutedLayer(nn.Module):
    """The model's RoutedKVAttention called as the text/image towers call it (causal mask, text lengths), optionally
    with its attention core swapped and/or its routing fixed."""

    def __init__(self, layer: nn.Module, core=None):
        super().__init__()
        self.layer, self.core = layer, core

    def forward(self, x, causal: bool, lengths: torch.Tensor | None = None):
        try:
            from flbench.backbones.layers import sequence_lengths
        except ImportError:  # older layout
            from flbench.backbones.attention import sequence_lengths

        mask = causal_mask(x.shape[1], x.device) if causal else None
        swap = swapped_core(self.core) if self.core is not None else contextlib.nullcontext()
        with swap, sequence_lengths(lengths):
            return self.layer(x, x, x, need_weights=False, attn_mask=mask)[0]


def make_mha(width: int, heads: int, device, dtype, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    return nn.MultiheadAttention(width, heads, batch_first=True).to(device, dtype).requires_grad_(False)


def make_routed(mha, tower: str, groups, ratios, backend: str) -> nn.Module:
    """A RoutedKVAttention on the given weights, frozen (the prompt-learning case: gradients flow to x only)."""
    from flbench.backbones.routed_kv import RoutedKVAttention

    layer = RoutedKVAttention(mha, tower, group_sizes=groups, ratios=ratios, backend=backend)
    # What the conversion sets after checking the tower's mask once: the text tower's mask is open_clip's causal one.
    layer.causal_mask = tower == "text"
    return layer.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype).requires_grad_(False)


def fp32_reference(layer: nn.Module, assignment: torch.Tensor | None) -> nn.Module:
    """An fp32 copy computing the same thing by the plainest path: math SDPA, or expand-and-attend with the routing
    the measured layer chose (routing is discrete: bf16 and fp32 router scores may order near-ties differently)."""
    if isinstance(layer, RoutedLayer):
        inner = copy.deepcopy(layer.layer).float()  # not the swapped core: a compiled FlexAttention does not copy
        inner.backend = "torch"
        inner.fixed_assignment = assignment
        return RoutedLayer(inner)
    ref = copy.deepcopy(layer).float()
    ref.math = True
    return ref
