"""Routing bookkeeping for routed-KV attention (mixSGA): budgets, capacities, progressive expert-choice and the
fixed-width slot buffers the attention kernel reads. Pure tensor functions, no module state.

Capacities are computed on the host, in exact arithmetic, for every row length (`capacity_rows`); the layer keeps
them as a device table indexed by the rows' token counts, so nothing here reads a tensor back to the host on the
model path (`capacities` and `expert_slots` do, for tests and analysis, and say so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from flbench.errors import ConfigError

CAPACITY_RULES = ("ceil", "cap")


def check_routing(group_sizes: Sequence[int], ratios: Sequence[float], capacity: str = "ceil") -> None:
    """ConfigError naming the key when the expert layout makes no sense."""
    if len(group_sizes) == 0 or len(group_sizes) != len(ratios):
        raise ConfigError(f"backbone.attention.ratios={list(ratios)} needs one entry per group size "
                          f"(backbone.attention.group_sizes={list(group_sizes)})")
    if any(not float(g).is_integer() or int(g) < 1 for g in group_sizes):
        raise ConfigError(f"backbone.attention.group_sizes={list(group_sizes)} must be positive integers")
    if any(float(r) < 0 for r in ratios) or sum(float(r) for r in ratios) <= 0:
        raise ConfigError(f"backbone.attention.ratios={list(ratios)} must be non-negative with a positive sum")
    if capacity not in CAPACITY_RULES:
        raise ConfigError(f"backbone.attention.capacity={capacity!r} must be one of {list(CAPACITY_RULES)}")
    if capacity == "cap" and int(group_sizes[-1]) != max(int(g) for g in group_sizes):
        raise ConfigError(f"backbone.attention.capacity=cap needs the last expert to be the coarsest "
                          f"(group_sizes={list(group_sizes)}): it takes the tokens moved to stay within budget")


def _fractions(ratios: Sequence[float]) -> list[Fraction]:
    """Normalised ratios as exact fractions (0.3 is 3/10, not the float nearest to it)."""
    parts = [Fraction(repr(float(r))) for r in ratios]
    total = sum(parts)
    return [p / total for p in parts]


def kv_fraction(ratios: Sequence[float], group_sizes: Sequence[int]) -> float:
    """Nominal K/V memory relative to dense: Σ ρ_e / g_e with ρ the normalised ratios."""
    return float(sum(r / int(g) for r, g in zip(_fractions(ratios), group_sizes)))


def capacity_rows(max_length: int, ratios: Sequence[float], group_sizes: Sequence[int], rule: str = "ceil"
                  ) -> list[tuple[int, ...]]:
    """Capacities of every expert for rows of n = 0..max_length tokens, on the host, in exact arithmetic.

    ceil: expert e < E takes ⌈ρ_e·n⌉ (progressively: never more than what is left), the last the rest.
    cap:  from ceil, one token at a time moves from the finer expert that overshoots its share most (ρ_e·n) to the
          last (coarsest) expert, until Σ C_e / g_e ≤ n·Σ ρ_e / g_e: the realised budget never exceeds the nominal.
    """
    rho = _fractions(ratios)
    groups = [int(g) for g in group_sizes]
    nominal = sum(r / g for r, g in zip(rho, groups))
    rows = []
    for n in range(max_length + 1):
        caps, remaining = [], n
        for r in rho[:-1]:
            c = min(math.ceil(r * n), remaining)
            caps.append(c)
            remaining -= c
        caps.append(remaining)
        if rule == "cap":
            while sum(Fraction(c, g) for c, g in zip(caps, groups)) > n * nominal:
                movable = [e for e in range(len(caps) - 1) if caps[e] > 0]
                e = max(movable, key=lambda i: (caps[i] - rho[i] * n, -groups[i]))
                caps[e] -= 1
                caps[-1] += 1
        rows.append(tuple(caps))
    return rows


def capacities(n_tokens: torch.Tensor, ratios: Sequence[float], group_sizes: Sequence[int] | None = None,
               rule: str = "ceil") -> torch.Tensor:
    """[B, E] capacities for rows of n_tokens real tokens (reads n_tokens on the host: analysis and tests only)."""
    groups = group_sizes if group_sizes is not None else [1] * len(ratios)
    table = torch.tensor(capacity_rows(int(n_tokens.max()) if n_tokens.numel() else 0, ratios, groups, rule))
    return table.to(n_tokens.device)[n_tokens.long()]


def realised_kv_fraction(n: int, ratios: Sequence[float], group_sizes: Sequence[int], rule: str = "ceil") -> float:
    """K/V stored for a row of n tokens relative to dense (the integer capacities, not the ratios)."""
    caps = capacity_rows(n, ratios, group_sizes, rule)[n]
    return sum(c / int(g) for c, g in zip(caps, group_sizes)) / max(n, 1)


def expert_choice(scores: torch.Tensor, valid: torch.Tensor, ratios: Sequence[float],
                  pinned: torch.Tensor | None = None, caps: torch.Tensor | None = None) -> torch.Tensor:
    """Progressive expert-choice assignment [B, L] (expert index; -1 for padding) from scores [B, L, E].

    `caps` [B, E] are the rows' capacities (default: ceil capacities of each row's valid count, read on the host).
    `pinned` tokens (e.g. CLS) go to expert 0 first and count against its capacity. Ties break by position.
    """
    batch, length, n_experts = scores.shape
    if caps is None:
        caps = capacities(valid.sum(1), ratios)
    assign = torch.full((batch, length), -1, dtype=torch.long, device=scores.device)
    free = valid
    if pinned is not None:
        pinned = pinned & valid
        assign = torch.where(pinned, 0, assign)
        free = free & ~pinned
        caps = torch.cat([(caps[:, :1] - pinned.sum(1, keepdim=True)).clamp(min=0), caps[:, 1:]], dim=1)
    ranks = torch.arange(length, device=scores.device)
    for e in range(n_experts - 1):
        s = scores[..., e].masked_fill(~free, float("-inf"))
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        # The first caps[b, e] tokens in score order; a capacity never exceeds the free tokens (capacity_rows).
        taken = torch.zeros_like(free).scatter(1, order, (ranks[None, :] < caps[:, e:e + 1]) & free.gather(1, order))
        assign = torch.where(taken, e, assign)
        free = free & ~taken
    return torch.where(free, n_experts - 1, assign)


def expert_slot_buffers(assign: torch.Tensor, widths: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per expert: (token index [B, W_e], slot position [B, W_e]) of its tokens in position order, in a buffer of
    fixed width W_e (spare slots point at token 0 with position -1: padding the kernel never attends to).

    One sort for all experts: tokens ordered by (expert, position), padding last; expert e's tokens are then the
    segment that starts after the earlier experts' counts.
    """
    batch, length = assign.shape
    position = torch.arange(length, device=assign.device).expand(batch, length)
    n_experts = len(widths)
    key = torch.where(assign >= 0, assign * length + position, n_experts * length + position)
    order = key.argsort(dim=1)
    counts = torch.stack([(assign == e).sum(1) for e in range(n_experts)], dim=1)  # [B, E]
    starts = counts.cumsum(1) - counts
    buffers = []
    for e, width in enumerate(widths):
        slot = torch.arange(width, device=assign.device)[None, :]
        used = slot < counts[:, e:e + 1]
        token = order.gather(1, (starts[:, e:e + 1] + slot).clamp(max=max(length - 1, 0)))
        buffers.append((token.masked_fill(~used, 0), token.masked_fill(~used, -1)))
    return buffers


def expert_slots(assign: torch.Tensor, expert: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's slot buffer (width: its largest count in the batch unless given — read on the host)."""
    n_experts = int(assign.max()) + 1 if assign.numel() else expert + 1
    n_experts = max(n_experts, expert + 1)
    widths = [0] * n_experts
    widths[expert] = int((assign == expert).sum(1).max()) if width is None and assign.numel() else int(width or 0)
    return expert_slot_buffers(assign, widths)[expert]
