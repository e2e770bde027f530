"""The backbone tables' report parts: rows keyed by `backbone.attention.name` (each row its own backbone) get
zero-shot as a column, not a second row per row, and every converted tower gets its K/V budget (nominal, measured),
K/V bytes per token and FLOPs columns — numbers against hand computations from hand-made records."""

from __future__ import annotations

import numpy as np
import pytest

from flbench.experiment import config_hash
from flbench.results.record import result_config
from flbench.results.render import to_markdown
from flbench.results.tables import build_table

DENSE = {"kind": "dense", "layers": 3, "heads": 4, "head_dim": 32, "seq_len": 16, "kv_fraction": 1.0,
         "kv_fraction_realised": 1.0, "kv_bytes_per_token_per_layer": 512.0,
         "kv_bytes_per_token_per_layer_realised": 512.0, "kv_proj_flops_per_sequence": 3_145_728,
         "attention_flops_per_sequence": 208_896}
ROUTED = {**DENSE, "kind": "routed_kv", "kv_fraction": 0.5, "kv_fraction_realised": 0.515625,
          "kv_bytes_per_token_per_layer": 256.25, "kv_bytes_per_token_per_layer_realised": 264.25,
          "kv_proj_flops_per_sequence": 1_658_880}
ZEROSHOT = {"dense": {0: 70.0, 1: 70.0}, "routed_316": {0: 68.0, 1: 71.0}}
COOP = {"dense": {0: 72.0, 1: 74.0}, "routed_316": {0: 70.0, 1: 73.0}}


def record(name: str, seed: int) -> dict:
    config = {"seed": seed, "algorithm": {"name": "coop"}, "scenario": {"name": "global"},
              "backbone": {"name": "tiny", "attention": {"name": name, "kind": name.split("_")[0]}}}
    text = dict(DENSE) if name == "dense" else {**ROUTED, "kv_fraction_measured": 0.52 + 0.01 * seed,
                                                "kv_bytes_per_token_per_layer_measured": 266.0 + seed}
    return {"config": config, "config_hash": config_hash(result_config(config)), "seed": seed,
            "metrics": {"global": {"best_val": COOP[name][seed], "last": 0.0, "best_val_round": 1}},
            "zeroshot": {"global": ZEROSHOT[name][seed]},
            "costs": {"trainable_params": 512, "attention": {"text": text}}, "complete": True}


@pytest.fixture
def table():
    records = [record(name, seed) for name in ("dense", "routed_316") for seed in (0, 1)]
    return build_table(records, rows=["backbone.attention.name"], metrics=["global"])


def test_zero_shot_is_a_column_beside_each_attention_row(table):
    assert table.rows == [("dense",), ("routed_316",)]  # no "(zero-shot)" rows
    for name in ("dense", "routed_316"):
        zs = table.value([name], "zero-shot · global")
        assert zs.mean == pytest.approx(np.mean(list(ZEROSHOT[name].values())))
        assert table.value([name], "global").mean == pytest.approx(np.mean(list(COOP[name].values())))
    assert table.value(["routed_316"], "zero-shot · global").std == pytest.approx(np.std([68.0, 71.0], ddof=1))
    assert table.value(["dense"], "zero-shot · global").constant  # identical over seeds: no ±


def test_converted_towers_get_budget_bytes_and_flops_columns(table):
    routed, dense = ["routed_316"], ["dense"]
    assert table.value(routed, "text KV % nominal").mean == pytest.approx(50.0)
    assert table.value(routed, "text KV % measured").mean == pytest.approx(100 * np.mean([0.52, 0.53]))
    assert table.value(dense, "text KV % measured").mean == pytest.approx(100.0)  # dense stores its nominal K/V
    assert table.value(routed, "text KV bytes / token").mean == pytest.approx(3 * 266.5)
    assert table.value(dense, "text KV bytes / token").mean == pytest.approx(3 * 512.0)
    assert table.value(routed, "text K/V-proj MFLOPs / seq").mean == pytest.approx(1.65888)
    assert table.value(dense, "text attention MFLOPs / seq").mean == pytest.approx(0.208896)
    markdown = to_markdown(table)
    assert "| attention | zero-shot · Global | Global |" in markdown
    assert "routed-KV 3:1:6, calibrated" in markdown and "n = 2 seeds" in markdown
    assert not any(c.label.startswith("vision") for c in table.columns)  # no converted image tower here


def test_a_seed_key_that_follows_the_runs_seed_is_part_of_the_seed():
    """`calibration.seed: ${seed}` resolves to each run's seed: the seeds of one row, not a mixed folder; a seed key
    that does not follow the run's seed still is."""
    from flbench.results.tables import ReportError

    def seeded(name: str, seed: int, calibration_seed: int) -> dict:
        r = record(name, seed)
        r["config"]["backbone"]["attention"]["calibration"] = {"seed": calibration_seed}
        r["config_hash"] = config_hash(result_config(r["config"]))
        return r

    follows = [seeded(name, seed, seed) for name in ("dense", "routed_316") for seed in (0, 1)]
    assert build_table(follows, rows=["backbone.attention.name"], metrics=["global"]).rows == [("dense",),
                                                                                             ("routed_316",)]
    fixed = [seeded("routed_316", 0, 0), seeded("routed_316", 1, 7)]
    with pytest.raises(ReportError, match="calibration.seed"):
        build_table(fixed, rows=["backbone.attention.name"], metrics=["global"])

def test_the_whole_model_kv_column_appears_only_beside_two_converted_towers(table):
    labels = [c.label for c in table.columns]
    assert "KV bytes %" not in labels, "one converted tower: its nominal and measured columns are the budget"
    both = []
    for name in ("dense", "routed_316"):
        for seed in (0, 1):
            r = record(name, seed)
            r["costs"]["attention"]["vision"] = dict(r["costs"]["attention"]["text"])
            both.append(r)
    labels = [c.label for c in build_table(both, rows=["backbone.attention.name"], metrics=["global"]).columns]
    assert "KV bytes %" in labels and "text KV % nominal" in labels and "vision KV % nominal" in labels
