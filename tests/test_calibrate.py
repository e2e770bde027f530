"""Router calibration (backbones/calibration.py, python -m flbench.calibrate): the oracle is weighted by the query
rows that reach the pooled output, distillation moves the routers toward it, the routers are cached per backbone
weights and layout, a run with routers=calibrated loads them, and a corrupt cache is one line naming the file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flbench.backbones.conversion as conversion
from flbench.backbones.attention import attention_settings, router_parameters, swap_attention
from flbench.backbones.build import load_backbone
from flbench.backbones.calibration import calibrate, calibration_prompts, oracle_targets, set_rollout_relevance
from flbench.backbones.conversion import apply_attention
from flbench.backbones.routed_kv import routed_layers
from flbench.datasets.synthetic import CAPTIONS, DOMAIN_PHRASE, FAMILIES
from flbench.errors import ConfigError, DataFileError
from helpers import random_tiny

SMALL = dict(steps=12, batch_size=16, lr=0.01, images=128, seed=0)
TINY = {"name": "tiny", "pretrain": {"steps": 40, "batch_size": 64, "corpus": 2048, "warmup": 5}}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibration_moves_routed_model_toward_dense_in_both_towers():
    backbone = random_tiny("tiny-vit")
    cfg = {"attention": {"kind": "routed_kv", "calibration": SMALL}}
    apply_attention(backbone, cfg)
    initial = {k: v.clone() for k, v in router_parameters(backbone.model).items()}
    report = calibrate(backbone, attention_settings(cfg["attention"])["calibration"])
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


def test_oracle_weighs_only_the_pooled_row_by_default():
    """Text: the end-of-text row of each prompt; vision: the CLS row. The benefit equals the pooling error the
    pooled row sees, written out here from the definition (one layer, one head group)."""
    backbone = random_tiny("tiny-vit")
    swap_attention(backbone.model, {"kind": "routed_kv"})
    text_layer, vision_layer = routed_layers(backbone.model, "text")[0], routed_layers(backbone.model, "vision")[0]
    n = torch.tensor([5, 9])
    valid = torch.arange(12)[None, :] < n[:, None]
    relevance = text_layer.oracle_relevance(valid, n)
    assert torch.equal(relevance, F.one_hot(n - 1, 12).float())
    assert torch.equal(vision_layer.oracle_relevance(torch.ones(2, 12, dtype=torch.bool), torch.tensor([12, 12])),
                       F.one_hot(torch.zeros(2, dtype=torch.long), 12).float())

    x = torch.randn(2, 12, 128, generator=torch.Generator().manual_seed(0))
    benefit = text_layer.oracle_benefit(x, valid, causal=True, relevance=relevance)
    # By hand, full K/V (g=1) vs g=4 for the EOT row of row 0 (position 4): Σ_h p_h,4,j (‖Δv‖² + (q·Δk/√d)²).
    w, b = text_layer.in_proj_weight, text_layer.in_proj_bias
    d, heads = 32, 4
    q, k, v = (F.linear(x[0, :5], w[i * 128:(i + 1) * 128], b[i * 128:(i + 1) * 128]).view(5, heads, d)
               for i in range(3))
    k4, v4 = k.mean(1, keepdim=True), v.mean(1, keepdim=True)
    expected = torch.zeros(5)
    for h in range(heads):
        p = torch.softmax(q[4, h] @ k[:, h].T / d ** 0.5, dim=-1)  # row 4 sees positions 0..4 (causal)
        expected += p * ((v[:, h] - v4[:, 0]).pow(2).sum(-1) + ((k[:, h] - k4[:, 0]) @ q[4, h] / d ** 0.5) ** 2)
    assert torch.allclose(benefit[0, :5, 0], expected, rtol=1e-4, atol=1e-6)
    assert benefit[0, 5:].abs().max() == 0  # padding receives nothing


def test_rollout_relevance_starts_at_the_pooled_row_and_spreads_backwards():
    backbone = random_tiny("tiny-vit")
    swap_attention(backbone.model, {"kind": "routed_kv"})
    tokens = backbone.tokenize(["a photo of a red circle.", "blue"])
    images = torch.rand(2, 3, 32, 32)
    with oracle_targets(backbone, "rollout"):
        set_rollout_relevance(backbone, images, tokens)
        for tower in ("text", "vision"):
            layers = routed_layers(backbone.model, tower)
            last, first = layers[-1].query_relevance, layers[0].query_relevance
            assert torch.allclose(last.sum(-1), torch.ones(2)) and torch.allclose(first.sum(-1), torch.ones(2))
            assert (last > 0).sum() == 2  # one pooled row per image / prompt
            assert ((first > 0).sum(-1) > 1).all()  # earlier layers: the rows the pooled row reads from
        eot = tokens.argmax(-1)
        text_first = routed_layers(backbone.model, "text")[0].query_relevance
        assert (text_first[1, eot[1] + 1:] == 0).all()  # nothing after a prompt's end is relevant
        with torch.no_grad():
            backbone.encode_text_embeddings(backbone.token_embeddings(tokens), eot)
        assert all(m.last_oracle_loss is not None for m in routed_layers(backbone.model, "text"))


def test_routers_are_cached_per_layout_and_loaded_by_a_run(tmp_path, monkeypatch):
    monkeypatch.setattr(conversion, "cache_dir", lambda override=None: tmp_path)
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

    monkeypatch.setattr(conversion, "calibrate", fail)
    fresh = random_tiny("tiny")
    fresh.model.load_state_dict(backbone.model.state_dict(), strict=False)
    swap_attention(fresh.model, {"kind": "routed_kv"})
    again = conversion.calibrated_routers(fresh, cfg)
    assert all(torch.equal(again[k], cached[k]) for k in cached)
    # Another budget, another oracle: other cache entries.
    for change in ({"ratios": [1, 1, 8]}, {"calibration": {**SMALL, "oracle_rows": "all"}},
                   {"calibration": {**SMALL, "prompts": "template+captions"}}):
        other = {**cfg, "attention": {**cfg["attention"], **change}}
        assert conversion.router_cache_path(fresh, other) != conversion.router_cache_path(fresh, cfg)
    # `prompts` came after these caches: at its default (the prompts calibration always used) a config hashes to the
    # files it did before the key existed, for the routers and for uptrainings that start from them.
    uptrained = {**cfg, "attention": {**cfg["attention"], "uptrain": {"steps": 5}}}
    now = [conversion.router_cache_path(fresh, cfg), conversion.uptrain_cache_path(fresh, uptrained)]

    def settings_before_the_key(attention):
        settings = attention_settings(attention)
        settings["calibration"].pop("prompts")
        return settings

    with monkeypatch.context() as patch:
        patch.setattr(conversion, "attention_settings", settings_before_the_key)
        assert [conversion.router_cache_path(fresh, cfg), conversion.uptrain_cache_path(fresh, uptrained)] == now

    # A corrupt cache file: one line naming it and what to do, never a silent recalibration.
    files[0].write_bytes(b"not a torch file")
    with pytest.raises(DataFileError, match=rf"{files[0]}.*delete it") as error:
        conversion.calibrated_routers(fresh, cfg)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("nested", ["calibration", "uptrain"])
def test_nested_attention_settings_refuse_unknown_keys(nested):
    with pytest.raises(ConfigError, match=rf"backbone.attention.{nested} has unknown keys \['stpes'\]"):
        attention_settings({"kind": "routed_kv", nested: {"stpes": 3}})
    with pytest.raises(ConfigError, match=rf"backbone.attention.{nested}.steps"):
        attention_settings({"kind": "routed_kv", nested: {"steps": "many"}})
    with pytest.raises(ConfigError, match="oracle_rows"):
        attention_settings({"kind": "routed_kv", "calibration": {"oracle_rows": "eot"}})
    with pytest.raises(ConfigError, match=r"calibration.prompts='captions' must be one of \['template', "):
        attention_settings({"kind": "routed_kv", "calibration": {"prompts": "captions"}})


def test_calibration_prompts_can_add_the_corpus_captions():
    names = [name for family in FAMILIES.values() for name in family.classnames]
    suite = {f"a {phrase} of a {name}." for phrase in DOMAIN_PHRASE.values() for name in names}
    corpus = {template.format(name) for templates in CAPTIONS.values() for template in templates for name in names}
    assert set(calibration_prompts()) == suite and len(calibration_prompts()) == len(suite)
    both = calibration_prompts("template+captions")
    assert set(both) == suite | corpus and len(both) == len(set(both))  # each distinct prompt once
    assert "a shaded blue star." in both and "blue star" in both
    # calibrate reads them: its held-out batch (the first prompts) differs, and so does the loss on it.
    backbone = random_tiny("tiny")
    apply_attention(backbone, {"attention": {"kind": "routed_kv"}})
    before = {prompts: calibrate(backbone, attention_settings({"kind": "routed_kv", "calibration": {
        **SMALL, "steps": 0, "prompts": prompts}})["calibration"])["before"]["distillation_loss"]
              for prompts in ("template", "template+captions")}
    assert before["template"] != before["template+captions"]
