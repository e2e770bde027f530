"""Triton kernels for routed-KV (mixSGA) attention: forward, delta preprocessing, dQ, and per-expert dK/dV.

Loaded lazily by ``routed_attention.py`` (never at ``import flbench.kernels``), because ``@triton.jit`` decides
between the compiler and the CPU interpreter from ``TRITON_INTERPRET`` at decoration time.

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

The dQ program owns a block of query rows of one head and loops over all experts' slots. The dK/dV program owns a
block of one expert's compact slots of one compact head and loops over the ``g_e`` query heads that read that
compact head, and over the query rows, summing their contributions in registers: no atomics. With causality a slot
at position ``p`` is seen only by rows ``i >= p``, so that loop starts at the block holding the tile's first
position.

Tiles are loaded in the inputs' dtype and accumulated in fp32. ``DOT_FP32`` upcasts tiles before ``tl.dot`` (the
CPU interpreter's bf16 dot is wrong); ``PRECISION`` is the fp32 ``tl.dot`` mode ("ieee" or "tf32").
Up to four experts are passed as separate arguments (Triton cannot load pointers from memory); ``NUM_EXPERTS``
and the group sizes ``G0..G3`` are compile-time constants.
"""

import triton
import triton.language as tl

MAX_EXPERTS = 4


@triton.jit
def _fwd_expert(acc, m_i, l_i, q, K, V, P, n_slots, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                batch, head, offs_m, offs_d, head_dim, qk_scale,
                GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                PRECISION: tl.constexpr):
    kv_head = head // GROUP
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    p_base = P + batch.to(tl.int64) * n_slots
    d_ok = offs_d[None, :] < head_dim
    for start_n in range(0, n_slots, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n < n_slots
        slot_pos = tl.load(p_base + offs_n, mask=in_range, other=-1)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None] & d_ok, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = slot_pos[None, :] >= 0
        if CAUSAL:
            visible = visible & (slot_pos[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None] & d_ok, other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def routed_attention_fwd_kernel(
    Q, Out, Lse,
    K0, V0, P0, C0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n,
    K1, V1, P1, C1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n,
    K2, V2, P2, C2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n,
    K3, V3, P3, C3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n,
    stride_qb, stride_qh, stride_qm, stride_ob, stride_oh, stride_om,
    num_heads, seq_len, head_dim, qk_scale,
    G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr, G3: tl.constexpr, NUM_EXPERTS: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_len
    tile_ok = row_ok[:, None] & (offs_d[None, :] < head_dim)
    q_ptrs = (Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
              + offs_m[:, None] * stride_qm + offs_d[None, :])
    q = tl.load(q_ptrs, mask=tile_ok, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if NUM_EXPERTS > 0:
        acc, m_i, l_i = _fwd_expert(acc, m_i, l_i, q, K0, V0, P0, C0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n,
                                    batch, head, offs_m, offs_d, head_dim, qk_scale,
                                    G0, CAUSAL, BLOCK_N, DOT_FP32, PRECISION)
    if NUM_EXPERTS > 1:
        acc, m_i, l_i = _fwd_expert(acc, m_i, l_i, q, K1, V1, P1, C1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n,
                                    batch, head, offs_m, offs_d, head_dim, qk_scale,
                                    G1, CAUSAL, BLOCK_N, DOT_FP32, PRECISION)
    if NUM_EXPERTS > 2:
        acc, m_i, l_i = _fwd_expert(acc, m_i, l_i, q, K2, V2, P2, C2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n,
                                    batch, head, offs_m, offs_d, head_dim, qk_scale,
                                    G2, CAUSAL, BLOCK_N, DOT_FP32, PRECISION)
    if NUM_EXPERTS > 3:
        acc, m_i, l_i = _fwd_expert(acc, m_i, l_i, q, K3, V3, P3, C3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n,
                                    batch, head, offs_m, offs_d, head_dim, qk_scale,
                                    G3, CAUSAL, BLOCK_N, DOT_FP32, PRECISION)

    # l_i >= 1 for any row that saw a key (its maximum contributes exp2(0)); rows that saw none output 0.
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(has_key, m_i + tl.log2(l_safe), float("-inf"))
    o_ptrs = (Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=tile_ok)
    tl.store(Lse + pid_bh.to(tl.int64) * seq_len + offs_m, lse2, mask=row_ok)  # Lse: contiguous [B, H, L]


@triton.jit
def routed_attention_bwd_delta_kernel(
    Out, dOut, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    num_heads, seq_len, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_len
    tile_ok = row_ok[:, None] & (offs_d[None, :] < head_dim)
    o = tl.load(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    do = tl.load(dOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_len + offs_m, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _bwd_dq_expert(dq, q, do, lse2, delta, K, V, P, n_slots,
                   stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   batch, head, offs_m, offs_d, head_dim, qk_scale,
                   GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                   PRECISION: tl.constexpr):
    kv_head = head // GROUP
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    p_base = P + batch.to(tl.int64) * n_slots
    d_ok = offs_d[None, :] < head_dim
    for start_n in range(0, n_slots, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_range = offs_n < n_slots
        slot_pos = tl.load(p_base + offs_n, mask=in_range, other=-1)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None] & d_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None] & d_ok, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = slot_pos[None, :] >= 0
        if CAUSAL:
            visible = visible & (slot_pos[None, :] <= offs_m[:, None])
        # Mask before exp2: an empty row has lse2 = -inf, and masked scores must give exactly 0.
        p = tl.exp2(tl.where(visible, s - lse2[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def routed_attention_bwd_dq_kernel(
    Q, dOut, Lse, Delta, dQ,
    K0, V0, P0, C0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n,
    K1, V1, P1, C1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n,
    K2, V2, P2, C2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n,
    K3, V3, P3, C3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n,
    stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    num_heads, seq_len, head_dim, qk_scale, sm_scale,
    G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr, G3: tl.constexpr, NUM_EXPERTS: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_len
    tile_ok = row_ok[:, None] & (offs_d[None, :] < head_dim)
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :], mask=tile_ok, other=0.0)
    do = tl.load(dOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=tile_ok, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(Lse + pid_bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if NUM_EXPERTS > 0:
        dq = _bwd_dq_expert(dq, q, do, lse2, delta, K0, V0, P0, C0, sk0b, sk0h, sk0n, sv0b, sv0h, sv0n,
                            batch, head, offs_m, offs_d, head_dim, qk_scale, G0, CAUSAL, BLOCK_N, DOT_FP32, PRECISION)
    if NUM_EXPERTS > 1:
        dq = _bwd_dq_expert(dq, q, do, lse2, delta, K1, V1, P1, C1, sk1b, sk1h, sk1n, sv1b, sv1h, sv1n,
                            batch, head, offs_m, offs_d, head_dim, qk_scale, G1, CAUSAL, BLOCK_N, DOT_FP32, PRECISION)
    if NUM_EXPERTS > 2:
        dq = _bwd_dq_expert(dq, q, do, lse2, delta, K2, V2, P2, C2, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n,
                            batch, head, offs_m, offs_d, head_dim, qk_scale, G2, CAUSAL, BLOCK_N, DOT_FP32, PRECISION)
    if NUM_EXPERTS > 3:
        dq = _bwd_dq_expert(dq, q, do, lse2, delta, K3, V3, P3, C3, sk3b, sk3h, sk3n, sv3b, sv3h, sv3n,
                            batch, head, offs_m, offs_d, head_dim, qk_scale, G3, CAUSAL, BLOCK_N, DOT_FP32, PRECISION)
    dq = dq * sm_scale
    tl.store(dQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(dQ.dtype.element_ty), mask=tile_ok)


@triton.jit
def routed_attention_bwd_dkdv_kernel(
    Q, dOut, Lse, Delta, K, V, P, dK, dV,
    stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    num_heads, seq_len, n_slots, head_dim, qk_scale, sm_scale,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """One expert: grid (cdiv(C_e, BLOCK_N), B * H // GROUP)."""
    pid_n = tl.program_id(0)
    pid_bkh = tl.program_id(1)
    kv_heads = num_heads // GROUP
    batch = pid_bkh // kv_heads
    kv_head = pid_bkh % kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_range = offs_n < n_slots
    d_ok = offs_d[None, :] < head_dim
    slot_pos = tl.load(P + batch.to(tl.int64) * n_slots + offs_n, mask=in_range, other=-1)
    k = tl.load(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None] & d_ok, other=0.0)
    v = tl.load(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None] & d_ok, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Rows before the tile's first valid position cannot see it when causal; an all-padding tile does no work.
    first_pos = tl.min(tl.where(slot_pos >= 0, slot_pos, seq_len), axis=0)
    if CAUSAL:
        lo = (first_pos // BLOCK_M) * BLOCK_M
    else:
        lo = tl.where(first_pos < seq_len, 0, seq_len)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = dOut + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        row_base = (batch * num_heads + head).to(tl.int64) * seq_len
        for start_m in range(lo, seq_len, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seq_len
            tile_ok = row_ok[:, None] & d_ok
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=tile_ok, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=tile_ok, other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
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
    dk = dk * sm_scale
    dk_ptrs = (dK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
               + offs_n[:, None] * stride_dkn + offs_d[None, :])
    dv_ptrs = (dV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
               + offs_n[:, None] * stride_dvn + offs_d[None, :])
    tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=in_range[:, None] & d_ok)
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=in_range[:, None] & d_ok)
