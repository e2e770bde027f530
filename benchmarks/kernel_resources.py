"""Compile the routed-attention Triton kernels for an H100 (sm_90) without a GPU, and report what each launch
configuration costs in registers, spills and shared memory.

Triton ships ptxas and cuobjdump, so ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` builds real cubins on a
CPU-only machine. The CPU interpreter cannot see what only the compiler rejects (types that do not unify across loop
iterations, constexpr misuse, shared memory beyond the chip), and resource use decides occupancy on the GPU.

    python benchmarks/kernel_resources.py                 # every autotuning candidate, bf16 and fp32, d=64
    python benchmarks/kernel_resources.py --first-only    # the heuristic (first) candidate of each kind only
    python benchmarks/kernel_resources.py --json out.json

Run with TRITON_INTERPRET unset (the compiled-mode kernels are decorated on load); tests/test_kernels_compile.py runs
``--first-only`` in a subprocess with a private TRITON_CACHE_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

H100_MAX_SHARED_BYTES = 227 * 1024
# (dtype name, head_dim, seq_len, causal): the ViT-B/16 image tower in bf16 and the text tower in fp32.
CASES = [("bfloat16", 64, 197, False), ("float32", 64, 77, True)]
KERNELS = {"fwd": "routed_attention_fwd_kernel", "bwd": "routed_attention_bwd_kernel",
           "dq": "routed_attention_bwd_dq_kernel"}
GROUPS = {"G0": 4, "G1": 2, "G2": 1, "G3": 1}  # the launcher's order: largest group first


def _signature(fn, dtype_name: str, constexprs: dict) -> dict:
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype_name]
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Lse", "Delta", "DQ"):
            sig[name] = "*fp32"
        elif re.fullmatch(r"P\d", name):
            sig[name] = "*i32"
        elif name in ("Q", "Out", "dOut", "dQ") or re.fullmatch(r"(d?K|d?V)\d", name):
            sig[name] = "*" + short
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _resources(cubin: bytes) -> dict:
    """Registers per thread, stack frame (spills) and static shared memory, as cuobjdump reports them."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = {key: int(m.group(1)) for key in ("REG", "STACK", "LOCAL") if (m := re.search(rf"{key}:(\d+)", text))}
    return {"registers": found.get("REG"), "spill_bytes": found.get("STACK", 0) + found.get("LOCAL", 0)}


def compile_all(first_only: bool) -> list[dict]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import flbench.kernels  # noqa: F401

    ra = sys.modules["flbench.kernels.routed_attention"]
    if ra._interpreting():
        raise SystemExit("unset TRITON_INTERPRET: this compiles the GPU kernels")
    kern = ra._kernels(False)
    rows = []
    for dtype_name, head_dim, seq_len, causal in CASES:
        dtype = getattr(torch, dtype_name)
        q = torch.empty(1, 1, seq_len, head_dim, dtype=dtype)
        plan = ra._plan(q, seq_len)
        for kind, fn_name in KERNELS.items():
            fn = getattr(kern, fn_name)
            for index, (bm, bn, warps, stages) in enumerate(plan.candidates[kind]):
                if first_only and index:
                    break
                constexprs = {**GROUPS, "CAUSAL": causal, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": plan.block_d,
                              "DOT_FP32": plan.dot_fp32, "PRECISION": plan.precision}
                if kind == "bwd":
                    constexprs["FUSE_DQ"] = True
                src = ASTSource(fn=fn, signature=_signature(fn, dtype_name, constexprs), constexprs=constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": warps, "num_stages": stages})
                rows.append({"kind": kind, "dtype": dtype_name, "head_dim": head_dim, "block_m": bm, "block_n": bn,
                             "num_warps": warps, "num_stages": stages, "shared_bytes": compiled.metadata.shared,
                             "cubin_bytes": len(compiled.asm["cubin"]), **_resources(compiled.asm["cubin"])})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first-only", action="store_true", help="only the first (heuristic) candidate per kind")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    import triton

    rows = compile_all(args.first_only)
    print(f"triton {triton.__version__}, target sm_90")
    print("| kind | dtype | d | BLOCK_M, BLOCK_N, warps, stages | registers / thread | spill bytes | shared bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['dtype']} | {r['head_dim']} | {r['block_m']}, {r['block_n']}, {r['num_warps']}, "
              f"{r['num_stages']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']:,} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    too_big = [r for r in rows if r["shared_bytes"] > H100_MAX_SHARED_BYTES]
    if too_big:
        raise SystemExit(f"{len(too_big)} configuration(s) need more shared memory than an H100 has: {too_big}")


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main()
