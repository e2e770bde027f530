"""Routed-KV attention (mixSGA, "Mixture of Weight-shared Heterogeneous Group Attention Experts for Dynamic
Token-wise KV Optimization", arXiv 2506.13541), built from a pretrained multi-head attention layer.

Per layer:

* **Experts** e = 1..E store K/V at group size g_e (default 1, 2, 4). They share the pretrained W_K, W_V: expert e's
  compact head j is the mean of original heads j*g_e .. j*g_e+g_e-1, i.e. it projects with the group-averaged
  weights. Queries are never routed or pooled: query head h reads compact head h // g_e of every expert, and one
  softmax runs jointly over all keys (``flbench.kernels.routed_attention``, the one dispatch point).
* **Router** S = sigmoid(x·φ + β), φ He-initialised, β = 0: the only new parameters.
* **Progressive expert-choice**: expert 1 takes the ⌈ρ₁·n⌉ tokens it scores highest, expert 2 the ⌈ρ₂·n⌉ best of
  the rest, ...; the last expert takes the remainder. Every token lands in exactly one expert; capacities sum to n
  (n = the row's real tokens: text padding after end-of-text takes no capacity). KV fraction = Σ ρ_e / g_e
  (3:1:6 over (1, 2, 4) → 0.3 + 0.05 + 0.15 = 0.5). Optionally the image CLS token is pinned to expert 1.
* Each expert's K/V are computed **only for its own tokens** (gather, then project with the pooled weights), so
  the K/V projection cost falls with the budget.
* **Auxiliary loss**: cross-entropy between each token's router logits x·φ + β (argmax of the logits = argmax of
  the sigmoid scores) and its expert-choice assignment, weight α, so per-token argmax routing — what a streaming
  setting would use — agrees with expert-choice. The agreement is recorded per layer.

Router gradient (our choice; the paper's hard masks give the router no task gradient). Each token's values in its
expert are scaled by s / stopgrad(s), s = the token's score for the expert it was assigned to: the forward pass is
unchanged (the factor is exactly 1), and the router receives ∂L/∂s = Σ_i p_ij ⟨∂L/∂o_i, v_j⟩ / s — how much the
token's contribution, at the granularity it was given, helps the loss. That signal is weak (it says whether a token
matters, not which granularity it needs), so the calibration (flbench/calibrate.py) also trains the router toward
an oracle routing computed from the dense layer (`oracle_benefit`). The auxiliary loss is added to
the backward pass of the layer's output by a tiny autograd function (identity forward; backward also sends α to
the aux loss), so any loss computed from the model — a prompt method's, the calibration's — trains the router
with it without knowing about it. Both are active only when the router's parameters require gradients.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flbench.backbones.attention import SharedWeightAttention, current_text_lengths, is_causal_mask, pooled_projection
from flbench.errors import ConfigError
from flbench.kernels import routed_attention

log = logging.getLogger(__name__)


def check_routing(group_sizes: Sequence[int], ratios: Sequence[float]) -> None:
    """ConfigError naming the key when the expert layout makes no sense."""
    if len(group_sizes) == 0 or len(group_sizes) != len(ratios):
        raise ConfigError(f"backbone.attention.ratios={list(ratios)} needs one entry per group size "
                          f"(backbone.attention.group_sizes={list(group_sizes)})")
    if any(not float(g).is_integer() or int(g) < 1 for g in group_sizes):
        raise ConfigError(f"backbone.attention.group_sizes={list(group_sizes)} must be positive integers")
    if any(float(r) < 0 for r in ratios) or sum(float(r) for r in ratios) <= 0:
        raise ConfigError(f"backbone.attention.ratios={list(ratios)} must be non-negative with a positive sum")


def kv_fraction(ratios: Sequence[float], group_sizes: Sequence[int]) -> float:
    """Nominal K/V memory relative to dense: Σ ρ_e / g_e with ρ the normalised ratios."""
    total = float(sum(ratios))
    return sum(float(r) / total / int(g) for r, g in zip(ratios, group_sizes))


def capacities(n_tokens: torch.Tensor, ratios: Sequence[float]) -> torch.Tensor:
    """[B, E] capacities for rows of n_tokens real tokens: ⌈ρ_e·n⌉ taken progressively, the last expert the rest."""
    total = float(sum(ratios))
    n = n_tokens.to(torch.float64)
    remaining = n_tokens.long().clone()
    caps = []
    for r in list(ratios)[:-1]:
        # The small epsilon keeps exact products (0.3 * 20 = 6.000000000000001) from rounding up.
        c = torch.ceil(n * (float(r) / total) - 1e-9).long().clamp(min=0)
        c = torch.minimum(c, remaining)
        caps.append(c)
        remaining = remaining - c
    caps.append(remaining)
    return torch.stack(caps, dim=-1)


def expert_choice(scores: torch.Tensor, valid: torch.Tensor, ratios: Sequence[float],
                  pinned: torch.Tensor | None = None) -> torch.Tensor:
    """Progressive expert-choice assignment [B, L] (expert index; -1 for padding) from scores [B, L, E].

    `pinned` tokens (e.g. CLS) go to expert 0 first and count against its capacity. Ties break by position.
    """
    batch, length, n_experts = scores.shape
    caps = capacities(valid.sum(1), ratios)  # [B, E]
    assign = torch.full((batch, length), -1, dtype=torch.long, device=scores.device)
    free = valid.clone()
    if pinned is not None:
        pinned = pinned & valid
        assign[pinned] = 0
        free &= ~pinned
        caps[:, 0] = (caps[:, 0] - pinned.sum(1)).clamp(min=0)
    ranks = torch.arange(length, device=scores.device)
    for e in range(n_experts - 1):
        s = scores[..., e].masked_fill(~free, float("-inf"))
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        taken = torch.zeros_like(free)
        # The first caps[b, e] tokens in score order; capacity never exceeds the free tokens (capacities() clamps).
        taken.scatter_(1, order, (ranks[None, :] < caps[:, e:e + 1]) & free.gather(1, order))
        assign[taken] = e
        free &= ~taken
    assign[free] = n_experts - 1
    return assign


def expert_slots(assign: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token index [B, C], slot position [B, C]) of one expert's tokens in position order; C = the batch's largest
    count; a row's spare slots point at token 0 with position -1 (padding the kernel never attends to)."""
    batch, length = assign.shape
    mine = assign == expert
    counts = mine.sum(1)
    width = int(counts.max()) if batch else 0
    position = torch.arange(length, device=assign.device).expand(batch, length)
    order = torch.argsort(torch.where(mine, position, position + length), dim=1)[:, :width]
    used = torch.arange(width, device=assign.device)[None, :] < counts[:, None]
    return order.masked_fill(~used, 0), order.masked_fill(~used, -1)


class Router(nn.Module):
    """S = sigmoid(x·φ + β): one score per expert per token."""

    def __init__(self, width: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, width))
        self.bias = nn.Parameter(torch.zeros(n_experts))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """He initialisation of φ (std sqrt(2 / width)), zero β."""
        with torch.no_grad():
            self.weight.normal_(0.0, math.sqrt(2.0 / self.weight.shape[1]), generator=generator)
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits x·φ + β [..., E] (the scores are their sigmoid)."""
        return F.linear(x, self.weight, self.bias)


class _AuxLossInjection(torch.autograd.Function):
    """Identity on `out`; its backward also sends gradient `weight` into `aux`, so whoever backpropagates through
    the layer's output trains the router on the auxiliary loss too."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        ctx.aux_shape = aux.shape
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, grad_out.new_full(ctx.aux_shape, ctx.weight), None


class RoutedKVAttention(SharedWeightAttention):
    """mixSGA attention from a pretrained ``nn.MultiheadAttention`` (same Q/K/V/O parameters, plus a router)."""

    def __init__(self, mha: nn.MultiheadAttention, tower: str, group_sizes: Sequence[int] = (1, 2, 4),
                 ratios: Sequence[float] = (3, 1, 6), pin_cls: bool = False, aux_weight: float = 0.01,
                 backend: str = "auto") -> None:
        super().__init__(mha, tower)
        check_routing(group_sizes, ratios)
        bad = [g for g in group_sizes if self.num_heads % int(g)]
        if bad:
            raise ConfigError(f"backbone.attention.group_sizes={list(group_sizes)}: {bad} do not divide the {tower} "
                              f"tower's {self.num_heads} heads")
        self.group_sizes = tuple(int(g) for g in group_sizes)
        self.ratios = tuple(float(r) for r in ratios)
        self.pin_cls = pin_cls
        self.aux_weight = float(aux_weight)
        self.backend = backend
        self.router = Router(self.embed_dim, len(self.group_sizes))
        self.fixed_assignment: torch.Tensor | None = None  # tests and analysis: bypass the router's choice
        self.oracle: str | None = None  # calibration: "target" (train toward the oracle) or "route" (route by it)
        self.last_oracle_loss: torch.Tensor | None = None
        self.last_assignment: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_agreement: torch.Tensor | None = None

    # --- budget ---------------------------------------------------------------------------------------------
    def kv_heads_per_token(self, length: int | None = None) -> float:
        """Average K (= V) heads stored per token: nominal (ratios), or realised at `length` tokens (capacities)."""
        if length is None:
            return self.num_heads * kv_fraction(self.ratios, self.group_sizes)
        caps = capacities(torch.tensor([length]), self.ratios)[0].tolist()
        return sum(c * self.num_heads / g for c, g in zip(caps, self.group_sizes)) / max(length, 1)

    # --- routing --------------------------------------------------------------------------------------------
    def _valid(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        lengths = current_text_lengths() if self.tower == "text" else None
        positions = torch.arange(length, device=device)
        if lengths is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        if lengths.shape[0] != batch:
            raise RuntimeError(f"sequence_lengths() gave {lengths.shape[0]} rows for a batch of {batch}")
        return positions[None, :] < lengths.to(device)[:, None]

    def route(self, x: torch.Tensor, valid: torch.Tensor, causal: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(router logits [B, L, E], assignment [B, L], pinned mask or None)."""
        logits = self.router(x)
        pinned = None
        if self.pin_cls:
            pinned = torch.zeros_like(valid)
            pinned[:, 0] = True
        self.last_oracle_loss = None
        if self.fixed_assignment is not None:
            assign = self.fixed_assignment.to(x.device)
        elif self.oracle == "route":
            assign = expert_choice(self.oracle_benefit(x, valid, causal), valid, self.ratios, pinned)
        else:
            assign = expert_choice(torch.sigmoid(logits.detach()), valid, self.ratios, pinned)
        if self.oracle == "target":
            target = expert_choice(self.oracle_benefit(x, valid, causal), valid, self.ratios, pinned)
            routed = valid if pinned is None else valid & ~pinned
            self.last_oracle_loss = F.cross_entropy(logits[routed], target[routed])
        return logits, assign, pinned

    @torch.no_grad()
    def oracle_benefit(self, x: torch.Tensor, valid: torch.Tensor, causal: bool) -> torch.Tensor:
        """[B, L, E]: attention-weighted K/V error a token avoids in expert e instead of the last (coarsest) expert.

        Computed from the dense layer (full K/V for every token: calibration only). A token's pooling error is
        weighted by the attention mass it receives: Σ_i p_ij (‖Δv_j‖² + (q_i·Δk_j / √d)²), summed over heads.
        Progressive expert-choice on these benefits is a greedy oracle routing the router is trained to imitate.
        """
        (wq, bq), (wk, bk), (wv, bv) = self._split_weights()
        heads, scale = self.num_heads, self.head_dim ** -0.5
        q = self._heads(F.linear(x, wq, bq), heads)
        k = self._heads(F.linear(x, wk, bk), heads)
        v = self._heads(F.linear(x, wv, bv), heads)
        length = x.shape[1]
        visible = valid[:, None, None, :]
        if causal:
            visible = visible & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        probs = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf")), dim=-1)
        probs = probs.nan_to_num(0.0) * valid[:, None, :, None]
        costs = []
        for g in self.group_sizes:
            def pooled(t: torch.Tensor) -> torch.Tensor:
                return t.unflatten(1, (heads // g, g)).mean(2, keepdim=True).expand(-1, -1, g, -1, -1).flatten(1, 2)

            dk, dv = k - pooled(k), v - pooled(v)
            key_error = ((q @ dk.transpose(-1, -2)) * scale) ** 2  # [B, H, Lq, Lk]
            costs.append((probs * (key_error + dv.pow(2).sum(-1)[:, :, None, :])).sum((1, 2)))
        cost = torch.stack(costs, dim=-1)
        return cost[..., -1:] - cost

    def _record(self, logits: torch.Tensor, assign: torch.Tensor, valid: torch.Tensor,
                pinned: torch.Tensor | None, need_aux: bool) -> torch.Tensor | None:
        """Agreement of per-token argmax with expert-choice (always) and the aux loss (when it will be trained)."""
        routed = valid & (assign >= 0) if pinned is None else valid & ~pinned & (assign >= 0)
        z, target = logits[routed], assign[routed]
        self.last_assignment = assign.detach()
        self.last_agreement = (z.detach().argmax(-1) == target).float().mean() if target.numel() else None
        aux = F.cross_entropy(z, target) if (need_aux and target.numel()) else None
        self.last_aux_loss = aux
        return aux

    # --- attention ------------------------------------------------------------------------------------------
    def attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        if attn_mask is None:
            causal = False
        elif is_causal_mask(attn_mask, length):
            causal = True
        else:
            raise NotImplementedError("routed_kv attention takes no mask or open_clip's causal mask")
        valid = self._valid(batch, length, x.device)
        logits, assign, pinned = self.route(x, valid, causal)
        train_router = torch.is_grad_enabled() and self.router.weight.requires_grad
        aux = self._record(logits, assign, valid, pinned, need_aux=train_router and self.aux_weight > 0)
        scores = torch.sigmoid(logits) if train_router else None

        (wq, bq), (wk, bk), (wv, bv) = self._split_weights()
        q = self._heads(F.linear(x, wq, bq), self.num_heads)
        keys, values, positions = [], [], []
        for e, g in enumerate(self.group_sizes):
            index, pos = expert_slots(assign, e)
            tokens = x.gather(1, index[..., None].expand(-1, -1, width))  # only this expert's tokens
            k = self._heads(F.linear(tokens, *pooled_projection(wk, bk, self.num_heads, g)), self.num_heads // g)
            v = self._heads(F.linear(tokens, *pooled_projection(wv, bv, self.num_heads, g)), self.num_heads // g)
            if scores is not None:  # straight-through: factor 1 forward, router gradient backward
                s = scores[..., e].gather(1, index).clamp_min(1e-6)
                v = v * (s / s.detach())[:, None, :, None]
            keys.append(k)
            values.append(v)
            positions.append(pos)
        out = routed_attention(q, keys, values, positions, self.group_sizes, causal, backend=self.backend)
        out = self._merge(out)
        if aux is not None:
            out = _AuxLossInjection.apply(out, aux, self.aux_weight)
        return out

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, group_sizes={self.group_sizes}, ratios={self.ratios}, "
                f"pin_cls={self.pin_cls}, aux_weight={self.aux_weight}")


def routing_stats(model: nn.Module) -> dict[str, float]:
    """Mean argmax/expert-choice agreement (and aux loss) per tower over the last forward pass of each layer."""
    per_tower: dict[str, list[float]] = {}
    aux: dict[str, list[float]] = {}
    for m in model.modules():
        if isinstance(m, RoutedKVAttention) and m.last_agreement is not None:
            per_tower.setdefault(m.tower, []).append(float(m.last_agreement))
            if m.last_aux_loss is not None:
                aux.setdefault(m.tower, []).append(float(m.last_aux_loss.detach()))
    stats = {f"{t}/agreement": sum(v) / len(v) for t, v in per_tower.items()}
    stats.update({f"{t}/aux_loss": sum(v) / len(v) for t, v in aux.items()})
    return stats


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over layers of the last forward's aux losses (None when none was computed)."""
    losses = [m.last_aux_loss for m in model.modules() if isinstance(m, RoutedKVAttention)
              and m.last_aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
