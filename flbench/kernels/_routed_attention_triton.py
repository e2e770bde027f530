"""Triton kernels for routed-KV (mixSGA) attention: forward, delta preprocessing, a fused dK/dV(+dQ) backward for all
experts in one launch, and a separate dQ kernel for deterministic runs.

Loaded lazily by ``routed_attention.py`` (never at ``import flbench.kernels``), because ``@triton.jit`` decides
between the compiler and the CPU interpreter from ``TRITON_INTERPRET`` at decoration time. Launch configurations
(block sizes, warps, stages; autotuned on GPU) are chosen there.

Math (FlashAttention-2, with the key axis split across experts)
----------------------------------------------------------------
Query head ``h`` at position ``i`` attends jointly over every expert ``e``'s compact slots ``j`` (head
``h // g_e``), visible when ``pos_e[j] >= 0`` and, if causal, ``pos_e[j] <= i``::

    s_ej = scale * q_i . k_ej          P_ej = exp(s_ej - lse_i)          lse_i = log sum_{e,j visible} exp(s_ej)
    o_i  = sum_{e,j} P_ej v_ej

Forward: one online-softmax state (running max ``m``, running sum ``l``, unnormalised ``acc``) is carried across
all experts' key tiles, in base 2 (``exp2``, with ``log2(e)`` folded into the scale)::

    m' = max(m, rowmax(s))      p = exp2(s - m')      alpha = exp2(m - m')
    l' = alpha * l + rowsum(p)  acc' = alpha * acc + p @ v
    o = acc / l                 lse2 = m + log2(l)     (stored in base 2; -inf for a row that sees no key, o = 0)

``m`` starts at -inf; while a row has seen nothing, ``m'`` is -inf too and we subtract 0 instead, so
``exp2(-inf - 0) = 0`` rather than NaN.

Backward, with ``dO`` given and ``Delta_i = sum_d dO_i * O_i`` (= ``sum_j P_ij dP_ij``, computed first)::

    P = exp2(s2 - lse2)   dP = dO @ V^T   dS = P * (dP - Delta)
    dQ = scale * dS @ K   dK = scale * dS^T @ Q   dV = P^T @ dO

Schedule
--------
* **One flattened key loop** (forward, dQ). A query-block program walks the key tiles of all experts as one loop
  ``t = 0 .. T-1`` (expert ``e`` owns tiles ``[T_0 + .. + T_{e-1}, .. + T_e)``); each iteration selects its expert's
  pointers, strides and group size by comparisons. One loop of ``T`` iterations lets the compiler's software
  pipeliner prefetch tile ``t+1`` (whatever expert it belongs to) during tile ``t``'s matmuls; per-expert loops of
  one or two iterations each could not overlap anything.
* **Visible bounds.** Before the loop, each expert's slot positions (int32, one small load per 128 slots) give
  ``bound_e`` = 1 + the last slot index visible to the block: a valid slot, at a position ``<=`` the block's last
  row when causal. Only ``cdiv(bound_e, BLOCK_N)`` tiles are visited: trailing padding is skipped, and with
  position-sorted slots (what the model's router produces) a causal block stops at the diagonal.
* **Backward in one launch** for all experts' dK/dV: program ``(unit, batch)`` owns a key tile of one compact head
  of one expert (units enumerate experts in argument order, so the launcher puts the heaviest, largest-group expert
  first) and runs one flattened loop over the ``g_e`` query heads that read that compact head times the query
  blocks at or after the tile's first position (causal), summing dK/dV in registers. With ``FUSE_DQ`` the same loop
  adds ``scale * dS @ K`` into an fp32 dQ buffer with atomics: 5 matmuls per (key tile, query block) pair, against
  7 when dQ recomputes P in a pass of its own. Atomics make dQ's summation order, and so its last bits, vary from
  run to run; when torch's deterministic mode is on, the launcher uses the dQ kernel instead (one query block per
  program, no atomics).

Tiles are loaded in the inputs' dtype and accumulated in fp32. ``DOT_FP32`` upcasts tiles before ``tl.dot`` (the
CPU interpreter's bf16 dot is wrong); ``PRECISION`` is the fp32 ``tl.dot`` mode ("ieee" or "tf32").
Exactly four expert slots are passed as separate arguments (Triton cannot load pointers from memory); the launcher
fills unused ones with zero-slot dummies, which contribute no tile. Group sizes ``G0..G3`` are compile-time.
"""

import triton
import triton.language as tl

MAX_EXPERTS = 4
BLOCK_P = tl.constexpr(128)  # positions scanned per step when computing visible bounds


@triton.jit
def _pick(e, a0, a1, a2, a3):
    """The value of expert ``e`` (a runtime scalar in 0..3) among four per-expert scalars or pointers."""
    return tl.where(e == 0, a0, tl.where(e == 1, a1, tl.where(e == 2, a2, a3)))


@triton.jit
def _visible_bound(P, batch, n_slots, row_hi, CAUSAL: tl.constexpr):
    """1 + the largest slot index holding a position visible to rows <= row_hi (0 when none)."""
    base = P + batch.to(tl.int64) * n_slots
    bound = tl.full((), 0, tl.int32)
    for start in range(0, n_slots, BLOCK_P):
        offs = start + tl.arange(0, BLOCK_P)
        pos = tl.load(base + offs, mask=offs < n_slots, other=-1)
        ok = pos >= 0
        if CAUSAL:
            ok = ok & (pos <= row_hi)
        bound = tl.maximum(bound, tl.max(tl.where(ok, offs + 1, 0), axis=0))
    return bound


@triton.jit
def _load_key_tile(t, s1, s2, s3, batch, head, offs_d, head_dim,
                   K0, V0, P0, C0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n,
                   K1, V1, P1, C1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n,
                   K2, V2, P2, C2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n,
                   K3, V3, P3, C3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n,
                   G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr, G3: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """K, V tiles and slot positions of flattened tile ``t`` (experts' tiles start at 0, s1, s2, s3)."""
    e = (t >= s1).to(tl.int32) + (t >= s2).to(tl.int32) + (t >= s3).to(tl.int32)
    offs_n = (t - _pick(e, 0, s1, s2, s3)) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_slots = _pick(e, C0, C1, C2, C3)
    kv_head = (head // _pick(e, G0, G1, G2, G3)).to(tl.int64)
    b = batch.to(tl.int64)
    k_base = (_pick(e, K0, K1, K2, K3) + b * _pick(e, sk0b, sk1b, sk2b, sk3b)
              + kv_head * _pick(e, sk0h, sk1h, sk2h, sk3h))
    v_base = (_pick(e, V0, V1, V2, V3) + b * _pick(e, sv0b, sv1b, sv2b, sv3b)
              + kv_head * _pick(e, sv0h, sv1h, sv2h, sv3h))
    stride_kn = _pick(e, sk0n, sk1n, sk2n, sk3n)
    stride_vn = _pick(e, sv0n, sv1n, sv2n, sv3n)
    in_range = offs_n < n_slots
    slot_pos = tl.load(_pick(e, P0, P1, P2, P3) + b * n_slots + offs_n, mask=in_range, other=-1)
    tile_ok = in_range[:, None] & (offs_d[None, :] < head_dim)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=tile_ok, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=tile_ok, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v, slot_pos


@triton.jit
def _tile_starts(P0, C0, P1, C1, P2, C2, P3, C3, batch, row_hi, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """First flattened tile of experts 1..3 and the total tile count for a query block whose last row is row_hi."""
    s1 = tl.cdiv(_visible_bound(P0, batch, C0, row_hi, CAUSAL), BLOCK_N)
    s2 = s1 + tl.cdiv(_visible_bound(P1, batch, C1, row_hi, CAUSAL), BLOCK_N)
    s3 = s2 + tl.cdiv(_visible_bound(P2, batch, C2, row_hi, CAUSAL), BLOCK_N)
    total = s3 + tl.cdiv(_visible_bound(P3, batch, C3, row_hi, CAUSAL), BLOCK_N)
    return s1, s2, s3, total


@triton.jit
def _query_block(num_heads, seq_len, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's query block (grid (cdiv(L, BLOCK_M), B * H)): batch, head, row and column offsets, the valid
    rows and the valid [row, column] tile."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_len
    tile_ok = row_ok[:, None] & (offs_d[None, :] < head_dim)
    return pid_bh // num_heads, pid_bh % num_heads, offs_m, offs_d, row_ok, tile_ok


@triton.jit
def _load_rows(X, batch, head, stride_b, stride_h, stride_m, offs_m, offs_d, tile_ok):
    """Rows offs_m of head `head` of batch `batch` of a [B, H, L, d] tensor (zeros outside tile_ok)."""
    return tl.load(X + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
                   + offs_m[:, None] * stride_m + offs_d[None, :], mask=tile_ok, other=0.0)


@triton.jit
def _scores(q, k, slot_pos, offs_m, qk_scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 scores [BLOCK_M, BLOCK_N] of a query block against a key tile, and which of them are visible."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    visible = slot_pos[None, :] >= 0
    if CAUSAL:
        visible = visible & (slot_pos[None, :] <= offs_m[:, None])
    return s, visible


@triton.jit
def routed_attention_fwd_kernel(
    Q, Out, Lse,
    K0, V0, P0, C0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n,
    K1, V1, P1, C1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n,
    K2, V2, P2, C2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n,
    K3, V3, P3, C3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n,
    stride_qb, stride_qh, stride_qm, stride_ob, stride_oh, stride_om,
    num_heads, seq_len, head_dim, qk_scale,
    G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr, G3: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_M), B * H)."""
    batch, head, offs_m, offs_d, row_ok, tile_ok = _query_block(num_heads, seq_len, head_dim, BLOCK_M, BLOCK_D)
    q = _load_rows(Q, batch, head, stride_qb, stride_qh, stride_qm, offs_m, offs_d, tile_ok)
    if DOT_FP32:
        q = q.to(tl.float32)

    row_hi = tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, seq_len) - 1
    s1, s2, s3, total = _tile_starts(P0, C0, P1, C1, P2, C2, P3, C3, batch, row_hi, CAUSAL, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(0, total):
        k, v, slot_pos = _load_key_tile(
            t, s1, s2, s3, batch, head, offs_d, head_dim,
            K0, V0, P0, C0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n, K1, V1, P1, C1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n,
            K2, V2, P2, C2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n, K3, V3, P3, C3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n,
            G0, G1, G2, G3, BLOCK_N, DOT_FP32)
        s, visible = _scores(q, k, slot_pos, offs_m, qk_scale, CAUSAL, PRECISION)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # l_i >= 1 for any row that saw a key (its maximum contributes exp2(0)); rows that saw none output 0.
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(has_key, m_i + tl.log2(l_safe), float("-inf"))
    o_ptrs = (Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=tile_ok)
    row_base = tl.program_id(1).to(tl.int64) * seq_len  # Lse: contiguous [B, H, L]
    tl.store(Lse + row_base + offs_m, lse2, mask=row_ok)


@triton.jit
def routed_attention_bwd_delta_kernel(
    Out, dOut, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    num_heads, seq_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Delta = rowsum(dO * O), contiguous [B, H, L] fp32; grid (cdiv(L, BLOCK_M), B * H)."""
    batch, head, offs_m, offs_d, row_ok, tile_ok = _query_block(num_heads, seq_len, head_dim, BLOCK_M, BLOCK_D)
    o = _load_rows(Out, batch, head, stride_ob, stride_oh, stride_om, offs_m, offs_d, tile_ok).to(tl.float32)
    do = _load_rows(dOut, batch, head, stride_dob, stride_doh, stride_dom, offs_m, offs_d, tile_ok).to(tl.float32)
    tl.store(Delta + tl.program_id(1).to(tl.int64) * seq_len + offs_m, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def routed_attention_bwd_dq_kernel(
    Q, dOut, Lse, Delta, dQ,
    K0, V0, P0, C0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n,
    K1, V1, P1, C1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n,
    K2, V2, P2, C2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n,
    K3, V3, P3, C3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n,
    stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    num_heads, seq_len, head_dim, qk_scale, sm_scale,
    G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr, G3: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ without atomics (deterministic); grid (cdiv(L, BLOCK_M), B * H); the same flattened loop as the forward."""
    batch, head, offs_m, offs_d, row_ok, tile_ok = _query_block(num_heads, seq_len, head_dim, BLOCK_M, BLOCK_D)
    q = _load_rows(Q, batch, head, stride_qb, stride_qh, stride_qm, offs_m, offs_d, tile_ok)
    do = _load_rows(dOut, batch, head, stride_dob, stride_doh, stride_dom, offs_m, offs_d, tile_ok)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = tl.program_id(1).to(tl.int64) * seq_len
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)

    row_hi = tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, seq_len) - 1
    s1, s2, s3, total = _tile_starts(P0, C0, P1, C1, P2, C2, P3, C3, batch, row_hi, CAUSAL, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(0, total):
        k, v, slot_pos = _load_key_tile(
            t, s1, s2, s3, batch, head, offs_d, head_dim,
            K0, V0, P0, C0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n, K1, V1, P1, C1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n,
            K2, V2, P2, C2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n, K3, V3, P3, C3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n,
            G0, G1, G2, G3, BLOCK_N, DOT_FP32)
        s, visible = _scores(q, k, slot_pos, offs_m, qk_scale, CAUSAL, PRECISION)
        # Mask before exp2: an empty row has lse2 = -inf, and masked scores must give exactly 0.
        p = tl.exp2(tl.where(visible, s - lse2[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(dQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(dQ.dtype.element_ty), mask=tile_ok)


@triton.jit
def routed_attention_bwd_kernel(
    Q, dOut, Lse, Delta, DQ,
    K0, V0, P0, C0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n, dK0, dV0,
    K1, V1, P1, C1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n, dK1, dV1,
    K2, V2, P2, C2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n, dK2, dV2,
    K3, V3, P3, C3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n, dK3, dV3,
    stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    num_heads, seq_len, head_dim, qk_scale, sm_scale,
    G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr, G3: tl.constexpr,
    CAUSAL: tl.constexpr, FUSE_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK/dV of every expert (and, with FUSE_DQ, dQ by fp32 atomics into DQ, zeroed fp32 [B, H, L, d]).

    Grid (sum_e units_e, B): expert e owns units_e = (H // G_e) compact heads x cdiv(C_e, BLOCK_N) key tiles, after
    those of the experts before it. dK_e / dV_e are [B, H // G_e, C_e, d] views of contiguous [B, C_e, H // G_e, d]
    buffers (the layout the K/V projections' backward reads without a copy).
    """
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    b = batch.to(tl.int64)
    u1 = (num_heads // G0) * tl.cdiv(C0, BLOCK_N)
    u2 = u1 + (num_heads // G1) * tl.cdiv(C1, BLOCK_N)
    u3 = u2 + (num_heads // G2) * tl.cdiv(C2, BLOCK_N)
    e = (pid >= u1).to(tl.int32) + (pid >= u2).to(tl.int32) + (pid >= u3).to(tl.int32)
    unit = pid - _pick(e, 0, u1, u2, u3)
    n_slots = _pick(e, C0, C1, C2, C3)
    group = _pick(e, G0, G1, G2, G3)
    n_tiles = tl.cdiv(n_slots, BLOCK_N)
    kv_head = unit // n_tiles
    kv_heads = num_heads // group
    offs_n = (unit % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_range = offs_n < n_slots
    d_ok = offs_d[None, :] < head_dim
    kv_ok = in_range[:, None] & d_ok
    slot_pos = tl.load(_pick(e, P0, P1, P2, P3) + b * n_slots + offs_n, mask=in_range, other=-1)
    kh = kv_head.to(tl.int64)
    k = tl.load(_pick(e, K0, K1, K2, K3) + b * _pick(e, sk0b, sk1b, sk2b, sk3b) + kh * _pick(e, sk0h, sk1h, sk2h, sk3h)
                + offs_n[:, None] * _pick(e, sk0n, sk1n, sk2n, sk3n) + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(_pick(e, V0, V1, V2, V3) + b * _pick(e, sv0b, sv1b, sv2b, sv3b) + kh * _pick(e, sv0h, sv1h, sv2h, sv3h)
                + offs_n[:, None] * _pick(e, sv0n, sv1n, sv2n, sv3n) + offs_d[None, :], mask=kv_ok, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Rows before the tile's first valid position cannot see it when causal; an all-padding tile does no work.
    first_pos = tl.min(tl.where(slot_pos >= 0, slot_pos, seq_len), axis=0)
    if CAUSAL:
        lo = tl.where(first_pos < seq_len, (first_pos // BLOCK_M) * BLOCK_M, seq_len)
    else:
        lo = tl.where(first_pos < seq_len, 0, seq_len)
    n_blocks = tl.cdiv(seq_len - lo, BLOCK_M)
    # One loop over (query head of the group, query block), so the pipeliner streams across heads too.
    for it in range(0, group * n_blocks):
        head = kv_head * group + it // n_blocks
        offs_m = lo + (it % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_len
        tile_ok = row_ok[:, None] & d_ok
        q = tl.load(Q + b * stride_qb + head.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                    + offs_d[None, :], mask=tile_ok, other=0.0)
        do = tl.load(dOut + b * stride_dob + head.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom
                     + offs_d[None, :], mask=tile_ok, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        row_base = (b * num_heads + head) * seq_len
        lse2 = tl.load(Lse + row_base + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
        # Transposed scores [BLOCK_N, BLOCK_M], so dK/dV accumulate without transposing P back.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        visible = (slot_pos[:, None] >= 0) & row_ok[None, :]
        if CAUSAL:
            visible = visible & (slot_pos[:, None] <= offs_m[None, :])
        p_t = tl.exp2(tl.where(visible, s_t - lse2[None, :], float("-inf")))
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        if FUSE_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION) * sm_scale
            dq_ptrs = (DQ + b * stride_dqb + head.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm
                       + offs_d[None, :])
            tl.atomic_add(dq_ptrs, dq, mask=tile_ok, sem="relaxed")  # a sum: no ordering needed
    dk = dk * sm_scale
    out_off = ((b * n_slots + offs_n[:, None]) * kv_heads + kh) * head_dim + offs_d[None, :]
    tl.store(_pick(e, dK0, dK1, dK2, dK3) + out_off, dk.to(dK0.dtype.element_ty), mask=kv_ok)
    tl.store(_pick(e, dV0, dV1, dV2, dV3) + out_off, dv.to(dV0.dtype.element_ty), mask=kv_ok)
