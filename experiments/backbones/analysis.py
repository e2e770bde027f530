"""Zero-shot probes of converted tiny CLIPs on the synthetic suite's validation and test splits — the evidence behind
docs/backbones.md's choices (oracle rows, ratio selection), and the check of issue 16's findings.

    FLBENCH_CACHE=.cache/flbench python experiments/backbones/analysis.py findings [--backbone tiny]
    FLBENCH_CACHE=.cache/flbench python experiments/backbones/analysis.py validation --backbone tiny-vit --towers vision

`findings`: dense, GQA and routed-KV 3:1:6 with fresh routers and routed *by the oracle itself* (each oracle-rows
variant), zero-shot 64-way accuracy on val and test, and which tokens of "a photo of a <class>." prompts get full K/V
under each oracle, per layer. `validation`: the routed variants of the table, training-free with calibrated routers,
on the validation split only (ratio and calibration selection never look at test).
Accuracy is computed here directly (image features, hand-written template, argmax), independently of the engine.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=4)
def _data(backbone_name: str) -> tuple[Any, str]:
    """(scenario, zero-shot template) of the default experiment on `backbone_name` (no method, no federation)."""
    from flbench.cli import compose
    from flbench.backbones.weights import backbone_image_size
    from flbench.datasets import load_dataset
    from flbench.scenarios import build_scenario

    cfg = compose([f"backbone={backbone_name}"], job_name="backbones_analysis")
    bundle = load_dataset(cfg["dataset"], image_size=backbone_image_size(cfg["backbone"]))
    scenario = build_scenario(cfg["scenario"]["name"], bundle,
                              {k: v for k, v in cfg["scenario"].items() if k != "name"}, dataset_cfg=cfg["dataset"])
    return scenario, bundle.templates[0]


@torch.no_grad()
def zero_shot(backbone: Any, split: Any, template: str, batch: int = 512) -> float:
    from flbench.backbones.clip import normalize

    text = normalize(backbone.encode_text([template.format(c) for c in split.classnames]))
    correct = 0
    for start in range(0, len(split.labels), batch):
        idx = np.arange(start, min(start + batch, len(split.labels)))
        image = normalize(backbone.encode_image(split.images.load(idx)))
        correct += int(((image @ text.T).argmax(-1).numpy() == split.labels[idx]).sum())
    return 100.0 * correct / len(split.labels)


WEIGHTS: str | None = None  # --weights: a tiny CLIP state dict to probe instead of the current build


def _backbone(name: str, attention: dict | None) -> Any:
    from flbench.backbones.build import load_backbone

    if WEIGHTS is None:
        return load_backbone({"name": name, **({"attention": attention} if attention else {})})
    import open_clip

    from flbench.backbones.clip import FrozenCLIP
    from flbench.backbones.conversion import apply_attention
    from flbench.backbones.tiny import TINY_CONFIGS
    from flbench.io import load_torch_data

    model = open_clip.CLIP(**TINY_CONFIGS[name])
    model.load_state_dict(load_torch_data(WEIGHTS, what="tiny CLIP weights", fix="pass another --weights file"))
    backbone = FrozenCLIP(model, name)
    return apply_attention(backbone, {"attention": attention}) if attention else backbone


def _scores(backbone: Any, scenario: Any, template: str) -> dict[str, float]:
    return {"val": round(zero_shot(backbone, scenario.val["global"], template), 2),
            "test": round(zero_shot(backbone, scenario.test["global"], template), 2)}


def _full_kv_shares(backbone: Any, template: str, classnames: list[str]) -> dict[str, list[float]]:
    """Per layer: share of start tokens / class-name tokens routed to the full-K/V expert."""
    from flbench.backbones.routed_kv import routed_layers

    prefix = len(backbone.tokenize([template.split("{}")[0].strip()])[0].nonzero()) - 1  # SOT + prefix words
    tokens = backbone.tokenize([template.format(c) for c in classnames])
    eot = tokens.argmax(-1)
    backbone.encode_text_embeddings(backbone.token_embeddings(tokens[:, :int(eot.max()) + 1]), eot)
    out: dict[str, list[float]] = {"start": [], "class name": []}
    for layer in routed_layers(backbone.model, "text"):
        full = layer.last_assignment == 0
        positions = torch.arange(full.shape[1])[None, :]
        name = (positions >= prefix) & (positions < (eot - 1)[:, None])  # between the prefix and the final "."
        out["start"].append(round(float(full[:, 0].float().mean()), 2))
        out["class name"].append(round(float(full[name].float().mean()), 2))
    return out


def findings(name: str) -> dict[str, Any]:
    from flbench.backbones.routed_kv import routed_layers

    scenario, template = _data(name)
    rows: dict[str, Any] = {"dense": _scores(_backbone(name, None), scenario, template),
                            "gqa g=2": _scores(_backbone(name, {"kind": "gqa", "towers": ["text"]}), scenario,
                                               template)}
    routed = _backbone(name, {"kind": "routed_kv", "towers": ["text"]})
    rows["routed 3:1:6, fresh routers"] = _scores(routed, scenario, template)
    rows["full-K/V share, fresh routers"] = _full_kv_shares(routed, template, scenario.test["global"].classnames)
    for oracle_rows in ("all", "pooled"):
        for layer in routed_layers(routed.model):
            layer.oracle, layer.oracle_rows = "route", oracle_rows
        rows[f"routed 3:1:6 by the oracle ({oracle_rows} rows)"] = _scores(routed, scenario, template)
        rows[f"full-K/V share, oracle ({oracle_rows} rows)"] = _full_kv_shares(routed, template,
                                                                              scenario.test["global"].classnames)
    for layer in routed_layers(routed.model):
        layer.oracle = None
    return rows


VARIANTS = {"3:1:6": [3, 1, 6], "1:1:2": [1, 1, 2], "1:6:2": [1, 6, 2], "1:1:8": [1, 1, 8]}


def validation(name: str, towers: list[str], oracle_rows: list[str], ratios: list[str]) -> dict[str, Any]:
    """Training-free calibrated routed-KV, per ratio and oracle-rows setting: zero-shot on validation only."""
    scenario, template = _data(name)
    out: dict[str, Any] = {}
    for rows in oracle_rows:
        for label in ratios:
            attention = {"kind": "routed_kv", "towers": towers, "ratios": VARIANTS[label], "routers": "calibrated",
                         "calibration": {"oracle_rows": rows}}
            backbone = _backbone(name, attention)
            out[f"{label} {rows}"] = round(zero_shot(backbone, scenario.val["global"], template), 2)
            print(f"{label} oracle_rows={rows}: val {out[f'{label} {rows}']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["findings", "validation"])
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--towers", nargs="+", default=["text"])
    parser.add_argument("--oracle-rows", nargs="+", default=["pooled", "rollout", "all"])
    parser.add_argument("--ratios", nargs="+", default=list(VARIANTS))
    parser.add_argument("--weights", help="a tiny CLIP state dict (e.g. an earlier build) instead of the current one")
    args = parser.parse_args()
    global WEIGHTS
    WEIGHTS = args.weights
    from flbench.cli import setup_logging

    setup_logging(False)
    result = findings(args.backbone) if args.what == "findings" else \
        validation(args.backbone, args.towers, args.oracle_rows, args.ratios)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
