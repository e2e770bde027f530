"""Bucketing class prompts by length (issue 17): one text-tower call trimmed to the longest prompt against one call
per distinct prompt length (each trimmed to its own length; exact row by row), CoOp's text forward + backward.
Run through `python benchmarks/fl_round.py bucket --models tiny,vit_b16 --repeats 20`."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from fl_process import load1


def measure_buckets(model_name: str, repeats: int) -> dict[str, Any]:
    """One CoOp text pass (forward + backward to the context) over a benchmark's class prompts: one call trimmed to
    the longest prompt, against one call per prompt length (each trimmed to its own length; exact row by row)."""
    import open_clip
    import torch

    from flbench.algorithms.prompting import TextPrompt, init_context
    from flbench.backbones import clip, tiny
    from flbench.datasets.synthetic import FAMILIES

    torch.manual_seed(0)
    if model_name == "vit_b16":
        backbone, family = clip.FrozenCLIP(open_clip.create_model("ViT-B-16", pretrained=None), "ViT-B-16"), "patterns"
    else:
        backbone, family = clip.FrozenCLIP(open_clip.CLIP(**tiny.TINY_CONFIGS["tiny"]), "tiny"), "shapes"
    prompt = TextPrompt(backbone, FAMILIES[family].classnames, 4)
    ctx = init_context(backbone, 4, "a photo of a").requires_grad_(True)
    eot = prompt.eot()
    buckets = [torch.nonzero(eot == length).flatten() for length in torch.unique(eot)]

    def one_call() -> None:
        backbone.encode_text_embeddings(prompt.assemble(ctx), eot).square().sum().backward()

    def bucketed() -> None:
        embeddings = prompt.assemble(ctx)
        parts = [backbone.encode_text_embeddings(embeddings[rows], eot[rows]) for rows in buckets]
        torch.cat(parts).square().sum().backward()  # row order differs; the loss does not care

    times: dict[str, list[float]] = {"one call": [], "bucketed": []}
    for _ in range(repeats + 1):  # the first pair warms up
        for name, fn in (("one call", one_call), ("bucketed", bucketed)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    tokens = {"one call": len(eot) * int(eot.max() + 1), "bucketed": int((eot + 1).sum())}
    return {name: {"median_ms": 1e3 * statistics.median(t[1:]), "tokens": tokens[name], "calls": calls}
            for (name, t), calls in zip(times.items(), (1, len(buckets)))}


def bench_bucket(base: list[str], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"load before": load1()}
    for model_name in args.models:
        result = measure_buckets(model_name, args.repeats)
        for name, figures in result.items():
            out[f"{model_name} {name}"] = (f"{figures['median_ms']:.1f} ms, {figures['calls']} call(s), "
                                           f"{figures['tokens']} token positions")
        out[f"{model_name}: bucketed / one call"] = result["bucketed"]["median_ms"] / result["one call"]["median_ms"]
    out["load after"] = load1()
    return out
