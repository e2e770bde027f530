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
@dataclass(frozen=True)
class _LaunchConfig:
    interpret: bool
    dot_fp32: bool  # upcast tiles before tl.dot (the interpreter's bf16 dot is wrong)
    precision: str  # tl.dot input_precision for fp32 operands
    block_d: int
    fwd: tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages
    dq: tuple[int, int, int, int]
    dkdv: tuple[int, int, int, int]


def _pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    """Next power of two of ``n``, clamped to [lo, hi] (tl.dot needs every block dimension >= 16)."""
    return max(lo, min(hi, 1 if n <= 1 else 1 << (n - 1).bit_length()))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_config(q: torch.Tensor, max_slots: int) -> _LaunchConfig:
    """Fixed heuristic blocks (no autotuning: one config, so nothing queries a driver or needs a GPU)."""
    interpret = _interpreting()
    seq_len, head_dim = q.shape[2], q.shape[3]
    block_d = _pow2(head_dim, 16, 1 << 30)
    if interpret:
        # Programs run one after another in numpy: few, big blocks are fastest.
        bm, bn = _pow2(seq_len), _pow2(max_slots)
        cfg = (bm, bn, 1, 1)
        return _LaunchConfig(True, True, "ieee", block_d, cfg, cfg, cfg)
    # GPU blocks below were checked by compiling for sm_90 with triton 3.6 and 3.8 (no GPU needed, see
    # tests/test_kernels_compile.py) and reading ptxas's resource usage: at most 56 bytes of register spills and
    # 57 KB of shared memory. They are not tuned by timing: no GPU was available when they were chosen.
    bm_cap = _pow2(seq_len)  # short sequences do not need 128-row query blocks
    if q.dtype == torch.float32:
        # torch's own switch decides TF32: "highest" (its default) keeps fp32 parity with the reference.
        if torch.get_float32_matmul_precision() != "highest":
            cfg = (min(64, bm_cap), 32, 4, 2)
            return _LaunchConfig(False, False, "tf32", block_d, cfg, cfg, cfg)
        # "ieee" dots run on FMA units: small tiles keep the operands in registers.
        cfg = (32, 32, 4, 2) if block_d <= 32 else (32, 32, 8, 2) if block_d <= 64 else (16, 16, 4, 2)
        cfg = (min(cfg[0], bm_cap), *cfg[1:])
        return _LaunchConfig(False, False, "ieee", block_d, cfg, cfg, cfg)
    if block_d <= 64:
        fwd, bwd = (128, 64, 8, 3), (64, 64, 8, 2)
    elif block_d <= 128:
        fwd, bwd = (128, 64, 8, 2), (64, 32, 4, 2)
    else:
        fwd, bwd = (64, 32, 4, 2), (32, 32, 4, 1)
    fwd, bwd = (min(fwd[0], bm_cap), *fwd[1:]), (min(bwd[0], bm_cap), *bwd[1:])
    if fwd[0] < 64:
        fwd = (*fwd[:2], 4, fwd[3])
    return _LaunchConfig(False, False, "tf32", block_d, fwd, bwd, bwd)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _expert_args(experts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], dummy: torch.Tensor) -> list:
    """Flatten up to MAX_EXPERTS (K, V, positions) into the kernels' per-expert arguments; pad with inert dummies."""
    args: list = []
    for e in range(MAX_EXPERTS):
        if e < len(experts):
            k, v, pos = experts[e]
            args += [k, v, pos, k.shape[2], *k.stride()[:3], *v.stride()[:3]]
        else:
            args += [dummy, dummy, dummy, 0, 0, 0, 0, 0, 0, 0]
    return args


def _group_args(groups: Sequence[int]) -> dict:
    padded = list(groups) + [1] * (MAX_EXPERTS - len(groups))
    return {f"G{e}": padded[e] for e in range(MAX_EXPERTS)}


class _RoutedAttentionFn(torch.autograd.Function):
    """Inputs after the three constants: q, keys..., values..., positions... (E of each; positions get no grad)."""

    @staticmethod
    def forward(ctx, causal: bool, scale: float, groups: tuple[int, ...], q: torch.Tensor, *kvp: torch.Tensor):
        n = len(groups)
        keys, values, positions = kvp[:n], kvp[n : 2 * n], kvp[2 * n :]
        with _interpretable_triton_stdlib(_interpreting()):
            out, lse2, live = _forward(q, keys, values, positions, groups, causal, scale)
        ctx.save_for_backward(q, out, lse2, *keys, *values, *positions)
        ctx.causal, ctx.scale, ctx.groups, ctx.live = causal, scale, groups, live
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: torch.Tensor):
        n = len(ctx.groups)
        q, out, lse2, *rest = ctx.saved_tensors
        keys, values, positions = rest[:n], rest[n : 2 * n], rest[2 * n :]
        need_q = ctx.needs_input_grad[3]
        need_kv = [ctx.needs_input_grad[4 + e] or ctx.needs_input_grad[4 + n + e] for e in range(n)]
        with _interpretable_triton_stdlib(_interpreting()):
            dq, dks, dvs = _backward(q, keys, values, positions, ctx.groups, ctx.causal, ctx.scale, out, lse2,
                                     d_out, ctx.live, need_q, need_kv)
        return (None, None, None, dq, *dks, *dvs, *([None] * n))


def _forward(q, keys, values, positions, groups, causal: bool, scale: float):
    """Returns (out, lse in base 2 [B, H, L] fp32, indices of the experts that hold at least one slot)."""
    batch, heads, seq_len, head_dim = q.shape
    # Experts with no slots contribute nothing: drop them, so no kernel ever sees a zero-size buffer.
    live = tuple(e for e in range(len(groups)) if keys[e].shape[2] > 0)
    if len(live) > MAX_EXPERTS:
        raise ValueError(f"the Triton routed-attention kernel takes at most {MAX_EXPERTS} non-empty experts, got "
                         f"{len(live)}; use backend='torch' or fewer experts")
    experts = [(_last_dim_contiguous(keys[e]), _last_dim_contiguous(values[e]), positions[e].to(torch.int32)
                .contiguous()) for e in live]
    q = _last_dim_contiguous(q)
    cfg = _launch_config(q, max((k.shape[2] for k, _, _ in experts), default=1))
    kern = _kernels(cfg.interpret)
    # The interpreter's fp32 -> 16-bit casts truncate; write fp32 there and let torch round.
    out_dtype = torch.float32 if cfg.interpret else q.dtype
    # [B, H, L, d] view of a [B, L, H, d] buffer: the usual next step (merge heads, output projection) is then free.
    out = torch.empty((batch, seq_len, heads, head_dim), device=q.device, dtype=out_dtype).transpose(1, 2)
    lse2 = torch.empty((batch, heads, seq_len), device=q.device, dtype=torch.float32)
    bm, bn, warps, stages = cfg.fwd
    grid = (_cdiv(seq_len, bm), batch * heads)
    kern.routed_attention_fwd_kernel[grid](
        q, out, lse2, *_expert_args(experts, q), *q.stride()[:3], *out.stride()[:3],
        heads, seq_len, head_dim, scale * math.log2(math.e),
        **_group_args([groups[e] for e in live]), NUM_EXPERTS=len(experts), CAUSAL=causal,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg.block_d, DOT_FP32=cfg.dot_fp32, PRECISION=cfg.precision,
        num_warps=warps, num_stages=stages,
    )
    return out.to(q.dtype), lse2, live


def _backward(q, keys, values, positions, groups, causal, scale, out, lse2, d_out, live, need_q, need_kv):
    batch, heads, seq_len, head_dim = q.shape
    q = _last_dim_contiguous(q)
    d_out = _last_dim_contiguous(d_out)
    experts = [(_last_dim_contiguous(keys[e]), _last_dim_contiguous(values[e]), positions[e].to(torch.int32)
                .contiguous()) for e in live]
    cfg = _launch_config(q, max((k.shape[2] for k, _, _ in experts), default=1))
    kern = _kernels(cfg.interpret)
    grad_dtype = torch.float32 if cfg.interpret else q.dtype
    qk_scale = scale * math.log2(math.e)

    delta = torch.empty_like(lse2)
    bm_delta = min(64, _pow2(seq_len))
    kern.routed_attention_bwd_delta_kernel[(_cdiv(seq_len, bm_delta), batch * heads)](
        out, d_out, delta, *out.stride()[:3], *d_out.stride()[:3], heads, seq_len, head_dim,
        BLOCK_M=bm_delta, BLOCK_D=cfg.block_d,
    )

    dq = None
    if need_q:
        dq = torch.empty_like(q, dtype=grad_dtype)  # keeps q's memory layout when q is dense
        bm, bn, warps, stages = cfg.dq
        kern.routed_attention_bwd_dq_kernel[(_cdiv(seq_len, bm), batch * heads)](
            q, d_out, lse2, delta, dq, *_expert_args(experts, q), *q.stride()[:3], *d_out.stride()[:3],
            *dq.stride()[:3],
            heads, seq_len, head_dim, qk_scale, scale,
            **_group_args([groups[e] for e in live]), NUM_EXPERTS=len(experts), CAUSAL=causal,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg.block_d, DOT_FP32=cfg.dot_fp32, PRECISION=cfg.precision,
            num_warps=warps, num_stages=stages,
        )
        dq = dq.to(q.dtype)

    dks: list = [None] * len(groups)
    dvs: list = [None] * len(groups)
    for e in range(len(groups)):
        if not need_kv[e]:
            continue
        if e not in live:  # no slots: the gradient is an empty tensor of the input's shape
            dks[e], dvs[e] = torch.zeros_like(keys[e]), torch.zeros_like(values[e])
            continue
        k, v, pos = experts[live.index(e)]
        n_slots = k.shape[2]
        dk = torch.empty_like(k, dtype=grad_dtype)
        dv = torch.empty_like(v, dtype=grad_dtype)
        bm, bn, warps, stages = cfg.dkdv
        grid = (_cdiv(n_slots, bn), batch * (heads // groups[e]))
        kern.routed_attention_bwd_dkdv_kernel[grid](
            q, d_out, lse2, delta, k, v, pos, dk, dv,
            *q.stride()[:3], *d_out.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3], heads, seq_len, n_slots, head_dim, qk_scale, scale,
            GROUP=groups[e], CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg.block_d,
            DOT_FP32=cfg.dot_fp32, PRECISION=cfg.precision, num_warps=warps, num_stages=stages,
        )
        dks[e], dvs[e] = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dks, dvs


def routed_attention_triton_with_lse(q, keys, values, positions, group_sizes, causal, scale=None):
    """Forward only, returning (out, natural-log LSE [B, H, L]); for tests and benchmarks (no autograd)."""
    validate_routed_inputs(q, keys, values, positions, group_sizes)
    _check_triton_runnable(q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad(), _interpretable_triton_stdlib(_interpreting()):
        out, lse2, _ = _forward(q, keys, values, positions, tuple(group_sizes), causal, scale)
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
