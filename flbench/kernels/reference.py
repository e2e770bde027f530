"""PyTorch reference for routed-KV (mixSGA) attention: expand every expert's compact K/V, then attend.

This is the oracle the Triton kernel is tested against, the CPU path the model uses, and "the paper's
expand-and-attend path" in ``benchmarks/attention.py``. It favours clarity over speed: it materialises the
expanded K/V and the full ``[B, H, L, N]`` score matrix in fp32.

Layout (shared with the kernel, see ``routed_attention.py``):

* ``q``: ``[B, H, L, d]``, one query per token position ``0..L-1``.
* expert ``e`` holds compact ``keys[e]`` / ``values[e]`` of shape ``[B, H // g_e, C_e, d]`` (only its tokens, with
  ``H // g_e`` heads), and ``positions[e]``: ``[B, C_e]`` giving each slot's original token position, or ``-1`` for a
  padding slot that no query may see.
* query head ``h`` reads compact head ``h // g_e`` of expert ``e``; one softmax runs jointly over all experts' slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["routed_attention_reference", "validate_routed_inputs"]


def validate_routed_inputs(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    group_sizes: Sequence[int],
) -> None:
    """Raise a ValueError that names the offending argument when shapes, dtypes or devices do not line up."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, L, d], got shape {tuple(q.shape)}")
    batch, heads, _, head_dim = q.shape
    n_experts = len(group_sizes)
    if not (len(keys) == len(values) == len(positions) == n_experts):
        raise ValueError(
            f"keys, values, positions and group_sizes must have one entry per expert; got {len(keys)}, "
            f"{len(values)}, {len(positions)}, {n_experts}"
        )
    if n_experts == 0:
        raise ValueError("routed attention needs at least one expert (group_sizes is empty)")
    for e, (k, v, pos, g) in enumerate(zip(keys, values, positions, group_sizes)):
        if not isinstance(g, int) or g < 1 or heads % g != 0:
            raise ValueError(f"group_sizes[{e}]={g!r} must be a positive int dividing the head count H={heads}")
        want = (batch, heads // g, k.shape[2] if k.dim() == 4 else -1, head_dim)
        if k.dim() != 4 or tuple(k.shape) != want:
            raise ValueError(f"keys[{e}] must be [B, H // g_e, C_e, d] = {want}, got {tuple(k.shape)}")
        if tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"values[{e}] must have the shape of keys[{e}] {tuple(k.shape)}, got {tuple(v.shape)}")
        if tuple(pos.shape) != (batch, k.shape[2]):
            raise ValueError(f"positions[{e}] must be [B, C_e] = {(batch, k.shape[2])}, got {tuple(pos.shape)}")
        if pos.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"positions[{e}] must be int32 or int64, got {pos.dtype}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise ValueError(f"keys[{e}]/values[{e}] dtype {k.dtype}/{v.dtype} differs from q's {q.dtype}")
        for name, t in (("keys", k), ("values", v), ("positions", pos)):
            if t.device != q.device:
                raise ValueError(f"{name}[{e}] is on {t.device}, q on {q.device}: move them to one device")


def routed_attention_reference(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    group_sizes: Sequence[int],
    causal: bool,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Routed-KV attention by expansion; differentiable; returns ``out`` (q's dtype) and optionally LSE ``[B, H, L]``.

    A query row that sees no key returns 0 (and gets zero gradients) and its log-sum-exp is ``-inf``.
    """
    validate_routed_inputs(q, keys, values, positions, group_sizes)
    _, _, seq_len, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else float(scale)

    # Expand each expert to H heads (query head h reads compact head h // g) and concatenate along the key axis.
    k_full = torch.cat([k.float().repeat_interleave(g, dim=1) for k, g in zip(keys, group_sizes)], dim=2)
    v_full = torch.cat([v.float().repeat_interleave(g, dim=1) for v, g in zip(values, group_sizes)], dim=2)
    slot_pos = torch.cat([p.long() for p in positions], dim=1)  # [B, N]

    visible = (slot_pos >= 0)[:, None, :]  # [B, 1, N]
    if causal:
        query_pos = torch.arange(seq_len, device=q.device)[None, :, None]
        visible = visible & (slot_pos[:, None, :] <= query_pos)  # [B, L, N]
    visible = visible[:, None]  # [B, 1, L or 1, N], broadcast over heads

    scores = torch.matmul(q.float(), k_full.transpose(-1, -2)) * scale  # [B, H, L, N]
    scores = scores.masked_fill(~visible, float("-inf"))
    # Rows that see nothing: softmax over all -inf is NaN (and so is its gradient). Give those rows finite scores,
    # then zero their probabilities, so their output is 0 and no NaN reaches the backward pass.
    empty_rows = ~visible.any(dim=-1, keepdim=True)  # [B, 1, L or 1, 1]
    scores = scores.masked_fill(empty_rows, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty_rows, 0.0)
    out = torch.matmul(probs, v_full).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores, dim=-1)
    lse = lse.masked_fill(empty_rows.squeeze(-1).expand_as(lse), float("-inf"))
    return out, lse
