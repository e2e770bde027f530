"""Benchmark routed-KV (mixSGA) attention: the Triton kernel vs dense flash SDPA, expand-and-attend, FlexAttention.

GPU (NVIDIA, bf16, < 5 minutes on an H100; needs only torch, triton and this repository):

    python benchmarks/attention.py --out docs/attention_gpu.md

CPU smoke test (tiny shapes, Triton CPU interpreter; checks every method against the reference, timings meaningless):

    python benchmarks/attention.py --cpu-smoke --out /tmp/attention_smoke.md

Attention core: ViT-B/16 image tower (B=256, L=197, H=12, d=64, bidirectional) and text tower (B=512, L=77, H=8,
d=64, causal); expert ratios 3:1:6 and 1:1:8 with group sizes (1, 2, 4): expert e holds ceil(rho_e * L) tokens (the
last takes the rest), drawn at random per sample and kept in position order. Whole layer: Q/K/V/O projections +
attention at width 768, dense (fused QKV + flash SDPA) vs routed-KV (compact per-expert K/V projections with weights
pooled over each group of g heads, applied only to that expert's tokens, + the kernel).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import statistics
import sys
import time
import warnings

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first Triton call

import torch
import torch.nn.functional as F

try:
    import flbench.kernels  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flbench.kernels import routed_attention, routed_attention_reference

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = create_block_mask = None

GROUPS = (1, 2, 4)
RATIOS = {"3:1:6": (0.3, 0.1, 0.6), "1:1:8": (0.1, 0.1, 0.8)}
GPU_SHAPES = {"image (ViT-B/16)": (256, 197, 12, 64, False), "text (ViT-B/16)": (512, 77, 8, 64, True)}
SMOKE_SHAPES = {"image-like (tiny)": (2, 37, 4, 32, False), "text-like (tiny)": (2, 23, 4, 32, True)}


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def capacities(seq_len: int, ratios: tuple[float, ...]) -> list[int]:
    caps = []
    for r in ratios[:-1]:
        caps.append(min(math.ceil(r * seq_len - 1e-9), seq_len - sum(caps)))
    return caps + [seq_len - sum(caps)]


def make_case(batch, seq_len, heads, head_dim, ratios, device, dtype, seed=0):
    """Dense q/k/v plus the routed layout of the same tokens: compact K/V per expert and their positions.

    ``perm[b]`` lists the tokens grouped by expert (each group in position order), so ``positions[e]`` is its slice.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    caps = capacities(seq_len, ratios)
    perm = torch.stack([torch.randperm(seq_len, generator=gen) for _ in range(batch)])
    bounds = [0, *torch.tensor(caps).cumsum(0).tolist()]
    perm = torch.cat([perm[:, a:b].sort(dim=1).values for a, b in zip(bounds[:-1], bounds[1:])], dim=1).to(device)
    positions = [perm[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    dev_gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=dev_gen, device=device).to(dtype)

    q, k, v = (rand(batch, heads, seq_len, head_dim) for _ in range(3))
    keys = [rand(batch, heads // g, c, head_dim) for c, g in zip(caps, GROUPS)]
    values = [rand(batch, heads // g, c, head_dim) for c, g in zip(caps, GROUPS)]
    return dict(q=q, k=k, v=v, keys=keys, values=values, positions=positions, caps=caps, perm=perm)


# ----------------------------------------------------------------------------------------------------------------
# Methods (each takes q, K/V, and returns [B, H, L, d])
# ----------------------------------------------------------------------------------------------------------------
def dense_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def expand_sdpa(q, keys, values, positions, causal):
    """Expand-and-attend with a fused kernel: expanded bf16 K/V and a boolean mask through SDPA."""
    k = torch.cat([t.repeat_interleave(g, dim=1) for t, g in zip(keys, GROUPS)], dim=2)
    v = torch.cat([t.repeat_interleave(g, dim=1) for t, g in zip(values, GROUPS)], dim=2)
    pos = torch.cat(positions, dim=1)
    mask = (pos >= 0)[:, None, None, :]
    if causal:
        mask = mask & (pos[:, None, None, :] <= torch.arange(q.shape[2], device=q.device)[None, None, :, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FlexMerge:
    """One FlexAttention call per expert (GQA over its compact heads), outputs merged by log-sum-exp."""

    def __init__(self, case, causal, compile_flex):
        self.fn = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention
        self.aux = "return_aux" in inspect.signature(flex_attention).parameters
        seq_len, batch = case["q"].shape[2], case["q"].shape[0]
        self.masks = []
        for pos in case["positions"]:
            cap = pos.shape[1]

            def mask_mod(b, h, q_idx, kv_idx, pos=pos, cap=cap):
                p = pos[b, torch.clamp(kv_idx, max=cap - 1)]  # clamp: kernels may probe past the last slot
                ok = (kv_idx < cap) & (p >= 0)
                return ok & (p <= q_idx) if causal else ok

            self.masks.append(create_block_mask(mask_mod, batch, None, seq_len, cap, device=pos.device))

    def __call__(self, q, keys, values):
        if q.device.type == "cpu" and not torch.is_grad_enabled():  # CPU flex refuses inputs that require grad
            q, keys, values = q.detach(), [k.detach() for k in keys], [v.detach() for v in values]
        outs, lses = [], []
        for k, v, mask in zip(keys, values, self.masks):
            if self.aux:
                from torch.nn.attention.flex_attention import AuxRequest

                out, aux = self.fn(q, k, v, block_mask=mask, enable_gqa=True, return_aux=AuxRequest(lse=True))
                lse = aux.lse
            else:
                out, lse = self.fn(q, k, v, block_mask=mask, enable_gqa=True, return_lse=True)
            outs.append(out)
            lses.append(lse)
        lse = torch.stack(lses)
        weights = torch.exp(lse - torch.logsumexp(lse, dim=0)).nan_to_num(0.0)  # [E, B, H, L]
        return (weights[..., None] * torch.stack(outs).float()).sum(0).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mb(fn, device):
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def fwd_bwd(fn, inputs):
    grad = []  # the upstream gradient, made once so its fill is not timed

    def step():
        out = fn()
        if not grad:
            grad.append(torch.randn_like(out))
        torch.autograd.grad(out, inputs, grad[0])

    return step


def fmt_mb(x):
    return f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def fmt(x, digits=2):
    if isinstance(x, str):
        return x
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------------------------------------------
# Attention-core benchmark
# ----------------------------------------------------------------------------------------------------------------
def attention_methods(case, causal, device, with_flex):
    """(name, forward thunk or error text, grad inputs, K/V bytes read (fwd, ideal), K/V bytes held, comparable)."""
    q, keys, values, positions = case["q"], case["keys"], case["values"], case["positions"]
    elt = q.element_size()
    dense_kv = 2 * case["k"].numel() * elt
    compact_kv = 2 * sum(k.numel() for k in keys) * elt
    routed_inputs = [q, *keys, *values]
    if with_flex:
        name = "FlexAttention per expert + LSE merge"
        if flex_attention is None:
            return [(name, "torch.nn.attention.flex_attention unavailable", None, compact_kv, compact_kv, True)]
        try:
            flex = FlexMerge(case, causal, compile_flex=device.type == "cuda")
        except Exception as exc:  # report, do not abort the whole benchmark
            return [(name, error_text(exc), None, compact_kv, compact_kv, True)]
        return [(name, lambda: flex(q, keys, values), routed_inputs, compact_kv, compact_kv, True)]
    return [
        ("routed-KV Triton kernel (this)",
         lambda: routed_attention(q, keys, values, positions, GROUPS, causal, backend="triton"),
         routed_inputs, compact_kv, compact_kv, True),
        ("dense SDPA (flash)", lambda: dense_flash(q, case["k"], case["v"], causal),
         [q, case["k"], case["v"]], dense_kv, dense_kv, False),
        # The reference expands to fp32: it writes and reads fp32 K/V of the dense size.
        ("expand-and-attend (reference, fp32 softmax)",
         lambda: routed_attention_reference(q, keys, values, positions, GROUPS, causal),
         routed_inputs, compact_kv + 2 * dense_kv * 4 // elt, compact_kv + dense_kv * 4 // elt, True),
        ("expand + SDPA (bool mask)", lambda: expand_sdpa(q, keys, values, positions, causal),
         routed_inputs, compact_kv + 2 * dense_kv, compact_kv + dense_kv, True),
    ]


def error_text(exc):
    return f"error: {type(exc).__name__}: {exc}"[:160].replace("\n", " ").replace("|", "/")


def measure(method, case, causal, args, device, deadline):
    name, thunk, inputs, kv_read, kv_held, comparable = method
    batch, heads, seq_len, head_dim = case["q"].shape
    dense_kv = 2 * case["k"].numel() * case["k"].element_size()
    pairs = seq_len * (seq_len + 1) / 2 if causal else seq_len * seq_len
    flops_fwd = 4 * batch * heads * pairs * head_dim  # useful work, the same for every method
    flops_fwd_bwd = 3.5 * flops_fwd  # backward = 2.5 x forward (recompute S, dV, dP, dQ, dK)
    row = {"method": name, "kv_read": kv_read / 2**20, "kv_held": kv_held / 2**20,
           "kv_held_pct": 100.0 * kv_held / dense_kv}
    if isinstance(thunk, str):
        row["note"] = thunk
        return row
    if time.monotonic() > deadline:
        row["note"] = "skipped: time budget exhausted (raise --budget-s)"
        return row
    # Forward as in training (autograd on, which is also the graph FlexAttention compiles once); the CPU smoke
    # run uses no autograd for forwards, as CPU FlexAttention refuses inputs that require grad.
    grad_fwd = device.type == "cuda"
    try:
        with torch.set_grad_enabled(grad_fwd):
            out = thunk()
        if comparable:
            row["err"] = (out.detach().float() - case["ref_out"].float()).abs().max().item()
        del out
        with torch.set_grad_enabled(grad_fwd):
            row["fwd_ms"] = time_ms(thunk, device, args.warmup, args.reps)
        row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
    except Exception as exc:
        row["note"] = error_text(exc)
        return row
    try:  # separately, so a method without a backward (FlexAttention on CPU) still reports its forward
        step = fwd_bwd(thunk, inputs)
        row["fwd_bwd_ms"] = time_ms(step, device, args.warmup, args.reps)
        row["fwd_bwd_tflops"] = flops_fwd_bwd / row["fwd_bwd_ms"] / 1e9
        row["peak_mb"] = peak_extra_mb(step, device)
    except Exception as exc:
        row["note"] = error_text(exc)
    return row


def attention_table(rows):
    head = ("| method | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | K/V MB read (fwd, ideal) | "
            "K/V MB held (% dense) | peak extra MB (fwd+bwd) | max abs err vs reference | note |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['method']} | {fmt(r.get('fwd_ms'), 3)} | {fmt(r.get('fwd_bwd_ms'), 3)} | "
            f"{fmt(r.get('fwd_tflops'), 1)} | {fmt(r.get('fwd_bwd_tflops'), 1)} | {fmt_mb(r['kv_read'])} | "
            f"{fmt_mb(r['kv_held'])} ({r['kv_held_pct']:.0f} %) | {fmt(r.get('peak_mb'), 0)} | "
            f"{f'{err:.1e}' if (err := r.get('err')) is not None else '-'} | {r.get('note', '')} |"
        )
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Whole attention layer (projections + attention)
# ----------------------------------------------------------------------------------------------------------------
class DenseLayer(torch.nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x, causal):
        batch, seq_len, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = dense_flash(q, k, v, causal)
        return self.proj(out.transpose(1, 2).reshape(batch, seq_len, width))


class RoutedLayer(torch.nn.Module):
    """Routed-KV layer: full Q; per expert, K/V projected from its tokens only, with head-pooled weights."""

    def __init__(self, width, heads, backend):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q, self.kv, self.proj = (torch.nn.Linear(width, n * width) for n in (1, 2, 1))

    def forward(self, x, causal, perm, caps, positions):
        batch, seq_len, width = x.shape
        head_dim = width // self.heads
        q = self.q(x).view(batch, seq_len, self.heads, head_dim).transpose(1, 2)
        # Tokens grouped by expert (one gather), then each expert's slice goes through its pooled K/V weights.
        grouped = x.gather(1, perm[..., None].expand(-1, -1, width)).split(caps, dim=1)
        w = self.kv.weight.view(2, self.heads, head_dim, width)
        b = self.kv.bias.view(2, self.heads, head_dim)
        keys, values = [], []
        for tokens, g in zip(grouped, GROUPS):
            kv_heads = self.heads // g
            w_e = w.view(2, kv_heads, g, head_dim, width).mean(2).reshape(2 * kv_heads * head_dim, width)
            b_e = b.view(2, kv_heads, g, head_dim).mean(2).reshape(-1)
            kv = F.linear(tokens, w_e, b_e).view(batch, tokens.shape[1], 2, kv_heads, head_dim)
            keys.append(kv[:, :, 0].transpose(1, 2))
            values.append(kv[:, :, 1].transpose(1, 2))
        out = routed_attention(q, keys, values, positions, GROUPS, causal, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, seq_len, width))


def layer_rows(shape, ratios, width, args, device, dtype, deadline):
    batch, seq_len, heads, _, causal = shape
    case = make_case(batch, seq_len, heads, width // heads, ratios, device, dtype, seed=1)
    torch.manual_seed(0)  # same input and weights on every run
    x = torch.randn(batch, seq_len, width, device=device, dtype=dtype, requires_grad=True)
    dense = DenseLayer(width, heads).to(device, dtype)
    routed = RoutedLayer(width, heads, "triton").to(device, dtype)
    reference = RoutedLayer(width, heads, "torch").to(device, dtype)
    reference.load_state_dict(routed.state_dict())
    routed_args = (causal, case["perm"], case["caps"], case["positions"])
    layers = [("dense layer (fused QKV + flash SDPA)", dense, (causal,)),
              ("routed-KV layer (compact K/V projections + Triton kernel)", routed, routed_args),
              ("routed-KV layer (compact K/V projections + expand-and-attend)", reference, routed_args)]
    rows, base = [], None
    # Kernel layer vs expand-and-attend layer with the same weights: output and every gradient.
    try:
        outs, grads = [], []
        for layer in (routed, reference):
            out = layer(x, *routed_args)
            outs.append(out.detach().float())
            grads.append([g.float() for g in torch.autograd.grad(out, [x, *layer.parameters()], torch.ones_like(out))])
        check = (outs[0] - outs[1]).abs().max().item()
        check_grad = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(*grads))
        check_text = (f"output max abs difference {check:.2e}; gradients (input and all weights) max difference "
                      f"relative to their largest magnitude {check_grad:.2e}.")
        del outs, grads, out
    except Exception as exc:
        check_text = error_text(exc)
    for name, layer, extra in layers:
        row = {"method": name}
        if time.monotonic() > deadline:
            row["note"] = "skipped: time budget exhausted"
            rows.append(row)
            continue
        try:
            inputs = [x, *layer.parameters()]
            row["fwd_ms"] = time_ms(lambda: layer(x, *extra), device, args.warmup, args.reps)
            row["fwd_bwd_ms"] = time_ms(fwd_bwd(lambda: layer(x, *extra), inputs), device, args.warmup, args.reps)
            base = row["fwd_bwd_ms"] if layer is dense else base
            row["speedup"] = base / row["fwd_bwd_ms"] if base else None
        except Exception as exc:
            row["note"] = error_text(exc)
        rows.append(row)
    lines = ["| layer | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs dense | note |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {fmt(r.get('fwd_ms'), 3)} | {fmt(r.get('fwd_bwd_ms'), 3)} | "
                     f"{fmt(r.get('speedup'), 2)} | {r.get('note', '')} |")
    lines.append(f"\nRouted layer, Triton kernel vs expand-and-attend, same weights: {check_text}")
    return rows, lines


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="markdown file to write the tables to")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 on GPU, float32 for --cpu-smoke")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="skip the timings not yet started after this many seconds (FlexAttention goes last)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

    if args.cpu_smoke:
        device, dtype, shapes, width = torch.device("cpu"), getattr(torch, args.dtype or "float32"), SMOKE_SHAPES, 128
        args.warmup, args.reps = args.warmup or 1, args.reps or 3
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on an NVIDIA GPU, or use --cpu-smoke for the CPU interpreter check")
        device, dtype, shapes, width = torch.device("cuda"), getattr(torch, args.dtype or "bfloat16"), GPU_SHAPES, 768
        args.warmup, args.reps = args.warmup or 5, args.reps or 20
        if hasattr(torch, "_dynamo"):  # one FlexAttention compile per expert shape: raise the recompile limit
            for knob in ("cache_size_limit", "recompile_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 64)

    import triton

    env = (f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (Triton interpreter)'}; "
           f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
           f"Python {platform.python_version()}; dtype {str(dtype).replace('torch.', '')}; "
           f"median of {args.reps} runs after {args.warmup} warm-up")
    lines = ["# Routed-KV attention benchmark", "", f"Device: {env}", ""]
    if args.cpu_smoke:
        lines += ["**CPU smoke run: the Triton kernel runs in the interpreter, so timings say nothing about speed; "
                  "the error column is the check.**", ""]
    # Order: kernel and baselines for every case, then the whole layer, then FlexAttention (its compiles are the
    # slowest part, so if the time budget runs out it is what gets skipped).
    cases, summary = {}, {}
    for shape_name, (batch, seq_len, heads, head_dim, causal) in shapes.items():
        for ratio_name, ratios in RATIOS.items():
            case = make_case(batch, seq_len, heads, head_dim, ratios, device, dtype)
            for t in [case["q"], case["k"], case["v"], *case["keys"], *case["values"]]:
                t.requires_grad_(True)
            with torch.no_grad():
                case["ref_out"] = routed_attention_reference(case["q"], case["keys"], case["values"],
                                                             case["positions"], GROUPS, causal)
            key = (shape_name, ratio_name)
            cases[key] = (case, causal)
            print(f"{shape_name} {ratio_name}: kernel and baselines", flush=True)
            summary[key] = [measure(m, case, causal, args, device, deadline)
                            for m in attention_methods(case, causal, device, with_flex=False)]
    layer_shape = next(iter(shapes.values()))
    layer_lines, layer_summary = [], {}
    for ratio_name, ratios in RATIOS.items():
        print(f"whole layer {ratio_name}", flush=True)
        layer_summary[ratio_name], table = layer_rows(layer_shape, ratios, width, args, device, dtype, deadline)
        layer_lines += [f"## Whole attention layer, width {width}, {next(iter(shapes))} shape, ratio {ratio_name}",
                        "", *table, ""]
    for key in sorted(cases, key=lambda k: k[1] != "3:1:6"):  # the target ratio first
        case, causal = cases[key]
        print(f"{key[0]} {key[1]}: FlexAttention", flush=True)
        summary[key] += [measure(m, case, causal, args, device, deadline)
                         for m in attention_methods(case, causal, device, with_flex=True)]
    for (shape_name, ratio_name), rows in summary.items():
        case, causal = cases[(shape_name, ratio_name)]
        batch, heads, seq_len, head_dim = case["q"].shape
        lines += [f"## {shape_name}: B={batch}, L={seq_len}, H={heads}, d={head_dim}, "
                  f"{'causal' if causal else 'bidirectional'}, ratio {ratio_name}, capacities {case['caps']}",
                  "", *attention_table(rows), ""]
    lines += layer_lines
    if not args.cpu_smoke:
        lines += [*targets(summary, layer_summary), ""]
    lines.append(f"Total wall time: {time.monotonic() - started:.0f} s.")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out} ({time.monotonic() - started:.0f} s)")


def targets(summary, layer_summary):
    """Issue 7's targets at ratio 3:1:6, computed from the measured rows (forward+backward)."""
    out = ["## Targets (ratio 3:1:6, forward+backward)", ""]
    for (shape_name, ratio_name), rows in summary.items():
        if ratio_name != "3:1:6":
            continue
        by = {r["method"].split(" (")[0]: r for r in rows}
        mine = by["routed-KV Triton kernel"].get("fwd_bwd_ms")
        parts = []
        for label, key in (("dense flash", "dense SDPA"), ("expand-and-attend", "expand-and-attend"),
                           ("FlexAttention merge", "FlexAttention per expert + LSE merge")):
            other = by.get(key, {}).get("fwd_bwd_ms")
            parts.append(f"{other / mine:.2f}x vs {label}" if mine and other else f"n/a vs {label}")
        held = by["routed-KV Triton kernel"]["kv_held_pct"]
        out.append(f"- {shape_name}: kernel speed-up {', '.join(parts)}; K/V held {held:.0f} % of dense "
                   "(targets: >= 1.0x dense, >= 3x expand, >= 1.5x Flex, 50 %)")
    layer = [r for r in layer_summary.get("3:1:6", []) if "Triton kernel" in r["method"]]
    speedup = layer[0].get("speedup") if layer else None
    out.append(f"- whole layer: routed-KV with the kernel {fmt(speedup, 2)}x vs dense (target: >= 1.2x)")
    return out


if __name__ == "__main__":
    main()
