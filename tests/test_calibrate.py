"""Router calibration (python -m flbench.calibrate): distillation toward the dense model lowers the gap, the routers
are cached per backbone weights and layout, and a run with routers=calibrated loads them."""

from __future__ import annotations

import pytest
import torch

import flbench.calibrate as calibration
from flbench.backbones.attention import apply_attention, router_parameters, swap_attention
from flbench.backbones.clip import load_backbone
from helpers import random_tiny

SMALL = dict(steps=12, batch_size=16, lr=0.01, images=128, seed=0)
TINY = {"name": "tiny", "pretrain": {"steps": 40, "batch_size": 64, "corpus": 2048, "warmup": 5}}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibration_moves_routed_model_toward_dense_in_both_towers():
    backbone = random_tiny("tiny-vit")
    cfg = {"attention": {"kind": "routed_kv", "calibration": SMALL}}
    apply_attention(backbone, cfg)
    initial = {k: v.clone() for k, v in router_parameters(backbone.model).items()}
    report = calibration.calibrate(backbone, cfg)
    before, after = report["before"], report["after"]
    # On held-out images and prompts the routers imitate the oracle routing better (on a random model the
    # distillation loss itself is too noisy to test in a dozen steps; docs/backbones.md measures it on real ones).
    assert after["oracle_loss"] < before["oracle_loss"], report
    assert before["distillation_loss"] > 0 and after["distillation_loss"] > 0
    assert {"text/agreement", "vision/agreement"} <= set(after)
    trained = router_parameters(backbone.model)
    assert all(not p.requires_grad for p in trained.values())  # frozen again afterwards
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    # Only routers were trained: the pretrained weights are untouched (the teacher is the model itself).
    assert all(not p.requires_grad for p in backbone.parameters())


def test_routers_are_cached_per_layout_and_loaded_by_a_run(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "cache_dir", lambda override=None: tmp_path)
    cfg = {**TINY, "attention": {"kind": "routed_kv", "routers": "calibrated", "calibration": SMALL}}
    backbone = load_backbone(cfg)  # calibrates once (text tower: the tiny ResNet CLIP has no vision routers)
    files = sorted(tmp_path.glob("routers/*.pt"))
    assert len(files) == 1 and files[0].with_suffix(".json").exists()
    cached = torch.load(files[0], weights_only=True)
    loaded = router_parameters(backbone.model)
    assert set(cached) == set(loaded) and all(torch.equal(cached[k], loaded[k]) for k in cached)

    # Same weights and layout: read from the cache, never recalibrated.
    def fail(*args, **kwargs):
        raise AssertionError("calibrated again although the routers are cached")

    monkeypatch.setattr(calibration, "calibrate", fail)
    fresh = random_tiny("tiny")
    fresh.model.load_state_dict(backbone.model.state_dict(), strict=False)
    swap_attention(fresh.model, {"kind": "routed_kv"})
    again = calibration.calibrated_routers(fresh, cfg)
    assert all(torch.equal(again[k], cached[k]) for k in cached)
    # Another budget is another cache entry.
    other = {**cfg, "attention": {**cfg["attention"], "ratios": [1, 1, 8]}}
    assert calibration.router_cache_path(fresh, other) != calibration.router_cache_path(fresh, cfg)
