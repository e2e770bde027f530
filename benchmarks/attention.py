"""Benchmark routed-KV (mixSGA) attention on the GPU: the Triton kernel and the model's RoutedKVAttention layer
beside dense flash, GQA, scatter-to-position + flash, expand-and-attend and FlexAttention.

GPU (NVIDIA, bf16; needs only torch, triton and this checkout; a few minutes on an H100, bounded by --budget-s):

    python benchmarks/attention.py --out-dir results/attention

CPU smoke run (tiny shapes, the Triton kernel in the CPU interpreter; every gradient check runs, timings mean
nothing):

    python benchmarks/attention.py --cpu-smoke --out-dir /tmp/attention-smoke

Shapes: ViT-B/16 image tower (B=256, L=197, width 768, 12 heads, bidirectional) and text tower (B=512, L=77, width
512, 8 heads, causal, padded rows: real lengths uniform in [L/4, L], at least one row full). Experts (1, 2, 4) at
ratios 3:1:6 and 1:1:8: each row's real tokens are split by the model's capacity rule (ceil(rho_e * n), the last
expert takes the rest), drawn at random, each expert's slots in position order, padding slots (-1) at the end of
fixed-size buffers (the largest count of the batch).

Two levels. **Attention core**: the kernel on compact K/V vs dense flash SDPA, GQA (g=2, K/V repeated) + flash,
scatter (expand each expert's K/V to all heads, scatter them to token order) + flash, the expand-and-attend reference
(fp32 softmax) and FlexAttention (one compiled call per expert, merged by log-sum-exp). **Whole layer** (projections +
routing + attention; weights frozen, gradient w.r.t. the input, as in prompt learning): a fused-QKV dense layer + flash,
a GQA layer + flash, and the model's RoutedKVAttention with the kernel (routing by its router, and with the routing
fixed in advance), with its attention core swapped for scatter + flash, for FlexAttention, and with the
expand-and-attend reference.

Before timing, every method is checked against an fp32 reference of the same computation (output, and every input
gradient for the same upstream gradient; text rows past their end are left out where the method's semantics differ
there). Rows are written to <out-dir>/attention.json and attention.md after each measurement, so a killed run keeps
what it measured; --budget-s bounds the whole run, compiles and autotuning included (FlexAttention goes last).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first Triton call

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import attention_layers as al  # noqa: E402
from bench_util import Budget, BudgetExceeded, Results, error_text, fmt, peak_extra_mb, sync, time_ms  # noqa: E402

from flbench.kernels import routed_attention, routed_attention_reference  # noqa: E402

GROUPS = (1, 2, 4)
GQA_GROUP = 2  # the K/V budget of 3:1:6 over (1, 2, 4): 50 % of dense
RATIOS = {"3:1:6": (3.0, 1.0, 6.0), "1:1:8": (1.0, 1.0, 8.0)}
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}
# --quick keeps these methods: the kernel, the model's layer with it (routing on), and the dense baselines.
QUICK = ("routed-KV Triton kernel", "dense flash SDPA", "dense layer: fused QKV + flash",
         "RoutedKVAttention, Triton kernel, routing")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq_len: int
    heads: int
    width: int
    causal: bool
    tower: str

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


GPU_SHAPES = {"image": Shape("image (ViT-B/16)", 256, 197, 12, 768, False, "vision"),
              "text": Shape("text (ViT-B/16)", 512, 77, 8, 512, True, "text")}
SMOKE_SHAPES = {"image": Shape("image-like (tiny)", 2, 37, 4, 128, False, "vision"),
                "text": Shape("text-like (tiny)", 3, 23, 4, 128, True, "text")}


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def row_capacities(n: int, ratios) -> list[int]:
    """ceil(rho_e * n) taken progressively, the last expert the rest (the model's rule, written out here)."""
    total, caps = float(sum(ratios)), []
    for r in ratios[:-1]:
        caps.append(min(math.ceil(n * r / total - 1e-9), n - sum(caps)))
    return caps + [n - sum(caps)]


def make_case(shape: Shape, ratios, device, dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    batch, seq_len, heads, d = shape.batch, shape.seq_len, shape.heads, shape.head_dim
    if shape.tower == "text":
        lengths = torch.randint(max(2, seq_len // 4), seq_len + 1, (batch,), generator=gen)
        lengths[0] = seq_len
    else:
        lengths = torch.full((batch,), seq_len)
    rows = []
    for b in range(batch):
        n = int(lengths[b])
        perm, start, slots = torch.randperm(n, generator=gen), 0, []
        for c in row_capacities(n, ratios):
            slots.append(perm[start:start + c].sort().values)
            start += c
        rows.append(slots)
    widths = [max(len(r[e]) for r in rows) for e in range(len(ratios))]
    positions = [torch.stack([torch.cat([r[e], torch.full((widths[e] - len(r[e]),), -1)]) for r in rows]).to(device)
                 for e in range(len(ratios))]

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device, dtype)

    case = dict(lengths=lengths.to(device), caps=widths, positions=positions,
                valid=(torch.arange(seq_len)[None, :] < lengths[:, None]).to(device),
                q=rand(batch, heads, seq_len, d), k=rand(batch, heads, seq_len, d), v=rand(batch, heads, seq_len, d),
                k_gqa=rand(batch, heads // GQA_GROUP, seq_len, d), v_gqa=rand(batch, heads // GQA_GROUP, seq_len, d),
                keys=[rand(batch, heads // g, c, d) for c, g in zip(widths, GROUPS)],
                values=[rand(batch, heads // g, c, d) for c, g in zip(widths, GROUPS)])
    case["kv_held_pct"] = 100.0 * sum(k.numel() for k in case["keys"]) / case["k"].numel()
    return case


# ----------------------------------------------------------------------------------------------------------------
# Methods: (name, run(*inputs) -> out, inputs, reference(*fp32 inputs) -> out, compare valid rows only, K/V % held)
# ----------------------------------------------------------------------------------------------------------------
def core_methods(case: dict, shape: Shape, device, flex: bool) -> list[tuple]:
    causal, pos = shape.causal, case["positions"]
    n = len(GROUPS)
    routed_inputs = [case["q"], *case["keys"], *case["values"]]

    def routed(fn):
        return lambda q, *kv: fn(q, list(kv[:n]), list(kv[n:]), pos, GROUPS, causal)

    reference = routed(routed_attention_reference)
    held = case["kv_held_pct"]
    if flex:
        merge = al.FlexMerge(compiled=device.type == "cuda", static_positions=True)
        return [("FlexAttention per expert + LSE merge", routed(merge), routed_inputs, reference, True, held)]
    return [
        ("routed-KV Triton kernel", routed(lambda *a: routed_attention(*a, backend="triton")), routed_inputs,
         reference, True, held),
        ("dense flash SDPA", lambda q, k, v: al.flash_sdpa(q, k, v, causal), [case["q"], case["k"], case["v"]],
         lambda q, k, v: al.flash_sdpa(q, k, v, causal, math=True), False, 100.0),
        (f"GQA g={GQA_GROUP} (K/V repeated) + flash",
         lambda q, k, v: al.flash_sdpa(q, al.repeat_heads(k, GQA_GROUP), al.repeat_heads(v, GQA_GROUP), causal),
         [case["q"], case["k_gqa"], case["v_gqa"]],
         lambda q, k, v: al.flash_sdpa(q, al.repeat_heads(k, GQA_GROUP), al.repeat_heads(v, GQA_GROUP), causal,
                                       math=True), False, 100.0 / GQA_GROUP),
        ("scatter K/V to positions + flash", routed(al.scatter_to_position), routed_inputs, reference, True, held),
        ("expand-and-attend reference (fp32 softmax)", reference, routed_inputs, reference, True, held),
    ]


def layer_methods(shape: Shape, ratios, device, dtype, flex: bool) -> list[tuple]:
    mha = al.make_mha(shape.width, shape.heads, device, dtype)

    def routed(backend="triton", core=None):
        return al.RoutedLayer(al.make_routed(mha, shape.tower, GROUPS, ratios, backend), core)

    if flex:
        return [("RoutedKVAttention, FlexAttention core", routed(core=al.FlexMerge(device.type == "cuda", False)))]
    fixed = routed()
    fixed.fixed_routing = True  # its assignment is fixed from the first forward (see measure_layer)
    return [("dense layer: fused QKV + flash", al.DenseLayer(mha)),
            (f"GQA g={GQA_GROUP} layer + flash", al.GQALayer(mha, GQA_GROUP)),
            ("RoutedKVAttention, Triton kernel, routing", routed()),
            ("RoutedKVAttention, Triton kernel, routing fixed", fixed),
            ("RoutedKVAttention, scatter + flash core", routed(core=al.scatter_to_position)),
            ("RoutedKVAttention, expand-and-attend", routed(backend="torch"))]


# ----------------------------------------------------------------------------------------------------------------
# Checking and timing
# ----------------------------------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item() if b.numel() else 0.0


def grads_of(run, inputs, upstream, backward: bool, rows):
    """(output, input gradients) for the upstream gradient made by ``upstream(output)`` times the compared rows."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = run(*inputs)
    if not torch.is_tensor(upstream):
        upstream = upstream(out)
    # [B, L] rows -> the output's layout: [B, H, L, d] (cores) or [B, L, width] (layers).
    rows = rows[:, None, :, None] if out.dim() == 4 else rows[:, :, None]
    upstream = upstream * rows
    grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype)) if backward else []
    return out.detach() * rows, [g.detach() for g in grads], upstream


def check(run, inputs, reference, valid_only: bool, valid: torch.Tensor, backward: bool, tol: float) -> dict:
    """Output and input gradients vs an fp32 reference for one upstream gradient (zero on rows not compared)."""
    gen = torch.Generator().manual_seed(1)
    rows = valid if valid_only else torch.ones_like(valid)
    out, grads, upstream = grads_of(run, inputs, lambda o: torch.randn(o.shape, generator=gen).to(o.device),
                                    backward, rows)
    ref, ref_grads, _ = grads_of(reference, [t.float() for t in inputs], upstream.float(), backward, rows)
    out_err = rel_err(out, ref)
    grad_err = max((rel_err(g, r) for g, r in zip(grads, ref_grads)), default=None)
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    ok = finite and out_err <= tol and (grad_err is None or grad_err <= tol)
    return {"out_err": out_err, "grad_err": grad_err, "check": ("pass" if ok else "FAIL") + ("" if backward else
                                                                                               " (forward only)")}


def timings(run, inputs, device, args, backward: bool) -> dict:
    leaves = [t.detach().requires_grad_() for t in inputs]
    upstream = []

    def fwd():
        return run(*leaves)

    def step():
        out = fwd()
        if not upstream:
            upstream.append(torch.randn_like(out))
        torch.autograd.grad(out, leaves, upstream[0])

    if args.reps == 0:  # --reps 0: checks only (the dry run)
        return {}
    result = {"fwd_ms": time_ms(fwd, device, args.warmup, args.reps)}
    if backward:
        result["fwd_bwd_ms"] = time_ms(step, device, args.warmup, args.reps)
        result["peak_mb"] = peak_extra_mb(step, device)
    return result


def measure(results: Results, budget: Budget, base: dict, run, inputs, reference, valid_only, case, device, args):
    row = dict(base)
    if budget.left() <= 0:
        row["note"] = "skipped: time budget spent (raise --budget-s)"
        return results.add(row)
    # CPU FlexAttention has no backward; everything else is checked and timed forward and backward.
    backward = not (device.type == "cpu" and "Flex" in row["method"])
    try:
        with budget.guard():
            row.update(check(run, inputs, reference, valid_only, case["valid"], backward, TOL[args.dtype]))
            row.update(timings(run, inputs, device, args, backward))
    except BudgetExceeded:
        row["note"] = "stopped: time budget spent during this row (compile or timing)"
    except Exception as exc:  # report, do not abort the benchmark
        row["note"] = error_text(exc)
    return results.add(row)


def run_layer_method(name, layer, shape, case, device, args, results, budget, base):
    """Layers: input x [B, L, width]; routing fixed from a first forward where asked; reference = fp32 copy."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape.batch, shape.seq_len, shape.width, generator=gen).to(device, args.dtype)
    routed = isinstance(layer, al.RoutedLayer)
    extra = {"lengths": case["lengths"] if shape.tower == "text" else None} if routed else {}
    fix_routing = getattr(layer, "fixed_routing", False)

    def run(inp):
        if fix_routing and layer.layer.fixed_assignment is None:  # the first call routes, later calls reuse it
            with torch.no_grad():
                layer(inp, shape.causal, **extra)
            layer.layer.fixed_assignment = layer.layer.last_assignment
        return layer(inp, shape.causal, **extra)

    def reference(inp):
        assignment = getattr(layer.layer, "last_assignment", None) if routed else None
        return al.fp32_reference(layer, assignment)(inp, shape.causal, **extra)

    measure(results, budget, {**base, "method": name}, run, [x], reference, True, case, device, args)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def render(results: Results) -> list[str]:
    meta = results.meta
    lines = ["# Routed-KV attention benchmark", "", f"Device: {meta['device']}", ""]
    if meta.get("smoke"):
        lines += ["**CPU smoke run: the Triton kernel runs in the interpreter, so timings say nothing about speed; the "
                  "check column is the point.**", ""]
    groups: dict = {}
    for r in results.rows:
        groups.setdefault((r["level"], r["shape"], r["ratio"]), []).append(r)
    for (level, shape, ratio), rows in groups.items():
        base = next((r for r in rows if r["method"].startswith("dense")), {})
        lines += [f"## {level}: {shape}, ratio {ratio}, {rows[0]['detail']}", "",
                  "| method | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs dense | peak extra MB | K/V held % of dense "
                  "| out err | grad err | check | note |", "|" + "---|" * 10]
        for r in rows:
            speed = (base["fwd_bwd_ms"] / r["fwd_bwd_ms"]) if base.get("fwd_bwd_ms") and r.get("fwd_bwd_ms") else None
            lines.append(f"| {r['method']} | {fmt(r.get('fwd_ms'), 3)} | {fmt(r.get('fwd_bwd_ms'), 3)} | "
                         f"{fmt(speed)} | {fmt(r.get('peak_mb'), 0)} | {fmt(r.get('kv_held_pct'), 1)} | "
                         f"{fmt_err(r.get('out_err'))} | {fmt_err(r.get('grad_err'))} | {r.get('check', '-')} | "
                         f"{r.get('note', '')} |")
        lines.append("")
    if meta.get("smoke"):
        lines += ["## Targets", "", "Not evaluated: CPU smoke run (interpreter timings, tiny shapes).", ""]
    else:
        lines += targets(results.rows) + [""]
    lines += [f"- {n}" for n in results.notes]
    return lines


def fmt_err(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def _ms(rows, level, shape, ratio, prefix):
    row = next((r for r in rows if (r["level"], r["shape"], r["ratio"]) == (level, shape, ratio)
                and r["method"].startswith(prefix)), {})
    return row.get("fwd_bwd_ms"), row


def targets(rows: list[dict]) -> list[str]:
    """Issue 19's targets at 3:1:6 (forward+backward), from the measured rows."""
    out = ["## Targets (ratio 3:1:6, forward+backward)", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine, row = _ms(rows, "attention core", shape, "3:1:6", "routed-KV Triton")
        for label, prefix, goal, better in (("dense flash", "dense", 1.0, "<="), ("scatter + flash", "scatter", 1.0, "<"),
                                            ("FlexAttention merge", "Flex", 1 / 1.5, "<=")):
            other, _ = _ms(rows, "attention core", shape, "3:1:6", prefix)
            ratio = mine / other if mine and other else None
            met = None if ratio is None else (ratio <= goal if better == "<=" else ratio < goal)
            out.append(f"- {shape}: kernel time / {label} time = {fmt(ratio)} (target {better} {goal:.2f}): "
                       f"{'n/a' if met is None else 'met' if met else 'NOT met'}")
        if row:
            held = row.get("kv_held_pct")
            out.append(f"- {shape}: K/V held {fmt(held, 1)} % of dense (target <= 51 %): "
                       f"{'met' if held is not None and held <= 51.0 else 'NOT met'}")
        dense, _ = _ms(rows, "whole layer", shape, "3:1:6", "dense")
        routed, _ = _ms(rows, "whole layer", shape, "3:1:6", "RoutedKVAttention, Triton kernel, routing")
        speed = dense / routed if dense and routed else None
        out.append(f"- {shape}: whole layer speed-up vs dense = {fmt(speed)} (target >= 1.15 at the image shape)"
                   + ("" if speed is None else ": met" if speed >= 1.15 else ": NOT met"))
    return out


# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="folder for attention.json and attention.md")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, Triton in the interpreter")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 on GPU, float32 for --cpu-smoke")
    parser.add_argument("--shapes", default="image,text", help="comma list of: image, text")
    parser.add_argument("--ratios", default=None, help="comma list of: 3:1:6, 1:1:8 (smoke default: 3:1:6)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None, help="timed runs per figure (0: check only, no timing)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles are the slow part)")
    parser.add_argument("--quick", action="store_true", help="only the kernel, the model's layer with it, and the "
                        "dense baselines, no FlexAttention (what gpu_check.sh --dry-run runs)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="hard limit for the whole run, compiles "
                        "included; rows not finished are marked, and the process exits 20 s after it at the latest")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype or ("float32" if args.cpu_smoke else "bfloat16"))
    args.warmup = args.warmup if args.warmup is not None else (0 if args.cpu_smoke else 5)
    args.reps = args.reps if args.reps is not None else (1 if args.cpu_smoke else 20)
    default_ratios = "3:1:6" if args.cpu_smoke else "3:1:6,1:1:8"
    args.ratios = [r for r in (args.ratios or default_ratios).split(",") if r]
    args.shapes = [s for s in args.shapes.split(",") if s]
    bad = [r for r in args.ratios if r not in RATIOS] + [s for s in args.shapes if s not in GPU_SHAPES]
    if bad:
        parser.error(f"unknown ratio/shape {bad}; ratios: {list(RATIOS)}, shapes: {list(GPU_SHAPES)}")
    return args


def describe(device, dtype, args) -> str:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    return (f"{name}; torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, Python "
            f"{platform.python_version()}; {str(dtype).replace('torch.', '')}; median of {args.reps} runs after "
            f"{args.warmup} warm-up")


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    if args.cpu_smoke:
        device, shapes = torch.device("cpu"), SMOKE_SHAPES
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on an NVIDIA GPU, or use --cpu-smoke for the CPU interpreter check")
        device, shapes = torch.device("cuda"), GPU_SHAPES
        for knob in ("cache_size_limit", "recompile_limit"):  # one FlexAttention compile per expert shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
    meta = {"device": describe(device, args.dtype, args), "smoke": args.cpu_smoke, "budget_s": args.budget_s,
            "argv": sys.argv[1:] if argv is None else argv}
    results = Results(args.out_dir, "attention", meta, render)
    budget.start_watchdog(20.0, lambda: results.note("killed: the time budget ran out inside a step that did not "
                                                     "return to Python"))
    cases = {}
    for flex in ([False] if args.no_flex or args.quick else [False, True]):
        for level in ("attention core", "whole layer"):
            for key in args.shapes:
                shape = shapes[key]
                for ratio in args.ratios:
                    if (key, ratio) not in cases:
                        cases[(key, ratio)] = make_case(shape, RATIOS[ratio], device, args.dtype)
                    case = cases[(key, ratio)]
                    detail = (f"B={shape.batch}, L={shape.seq_len}, H={shape.heads}, d={shape.head_dim}, width "
                              f"{shape.width}, {'causal' if shape.causal else 'bidirectional'}, expert buffers "
                              f"{case['caps']}" + (f", mean text length {case['lengths'].float().mean():.1f}"
                                                   if shape.tower == "text" else ""))
                    base = {"level": level, "shape": shape.name, "ratio": ratio, "detail": detail}
                    print(f"{level} / {shape.name} / {ratio}{' / FlexAttention' if flex else ''}", flush=True)
                    run_level(level, shape, case, device, args, results, budget, base, flex)
    results.note(f"total wall time {budget.elapsed():.0f} s (budget {args.budget_s:.0f} s)")
    print(f"wrote {Path(args.out_dir) / 'attention.md'} ({budget.elapsed():.0f} s)")
    failed = [r["method"] for r in results.rows if r.get("check", "").startswith("FAIL")]
    if failed:
        print(f"gradient check FAILED for: {failed}", file=sys.stderr)
    return 1 if failed else 0


def run_level(level, shape, case, device, args, results, budget, base, flex: bool) -> None:
    try:
        if level == "attention core":
            for name, run, inputs, reference, valid_only, held in core_methods(case, shape, device, flex):
                if args.quick and name not in QUICK:
                    continue
                measure(results, budget, {**base, "method": name, "kv_held_pct": held}, run, inputs, reference,
                        valid_only, case, device, args)
        else:
            ratios = RATIOS[base["ratio"]]
            for name, layer in layer_methods(shape, ratios, device, args.dtype, flex):
                if args.quick and name not in QUICK:
                    continue
                run_layer_method(name, layer, shape, case, device, args, results, budget, base)
    except Exception as exc:  # building a method failed (e.g. no FlexAttention in this torch): say so, go on
        results.add({**base, "method": "(setup)", "note": error_text(exc)})
    finally:
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
