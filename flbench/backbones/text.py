"""Exact text-length trimming: a text-tower pass computes only the positions that can reach an end-of-text token.

open_clip's text tower is causal: position i attends to positions 0..i only, and a text feature is read at the
row's end-of-text (EOT) token. So no position after the last EOT of a batch can change any feature, and running the
first `max(eot_index) + 1` positions — with the positional embedding and the causal mask sliced to the same length —
gives the same features and the same gradients, up to floating-point rounding (a reduction over fewer terms, a matrix
product of another shape; measured in tests/test_trimming.py). A CoOp prompt with a short class name ends near
position 10 of CLIP's 77, so most of the text work was spent on padding nobody reads.

A text tower without open_clip's causal mask (a custom config with `no_causal_mask`, or any other mask) lets every
position see every other, padding included: it is never trimmed (`is_causal_text_tower`).

Shared prefixes. A CoOp-style prompt "[SOS] ctx_1 … ctx_M name . [EOT]" starts with the same 1 + M positions for
every class, and under the causal mask a position's hidden state depends only on the positions up to it: so the
prefix's hidden states, layer by layer, are the same in every class row. `encode_shared_prefix` computes them once per
group of rows (a client's C classes; K clients in a cohort; one image's C prompts in CoCoOp) and runs only the
class-name positions per row, their queries attending to the group's prefix keys and values and to their own. That
is the same attention over the same keys — exact up to rounding — at (P + C·S) instead of C·(P + S) positions per
layer. It needs the plain open_clip block (dense multi-head attention, no cross-attention inputs); a swapped
attention layer (GQA, routed-KV: its routing counts a row's tokens) or any other block falls back to full rows.

Packed rows and a pooled last block. Inside a shared-prefix pass two more kinds of work are never read: a row's
positions after its own EOT (the pass runs to the batch's last EOT; on the default experiment 56 of 64 class prompts
end one position earlier, 17.5 % of the row positions), and, in the last block, every position but the EOT (only the
EOT row is pooled; the others matter there only as keys and values). So every per-token op (layer norms, projections,
MLP) runs on the real tokens alone, packed into one matrix; attention sees them in the padded [rows, positions] grid
as before, padding zero, which a real query never reaches under the causal mask; and the last block computes keys and
values for every token but its attention output, output projection and MLP for the EOT rows only. Block 0's
class-name tokens have seen no context yet: where every group has the same ones (a cohort's clients, CoCoOp's
images), their layer norm and QKV projection run once per call, on one group's tokens, with no backward (constant
inputs, frozen weights). Each row of a matrix product, layer norm or GELU is computed on its own, so this changes
which rows are computed, not how: the features and gradients came out bit-identical on this project's machine
(tests/test_prefix.py). A guard keeps it so across thread counts: a CPU product of fewer than 16 rows may sum in a
thread-dependent order (measured here: 1 and 4-15 rows, for some of the tower's weight shapes), so a product is packed
or pooled only where it keeps at least `MIN_PACKED_ROWS` rows, and block 0's two QKV products (prefixes; one group's
class-name tokens) are padded with zero rows to that many.

All three are on by default. `text_trimming(False)` / `prefix_sharing(False)` / `text_packing(False)` (context
managers) or the environment variables `FLBENCH_TRIM_TEXT=0` / `FLBENCH_SHARE_PREFIX=0` / `FLBENCH_PACK_TEXT=0` turn
them off, for the exactness tests, the old-vs-new benchmarks and debugging; none is a config key, so records and
their hashes do not depend on them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from flbench.backbones.layers import is_causal_mask, sdpa_mask, sequence_lengths
from flbench.io import switched_on

TRIM_ENV, PREFIX_ENV, PACK_ENV = "FLBENCH_TRIM_TEXT", "FLBENCH_SHARE_PREFIX", "FLBENCH_PACK_TEXT"
_overrides: dict[str, list[bool]] = {TRIM_ENV: [], PREFIX_ENV: [], PACK_ENV: []}  # innermost last; empty = environment
MIN_PACKED_ROWS = 32  # a per-token product is made smaller only where it keeps this many rows (16 + a margin)


@contextlib.contextmanager
def _switched(env: str, enabled: bool) -> Iterator[None]:
    _overrides[env].append(bool(enabled))
    try:
        yield
    finally:
        _overrides[env].pop()


def _enabled(env: str) -> bool:
    if _overrides[env]:
        return _overrides[env][-1]
    return switched_on(env)


def text_trimming(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Within this block, text-tower passes trim (True) or run every context position (False)."""
    return _switched(TRIM_ENV, enabled)


def prefix_sharing(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Within this block, rows with a shared prompt prefix compute it once (True) or each in full (False)."""
    return _switched(PREFIX_ENV, enabled)


def text_packing(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Within this block, shared-prefix passes run per-token ops on real tokens only and pool the last block (True)
    or compute every position of the padded rows (False)."""
    return _switched(PACK_ENV, enabled)


def trimming_enabled() -> bool:
    return _enabled(TRIM_ENV)


def prefix_sharing_enabled() -> bool:
    return _enabled(PREFIX_ENV)


def packing_enabled() -> bool:
    return _enabled(PACK_ENV)


def is_causal_text_tower(model: nn.Module) -> bool:
    """True when the text tower masks every position's future (open_clip's causal mask): only then is trimming exact.

    Checked once per mask tensor (the mask is a fixed buffer; a swapped one has another identity)."""
    mask = getattr(model, "attn_mask", None)
    if mask is None:
        return False
    cached = model.__dict__.get("_flbench_causal")
    key = (mask.data_ptr(), tuple(mask.shape), mask.dtype, mask._version)
    if cached is None or cached[0] != key:
        cached = (key, is_causal_mask(mask, int(model.positional_embedding.shape[0])))
        model.__dict__["_flbench_causal"] = cached
    return cached[1]


def text_length(model: nn.Module, eot_index: torch.Tensor, minimum: int = 0) -> int:
    """Positions a pass over rows ending at `eot_index` must compute: the last EOT + 1 (at least `minimum`, e.g. where
    deep prompts are inserted), or the full context when trimming is off or the tower is not causal."""
    full = int(model.positional_embedding.shape[0])
    if eot_index.numel() == 0 or not trimming_enabled() or not is_causal_text_tower(model):
        return full
    return min(full, max(int(eot_index.max()) + 1, int(minimum)))


def text_inputs(model: nn.Module, embeddings: torch.Tensor, eot_index: torch.Tensor, minimum: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(first transformer input [N, L', W] with positions added, attention mask [L', L'] or None), L' trimmed."""
    length = text_length(model, eot_index, minimum)
    x = embeddings[:, :length] + model.positional_embedding[:length].to(embeddings.dtype)
    mask = model.attn_mask
    if mask is not None and length < mask.shape[0]:
        mask = mask[:length, :length]
    return x, mask


def project_eot(model: nn.Module, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
    """EOT pooling, ln_final and the text projection (open_clip's tail of `encode_text`; a layer norm is per row, so
    pooling before it is the same)."""
    return project_pooled(model, x[torch.arange(x.shape[0], device=x.device), eot_index])


def project_pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ln_final and the text projection of pooled rows [N, W]."""
    x = model.ln_final(x)
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def encode_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `CLIP.encode_text(tokens)` (unnormalised), trimmed to the batch's last EOT (tiny-CLIP pretraining).

    Only argmax pooling (open_clip's default: the EOT token has the largest id) reads a position that trimming keeps;
    another pooling type ('last', 'first', 'eos' with its own id) goes through open_clip's own `encode_text`."""
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        return model.encode_text(tokens)
    eot_index = tokens.argmax(dim=-1)
    tokens = tokens[:, :text_length(model, eot_index)]
    return encode_embeddings(model, model.token_embedding(tokens).to(model.transformer.get_cast_dtype()), eot_index)


def shares_prefix(model: nn.Module) -> bool:
    """Whether `encode_shared_prefix` may split this text tower's rows: sharing is on, the tower is causal, and every
    block is open_clip's plain one with its own dense multi-head attention (checked once per attention layout)."""
    if not prefix_sharing_enabled() or not is_causal_text_tower(model):
        return False
    blocks = list(model.transformer.resblocks)
    key = tuple(id(b.attn) for b in blocks) + (model.transformer.grad_checkpointing,)
    cached = model.__dict__.get("_flbench_shares_prefix")
    if cached is None or cached[0] != key:
        plain = not model.transformer.grad_checkpointing and all(
            type(b) is ResidualAttentionBlock and type(b.attn) is nn.MultiheadAttention and not hasattr(b, "ln_1_kv")
            and b.attn._qkv_same_embed_dim and b.attn.batch_first for b in blocks)
        cached = (key, plain)
        model.__dict__["_flbench_shares_prefix"] = cached
    return cached[1]


def encode_shared_prefix(model: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor, eot_index: torch.Tensor
                         ) -> torch.Tensor:
    """Text features [G, C, D] of the G·C rows "prefix[g] ++ suffix[c]" (token embeddings, before positions).

    prefix [G, P, W] is shared by the C rows of group g; suffix [C, S, W] or [G, C, S, W]; eot_index [C] counts from
    the start of the whole row and lies in the suffix. Falls back to full rows when the tower cannot share
    (`shares_prefix`)."""
    G, P, _ = prefix.shape
    C = eot_index.shape[0]
    one_suffix = suffix.dim() == 3  # the same class-name tokens in every group
    suffix = suffix.expand(G, *suffix.shape[-3:])
    if not shares_prefix(model):
        rows = torch.cat([prefix.unsqueeze(1).expand(-1, C, -1, -1), suffix], dim=-2).flatten(0, 1)
        return encode_embeddings(model, rows, eot_index.repeat(G)).unflatten(0, (G, C))
    length = text_length(model, eot_index)
    positions = model.positional_embedding.to(prefix.dtype)
    layout = _Layout.of(G, P, length - P, eot_index - P)
    W = prefix.shape[-1]
    blocks = model.transformer.resblocks
    # Prefix and row tokens as one [G·P + tokens, W] matrix for every per-token op (layer norms, projections, MLP):
    # one product per weight, and one large enough that its summation order does not depend on the thread count
    # (small CPU GEMMs' does: module docstring). Block 0's QKV is the exception below, its products padded instead.
    prefix_tokens = (prefix + positions[:P]).reshape(-1, W)
    first_qkv = None
    if one_suffix and layout.packed_ops:
        # Block 0's class-name tokens have seen no context yet: their QKV projection is the same in every group and
        # needs no backward (constant inputs, frozen weights), so it runs once, on one group's tokens.
        group = layout.pack_group((suffix[0, :, :layout.steps] + positions[P:length]).reshape(-1, W))
        rows_qkv = layout.unpack_group(_qkv(blocks[0], group)).reshape(1, C, layout.steps, -1)
        rows, first_qkv = group.repeat(G, 1), (_qkv(blocks[0], prefix_tokens), rows_qkv.expand(G, -1, -1, -1))
    else:
        rows = layout.pack((suffix[..., :layout.steps, :] + positions[P:length]).reshape(-1, W))
    x = torch.cat([prefix_tokens, rows])
    mask = sdpa_mask(model.attn_mask[:length, :length], prefix.dtype)
    for i, block in enumerate(blocks):
        x = _shared_block(block, x, mask, layout, pooled=layout.pooled and i == len(blocks) - 1,
                          qkv=first_qkv if i == 0 else None)
    if not layout.pooled:  # every token came out of the last block: read the EOT rows
        x = x.index_select(0, layout.eot_packed + G * P)
    return project_pooled(model, x).unflatten(0, (G, C))


def encode_embeddings(model: nn.Module, embeddings: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
    """Text features of full rows of token embeddings [N, L, W], pooled at each row's EOT (trimmed)."""
    x, mask = text_inputs(model, embeddings, eot_index)
    with sequence_lengths(eot_index + 1):  # routed-KV attention: padding after EOT takes no expert capacity
        x = model.transformer(x, attn_mask=mask)
    return project_eot(model, x, eot_index)


@dataclass(frozen=True)
class _Layout:
    """Where the row tokens of a shared-prefix pass live: the padded grid [G, C, S] attention reads (row c's
    positions P .. P+S-1), and the packed list of its real tokens (positions up to the row's EOT) that every per-token
    op runs on. Without packing (`text_packing(False)`, or rows without padding) the two are the same."""

    groups: int
    prefix: int
    classes: int
    steps: int
    real: torch.Tensor | None  # grid index of each packed token, in grid order; None: every grid token is real
    eot_grid: torch.Tensor  # [G·C] grid index of each row's EOT
    eot_packed: torch.Tensor  # [G·C] index of each row's EOT among the packed tokens
    pooled: bool  # whether the last block runs its attention output, projection and MLP on the EOT rows alone
    packed_ops: bool  # whether per-token ops may run on some of the tokens (packing on)

    @staticmethod
    def of(groups: int, prefix: int, steps: int, eot_in_suffix: torch.Tensor) -> _Layout:
        classes = eot_in_suffix.shape[0]
        eot_grid = (torch.arange(groups * classes, device=eot_in_suffix.device) * steps
                    + eot_in_suffix.repeat(groups))
        if not packing_enabled():
            return _Layout(groups, prefix, classes, steps, None, eot_grid, eot_grid, False, False)
        pooled = groups * classes >= MIN_PACKED_ROWS
        keep = torch.arange(steps, device=eot_in_suffix.device) <= eot_in_suffix.unsqueeze(1)  # [C, S]
        real_per_group = int(keep.sum())
        if real_per_group == classes * steps or groups * (prefix + real_per_group) < MIN_PACKED_ROWS:
            # nothing to drop, or too few tokens to pack
            return _Layout(groups, prefix, classes, steps, None, eot_grid, eot_grid, pooled, True)
        real = keep.expand(groups, -1, -1).flatten().nonzero().squeeze(1)
        eot_packed = torch.searchsorted(real, eot_grid)  # real is sorted and holds every EOT
        return _Layout(groups, prefix, classes, steps, real, eot_grid, eot_packed, pooled, True)

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        """[G·C·S, F] -> [tokens, F]: the real tokens."""
        return grid if self.real is None else grid.index_select(0, self.real)

    def _group_real(self) -> torch.Tensor:
        """Grid index of each real token of group 0 (the groups' tokens come in group order, each the same)."""
        return self.real[:self.real.shape[0] // self.groups]

    def pack_group(self, grid: torch.Tensor) -> torch.Tensor:
        """[C·S, F] -> [tokens of one group, F]."""
        return grid if self.real is None else grid.index_select(0, self._group_real())

    def unpack_group(self, tokens: torch.Tensor) -> torch.Tensor:
        """[tokens of one group, F] -> [C·S, F], zero at padding."""
        if self.real is None:
            return tokens
        return tokens.new_zeros(self.classes * self.steps, tokens.shape[-1]).index_copy(0, self._group_real(), tokens)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """[tokens, F] -> [G·C·S, F], zero at padding (never attended to: it follows its row's EOT)."""
        if self.real is None:
            return tokens
        grid = tokens.new_zeros(self.groups * self.classes * self.steps, tokens.shape[-1])
        return grid.index_copy(0, self.real, tokens)


def _qkv(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """ln_1 and the QKV projection of tokens [N, W], in a product of at least MIN_PACKED_ROWS rows (zero rows
    appended to a shorter one): a product that large sums each row as the whole pass's one product does."""
    attn, short = block.attn, MIN_PACKED_ROWS - x.shape[0]
    x = block.ln_1(x)
    if short > 0:
        return F.linear(torch.cat([x, x.new_zeros(short, x.shape[1])]), attn.in_proj_weight, attn.in_proj_bias)[:-short]
    return F.linear(x, attn.in_proj_weight, attn.in_proj_bias)


def _shared_block(block: ResidualAttentionBlock, x: torch.Tensor, mask: torch.Tensor, layout: _Layout,
                  pooled: bool = False, qkv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One residual block over tokens [G·P + tokens, W] (the G prefixes, then the rows' packed tokens): per-token ops
    on all of them at once, attention apart — the prefix causally over itself, each row's queries over its group's
    prefix keys and values and its own (causally). `pooled`: the last block, whose output is read at the EOT rows
    only — returns those [G·C, W]. `qkv`: the QKV projections of the prefixes [G·P, 3W] and of the rows' grid
    [G, C, S, 3W], where the caller computed them (block 0)."""
    attn = block.attn
    G, P, C, S = layout.groups, layout.prefix, layout.classes, layout.steps
    heads, n = attn.num_heads, G * P
    if qkv is None:
        qkv_tokens = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        qkv_prefix, qkv_rows = qkv_tokens.split([n, qkv_tokens.shape[0] - n])  # one backward copy, not two
        qkv_rows = layout.unpack(qkv_rows).reshape(G, C, S, -1)
    else:
        qkv_prefix, qkv_rows = qkv
    qp, kp, vp = (t.reshape(G, P, heads, -1).transpose(-3, -2) for t in qkv_prefix.chunk(3, dim=-1))
    qr, kr, vr = (t.reshape(G, C, S, heads, -1).transpose(-3, -2) for t in qkv_rows.chunk(3, dim=-1))
    k_rows = torch.cat([kp.unsqueeze(1).expand(-1, C, -1, -1, -1), kr], dim=-2)
    v_rows = torch.cat([vp.unsqueeze(1).expand(-1, C, -1, -1, -1), vr], dim=-2)
    out_rows = F.scaled_dot_product_attention(qr, k_rows, v_rows, attn_mask=mask[P:])
    out_rows = out_rows.transpose(-3, -2).reshape(G * C * S, -1)
    if pooled:
        out, x = out_rows.index_select(0, layout.eot_grid), x.index_select(0, layout.eot_packed + n)
    else:
        out_prefix = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:P, :P])
        out = torch.cat([out_prefix.transpose(-3, -2).reshape(n, -1), layout.pack(out_rows)])
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
