"""Routed-KV attention: the Triton kernel (fwd + bwd) against the PyTorch reference, and the reference against plain
attention. Without a GPU the kernel runs under the Triton CPU interpreter (small shapes keep this fast); on a CUDA
machine the same tests run the compiled kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import flbench.kernels as kernels
from flbench.kernels import routed_attention, routed_attention_reference
from flbench.kernels.routed_attention import forced_blocks, resolve_backend, routed_attention_triton_with_lse

ON_GPU = torch.cuda.is_available()

DEVICE = "cuda" if ON_GPU else "cpu"
GROUPS = (1, 2, 4)
# Max error relative to the largest reference magnitude, per dtype (the reference computes in fp32).
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")


@pytest.fixture(autouse=True)
def _kernel_env(monkeypatch):
    # Without a GPU the kernels run in the Triton interpreter. flbench.kernels decorates its kernels on the first
    # Triton call, reading TRITON_INTERPRET then, so setting it per test works whatever was imported before, and
    # does not leak into other test files.
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(kernels.BACKEND_ENV_VAR, raising=False)


def make_inputs(batch, heads, seq_len, head_dim, capacities, groups=GROUPS, dtype=torch.float32, pad=0, seed=0,
                order="shuffled", skip_tokens=0):
    """Random q and compact per-expert K/V; tokens skip_tokens..L-1 are split over experts by ``capacities``.

    ``order``: "shuffled" assigns tokens to experts at random and keeps slots unsorted; "sorted" keeps each expert's
    slots in position order (what an order-preserving router produces). ``pad`` extra slots per expert hold -1 and
    large K/V values that must not leak into the result.
    """
    gen = torch.Generator().manual_seed(seed)
    assert sum(capacities) == seq_len - skip_tokens
    q = torch.randn(batch, heads, seq_len, head_dim, generator=gen)
    keys, values, positions = [], [], []
    perms = torch.stack([torch.randperm(seq_len - skip_tokens, generator=gen) + skip_tokens for _ in range(batch)])
    start = 0
    for cap, g in zip(capacities, groups):
        pos = perms[:, start : start + cap]
        start += cap
        if order == "sorted":
            pos = pos.sort(dim=1).values
        k = torch.randn(batch, heads // g, cap + pad, head_dim, generator=gen)
        v = torch.randn(batch, heads // g, cap + pad, head_dim, generator=gen)
        if pad:
            pos = torch.cat([pos, torch.full((batch, pad), -1, dtype=pos.dtype)], dim=1)
            # Interleave padding among real slots, and make it loud so a leak cannot hide.
            shuffle = torch.stack([torch.randperm(cap + pad, generator=gen) for _ in range(batch)])
            pos = pos.gather(1, shuffle)
            idx = shuffle[:, None, :, None].expand_as(k)
            k, v = k.gather(2, idx), v.gather(2, idx)
            k = torch.where((pos < 0)[:, None, :, None], 50.0 * k, k)
            v = torch.where((pos < 0)[:, None, :, None], 1e3 * v, v)
        keys.append(k)
        values.append(v)
        positions.append(pos)

    def to_dev(t):
        return t.to(DEVICE, dtype).requires_grad_()

    return (to_dev(q), [to_dev(k) for k in keys], [to_dev(v) for v in values], [p.to(DEVICE) for p in positions])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6)).item()


def run_both(q, keys, values, positions, groups, causal, scale=None):
    """Outputs and gradients (q, keys..., values...) of the Triton path and the reference for the same dO."""
    inputs = [q, *keys, *values]
    out = routed_attention(q, keys, values, positions, groups, causal, scale=scale, backend="triton")
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, inputs, d_out)
    ref = routed_attention_reference(q, keys, values, positions, groups, causal, scale=scale)
    ref_grads = torch.autograd.grad(ref, inputs, d_out)
    return out, grads, ref, ref_grads


def assert_matches(out, grads, ref, ref_grads, dtype):
    assert out.dtype == ref.dtype == dtype
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    tol = TOL[dtype]
    assert rel_err(out, ref) <= tol, f"output rel err {rel_err(out, ref):.2e} > {tol}"
    names = ["dq"] + [f"dk{e}" for e in range(len(grads) // 2)] + [f"dv{e}" for e in range(len(grads) // 2)]
    for name, g, rg in zip(names, grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == rg.dtype, name
        assert rel_err(g, rg) <= tol, f"{name} rel err {rel_err(g, rg):.2e} > {tol}"


# ------------------------------------------------------------------------------------------------------------------
# Kernel vs reference
# ------------------------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_matches_reference_with_padding_and_ragged_lengths(dtype, causal):
    # L=37 and capacities 11/6/20 (+3 padding slots each) are not multiples of any block size.
    q, keys, values, positions = make_inputs(2, 4, 37, 32, (11, 6, 20), dtype=dtype, pad=3)
    assert_matches(*run_both(q, keys, values, positions, GROUPS, causal), dtype)


@needs_triton
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("order", ["shuffled", "sorted"])
def test_kernel_several_blocks_per_axis(causal, order):
    # L=200 and an expert with 150+5 slots span two query blocks and two key blocks even with the interpreter's
    # 128-wide blocks; sorted slots let the causal dK/dV loop skip leading query blocks.
    q, keys, values, positions = make_inputs(1, 4, 200, 32, (30, 20, 150), pad=5, order=order, seed=3)
    assert_matches(*run_both(q, keys, values, positions, GROUPS, causal), torch.float32)


@needs_triton
@pytest.mark.parametrize("head_dim", [32, 64, 128, 48])
def test_kernel_head_dims(head_dim):
    dtype = torch.float16
    q, keys, values, positions = make_inputs(1, 4, 29, head_dim, (9, 5, 15), dtype=dtype, pad=2, seed=head_dim)
    assert_matches(*run_both(q, keys, values, positions, GROUPS, True, scale=0.3), dtype)


@needs_triton
@pytest.mark.parametrize("capacities", [(10, 0, 23), (0, 0, 33), (33, 0, 0)], ids=["middle", "first-two", "last-two"])
def test_kernel_experts_with_zero_tokens(capacities):
    q, keys, values, positions = make_inputs(2, 4, 33, 32, capacities, seed=5)
    out, grads, ref, ref_grads = run_both(q, keys, values, positions, GROUPS, True)
    assert_matches(out, grads, ref, ref_grads, torch.float32)
    for e, cap in enumerate(capacities):
        if cap == 0:
            assert grads[1 + e].shape == keys[e].shape == (2, 4 // GROUPS[e], 0, 32)


@needs_triton
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_rows_that_see_nothing_are_zero(causal):
    # Tokens 0..2 belong to no expert; with causality rows 0..2 see no key. A batch element of pure padding makes
    # every row of it empty, causal or not.
    q, keys, values, positions = make_inputs(2, 4, 21, 32, (6, 4, 8), pad=2, skip_tokens=3, seed=7)
    positions = [p.clone() for p in positions]
    for p in positions:
        p[1] = -1
    out, grads, ref, ref_grads = run_both(q, keys, values, positions, GROUPS, causal)
    assert_matches(out, grads, ref, ref_grads, torch.float32)
    assert out[1].abs().max() == 0 and grads[0][1].abs().max() == 0
    if causal:
        assert out[0, :, :3].abs().max() == 0 and grads[0][0, :, :3].abs().max() == 0
    _, lse = routed_attention_triton_with_lse(q, keys, values, positions, GROUPS, causal)
    _, ref_lse = routed_attention_reference(q, keys, values, positions, GROUPS, causal, return_lse=True)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and torch.isinf(lse[1]).all()
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)


@needs_triton
def test_kernel_accepts_strided_inputs():
    # q from a [B, L, H, d] projection and K/V slices of a fused [B, Hk, C, 2d] tensor: no copies needed.
    q0, keys0, values0, positions = make_inputs(2, 4, 25, 32, (7, 6, 12), seed=11)
    q = q0.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    keys, values = [], []
    for k, v in zip(keys0, values0):
        kv = torch.cat([k.detach(), v.detach()], dim=-1)
        keys.append(kv[..., :32].detach().requires_grad_())
        values.append(kv[..., 32:].detach().requires_grad_())
    assert not q.is_contiguous() and not keys[0].is_contiguous()
    assert_matches(*run_both(q, keys, values, positions, GROUPS, False), torch.float32)


@needs_triton
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_single_expert_holding_all_tokens_is_plain_attention(causal):
    # Ratio 1:0:0: expert 0 (g=1) holds every token (slots in shuffled order), the others are empty.
    q, keys, values, positions = make_inputs(2, 4, 45, 32, (45, 0, 0), seed=13)
    pos = positions[0]
    # Put K/V back in token order for ordinary attention: slot j holds token pos[b, j].
    order = pos.argsort(dim=1)[:, None, :, None].expand_as(keys[0])
    k_dense, v_dense = keys[0].gather(2, order), values[0].gather(2, order)
    sdpa = F.scaled_dot_product_attention(q, k_dense, v_dense, is_causal=causal)
    kernel = routed_attention(q, keys, values, positions, GROUPS, causal, backend="triton")
    reference = routed_attention_reference(q, keys, values, positions, GROUPS, causal)
    torch.testing.assert_close(kernel, sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference, sdpa, atol=1e-5, rtol=1e-5)
    d_out = torch.randn_like(sdpa)
    g_sdpa = torch.autograd.grad(sdpa, [q, keys[0], values[0]], d_out)
    g_kernel = torch.autograd.grad(kernel, [q, keys[0], values[0]], d_out)
    for a, b in zip(g_kernel, g_sdpa):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


SMALL = (16, 16, 1, 1)  # BLOCK_M, BLOCK_N, warps, stages: many query blocks and several key tiles per expert


@needs_triton
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("order", ["shuffled", "sorted"])
def test_kernel_small_blocks_many_tiles_per_expert(causal, order):
    # 16-wide blocks: 3 query blocks, experts of 2, 1 and 2 key tiles in one flattened loop, tiles that straddle
    # two experts' boundaries in the dK/dV grid, and causal bounds that cut each expert's loop at a block's diagonal
    # (sorted slots) or not at all (shuffled slots, whose last visible slot can be anywhere).
    q, keys, values, positions = make_inputs(1, 4, 37, 16, (11, 6, 20), pad=3, order=order, seed=2)
    with forced_blocks(fwd=SMALL, bwd=SMALL, dq=SMALL):
        assert_matches(*run_both(q, keys, values, positions, GROUPS, causal), torch.float32)


@needs_triton
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_never_reads_trailing_padding_tiles(causal):
    # Each expert's buffer: its real slots, finite padding up to a whole 16-wide tile, then one more tile of padding
    # holding NaN. A tile that is read feeds its V into p @ V (and K into dS^T K), where 0 * NaN = NaN: finite
    # results prove that the visible bounds stop before it.
    q, keys, values, positions = make_inputs(1, 4, 37, 16, (11, 6, 20), order="sorted", seed=4)

    def padded(t, fill):
        n_finite = -t.shape[2] % 16
        pieces = [t.detach(), torch.zeros(*t.shape[:2], n_finite, t.shape[3]), torch.full((*t.shape[:2], 16,
                                                                                          t.shape[3]), fill)]
        return torch.cat(pieces, dim=2).requires_grad_()

    keys_nan = [padded(k, float("nan")) for k in keys]
    values_nan = [padded(v, float("nan")) for v in values]
    positions = [torch.cat([p, torch.full((1, k.shape[2] - p.shape[1]), -1, dtype=p.dtype)], dim=1)
                 for p, k in zip(positions, keys_nan)]
    inputs = [q, *keys_nan, *values_nan]
    with forced_blocks(fwd=SMALL, bwd=SMALL, dq=SMALL):
        out = routed_attention(q, keys_nan, values_nan, positions, GROUPS, causal, backend="triton")
        d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, inputs, d_out)
    # Reference on the same slots with the padding zeroed: padding values cannot matter by definition.
    clean = [torch.nan_to_num(t.detach(), nan=0.0).requires_grad_() for t in keys_nan + values_nan]
    n = len(keys)
    ref = routed_attention_reference(q, clean[:n], clean[n:], positions, GROUPS, causal)
    ref_grads = torch.autograd.grad(ref, [q, *clean], d_out)
    assert_matches(out, grads, ref, ref_grads, torch.float32)


@needs_triton
def test_causal_bound_keeps_the_slot_on_a_blocks_last_row():
    # Query block 0 (32 rows) ends at row 31; expert 0's slot 16, the first of its second 16-wide key tile, sits at
    # position 31: that whole tile must be visited for block 0, or row 31 loses its own key.
    gen = torch.Generator().manual_seed(21)
    pos0 = torch.tensor([list(range(0, 31, 2)) + [31, 33, 35]])
    pos1 = torch.tensor([list(range(1, 31, 2)) + [32, 34, 36, 37, 38, 39]])
    q = torch.randn(1, 4, 40, 16, generator=gen).requires_grad_()
    keys = [torch.randn(1, 4 // g, p.shape[1], 16, generator=gen).requires_grad_() for p, g in ((pos0, 1), (pos1, 2))]
    values = [torch.randn(1, 4 // g, p.shape[1], 16, generator=gen).requires_grad_() for p, g in ((pos0, 1), (pos1, 2))]
    with forced_blocks(fwd=(32, 16, 1, 1), dq=(32, 16, 1, 1)):
        assert_matches(*run_both(q, keys, values, [pos0, pos1], (1, 2), True), torch.float32)
        torch.use_deterministic_algorithms(True)  # the dQ kernel computes the same bounds
        try:
            assert_matches(*run_both(q, keys, values, [pos0, pos1], (1, 2), True), torch.float32)
        finally:
            torch.use_deterministic_algorithms(False)


@needs_triton
def test_deterministic_mode_uses_the_atomic_free_dq_kernel(monkeypatch):
    module = sys.modules["flbench.kernels.routed_attention"]
    launches = []
    original = module._launch

    def spy(kernel, kind, grid, args, kwargs, plan, reset_to_zero=None):
        launches.append((kind, kwargs.get("FUSE_DQ")))
        return original(kernel, kind, grid, args, kwargs, plan, reset_to_zero)

    monkeypatch.setattr(module, "_launch", spy)
    q, keys, values, positions = make_inputs(1, 4, 37, 16, (11, 6, 20), pad=3, seed=6)
    fused = run_both(q, keys, values, positions, GROUPS, True)
    assert launches == [("fwd", None), ("bwd", True)]
    launches.clear()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    deterministic = run_both(q, keys, values, positions, GROUPS, True)
    assert launches == [("fwd", None), ("bwd", False), ("dq", None)]
    assert_matches(*deterministic, torch.float32)
    torch.testing.assert_close(deterministic[1][0], fused[1][0], atol=1e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("trainable", ["q-only", "kv-only"])
def test_kernel_gradient_of_a_subset_of_inputs(trainable):
    # Frozen K/V (q-only) takes the dQ kernel alone; a frozen q (kv-only) the dK/dV kernel without dQ.
    q, keys, values, positions = make_inputs(1, 4, 23, 16, (7, 4, 12), pad=2, seed=8)
    if trainable == "q-only":
        keys, values = [k.detach() for k in keys], [v.detach() for v in values]
        inputs = [q]
    else:
        q = q.detach()
        inputs = [*keys, *values]
    out = routed_attention(q, keys, values, positions, GROUPS, True, backend="triton")
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, inputs, d_out)
    ref_grads = torch.autograd.grad(routed_attention_reference(q, keys, values, positions, GROUPS, True), inputs,
                                    d_out)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= TOL[torch.float32]


def test_gpu_launch_candidates_fit_the_problem_and_autotune_wiring(monkeypatch):
    # No GPU needed: the candidate lists, and what _launch hands to triton.autotune (caught before any launch).
    from flbench.kernels.routed_attention import LAUNCH_KINDS, candidate_blocks

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for head_dim, seq_len, slots in ((64, 197, 117), (64, 77, 45), (128, 20, 9), (32, 300, 300)):
            cands = candidate_blocks(dtype, head_dim, seq_len, slots)
            for kind in LAUNCH_KINDS:
                assert cands[kind] and len(set(cands[kind])) == len(cands[kind])
                for bm, bn, warps, stages in cands[kind]:
                    assert 16 <= bm <= max(16, 1 << (seq_len - 1).bit_length()) and bm & (bm - 1) == 0
                    assert 16 <= bn <= max(16, 1 << (slots - 1).bit_length()) and bn & (bn - 1) == 0
                    assert warps in (4, 8) and stages >= 1
    assert candidate_blocks(torch.bfloat16, 64, 197, 117, interpret=True) == {
        kind: [(128, 128, 1, 1)] for kind in LAUNCH_KINDS}
    if not kernels.triton_available():
        return
    import triton

    module = sys.modules["flbench.kernels.routed_attention"]
    seen = {}

    class Stop(Exception):
        pass

    def fake_autotune(configs, key, reset_to_zero=None, do_bench=None, **_):
        seen.update(configs=configs, key=key, reset=reset_to_zero, bench=do_bench)

        def wrap(kernel):
            seen["kernel"] = kernel
            raise Stop

        return wrap

    monkeypatch.setattr(triton, "autotune", fake_autotune)
    monkeypatch.setattr(module, "_tuners", {})
    plan = module._Plan(False, False, "tf32", 64, {"bwd": ((64, 64, 8, 2), (32, 64, 4, 3))})
    kernel = module._kernels(module._interpreting()).routed_attention_bwd_kernel
    with pytest.raises(Stop):
        module._launch(kernel, "bwd", lambda meta: (1, 1), [], {}, plan, reset_to_zero=["DQ"])
    assert seen["reset"] == ["DQ"] and "DQ" in kernel.arg_names
    assert all(name in kernel.arg_names for name in seen["key"])
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in seen["configs"]] == [
        (64, 64, 8, 2), (32, 64, 4, 3)]
    seen.clear()
    with forced_blocks(bwd=(16, 16, 4, 1)), pytest.raises(TypeError):  # forced: launched directly (and, with no
        module._launch(kernel, "bwd", lambda meta: (1, 1), [], {}, plan)  # arguments, refused), never autotuned
    assert seen == {}
    with pytest.raises(ValueError, match="forced_blocks takes"):
        with forced_blocks(backward=SMALL):
            pass


# ------------------------------------------------------------------------------------------------------------------
# Reference vs hand-built attention
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reference_is_gqa_when_one_group2_expert_holds_all_tokens(causal):
    batch, heads, seq_len, head_dim = 2, 4, 19, 16
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(batch, heads, seq_len, head_dim, generator=gen)
    k_gqa = torch.randn(batch, heads // 2, seq_len, head_dim, generator=gen)
    v_gqa = torch.randn(batch, heads // 2, seq_len, head_dim, generator=gen)
    head_map = torch.arange(heads) // 2  # query head h reads kv head h // 2
    expected = F.scaled_dot_product_attention(q, k_gqa[:, head_map], v_gqa[:, head_map], is_causal=causal)

    def empty(g):
        return torch.zeros(batch, heads // g, 0, head_dim)

    positions = (torch.zeros(batch, 0, dtype=torch.long), torch.arange(seq_len).expand(batch, -1),
                 torch.zeros(batch, 0, dtype=torch.long))
    out = routed_attention_reference(q, (empty(1), k_gqa, empty(4)), (empty(1), v_gqa, empty(4)), positions,
                                     (1, 2, 4), causal)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_rejects_bad_group_size():
    q = torch.randn(1, 6, 4, 8)
    k = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"group_sizes\[0\]=4"):
        routed_attention_reference(q, (k,), (k,), (torch.arange(4)[None],), (4,), False)


# ------------------------------------------------------------------------------------------------------------------
# Dispatch and import hygiene
# ------------------------------------------------------------------------------------------------------------------
def test_auto_backend_follows_device_and_env(monkeypatch):
    cpu = torch.zeros(1, 1, 1, 16)
    assert resolve_backend(cpu, "auto") == "torch"
    assert resolve_backend(cpu, "triton") == "triton"
    monkeypatch.setenv(kernels.BACKEND_ENV_VAR, "triton")
    assert resolve_backend(cpu, "auto") == "triton"
    assert resolve_backend(cpu, "torch") == "torch"  # an explicit backend beats the environment
    monkeypatch.setenv(kernels.BACKEND_ENV_VAR, "torch")
    if ON_GPU:
        assert resolve_backend(cpu.cuda(), "auto") == "torch"
    monkeypatch.setenv(kernels.BACKEND_ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=kernels.BACKEND_ENV_VAR):
        resolve_backend(cpu, "auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(cpu, "flash")


@needs_triton
def test_env_var_routes_auto_calls_to_the_kernel(monkeypatch):
    q, keys, values, positions = make_inputs(1, 4, 9, 16, (3, 2, 4), seed=19)
    calls = []
    fn = sys.modules["flbench.kernels.routed_attention"]._RoutedAttentionFn
    original = fn.apply
    monkeypatch.setattr(fn, "apply", lambda *a: calls.append(1) or original(*a))
    routed_attention(q, keys, values, positions, GROUPS, True)
    assert calls == []
    monkeypatch.setenv(kernels.BACKEND_ENV_VAR, "triton")
    out = routed_attention(q, keys, values, positions, GROUPS, True)
    assert calls == [1]
    torch.testing.assert_close(out, routed_attention_reference(q, keys, values, positions, GROUPS, True),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(ON_GPU, reason="CPU-only behaviour")
def test_triton_backend_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, keys, values, positions = make_inputs(1, 4, 9, 16, (3, 2, 4))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        routed_attention(q, keys, values, positions, GROUPS, False, backend="triton")


def test_import_needs_no_triton_and_no_driver():
    code = ("import sys, flbench.kernels as k; assert 'triton' not in sys.modules, 'triton imported'; "
            "assert callable(k.routed_attention) and callable(k.routed_attention_reference)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=120)


@needs_triton
@pytest.mark.skipif(ON_GPU, reason="CPU-only behaviour")
def test_interpreter_works_when_triton_was_imported_first():
    # triton decorates its own tl.zeros/tl.max/... at import; the kernels must still run in the interpreter when
    # TRITON_INTERPRET=1 is set only afterwards (another module imported triton first).
    code = """
import os, torch, triton
os.environ["TRITON_INTERPRET"] = "1"
from flbench.kernels import routed_attention, routed_attention_reference
q = torch.randn(1, 2, 5, 16, requires_grad=True)
k = [torch.randn(1, 2, 3, 16), torch.randn(1, 1, 2, 16)]
pos = [torch.tensor([[0, 2, 4]]), torch.tensor([[1, 3]])]
out = routed_attention(q, k, k, pos, (1, 2), True, backend="triton")
out.sum().backward()
torch.testing.assert_close(out, routed_attention_reference(q, k, k, pos, (1, 2), True), atol=1e-5, rtol=1e-5)
assert torch.isfinite(q.grad).all()
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
