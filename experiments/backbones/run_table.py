"""The table of docs/backbones.md: dense vs GQA vs routed-KV (mixSGA) attention under federated CoOp.

    FLBENCH_CACHE=.cache/flbench python experiments/backbones/run_table.py [--rounds 5] [--seeds 0]

For each backbone (tiny: the ResNet image tower stays dense, only the text tower is swapped; tiny-vit: both towers)
and each attention variant, one run of the default experiment (CoOp under FedAvg, 10 clients by rendering domain,
synthetic suite) through `flbench.run.run`, exactly as `python -m flbench` would run it, with fewer rounds to keep
the cost affordable on a shared CPU. Every record holds the zero-shot baseline on the same backbone and splits, so
each row gives zero-shot and CoOp accuracy plus the RunRecord's attention cost figures. Routers marked "calibrated"
are trained once by `python -m flbench.calibrate` settings (cached); the calibration reports are tabulated too.
Records are skipped when they exist (rerunning the script only rebuilds the table).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

VARIANTS: list[tuple[str, list[str]]] = [
    ("dense", []),
    ("gqa g=2", ["+backbone/attention=gqa"]),
    ("routed_kv 3:1:6 (init)", ["+backbone/attention=routed_kv"]),
    ("routed_kv 3:1:6 (calibrated)", ["+backbone/attention=routed_kv", "backbone.attention.routers=calibrated"]),
    ("routed_kv 1:1:8 (init)", ["+backbone/attention=routed_kv", "backbone.attention.ratios=[1,1,8]"]),
    ("routed_kv 1:1:8 (calibrated)", ["+backbone/attention=routed_kv", "backbone.attention.ratios=[1,1,8]",
                                      "backbone.attention.routers=calibrated"]),
]
# Where the loss comes from on the ViT: the same budgets in the image tower only (the text tower stays dense).
VISION_ONLY: list[tuple[str, list[str]]] = [
    ("gqa g=2, image tower only", ["+backbone/attention=gqa", "backbone.attention.towers=[vision]"]),
    ("routed_kv 3:1:6 (calibrated), image tower only", ["+backbone/attention=routed_kv",
                                                        "backbone.attention.towers=[vision]",
                                                        "backbone.attention.routers=calibrated"]),
]
BACKBONES = ["tiny", "tiny-vit"]


def compose(overrides: list[str]) -> dict[str, Any]:
    from flbench.cli import compose as compose_config

    return compose_config(overrides, job_name="backbones_table")


def _tower(costs: dict[str, Any], tower: str, key: str, scale: float = 1.0, digits: int = 1) -> str:
    if tower not in costs:
        return "–"
    value = costs[tower][key] * scale
    return f"{value:.{digits}f}" if digits else f"{value:.0f}"


def row(backbone: str, variant: str, records: list[dict[str, Any]]) -> str:
    import numpy as np

    costs = records[0]["costs"]["attention"]
    zero = [r["zeroshot"]["global"] for r in records]
    coop = [r["metrics"]["global"]["last"] for r in records]
    noisy = [r["metrics"]["domain/noisy"]["last"] for r in records]
    fmt = (lambda v: f"{np.mean(v):.1f}" if len(v) == 1 else f"{np.mean(v):.1f} ± {np.std(v):.1f}")
    vision_seq = costs.get("vision", {}).get("seq_len", 0)
    cells = [
        backbone, variant,
        f"{_tower(costs, 'text', 'kv_fraction_realised', 100)} / "
        f"{_tower(costs, 'vision', 'kv_fraction_realised', 100)}",
        f"{_tower(costs, 'text', 'kv_bytes_per_token_per_layer_realised')} / "
        f"{_tower(costs, 'vision', 'kv_bytes_per_token_per_layer_realised')}",
        f"{_tower(costs, 'text', 'kv_proj_flops_per_sequence', 1e-6, 2)} / "
        f"{_tower(costs, 'vision', 'kv_proj_flops_per_sequence', 1e-6, 2)}",
        f"{_tower(costs, 'text', 'attention_flops_per_sequence', 1e-6, 2)} / "
        f"{_tower(costs, 'vision', 'attention_flops_per_sequence', 1e-6, 2) if vision_seq else '–'}",
        fmt(zero), fmt(coop), fmt(noisy),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| backbone | attention | KV % of dense (text / vision) | KV bytes per token per layer (text / vision) "
          "| K/V-projection MFLOPs per sequence (text / vision) | attention MFLOPs per sequence (text / vision) "
          "| zero-shot global | CoOp global | CoOp noisy (unseen domain) |\n|---|---|---|---|---|---|---|---|---|")


def calibration_rows(cache: Path, weights: set[str]) -> list[str]:
    """One row per cached calibration report of the backbones that ran (`<name>-<weights SHA-1>-<layout>.json`)."""
    rows = []
    reports = [r for r in sorted((cache / "routers").glob("*.json")) if r.stem.rsplit("-", 1)[0] in weights]
    for report in reports:
        data = json.loads(report.read_text())
        b, a = data["before"], data["after"]
        agreement = lambda d: " / ".join(f"{d[k]:.2f}" for k in ("text/agreement", "vision/agreement") if k in d)
        if "layout" not in data:
            continue
        label = f"{data['backbone']} {':'.join(f'{r:g}' for r in data['layout']['ratios'])}"
        if len(data["layout"]["towers"]) == 1:
            label += f" ({data['layout']['towers'][0]} only)"
        rows.append(f"| {label} | {b['distillation_loss']:.3f} → {a['distillation_loss']:.3f} | "
                    f"{b.get('oracle_loss', float('nan')):.2f} → {a.get('oracle_loss', float('nan')):.2f} | "
                    f"{agreement(b)} → {agreement(a)} | {data['seconds']:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="FL rounds per run (the default experiment has 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--backbones", nargs="+", default=BACKBONES)
    parser.add_argument("--results", default=str(ROOT / "results" / "backbones"))
    parser.add_argument("--out", default=str(Path(__file__).with_name("table.md")))
    args = parser.parse_args()

    import torch

    from flbench.cli import setup_logging
    from flbench.io import cache_dir
    from flbench.run import run

    setup_logging(False)
    log = logging.getLogger("flbench")
    lines = [HEADER]
    run_seconds = 0.0
    weights: set[str] = set()
    for backbone in args.backbones:
        for name, overrides in VARIANTS + (VISION_ONLY if backbone == "tiny-vit" else []):
            records = []
            for seed in args.seeds:
                cfg = compose([f"backbone={backbone}", *overrides, f"num_rounds={args.rounds}", f"seed={seed}",
                               "logger.mode=disabled", f"results_dir={args.results}"])
                t0 = time.perf_counter()
                records.append(run(cfg))
                weights.add(f"{backbone}-{records[-1]['backbone']['weights_sha1']}")
                run_seconds += records[-1]["costs"]["wall_time_s"]
                log.info("== %s / %s / seed %d: zero-shot %.1f, CoOp %.1f (%.0f s)", backbone, name, seed,
                         records[-1]["zeroshot"]["global"], records[-1]["metrics"]["global"]["last"],
                         time.perf_counter() - t0)
            lines.append(row(backbone, name, records))
    lines += ["", "Router calibration (held-out batch; distillation loss, router CE toward the oracle routing, "
              "argmax/expert-choice agreement text / vision; seconds):", "",
              "| routers | distillation loss | oracle CE | agreement | s |", "|---|---|---|---|---|",
              *calibration_rows(cache_dir(), weights)]
    lines += ["", f"{args.rounds} rounds, seeds {args.seeds}, torch threads {torch.get_num_threads()}; the runs' wall "
              f"times add up to {run_seconds:.0f} s (from the records; 2-core CPU: wall time is not a benchmark)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
