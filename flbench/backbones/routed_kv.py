"""Routed-KV attention (mixSGA, "Mixture of Weight-shared Heterogeneous Group Attention Experts for Dynamic
Token-wise KV Optimization", arXiv 2506.13541), built from a pretrained multi-head attention layer.

Per layer:

* **Experts** e = 1..E store K/V at group size g_e (default 1, 2, 4). They share the pretrained W_K, W_V: expert e's
  compact head j is the mean of original heads j*g_e .. j*g_e+g_e-1, i.e. it projects with the group-averaged
  weights (one K+V GEMM per expert, over its own tokens only). Queries are never routed or pooled: query head h
  reads compact head h // g_e of every expert, and one softmax runs jointly over all keys
  (``flbench.kernels.routed_attention``, the one dispatch point).
* **Router** S = sigmoid(x·φ + β), φ He-initialised, β = 0: the only new parameters.
* **Progressive expert-choice**: expert 1 takes the C_1 tokens it scores highest, expert 2 the C_2 best of the rest,
  ...; the last expert takes the remainder, so every token lands in exactly one expert (n = the row's real tokens:
  text padding after end-of-text takes no capacity). Capacities (`capacity_rows`): ``ceil`` (default) C_e = ⌈ρ_e·n⌉,
  so short rows get slightly more than the nominal budget Σ ρ_e / g_e; ``cap`` moves tokens to the coarsest expert
  until the row's budget is at most nominal. Optionally the image CLS token is pinned to expert 1.
* **Auxiliary loss**: cross-entropy between each token's router logits (argmax of the logits = argmax of the
  sigmoid scores) and its expert-choice assignment, averaged over the tower's routed layers and weighted α
  (α/N·Σ_l, as the paper writes it), so per-token argmax routing — what a streaming setting would use — agrees with
  expert-choice. The agreement is recorded per layer.

Router gradient (our choice; the paper's hard masks give the router no task gradient). Each token's values in its
expert are scaled by s / stopgrad(s), s = the token's score for the expert it was assigned to: the forward pass is
unchanged (the factor is exactly 1), and the router receives ∂L/∂s = Σ_i p_ij ⟨∂L/∂o_i, v_j⟩ / s. The calibration
(backbones/calibration.py) also trains the router toward an oracle routing computed from the dense layer
(`oracle_benefit`), weighted by the query rows that reach the pooled output. The auxiliary loss is added to the
backward pass of the layer's output by a tiny autograd function (identity forward), so any loss computed from the
model trains the router with it without knowing about it. Both are active only when the router's parameters
require gradients.

No host synchronisation in forward or backward: capacities come from a table computed on the host per row length
(a buffer on the layer's device, indexed by the rows' token counts), every expert's slot buffer has a fixed width
(the largest capacity any row of this length can have; spare slots hold position -1), assignments are built with
`torch.where`/`scatter`, never boolean-mask indexing. The layer compiles with `torch.compile` without graph breaks
(tests/test_routed_kv.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flbench.backbones.layers import SharedWeightAttention, current_text_lengths, pooled_projection
from flbench.backbones.routing import (CAPACITY_RULES, capacities, capacity_rows, check_routing, expert_choice,
                                       expert_slot_buffers, expert_slots, kv_fraction, realised_kv_fraction)
from flbench.errors import ConfigError
from flbench.kernels import routed_attention

log = logging.getLogger(__name__)

ORACLE_ROWS = ("pooled", "rollout", "all")
_TABLE_MIN_LENGTH = 256  # capacity tables start this long (CLIP text: 77 positions, ViT-B/16: 197 tokens)


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


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask holds (0 when nothing does), without boolean indexing (no host sync)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


class RoutedKVAttention(SharedWeightAttention):
    """mixSGA attention from a pretrained ``nn.MultiheadAttention`` (same Q/K/V/O parameters, plus a router)."""

    def __init__(self, mha: nn.MultiheadAttention, tower: str, group_sizes: Sequence[int] = (1, 2, 4),
                 ratios: Sequence[float] = (3, 1, 6), pin_cls: bool = False, aux_weight: float = 0.01,
                 backend: str = "auto", capacity: str = "ceil") -> None:
        super().__init__(mha, tower)
        check_routing(group_sizes, ratios, capacity)
        bad = [g for g in group_sizes if self.num_heads % int(g)]
        if bad:
            raise ConfigError(f"backbone.attention.group_sizes={list(group_sizes)}: {bad} do not divide the {tower} "
                              f"tower's {self.num_heads} heads")
        self.group_sizes = tuple(int(g) for g in group_sizes)
        self.ratios = tuple(float(r) for r in ratios)
        self.capacity = capacity
        self.pin_cls = pin_cls
        self.aux_weight = float(aux_weight)
        self.aux_scale = 1.0  # 1 / (routed layers of this tower), set by the conversion: the loss is α/N·Σ_l
        self.backend = backend
        self.router = Router(self.embed_dim, len(self.group_sizes))
        # Which query row the tower pools (the oracle's default relevance): "eot" (text), "cls" or "mean" (vision).
        self.pooled_row = "eot" if tower == "text" else "cls"
        self.fixed_assignment: torch.Tensor | None = None  # tests and analysis: bypass the router's choice
        self.oracle: str | None = None  # calibration: "target" (train toward the oracle) or "route" (route by it)
        self.oracle_rows = "pooled"  # which query rows weigh a token's pooling error (ORACLE_ROWS)
        self.query_relevance: torch.Tensor | None = None  # oracle_rows=rollout: [B, L] weights from the calibration
        self.last_oracle_loss: torch.Tensor | None = None
        self.last_assignment: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_agreement: torch.Tensor | None = None
        # What was actually encoded (budgets measured, not assumed): K/V heads stored and real tokens, summed.
        self.register_buffer("kv_heads_stored", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("tokens_encoded", torch.zeros((), dtype=torch.long), persistent=False)
        self._build_tables(_TABLE_MIN_LENGTH)
        self._projection_cache: tuple[tuple, list] | None = None

    # --- budget ---------------------------------------------------------------------------------------------
    def _build_tables(self, max_length: int) -> None:
        rows = capacity_rows(max_length, self.ratios, self.group_sizes, self.capacity)
        device = self.kv_heads_stored.device
        self.register_buffer("capacity_table", torch.tensor(rows, dtype=torch.long, device=device), persistent=False)
        # Slot-buffer width of each expert for a batch of length L: the largest capacity of any row of <= L tokens.
        widths, running = [], [0] * len(self.group_sizes)
        for row in rows:
            running = [max(a, b) for a, b in zip(running, row)]
            widths.append(tuple(running))
        self._widths = widths

    def slot_widths(self, length: int, pinned: bool) -> tuple[int, ...]:
        """Fixed slot-buffer widths for a batch of `length` positions (host integers: shapes, not data)."""
        widths = self._widths[length]
        if pinned:  # a pinned CLS is in expert 0 even where its capacity rounds to 0
            widths = (max(widths[0], 1), *widths[1:])
        return widths

    def kv_heads_per_token(self, length: int | None = None) -> float:
        """Average K (= V) heads stored per token: nominal (ratios), or realised at `length` tokens (capacities)."""
        if length is None:
            return self.num_heads * kv_fraction(self.ratios, self.group_sizes)
        return self.num_heads * realised_kv_fraction(length, self.ratios, self.group_sizes, self.capacity)

    def measured_kv_fraction(self) -> float | None:
        """K/V stored over everything this layer encoded since the last reset, relative to dense (None: nothing)."""
        tokens = int(self.tokens_encoded)
        return None if tokens == 0 else int(self.kv_heads_stored) / (tokens * self.num_heads)

    def reset_measurement(self) -> None:
        self.kv_heads_stored.zero_()
        self.tokens_encoded.zero_()

    # --- routing --------------------------------------------------------------------------------------------
    def _valid(self, batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(valid positions [B, L], real tokens per row [B])."""
        lengths = current_text_lengths() if self.tower == "text" else None
        positions = torch.arange(length, device=device)
        if lengths is None:
            return (torch.ones(batch, length, dtype=torch.bool, device=device),
                    torch.full((batch,), length, dtype=torch.long, device=device))
        if lengths.shape[0] != batch:
            raise RuntimeError(f"sequence_lengths() gave {lengths.shape[0]} rows for a batch of {batch}")
        lengths = lengths.to(device=device, dtype=torch.long).clamp(max=length)
        return positions[None, :] < lengths[:, None], lengths

    def route(self, x: torch.Tensor, valid: torch.Tensor, n_tokens: torch.Tensor, causal: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(router logits [B, L, E], assignment [B, L], pinned mask or None)."""
        logits = self.router(x)
        pinned = None
        if self.pin_cls:
            pinned = torch.zeros_like(valid)
            pinned[:, 0] = True
        caps = self.capacity_table[n_tokens]
        self.last_oracle_loss = None
        if self.fixed_assignment is not None:
            assign = self.fixed_assignment.to(x.device)
        elif self.oracle == "route":
            benefit = self.oracle_benefit(x, valid, causal, self.oracle_relevance(valid, n_tokens))
            assign = expert_choice(benefit, valid, self.ratios, pinned, caps)
        else:
            assign = expert_choice(torch.sigmoid(logits.detach()), valid, self.ratios, pinned, caps)
        if self.oracle == "target":
            benefit = self.oracle_benefit(x, valid, causal, self.oracle_relevance(valid, n_tokens))
            target = expert_choice(benefit, valid, self.ratios, pinned, caps)
            routed = valid if pinned is None else valid & ~pinned
            ce = F.cross_entropy(logits.flatten(0, 1).float(), target.clamp(min=0).flatten(), reduction="none")
            self.last_oracle_loss = _masked_mean(ce.view_as(target), routed)
        return logits, assign, pinned

    def oracle_relevance(self, valid: torch.Tensor, n_tokens: torch.Tensor, rows: str | None = None
                         ) -> torch.Tensor:
        """[B, L] weight of each query row in the oracle (rows, default `oracle_rows`): the row(s) the tower pools,
        all rows, or the rollout relevance the calibration computed for this batch."""
        rows = rows or self.oracle_rows
        if rows == "rollout":
            if self.query_relevance is None or tuple(self.query_relevance.shape) != tuple(valid.shape):
                raise RuntimeError("oracle_rows=rollout needs query_relevance for this batch (set by calibration)")
            return self.query_relevance
        if rows == "all":
            return valid.float()
        if self.pooled_row == "mean":
            return valid.float() / n_tokens[:, None].clamp(min=1)
        row = (n_tokens - 1).clamp(min=0) if self.pooled_row == "eot" else torch.zeros_like(n_tokens)
        return F.one_hot(row, valid.shape[1]).float()

    def attention_probs(self, x: torch.Tensor, valid: torch.Tensor, causal: bool) -> torch.Tensor:
        """Dense attention probabilities [B, H, L, L] of this layer for input x (rows of padding are zero)."""
        (wq, bq), (wk, bk), _ = self._split_weights()
        q = self._heads(F.linear(x, wq, bq), self.num_heads)
        k = self._heads(F.linear(x, wk, bk), self.num_heads)
        length = x.shape[1]
        visible = valid[:, None, None, :]
        if causal:
            visible = visible & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        scores = (q @ k.transpose(-1, -2) * self.head_dim ** -0.5).masked_fill(~visible, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0) * valid[:, None, :, None]

    @torch.no_grad()
    def oracle_benefit(self, x: torch.Tensor, valid: torch.Tensor, causal: bool,
                       relevance: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, E]: attention-weighted K/V error a token avoids in expert e instead of the last (coarsest) expert.

        Computed from the dense layer (full K/V for every token: calibration only). A token's pooling error is
        weighted by the attention mass it receives from the query rows that matter: Σ_i r_i Σ_h p_hij (‖Δv_hj‖² +
        (q_hi·Δk_hj / √d)²), r = `relevance` [B, L] (default: every valid row). Progressive expert-choice on these
        benefits is a greedy oracle routing the router is trained to imitate.
        """
        (wq, bq), (wk, bk), (wv, bv) = self._split_weights()
        heads, scale = self.num_heads, self.head_dim ** -0.5
        q = self._heads(F.linear(x, wq, bq), heads)
        k = self._heads(F.linear(x, wk, bk), heads)
        v = self._heads(F.linear(x, wv, bv), heads)
        probs = self.attention_probs(x, valid, causal)
        weights = valid.float() if relevance is None else relevance.to(probs.dtype)
        probs = probs * weights[:, None, :, None]
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
        routed = valid & (assign >= 0)
        if pinned is not None:
            routed = routed & ~pinned
        self.last_assignment = assign.detach()
        self.last_agreement = _masked_mean((logits.detach().argmax(-1) == assign).float(), routed)
        aux = None
        if need_aux:
            ce = F.cross_entropy(logits.flatten(0, 1).float(), assign.clamp(min=0).flatten(), reduction="none")
            aux = _masked_mean(ce.view_as(assign), routed)
        self.last_aux_loss = aux
        return aux

    # --- attention ------------------------------------------------------------------------------------------
    def _expert_projections(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per expert, the fused [K; V] projection with group-mean weights: one GEMM per expert. Cached while the
        weights are frozen and unchanged (an in-place load bumps their version, a move changes their storage)."""
        w, b = self.in_proj_weight, self.in_proj_bias
        trainable = w.requires_grad or (b is not None and b.requires_grad)
        key = None
        if not trainable and not torch.compiler.is_compiling():
            key = (w.data_ptr(), w._version, w.dtype, w.device, None if b is None else (b.data_ptr(), b._version))
            if self._projection_cache is not None and self._projection_cache[0] == key:
                return self._projection_cache[1]
        _, (wk, bk), (wv, bv) = self._split_weights()
        fused = []
        for g in self.group_sizes:
            pk, pbk = pooled_projection(wk, bk, self.num_heads, g)
            pv, pbv = pooled_projection(wv, bv, self.num_heads, g)
            fused.append((torch.cat([pk, pv]), None if pbk is None else torch.cat([pbk, pbv])))
        if key is not None:
            self._projection_cache = (key, [(fw.detach(), None if fb is None else fb.detach()) for fw, fb in fused])
        return fused

    def attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        causal = self._is_causal(attn_mask, length)
        if length >= len(self._widths):
            self._build_tables(max(length, 2 * len(self._widths)))
        valid, n_tokens = self._valid(batch, length, x.device)
        logits, assign, pinned = self.route(x, valid, n_tokens, causal)
        train_router = torch.is_grad_enabled() and self.router.weight.requires_grad
        aux = self._record(logits, assign, valid, pinned, need_aux=train_router and self.aux_weight > 0)
        scores = torch.sigmoid(logits) if train_router else None

        wq, bq = self._split_weights()[0]
        q = self._heads(F.linear(x, wq, bq), self.num_heads)
        widths = self.slot_widths(length, pinned is not None)
        if self.fixed_assignment is not None:  # analysis only: any assignment, so widths from its counts (host)
            widths = tuple(int((assign == e).sum(1).max()) for e in range(len(self.group_sizes)))
        slots = expert_slot_buffers(assign, widths)
        keys, values, positions, stored = [], [], [], []
        for e, (g, (fused_w, fused_b), (index, pos)) in enumerate(zip(self.group_sizes, self._expert_projections(),
                                                                      slots)):
            tokens = x.gather(1, index[..., None].expand(-1, -1, width))  # only this expert's tokens
            k, v = F.linear(tokens, fused_w, fused_b).chunk(2, dim=-1)
            k, v = self._heads(k, self.num_heads // g), self._heads(v, self.num_heads // g)
            if scores is not None:  # straight-through: factor 1 forward, router gradient backward
                s = scores[..., e].gather(1, index).clamp_min(1e-6)
                v = v * (s / s.detach())[:, None, :, None]
            keys.append(k)
            values.append(v)
            positions.append(pos)
            stored.append((pos >= 0).sum() * (self.num_heads // g))
        with torch.no_grad():
            self.kv_heads_stored += torch.stack(stored).sum()
            self.tokens_encoded += n_tokens.sum()
        out = routed_attention(q, keys, values, positions, self.group_sizes, causal, backend=self.backend)
        out = self._merge(out)
        if aux is not None:
            out = _AuxLossInjection.apply(out, aux, self.aux_weight * self.aux_scale)
        return out

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, group_sizes={self.group_sizes}, ratios={self.ratios}, "
                f"capacity={self.capacity}, pin_cls={self.pin_cls}, aux_weight={self.aux_weight}")


__all__ = ["CAPACITY_RULES", "ORACLE_ROWS", "RoutedKVAttention", "Router", "aux_loss", "capacities", "capacity_rows",
           "check_routing", "expert_choice", "expert_slot_buffers", "expert_slots", "kv_fraction",
           "realised_kv_fraction", "routed_layers", "routing_stats"]


def routed_layers(model: nn.Module, tower: str | None = None) -> list[RoutedKVAttention]:
    return [m for m in model.modules() if isinstance(m, RoutedKVAttention) and tower in (None, m.tower)]


def routing_stats(model: nn.Module) -> dict[str, float]:
    """Mean argmax/expert-choice agreement (and aux loss) per tower over the last forward pass of each layer."""
    per_tower: dict[str, list[float]] = {}
    aux: dict[str, list[float]] = {}
    for m in routed_layers(model):
        if m.last_agreement is not None:
            per_tower.setdefault(m.tower, []).append(float(m.last_agreement))
            if m.last_aux_loss is not None:
                aux.setdefault(m.tower, []).append(float(m.last_aux_loss.detach()))
    stats = {f"{t}/agreement": sum(v) / len(v) for t, v in per_tower.items()}
    stats.update({f"{t}/aux_loss": sum(v) / len(v) for t, v in aux.items()})
    return stats


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The paper's auxiliary loss of the last forward: per tower the mean over its layers (1/N·Σ_l), summed over
    towers (None when none was computed). α is applied by the layers' injection, not here."""
    towers: dict[str, list[torch.Tensor]] = {}
    for m in routed_layers(model):
        if m.last_aux_loss is not None:
            towers.setdefault(m.tower, []).append(m.last_aux_loss)
    return torch.stack([torch.stack(v).mean() for v in towers.values()]).sum() if towers else None
