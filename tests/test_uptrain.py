"""Equal uptraining (backbones/uptrain.py): only the converted layers' K/V projections (and routers) move, GQA and
routed-KV get the same recipe, the result is cached per (weights, settings, recipe) and read back as plain data, and
a record names the uptrained weights."""

from __future__ import annotations

import pytest
import torch

import flbench.backbones.conversion as conversion
from flbench.backbones.attention import attention_settings, swap_attention, swapped_modules
from flbench.backbones.conversion import apply_attention, uptrain_cache_path
from flbench.backbones.uptrain import uptrain, uptrained_parameters
from flbench.errors import ConfigError, DataFileError
from helpers import random_tiny

RECIPE = dict(steps=3, batch_size=16, lr=1e-2, warmup=1, images=96, seed=0)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("attention", [{"kind": "gqa"}, {"kind": "routed_kv"}])
def test_uptraining_moves_only_the_kv_rows_and_routers(tmp_path, monkeypatch, attention):
    monkeypatch.setattr(conversion, "cache_dir", lambda override=None: tmp_path)
    backbone = random_tiny("tiny")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    fingerprint = backbone.fingerprint()
    cfg = {"attention": {**attention, "towers": ["text"], "uptrain": RECIPE}}
    apply_attention(backbone, cfg)
    after = backbone.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    width = 128
    for layer_index in range(3):
        name = f"transformer.resblocks.{layer_index}.attn.in_proj_weight"
        assert name in moved
        assert torch.equal(after[name][:width], before[name][:width])  # the Q rows never move
        assert not torch.equal(after[name][width:], before[name][width:])
    allowed = {f"transformer.resblocks.{i}.attn.in_proj_{p}" for i in range(3) for p in ("weight", "bias")}
    assert moved <= allowed  # out_proj, MLPs, norms, embeddings, the image tower and the logit scale stay
    if attention["kind"] == "routed_kv":  # the routers train too (straight-through gate and aux loss)
        fresh = swap_attention(random_tiny("tiny").model, {**attention, "towers": ["text"]}).state_dict()
        routers = [k for k in after if ".router." in k]
        assert routers and all(not torch.equal(after[k], fresh[k]) for k in routers)
    assert all(not p.requires_grad for p in backbone.parameters())
    assert backbone.fingerprint() != fingerprint  # records name the uptrained weights
    assert backbone.build_fingerprint() == fingerprint  # ... and the build they were converted from
    report = sorted(tmp_path.glob("uptrained/*.json"))
    assert len(report) == 1 and '"steps": 3' in report[0].read_text()


def test_gqa_and_routed_kv_get_the_same_recipe_and_separate_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(conversion, "cache_dir", lambda override=None: tmp_path)
    recipes = []
    real = conversion.uptrain
    monkeypatch.setattr(conversion, "uptrain", lambda backbone, settings: recipes.append(dict(settings)) or
                        real(backbone, settings))
    paths = []
    for kind in ("gqa", "routed_kv"):
        backbone = random_tiny("tiny")
        cfg = {"attention": {"kind": kind, "towers": ["text"], "uptrain": RECIPE}}
        paths.append(uptrain_cache_path(backbone, cfg))
        apply_attention(backbone, cfg)
    assert recipes[0] == recipes[1] == RECIPE
    assert paths[0] != paths[1] and all(p.exists() for p in paths)


def test_uptrained_weights_are_cached_and_a_corrupt_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(conversion, "cache_dir", lambda override=None: tmp_path)
    cfg = {"attention": {"kind": "routed_kv", "towers": ["text"], "uptrain": RECIPE}}
    first = apply_attention(random_tiny("tiny"), cfg)

    def fail(*args, **kwargs):
        raise AssertionError("uptrained again although the result is cached")

    monkeypatch.setattr(conversion, "uptrain", fail)
    second = apply_attention(random_tiny("tiny"), cfg)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                 second.model.state_dict().values()))
    path = next(tmp_path.glob("uptrained/*.pt"))
    torch.save({"something": torch.zeros(2)}, path)  # a readable file that is not this model's tensors
    with pytest.raises(DataFileError, match=rf"{path} does not hold this model's tensors; delete it"):
        apply_attention(random_tiny("tiny"), cfg)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(DataFileError, match=rf"{path} is not a plain-data file"):
        apply_attention(random_tiny("tiny"), cfg)


def test_uptrained_parameters_are_the_swapped_projections_and_routers():
    backbone = random_tiny("tiny-vit")
    swap_attention(backbone.model, {"kind": "routed_kv"})
    names = set(uptrained_parameters(backbone))
    assert len(names) == len(swapped_modules(backbone.model)) * 4  # in_proj weight, bias, router weight, bias
    assert all(".attn.in_proj_" in n or ".attn.router." in n for n in names)


def test_a_study_can_freeze_the_routers_and_choose_the_objective():
    backbone = random_tiny("tiny")
    swap_attention(backbone.model, {"kind": "routed_kv", "towers": ["text"]})
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    calls = []

    def objective(model, images, tokens, vision_trains):
        calls.append(vision_trains)
        return model.encode_text_embeddings(model.token_embeddings(tokens), tokens.argmax(-1)).square().mean()

    settings = attention_settings({"kind": "routed_kv", "uptrain": RECIPE})["uptrain"]
    report = uptrain(backbone, settings, objective=objective, train_routers=False)
    after = backbone.model.state_dict()
    assert len(calls) == RECIPE["steps"] + 2 and not any(calls)  # every step, and the held-out loss before/after
    assert set(report["before"]) == {"loss"}
    assert all(torch.equal(after[k], before[k]) for k in after if ".router." in k)
    assert not torch.equal(after["transformer.resblocks.0.attn.in_proj_weight"],
                           before["transformer.resblocks.0.attn.in_proj_weight"])


def test_a_study_can_choose_the_caption_templates():
    backbone = random_tiny("tiny")
    swap_attention(backbone.model, {"kind": "gqa", "towers": ["text"]})
    seen = []

    def objective(model, images, tokens, vision_trains):
        seen.append(tokens)
        return model.encode_text_embeddings(model.token_embeddings(tokens), tokens.argmax(-1)).square().mean()

    settings = attention_settings({"kind": "gqa", "uptrain": RECIPE})["uptrain"]
    uptrain(backbone, settings, objective=objective, captions={d: ("zebra {} zebra",) for d in ("photo", "sketch",
                                                                                                  "cartoon")})
    zebra = int(backbone.tokenize(["zebra"])[0, 1])
    assert all(bool((batch[:, 1] == zebra).all()) for batch in seen)  # every caption, held out and trained on


def test_dense_cannot_be_uptrained():
    with pytest.raises(ConfigError, match="uptrain.steps"):
        apply_attention(random_tiny("tiny"), {"attention": {"kind": "dense", "uptrain": {"steps": 5}}})
