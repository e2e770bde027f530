"""K/V memory and FLOPs of attention, from a model as swapped or from plain dimensions.

Conventions (stated so every number can be checked by hand):

- K and V are stored at `bytes_per_element` (2 = an fp16/bf16 cache). Routed-KV also stores each token's expert
  index at ⌈log₂ E⌉ bits per token per layer (2 bits for 3 experts), counted in bytes as bits / 8. With plain
  dimensions this reproduces Table 9 of the mixSGA paper: Llama-3.2-1B (16 layers, 8 K/V heads of 64) 32,768 bytes
  per token vs 32,772 with 3 experts; OPT-125m (12 × 12 × 64) 36,864 vs 36,867; Gemma-2-2B (26 × 4 × 256) 106,496 vs
  106,502.5 — the paper prints whole bytes, rounded down (tests/test_costs.py).
- A multiply-add is 2 FLOPs. Projection FLOPs count K and V only (Q and the output projection never change);
  routed-KV adds its router (2·width·E per token). Attention FLOPs are QKᵀ plus PV for one full-length sequence over
  all layers (bidirectional: L² pairs; causal: L(L+1)/2). They do not depend on the KV budget: every query head
  still scores every key once; the compact heads are only re-read.
- Three budgets: *nominal* from the ratios; *realised* from the integer capacities at the tower's full length;
  *measured* from what the layers actually stored for the rows they encoded since the last reset (text rows end at
  their end-of-text token, and capacities round up on short rows, so measured ≥ realised ≥ nominal under
  ``capacity: ceil``; ``capacity: cap`` keeps every row at or below nominal).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from flbench.backbones.layers import GroupedKVAttention, SharedWeightAttention, transformer_blocks
from flbench.backbones.routed_kv import RoutedKVAttention


def index_bits(n_experts: int) -> int:
    """Bits per token per layer to store which expert holds the token's K/V: ⌈log₂ E⌉ (0 for one expert)."""
    return math.ceil(math.log2(n_experts)) if n_experts > 1 else 0


def kv_bytes_per_token(layers: int, kv_heads: float, head_dim: int, bytes_per_element: int = 2,
                       n_experts: int = 1) -> float:
    """K and V of one token over all layers, plus the expert index: 2·layers·kv_heads·head_dim·bytes + index."""
    return 2 * layers * kv_heads * head_dim * bytes_per_element + layers * index_bits(n_experts) / 8


def tower_costs(layers: int, heads: int, head_dim: int, seq_len: int = 0, kv_heads: float | None = None,
                n_experts: int = 1, causal: bool = False, bytes_per_element: int = 2, kind: str | None = None,
                kv_heads_realised: float | None = None, kv_heads_measured: float | None = None,
                tokens_measured: int = 0) -> dict[str, Any]:
    """Cost figures of one transformer tower from its dimensions (`kv_heads`: average K/V heads stored per token)."""
    kv_heads = float(heads if kv_heads is None else kv_heads)
    realised = kv_heads if kv_heads_realised is None else float(kv_heads_realised)
    width = heads * head_dim
    index_bytes = index_bits(n_experts) / 8
    router_flops = 2.0 * width * n_experts if n_experts > 1 else 0.0
    per_layer = lambda h: 2 * h * head_dim * bytes_per_element + index_bytes  # noqa: E731
    pairs = seq_len * (seq_len + 1) / 2 if causal else seq_len * seq_len
    kind = kind or ("dense" if kv_heads == heads else "gqa")
    out = {
        "kind": kind, "layers": layers, "heads": heads, "head_dim": head_dim, "seq_len": seq_len,
        "index_bits_per_token_per_layer": index_bits(n_experts),
        "kv_fraction": round(kv_heads / heads, 6),
        "kv_fraction_realised": round(realised / heads, 6),
        "kv_bytes_per_token": kv_bytes_per_token(layers, kv_heads, head_dim, bytes_per_element, n_experts),
        "kv_bytes_per_token_per_layer": per_layer(kv_heads),
        "kv_bytes_per_token_per_layer_realised": round(per_layer(realised), 3),
        "kv_proj_flops_per_token_per_layer": 2 * 2 * width * kv_heads * head_dim + router_flops,
        "kv_proj_flops_per_sequence": round(layers * seq_len * (2 * 2 * width * realised * head_dim + router_flops)),
        "attention_flops_per_sequence": int(layers * heads * 4 * head_dim * pairs),
    }
    if kv_heads_measured is not None:
        out.update({"kv_fraction_measured": round(kv_heads_measured / heads, 6),
                    "kv_bytes_per_token_per_layer_measured": round(per_layer(kv_heads_measured), 3),
                    "tokens_measured": int(tokens_measured)})
    return out


def _tower_lengths(model: nn.Module) -> dict[str, int]:
    lengths = {}
    visual = getattr(model, "visual", None)
    if getattr(visual, "transformer", None) is not None:
        lengths["vision"] = int(visual.positional_embedding.shape[0])
    if getattr(model, "transformer", None) is not None:
        lengths["text"] = int(model.context_length)
    return lengths


def _measured(layers: list[nn.Module]) -> tuple[float | None, int]:
    """(K/V heads stored per encoded token, tokens) over a tower's routed layers (None before any encoding)."""
    stored = sum(int(m.kv_heads_stored) for m in layers)
    tokens = sum(int(m.tokens_encoded) for m in layers)
    return (None, 0) if tokens == 0 else (stored / tokens, tokens // len(layers))


def attention_costs(model: nn.Module | None = None, bytes_per_element: int = 2, **dimensions: Any) -> dict[str, Any]:
    """Cost figures per transformer tower of `model` (a FrozenCLIP or open_clip model) as swapped — or, called with
    plain dimensions instead (layers=, heads=, head_dim=, kv_heads=, n_experts=, seq_len=, causal=), of one tower.
    """
    if model is None:
        return tower_costs(bytes_per_element=bytes_per_element, **dimensions)
    model = getattr(model, "model", model)
    by_tower: dict[str, list[nn.Module]] = {}
    for tower, block in transformer_blocks(model):
        by_tower.setdefault(tower, []).append(block.attn)
    lengths = _tower_lengths(model)
    out: dict[str, Any] = {}
    for tower, layers in by_tower.items():
        first, length = layers[0], lengths.get(tower, 0)
        heads, head_dim = first.num_heads, first.embed_dim // first.num_heads
        figures: dict[str, Any] = dict(layers=len(layers), heads=heads, head_dim=head_dim, seq_len=length,
                                       causal=tower == "text", bytes_per_element=bytes_per_element)
        if isinstance(first, RoutedKVAttention):
            measured, tokens = _measured(layers)
            figures.update(kind="routed_kv", kv_heads=first.kv_heads_per_token(), n_experts=len(first.group_sizes),
                           kv_heads_realised=first.kv_heads_per_token(length), kv_heads_measured=measured,
                           tokens_measured=tokens)
        elif isinstance(first, GroupedKVAttention):
            figures.update(kind="gqa", kv_heads=first.kv_heads_per_token())
        elif isinstance(first, SharedWeightAttention):
            raise TypeError(f"no cost model for {type(first).__name__}")
        else:
            figures.update(kind="dense")
        out[tower] = tower_costs(**figures)
        if isinstance(first, RoutedKVAttention):
            out[tower]["capacity"] = first.capacity
    return out


__all__ = ["attention_costs", "index_bits", "kv_bytes_per_token", "tower_costs"]
