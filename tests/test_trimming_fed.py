"""Text-length trimming seen from outside the text tower: routed-KV attention gets the same real tokens (same
assignments, same capacities, same outputs and router gradients), pretraining's text pass equals open_clip's own
forward, and a federated run's record metrics, and its config hash, are the same with trimming, prefix sharing and
packing (tests/test_prefix.py) on and off.
Tolerance as tests/test_trimming.py (5e-5 of the largest magnitude: fp32 rounding of differently shaped kernels)."""

import open_clip
import pytest
import torch

from flbench.algorithms.base import build_method
from flbench.backbones.attention import swap_attention, swapped_modules
from flbench.backbones.tiny import TINY_CONFIGS
from flbench.backbones.text import encode_tokens, prefix_sharing, text_packing, text_trimming
from flbench.run import run
from helpers import compose_config, random_tiny

CLASSES = ["red circle", "blue square with a long name", "star"]
TOL = 5e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_routed_kv_sees_the_same_real_tokens_and_gives_the_same_outputs_trimmed():
    backbone = random_tiny("tiny")
    swap_attention(backbone.model, {"kind": "routed_kv", "ratios": [1, 1, 2]})
    layers = swapped_modules(backbone.model)
    for layer in layers:
        layer.router.requires_grad_(True)  # trainable routers: straight-through and aux-loss gradients too
    coop = build_method("coop", backbone, CLASSES, ["a photo of a {}."], {})
    eot = coop.prompt.eot()
    runs = {}
    for trim in (True, False):
        with text_trimming(trim):
            backbone.model.zero_grad()
            features = coop.text_features()
            features.pow(2).sum().backward()
        runs[trim] = (features.detach(), [layer.last_assignment for layer in layers],
                      [layer.router.weight.grad.clone() for layer in layers])
    (f_t, assign_t, grad_t), (f_u, assign_u, grad_u) = runs[True], runs[False]
    length = int(eot.max()) + 1
    assert length < backbone.context_length
    for a_t, a_u in zip(assign_t, assign_u):
        assert a_t.shape[1] == length and a_u.shape[1] == backbone.context_length
        assert torch.equal(a_t, a_u[:, :length]), "the same real tokens in the same experts"
        assert (a_u[:, length:] == -1).all(), "what trimming drops was padding, in no expert"
        assert torch.equal((a_t >= 0).sum(1), eot + 1)
    assert _close(f_t, f_u) <= TOL
    assert all(_close(a, b) <= TOL for a, b in zip(grad_t, grad_u))


def test_pretraining_text_pass_equals_open_clip_forward():
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CONFIGS["tiny"])
    tokens = open_clip.SimpleTokenizer(context_length=16)(["a sketch of a red circle.", "star", "a flat moon."])
    with torch.no_grad():
        ours = encode_tokens(model, tokens)
        assert _close(ours, model.encode_text(tokens)) <= TOL
        with text_trimming(False):
            assert torch.equal(encode_tokens(model, tokens), model.encode_text(tokens))
        model.text_pool_type = "last"  # reads the last position, which trimming would drop: not trimmed
        assert torch.equal(encode_tokens(model, tokens), model.encode_text(tokens))


def test_a_federated_run_records_the_same_metrics_and_hash_with_and_without_the_text_shortcuts(tmp_path):
    records = {}
    for trim in (True, False):
        with text_trimming(trim), prefix_sharing(trim), text_packing(trim):
            records[trim] = run(compose_config(["num_rounds=1"], results_dir=tmp_path / str(trim)))
    on, off = records[True], records[False]
    assert on["config_hash"] == off["config_hash"], "the switch is no part of the config"
    rows_on, rows_off = on["history"], off["history"]
    assert [sorted(r) for r in rows_on] == [sorted(r) for r in rows_off] and len(rows_on) == 2
    for a, b in zip(rows_on, rows_off):
        for key, value in a.items():
            if key == "time_s":
                continue
            if "loss" in key:  # a mean of fp32 losses: equal to rounding (measured: 1e-8 relative)
                assert value == pytest.approx(b[key], rel=TOL), key
            else:  # accuracies (counts of correct predictions), sampling, failures: identical
                assert value == b[key], key
    assert on["metrics"] == off["metrics"] and on["zeroshot"] == off["zeroshot"]
