"""Correctness of the compiled routed-attention kernels on a GPU, with nothing but torch, triton and this checkout.

tests/test_kernels.py is the full suite (it needs pytest); this script is what benchmarks/gpu_check.sh runs whether
or not pytest is installed, at the towers' real sizes: forward output, LSE and every gradient (q, each expert's K and
V) against the fp32 expand-and-attend reference, for bf16/fp16/fp32, bidirectional (ViT-B/16 image shape) and causal
with padded rows (text shape), position-sorted and shuffled slots, the fused-atomic and the deterministic dQ paths,
an autotuned launch per shape, and every bf16 autotuning candidate forced in turn (autotuning picks one; each
must be right).

    python benchmarks/kernel_check.py --out results/kernel_check.json     # GPU
    python benchmarks/kernel_check.py --dry --out /tmp/kernel_check.json  # CPU: tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--dry" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before the first Triton call

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flbench.kernels import routed_attention, routed_attention_reference  # noqa: E402

GROUPS = (1, 2, 4)
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # max error / max |reference|
# (name, batch, heads, seq_len, head_dim, causal, padded text rows)
GPU_SHAPES = [("image", 2, 12, 197, 64, False, False), ("text", 4, 8, 77, 64, True, True)]
DRY_SHAPES = [("image-tiny", 1, 4, 21, 16, False, False), ("text-tiny", 2, 4, 19, 16, True, True)]


def make_inputs(batch, heads, seq_len, head_dim, causal, padded, dtype, device, order, seed=0):
    """Tokens split 3:1:6 over experts (1, 2, 4) per row; text rows end early (padding slots -1 at the end)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [seq_len] + [int(torch.randint(2, seq_len + 1, (1,), generator=gen)) for _ in range(batch - 1)] \
        if padded else [seq_len] * batch
    rows = []
    for n in lengths:
        perm = torch.randperm(n, generator=gen)
        caps = [-(-3 * n // 10), -(-n // 10)]
        caps.append(n - sum(caps))
        splits, start = [], 0
        for c in caps:
            chunk = perm[start:start + c]
            splits.append(chunk.sort().values if order == "sorted" else chunk)
            start += c
        rows.append(splits)
    positions = []
    for e in range(3):
        width = max(len(r[e]) for r in rows)
        positions.append(torch.stack([torch.cat([r[e], torch.full((width - len(r[e]),), -1)]) for r in rows]))

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()

    q = leaf(batch, heads, seq_len, head_dim)
    keys = [leaf(batch, heads // g, p.shape[1], head_dim) for p, g in zip(positions, GROUPS)]
    values = [leaf(batch, heads // g, p.shape[1], head_dim) for p, g in zip(positions, GROUPS)]
    return q, keys, values, [p.to(device) for p in positions]


def max_rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item() if b.numel() else 0.0


def check_case(q, keys, values, positions, causal, dtype) -> dict:
    inputs = [q, *keys, *values]
    out = routed_attention(q, keys, values, positions, GROUPS, causal, backend="triton")
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, inputs, d_out)
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    n = len(keys)
    ref = routed_attention_reference(ref_inputs[0], ref_inputs[1:1 + n], ref_inputs[1 + n:], positions, GROUPS,
                                     causal)
    ref_grads = torch.autograd.grad(ref, ref_inputs, d_out.float())
    errors = {"out": max_rel_err(out, ref)}
    errors.update({name: max_rel_err(g, r) for name, g, r in zip(
        ["dq"] + [f"dk{e}" for e in range(n)] + [f"dv{e}" for e in range(n)], grads, ref_grads)})
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    worst = max(errors.values())
    return {"max_rel_err": worst, "finite": finite, "pass": finite and worst <= TOL[dtype], "errors": errors}


def largest_expert(seq_len: int) -> int:
    """Slots of the 3:1:6 split's last expert for a full-length row: the key-block cap autotuning sees."""
    return seq_len - -(-3 * seq_len // 10) - -(-seq_len // 10)


def plan_runs(dry: bool) -> list[dict]:
    """Each run: dtype, shape, slot order, deterministic dQ or not, forced blocks, autotuning on or off.

    Compiling is most of this script's time, so launches use each kind's first candidate (autotuning off) except two
    autotuned runs, and the sweep forces every bf16 candidate once per shape: bidirectional with the fused atomic dQ
    (image), causal with the deterministic dQ kernel (text).
    """
    mod = sys.modules["flbench.kernels.routed_attention"]
    shapes = DRY_SHAPES if dry else GPU_SHAPES
    if dry:  # two runs that between them take every path: fused/atomic dQ and the dQ kernel, sorted/shuffled
        return [dict(shape=shapes[0], dtype=torch.float32, order="sorted", deterministic=False, forced=None,
                     autotune=False),
                dict(shape=shapes[1], dtype=torch.float32, order="shuffled", deterministic=True, forced=None,
                     autotune=False)]
    runs = []
    for shape in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for order in ("sorted", "shuffled"):
                runs.append(dict(shape=shape, dtype=dtype, order=order, deterministic=False, forced=None,
                                 autotune=False))
            runs.append(dict(shape=shape, dtype=dtype, order="sorted", deterministic=True, forced=None,
                             autotune=False))
        runs.append(dict(shape=shape, dtype=torch.bfloat16, order="sorted", deterministic=False, forced=None,
                         autotune=True))
        _, _, _, seq_len, head_dim, causal, _ = shape
        cands = mod.candidate_blocks(torch.bfloat16, head_dim, seq_len, largest_expert(seq_len))
        for i in range(max(len(c) for c in cands.values())):  # run i forces the i-th of each kind (lists wrap)
            runs.append(dict(shape=shape, dtype=torch.bfloat16, order="sorted", deterministic=causal,
                             forced={kind: c[i % len(c)] for kind, c in cands.items()}, autotune=False))
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--dry", action="store_true", help="CPU: tiny shapes in the Triton interpreter")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on an NVIDIA GPU, or use --dry for the CPU interpreter check")
    device = torch.device("cpu" if args.dry else "cuda")
    mod = sys.modules["flbench.kernels.routed_attention"]
    started, rows = time.monotonic(), []
    for run in plan_runs(args.dry):
        name, batch, heads, seq_len, head_dim, causal, padded = run["shape"]
        inputs = make_inputs(batch, heads, seq_len, head_dim, causal, padded, run["dtype"], device, run["order"])
        torch.use_deterministic_algorithms(run["deterministic"], warn_only=True)
        os.environ[mod.AUTOTUNE_ENV_VAR] = "1" if run["autotune"] else "0"
        row = {"shape": name, "dtype": str(run["dtype"]).replace("torch.", ""), "order": run["order"],
               "deterministic_dq": run["deterministic"], "forced": run["forced"], "autotuned": run["autotune"]}
        try:
            with mod.forced_blocks(**(run["forced"] or {})):
                row.update(check_case(*inputs, causal, run["dtype"]))
        except Exception as exc:  # a launch that fails is a failed check, not the end of the script
            row.update({"pass": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
        finally:
            torch.use_deterministic_algorithms(False)
        rows.append(row)
        status = "pass" if row["pass"] else "FAIL"
        print(f"{status} {name} {row['dtype']} {row['order']} det={run['deterministic']} forced={run['forced']} "
              f"autotune={run['autotune']} "
              f"err={row.get('max_rel_err', row.get('error'))}", flush=True)
    failed = [r for r in rows if not r["pass"]]
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)",
               "torch": torch.__version__, "runs": len(rows), "failed": len(failed),
               "worst_rel_err": {d: max((r.get("max_rel_err", float("inf")) for r in rows if r["dtype"] == d),
                                        default=None) for d in sorted({r["dtype"] for r in rows})},
               "seconds": round(time.monotonic() - started, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"{len(rows) - len(failed)}/{len(rows)} passed in {summary['seconds']} s; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
