"""Where a cached round's training time goes (issue 18): the text tower's attention cores and MLPs against the rest
of each local step, sequential (`backend.cohort_size=1`) and as cohorts. Run through

    python benchmarks/fl_round.py phases --backbone tiny --repeats 4 --rounds 4

Each call of `F.scaled_dot_product_attention` in the training steps' text pass (flbench/backbones/text.py) and of
every text block's MLP is wrapped in an autograd function that times its forward and, separately, its backward
(the wrapped call's own graph, run by `torch.autograd.grad`). The wrapping adds per-call work, so the rounds are
slower than unwrapped ones (the script reports both the wrapped round and the share of each phase in it);
"other" is the rest of `engine._gradients`: prompt construction, QKV and output projections, layer norms, packing,
the loss and autograd's own work. Evaluation and the optimiser step are outside `_gradients`.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any

from fl_process import COHORT, load1, paired


def _timed_call_class(totals: dict[str, float]) -> Any:
    import torch

    class Timed(torch.autograd.Function):
        """fn(*inputs), its forward and backward timed into `totals` under key."""

        @staticmethod
        def forward(ctx: Any, key: str, fn: Any, *inputs: Any) -> Any:
            started = time.perf_counter()
            with torch.enable_grad():
                leaves = [i.detach().requires_grad_(i.requires_grad) for i in inputs]
                out = fn(*leaves)
            totals[f"{key} forward"] += time.perf_counter() - started
            ctx.key, ctx.leaves, ctx.out = key, leaves, out
            return out.detach()

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            started = time.perf_counter()
            wanted = [leaf for leaf in ctx.leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(ctx.out, wanted, grad))
            totals[f"{ctx.key} backward"] += time.perf_counter() - started
            return (None, None, *[next(grads) if leaf.requires_grad else None for leaf in ctx.leaves])

    return Timed


def _instrument(totals: dict[str, float], blocks: Any) -> None:
    import torch

    import flbench.backbones.text as text
    import flbench.engine as engine

    Timed = _timed_call_class(totals)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attention(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        if args or set(kwargs) - {"attn_mask"} or not torch.is_grad_enabled():
            return sdpa(q, k, v, *args, **kwargs)
        return Timed.apply("attention", lambda a, b, c: sdpa(a, b, c, **kwargs), q, k, v)

    text.F.scaled_dot_product_attention = attention  # text.py's F is torch.nn.functional: every caller sees it
    for block in blocks:
        plain = block.mlp.forward
        block.mlp.forward = (lambda x, plain=plain: Timed.apply("mlp", plain, x)
                             if torch.is_grad_enabled() else plain(x))
    gradients = engine._gradients

    def timed_gradients(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return gradients(*args, **kwargs)
        finally:
            totals["steps"] += time.perf_counter() - started

    engine._gradients = timed_gradients


def measure_phases(variant: str, overrides: list[str]) -> dict[str, Any]:
    """One warm-up federation, then one timed one (both in this process, caches filled): seconds per round of each
    phase."""
    import tempfile

    from flbench.cli import compose
    from flbench.experiment import _PROCESS_EXPERIMENTS
    from flbench.run import run

    totals: dict[str, float] = collections.defaultdict(float)
    with tempfile.TemporaryDirectory(prefix="flbench-bench-") as results:
        warm = [o for o in overrides if not o.startswith("num_rounds=")]
        run(compose([*warm, *COHORT[variant], "num_rounds=1", f"results_dir={results}/warm"], job_name="bench"))
        experiment = next(iter(_PROCESS_EXPERIMENTS.values()))
        _instrument(totals, experiment.backbone.model.transformer.resblocks)
        totals.clear()
        record = run(compose([*overrides, *COHORT[variant], f"results_dir={results}/timed"], job_name="bench"))
    stamps = [row["time_s"] for row in record["history"]]
    rounds = len(stamps) - 1
    per_round = {key: value / rounds for key, value in totals.items()}
    timed = sum(v for k, v in per_round.items() if k != "steps")
    per_round["other"] = per_round["steps"] - timed
    return {"round_s": [b - a for a, b in zip(stamps, stamps[1:])], "phases_s": per_round, "history": []}


def bench_phases(base: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """`base`: the run overrides (fl_round.py's COMMON and backbone ones)."""
    overrides = [*base, f"num_rounds={args.rounds}"]
    out: dict[str, Any] = {"load before": load1()}
    runs = paired(overrides, args.repeats, args.threads, {v: (v, {}) for v in COHORT}, "_phases")
    medians = {}
    for variant, variant_runs in runs.items():
        keys = variant_runs[0]["phases_s"]
        medians[variant] = {k: statistics.median(r["phases_s"][k] for r in variant_runs) for k in keys}
        wrapped = statistics.median(statistics.median(r["round_s"]) for r in variant_runs)
        out[f"{variant}: wrapped round"] = f"{wrapped:.3f} s"
        for key, value in sorted(medians[variant].items()):
            out[f"{variant}: {key}"] = f"{value:.3f} s/round ({value / wrapped:.0%} of the wrapped round)"
    for key in medians["cohort"]:
        out[f"sequential / cohort: {key}"] = medians["sequential"][key] / max(medians["cohort"][key], 1e-12)
    out["load after"] = load1()
    return out
