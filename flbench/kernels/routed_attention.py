"""Routed-KV (mixSGA) attention that reads each expert's compact K/V directly: launchers, autograd, dispatch.

The kernels and their math live in ``_routed_attention_triton.py``; the PyTorch oracle in ``reference.py``.
``import flbench.kernels`` needs only torch (triton is imported on the first Triton call), queries no driver, and
works whatever the import order relative to ``TRITON_INTERPRET``: the kernel module is loaded on first use, once per
mode (compiled / interpreted), because ``@triton.jit`` reads that variable when it decorates.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from .reference import routed_attention_reference, validate_routed_inputs

__all__ = ["routed_attention", "triton_available", "BACKEND_ENV_VAR"]

logger = logging.getLogger(__name__)

BACKEND_ENV_VAR = "FLBENCH_ATTENTION_BACKEND"
_BACKENDS = ("auto", "triton", "torch")
MAX_EXPERTS = 4  # must match _routed_attention_triton.MAX_EXPERTS (kept here so importing needs no triton)
_KERNEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_routed_attention_triton.py")
_kernel_modules: dict[bool, ModuleType] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when triton can be imported (says nothing about a GPU being present)."""
    return importlib.util.find_spec("triton") is not None


def _kernels(interpret: bool) -> ModuleType:
    """Load the jit kernels for one mode; a separate module copy per mode, so the first import never pins it."""
    module = _kernel_modules.get(interpret)
    if module is None:
        if interpret != _interpreting():
            raise RuntimeError("internal: kernel mode must match TRITON_INTERPRET while the kernels are loaded")
        name = "flbench.kernels._routed_attention_triton" + ("_interpreted" if interpret else "_compiled")
        spec = importlib.util.spec_from_file_location(name, _KERNEL_FILE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        if module.MAX_EXPERTS != MAX_EXPERTS:
            raise RuntimeError("MAX_EXPERTS differs between routed_attention.py and _routed_attention_triton.py")
        _kernel_modules[interpret] = module
        logger.debug("loaded routed-attention Triton kernels (interpreter=%s)", interpret)
    return module


@contextlib.contextmanager
def _interpretable_triton_stdlib(interpret: bool):
    """Let interpreted kernels call ``tl.zeros``/``tl.max``/``tl.sum`` even when triton was imported in compiled mode.

    Those are themselves ``@triton.jit`` functions, decorated when ``triton`` is first imported: if that happened
    before ``TRITON_INTERPRET=1`` was set, an interpreted kernel calling them fails ("Cannot call @triton.jit'd
    outside of the scope of a kernel"). For the duration of our interpreted launch only, swap in interpreted twins.
    """
    if not interpret:
        yield
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    swapped = {name: obj for name, obj in vars(tl).items() if type(obj) is JITFunction}
    for name, obj in swapped.items():
        setattr(tl, name, InterpretedFunction(obj.fn))
    try:
        yield
    finally:
        for name, obj in swapped.items():
            setattr(tl, name, obj)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------
Block = tuple[int, int, int, int]  # BLOCK_M (query rows), BLOCK_N (key slots), num_warps, num_stages
LAUNCH_KINDS = ("fwd", "bwd", "dq")  # forward; dK/dV (+ fused dQ) backward; deterministic dQ
AUTOTUNE_ENV_VAR = "FLBENCH_KERNEL_AUTOTUNE"

# GPU candidates per kind, tried by triton.autotune; the first of each list is the heuristic used when autotuning
# is off. All compile for sm_90 with triton 3.6 and 3.8 within an H100's shared memory (tests/test_kernels_compile.py
# checks the first of each; benchmarks/kernel_resources.py lists registers, spills and shared memory of all).
# 16-bit inputs by head-dim bucket (tensor-core dots):
_GPU_16BIT: dict[int, dict[str, list[Block]]] = {
    64: {"fwd": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 4), (64, 64, 4, 2)],
         "bwd": [(64, 64, 8, 2), (32, 64, 4, 3), (32, 128, 8, 2), (32, 32, 4, 3), (16, 64, 4, 3)],
         "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 3), (128, 32, 8, 3)]},
    128: {"fwd": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
          "bwd": [(32, 32, 8, 2), (32, 32, 4, 3)],
          "dq": [(64, 32, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2)]},
    256: {"fwd": [(32, 32, 4, 1), (64, 32, 8, 2)], "bwd": [(16, 16, 4, 1), (16, 32, 4, 1)],
          "dq": [(32, 32, 4, 1)]},
}
# fp32 with input_precision="ieee" (torch's default "highest" matmul precision) runs on FMA units: small tiles.
_GPU_FP32_IEEE: dict[int, dict[str, list[Block]]] = {
    64: {"fwd": [(32, 32, 4, 2), (16, 32, 4, 2)], "bwd": [(16, 16, 4, 2), (16, 32, 4, 2)],
         "dq": [(32, 32, 4, 2), (16, 32, 4, 2)]},
    256: {"fwd": [(16, 16, 4, 2)], "bwd": [(16, 16, 4, 2)], "dq": [(16, 16, 4, 2)]},
}
_GPU_FP32_TF32: dict[str, list[Block]] = {"fwd": [(64, 32, 4, 2), (32, 32, 4, 2)], "bwd": [(32, 32, 4, 2)],
                                          "dq": [(64, 32, 4, 2), (32, 32, 4, 2)]}
_forced: dict[str, Block] = {}
_tuners: dict = {}


@dataclass(frozen=True)
class _Plan:
    interpret: bool
    dot_fp32: bool  # upcast tiles before tl.dot (the interpreter's bf16 dot is wrong)
    precision: str  # tl.dot input_precision for fp32 operands
    block_d: int
    candidates: dict[str, tuple[Block, ...]]


def _pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    """Next power of two of ``n``, clamped to [lo, hi] (tl.dot needs every block dimension >= 16)."""
    return max(lo, min(hi, 1 if n <= 1 else 1 << (n - 1).bit_length()))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bucket(table: dict[int, dict[str, list[Block]]], block_d: int) -> dict[str, list[Block]]:
    return table[min((k for k in table if k >= block_d), default=max(table))]


def candidate_blocks(dtype: torch.dtype, head_dim: int, seq_len: int, max_slots: int,
                     interpret: bool = False) -> dict[str, list[Block]]:
    """Launch configurations per kind for these shapes: one under the interpreter, the autotuning candidates on GPU.

    Blocks never exceed the problem (a 77-token sequence does not get 128-row query blocks): they are capped at the
    next power of two of the sequence (query blocks) and of the largest expert (key blocks), and duplicates dropped.
    """
    if interpret:
        # Programs run one after another in numpy: few, big blocks are fastest.
        cfg = (_pow2(seq_len), _pow2(max_slots), 1, 1)
        return {kind: [cfg] for kind in LAUNCH_KINDS}
    block_d = _pow2(head_dim, 16, 1 << 30)
    if dtype == torch.float32:
        # torch's own switch decides TF32: "highest" (its default) keeps fp32 parity with the reference.
        tf32 = torch.get_float32_matmul_precision() != "highest"
        table = _GPU_FP32_TF32 if tf32 else _bucket(_GPU_FP32_IEEE, block_d)
    else:
        table = _bucket(_GPU_16BIT, block_d)
    bm_cap, bn_cap = _pow2(seq_len), _pow2(max_slots)
    out: dict[str, list[Block]] = {}
    for kind in LAUNCH_KINDS:
        capped: list[Block] = []
        for bm, bn, warps, stages in table[kind]:
            bm, bn = min(bm, bm_cap), min(bn, bn_cap)
            cfg = (bm, bn, 4 if bm * bn < 32 * 32 else warps, stages)  # 8 warps have nothing to share on tiny tiles
            if cfg not in capped:
                capped.append(cfg)
        out[kind] = capped
    return out


def _plan(q: torch.Tensor, max_slots: int) -> _Plan:
    interpret = _interpreting()
    block_d = _pow2(q.shape[3], 16, 1 << 30)
    tf32 = q.dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest"
    candidates = candidate_blocks(q.dtype, q.shape[3], q.shape[2], max_slots, interpret)
    return _Plan(interpret, interpret, "ieee" if interpret or not tf32 else "tf32", block_d,
                 {kind: tuple(c) for kind, c in candidates.items()})


@contextlib.contextmanager
def forced_blocks(**blocks: Block):
    """Within this block, launches of the named kinds ("fwd", "bwd", "dq") use exactly the given configuration.

    For tests (small blocks exercise many tiles per expert under the interpreter) and the GPU kernel check (every
    autotuning candidate is checked for correctness, not only the one autotuning picks).
    """
    unknown = set(blocks) - set(LAUNCH_KINDS)
    if unknown:
        raise ValueError(f"forced_blocks takes {LAUNCH_KINDS}, got {sorted(unknown)}")
    saved = dict(_forced)
    _forced.update({kind: tuple(cfg) for kind, cfg in blocks.items()})
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def _autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def _quick_bench(kernel_call, quantiles):
    """Autotuning timer: triton's do_bench with short warm-up and repetition (milliseconds per candidate)."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _launch(kernel, kind: str, grid, args: list, kwargs: dict, plan: _Plan, reset_to_zero=None) -> None:
    """Launch with the forced block, the single candidate, or ``triton.autotune`` over the GPU candidates.

    ``grid`` maps the meta-parameters (BLOCK_M, BLOCK_N) to the launch grid. The autotuner is keyed on sequence
    length, head dim, causality and the tensors' dtypes; it is built on first use, so nothing queries a driver at
    import, and never under the interpreter (which has no driver to time with).
    """
    candidates = [_forced[kind]] if kind in _forced else list(plan.candidates[kind])
    if plan.interpret or len(candidates) == 1 or not _autotune_enabled():
        bm, bn, warps, stages = candidates[0]
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        kernel[grid(meta)](*args, **kwargs, **meta, num_warps=warps, num_stages=stages)
        return
    tuner = _tuners.get((kind, kernel, tuple(candidates)))
    if tuner is None:
        import triton

        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
                   for bm, bn, warps, stages in candidates]
        tuner = triton.autotune(configs, key=["seq_len", "head_dim", "CAUSAL"], reset_to_zero=reset_to_zero,
                                do_bench=_quick_bench)(kernel)
        _tuners[(kind, kernel, tuple(candidates))] = tuner
        logger.debug("routed attention: autotuning %s over %d configurations", kind, len(configs))
    tuner[grid](*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _live_experts(keys, values, positions, groups) -> tuple[list[int], list[tuple]]:
    """Experts holding at least one slot, largest group first (the backward's heaviest programs launch first), and
    their kernel-ready (K, V, int32 positions)."""
    live = sorted((e for e in range(len(groups)) if keys[e].shape[2] > 0), key=lambda e: -groups[e])
    if len(live) > MAX_EXPERTS:
        raise ValueError(f"the Triton routed-attention kernel takes at most {MAX_EXPERTS} non-empty experts, got "
                         f"{len(live)}; use backend='torch' or fewer experts")
    experts = [(_last_dim_contiguous(keys[e]), _last_dim_contiguous(values[e]),
                positions[e].to(torch.int32).contiguous()) for e in live]
    return live, experts


def _expert_args(experts: Sequence[tuple], dummy_kv: torch.Tensor, dummy_pos: torch.Tensor,
                 grads: Sequence[tuple] | None = None, dummy_grad: torch.Tensor | None = None) -> list:
    """Flatten up to MAX_EXPERTS (K, V, positions[, dK, dV]) into the kernels' per-expert arguments; unused slots get
    zero-slot dummies of matching types, which contribute no tile."""
    args: list = []
    for slot in range(MAX_EXPERTS):
        if slot < len(experts):
            k, v, pos = experts[slot]
            args += [k, v, pos, k.shape[2], *k.stride()[:3], *v.stride()[:3]]
            args += list(grads[slot]) if grads is not None else []
        else:
            args += [dummy_kv, dummy_kv, dummy_pos, 0, 0, 0, 0, 0, 0, 0]
            args += [dummy_grad, dummy_grad] if grads is not None else []
    return args


def _group_args(groups: Sequence[int]) -> dict:
    padded = list(groups) + [1] * (MAX_EXPERTS - len(groups))
    return {f"G{e}": padded[e] for e in range(MAX_EXPERTS)}


def _heads_last(batch: int, length: int, heads: int, head_dim: int, like: torch.Tensor, dtype, zero=False):
    """A [B, heads, length, d] view of a contiguous [B, length, heads, d] buffer: merging heads afterwards (the
    output projection, or the backward of the Q/K/V projections) is then free."""
    make = torch.zeros if zero else torch.empty
    return make((batch, length, heads, head_dim), device=like.device, dtype=dtype).transpose(1, 2)


class _RoutedAttentionFn(torch.autograd.Function):
    """Inputs after the three constants: q, keys..., values..., positions... (E of each; positions get no grad)."""

    @staticmethod
    def forward(ctx, causal: bool, scale: float, groups: tuple[int, ...], q: torch.Tensor, *kvp: torch.Tensor):
        n = len(groups)
        keys, values, positions = kvp[:n], kvp[n : 2 * n], kvp[2 * n :]
        with _interpretable_triton_stdlib(_interpreting()):
            out, lse2 = _forward(q, keys, values, positions, groups, causal, scale)
        ctx.save_for_backward(q, out, lse2, *keys, *values, *positions)
        ctx.causal, ctx.scale, ctx.groups = causal, scale, groups
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: torch.Tensor):
        n = len(ctx.groups)
        q, out, lse2, *rest = ctx.saved_tensors
        keys, values, positions = rest[:n], rest[n : 2 * n], rest[2 * n :]
        need_q = ctx.needs_input_grad[3]
        need_kv = any(ctx.needs_input_grad[4 + e] or ctx.needs_input_grad[4 + n + e] for e in range(n))
        with _interpretable_triton_stdlib(_interpreting()):
            dq, dks, dvs = _backward(q, keys, values, positions, ctx.groups, ctx.causal, ctx.scale, out, lse2,
                                     d_out, need_q, need_kv)
        return (None, None, None, dq, *dks, *dvs, *([None] * n))


def _forward(q, keys, values, positions, groups, causal: bool, scale: float):
    """Returns (out, lse in base 2 [B, H, L] fp32)."""
    batch, heads, seq_len, head_dim = q.shape
    live, experts = _live_experts(keys, values, positions, groups)
    q = _last_dim_contiguous(q)
    plan = _plan(q, max((k.shape[2] for k, _, _ in experts), default=1))
    kern = _kernels(plan.interpret)
    # The interpreter's fp32 -> 16-bit casts truncate; write fp32 there and let torch round.
    out = _heads_last(batch, seq_len, heads, head_dim, q, torch.float32 if plan.interpret else q.dtype)
    lse2 = torch.empty((batch, heads, seq_len), device=q.device, dtype=torch.float32)
    dummy_pos = torch.empty(1, device=q.device, dtype=torch.int32)
    args = [q, out, lse2, *_expert_args(experts, q, dummy_pos), *q.stride()[:3], *out.stride()[:3],
            heads, seq_len, head_dim, scale * math.log2(math.e)]
    kwargs = dict(**_group_args([groups[e] for e in live]), CAUSAL=causal, BLOCK_D=plan.block_d,
                  DOT_FP32=plan.dot_fp32, PRECISION=plan.precision)
    _launch(kern.routed_attention_fwd_kernel, "fwd", lambda meta: (_cdiv(seq_len, meta["BLOCK_M"]), batch * heads),
            args, kwargs, plan)
    return out.to(q.dtype), lse2


def _backward(q, keys, values, positions, groups, causal, scale, out, lse2, d_out, need_q: bool, need_kv: bool):
    batch, heads, seq_len, head_dim = q.shape
    q = _last_dim_contiguous(q)
    d_out = _last_dim_contiguous(d_out)
    live, experts = _live_experts(keys, values, positions, groups)
    plan = _plan(q, max((k.shape[2] for k, _, _ in experts), default=1))
    kern = _kernels(plan.interpret)
    grad_dtype = torch.float32 if plan.interpret else q.dtype
    qk_scale = scale * math.log2(math.e)
    live_groups = [groups[e] for e in live]
    common = dict(**_group_args(live_groups), CAUSAL=causal, BLOCK_D=plan.block_d, DOT_FP32=plan.dot_fp32,
                  PRECISION=plan.precision)

    delta = torch.empty_like(lse2)
    bm_delta = min(64, _pow2(seq_len))
    kern.routed_attention_bwd_delta_kernel[(_cdiv(seq_len, bm_delta), batch * heads)](
        out, d_out, delta, *out.stride()[:3], *d_out.stride()[:3], heads, seq_len, head_dim,
        BLOCK_M=bm_delta, BLOCK_D=plan.block_d,
    )
    dummy_pos = torch.empty(1, device=q.device, dtype=torch.int32)
    # Atomics reorder dQ's sums from run to run; torch's deterministic mode gets the atomic-free dQ kernel instead.
    fuse_dq = need_q and need_kv and not torch.are_deterministic_algorithms_enabled()
    dq = None
    dks: list = [None] * len(groups)
    dvs: list = [None] * len(groups)
    if need_kv:
        dq_acc = (_heads_last(batch, seq_len, heads, head_dim, q, torch.float32, zero=True) if fuse_dq
                  else torch.zeros(1, 1, 1, 1, device=q.device, dtype=torch.float32))
        grads = [tuple(_heads_last(batch, k.shape[2], k.shape[1], head_dim, q, grad_dtype) for _ in range(2))
                 for k, _, _ in experts]
        units = [(heads // g, k.shape[2]) for g, (k, _, _) in zip(live_groups, experts)]
        dummy_grad = torch.empty(1, device=q.device, dtype=grad_dtype)
        args = [q, d_out, lse2, delta, dq_acc, *_expert_args(experts, q, dummy_pos, grads, dummy_grad),
                *q.stride()[:3], *d_out.stride()[:3], *dq_acc.stride()[:3], heads, seq_len, head_dim, qk_scale, scale]
        _launch(kern.routed_attention_bwd_kernel, "bwd",
                lambda meta: (sum(h * _cdiv(c, meta["BLOCK_N"]) for h, c in units), batch),
                args, dict(**common, FUSE_DQ=fuse_dq), plan, reset_to_zero=["DQ"])
        for e, (dk, dv) in zip(live, grads):
            dks[e], dvs[e] = dk.to(keys[e].dtype), dv.to(values[e].dtype)
        for e in range(len(groups)):
            if e not in live:  # no slots: the gradient is an empty tensor of the input's shape
                dks[e], dvs[e] = torch.zeros_like(keys[e]), torch.zeros_like(values[e])
        if fuse_dq:
            dq = dq_acc.to(q.dtype)
    if need_q and dq is None:
        dq = _heads_last(batch, seq_len, heads, head_dim, q, grad_dtype)
        args = [q, d_out, lse2, delta, dq, *_expert_args(experts, q, dummy_pos), *q.stride()[:3],
                *d_out.stride()[:3], *dq.stride()[:3], heads, seq_len, head_dim, qk_scale, scale]
        _launch(kern.routed_attention_bwd_dq_kernel, "dq",
                lambda meta: (_cdiv(seq_len, meta["BLOCK_M"]), batch * heads), args, common, plan)
        dq = dq.to(q.dtype)
    return dq, dks, dvs


def routed_attention_triton_with_lse(q, keys, values, positions, group_sizes, causal, scale=None):
    """Forward only, returning (out, natural-log LSE [B, H, L]); for tests and benchmarks (no autograd)."""
    validate_routed_inputs(q, keys, values, positions, group_sizes)
    _check_triton_runnable(q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad(), _interpretable_triton_stdlib(_interpreting()):
        out, lse2 = _forward(q, keys, values, positions, tuple(group_sizes), causal, scale)
    return out, lse2 * math.log(2.0)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
def _check_triton_runnable(q: torch.Tensor) -> None:
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton), or use backend='torch'")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"backend='triton' got tensors on {q.device}: the Triton kernel runs on CUDA tensors, or on CPU tensors "
            "only under the Triton interpreter (set TRITON_INTERPRET=1 before the first Triton call); "
            f"otherwise use backend='torch' or {BACKEND_ENV_VAR}=torch"
        )


def resolve_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """'triton' or 'torch' for this call; ``FLBENCH_ATTENTION_BACKEND`` replaces ``backend='auto'``."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
        if backend not in _BACKENDS:
            raise ValueError(f"{BACKEND_ENV_VAR} must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.device.type == "cuda" and triton_available() else "torch"
    return backend


def routed_attention(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    group_sizes: Sequence[int],
    causal: bool,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Routed-KV attention ``[B, H, L, d]`` over compact per-expert K/V; see ``reference.py`` for the layout.

    ``backend``: "triton" (fused kernel, CUDA or the Triton CPU interpreter), "torch" (expand-and-attend reference),
    or "auto" (Triton for CUDA tensors when triton imports, else torch; ``FLBENCH_ATTENTION_BACKEND`` overrides it).
    """
    chosen = resolve_backend(q, backend)
    forced = backend == "triton" or os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() == "triton"
    if chosen == "triton" and not forced and sum(k.shape[2] > 0 for k in keys) > MAX_EXPERTS:
        logger.warning("routed_attention: %d non-empty experts exceed the kernel's %d; using the PyTorch reference",
                       sum(k.shape[2] > 0 for k in keys), MAX_EXPERTS)
        chosen = "torch"
    if chosen == "torch":
        return routed_attention_reference(q, keys, values, positions, group_sizes, causal, scale)
    validate_routed_inputs(q, keys, values, positions, group_sizes)
    _check_triton_runnable(q)
    groups = tuple(int(g) for g in group_sizes)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _RoutedAttentionFn.apply(bool(causal), scale, groups, q, *keys, *values, *positions)
