"""Attention swapping (dense | gqa | routed_kv) on open_clip models: exactness at the degenerate budgets, weight
sharing, configuration errors and cost accounting."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import open_clip
import pytest
import torch

from flbench.backbones.attention import (GroupedKVAttention, attention_costs, attention_settings, is_causal_mask,
                                         restore_attention, swap_attention, swapped_modules)
from flbench.backbones.build import load_backbone
from flbench.backbones.clip import FrozenCLIP
from flbench.backbones.routed_kv import RoutedKVAttention
from flbench.backbones.tiny import TINY_CONFIGS
from flbench.errors import ConfigError

TEXTS = ["a photo of a red circle.", "blue", "a sketch of a green star on a white page"]
DENSE_TOL = 1e-5


def _model(name: str) -> open_clip.CLIP:
    torch.manual_seed(0)
    if name == "ViT-B-16":
        return open_clip.create_model("ViT-B-16", pretrained=None).eval()
    return open_clip.CLIP(**TINY_CONFIGS[name]).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, open_clip.CLIP]:
    """One random instance of each architecture (ViT-B-16 is the slow one: built once per module)."""
    return {name: _model(name) for name in ("tiny", "tiny-vit", "ViT-B-16")}


@pytest.fixture(scope="module")
def backbones(models) -> dict[str, FrozenCLIP]:
    """FrozenCLIP wrappers of the same model objects (their tokenizer is the slow part to build)."""
    return {name: FrozenCLIP(model, name) for name, model in models.items()}


@contextlib.contextmanager
def _swapped(backbone: FrozenCLIP, attention: dict) -> Iterator[FrozenCLIP]:
    """The backbone with `attention` swapped in, in place (no copy: ViT-B-16 is big), restored afterwards."""
    swap_attention(backbone.model, attention)
    try:
        yield backbone
    finally:
        restore_attention(backbone.model)


def _images(backbone: FrozenCLIP, n: int) -> torch.Tensor:
    return torch.rand(n, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(1))


def _outputs(backbone: FrozenCLIP, n_images: int, texts: list[str], open_clip_path: bool = False
             ) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        # FrozenCLIP's path: routed layers know each row's length (padding takes no capacity)
        out = {"text": backbone.encode_text(texts)}
        if backbone.is_vit:
            out["image"] = backbone.encode_image(_images(backbone, n_images))
        if open_clip_path:  # open_clip's own path: every position counts as a token
            out["text_open_clip"] = backbone.model.encode_text(backbone.tokenize(texts))
        return out


@pytest.mark.parametrize("name", ["tiny", "tiny-vit"])
def test_ratio_1_0_0_reproduces_dense_and_0_1_0_reproduces_gqa(backbones, name):
    backbone = backbones[name]
    dense = _outputs(backbone, 3, TEXTS, open_clip_path=True)
    with _swapped(backbone, {"kind": "routed_kv", "ratios": [1, 0, 0]}):
        full = _outputs(backbone, 3, TEXTS, open_clip_path=True)
    for key in dense:
        assert (full[key] - dense[key]).abs().max() <= DENSE_TOL, key

    with _swapped(backbone, {"kind": "gqa", "group_size": 2}):
        gqa = _outputs(backbone, 3, TEXTS)
    with _swapped(backbone, {"kind": "routed_kv", "ratios": [0, 1, 0], "pin_cls": False}):
        pooled = _outputs(backbone, 3, TEXTS)
    for key in gqa:
        assert (pooled[key] - gqa[key]).abs().max() <= DENSE_TOL, key
    # ...and GQA really changes the model (so the two comparisons above are not vacuous).
    for key in gqa:
        assert (gqa[key] - dense[key]).abs().max() > 1e-3, key


def test_ratio_1_0_0_reproduces_dense_vit_b16(backbones):
    """One image and one text through a random ViT-B-16 (12 + 12 layers, 197 and 77 tokens)."""
    backbone = backbones["ViT-B-16"]
    dense = _outputs(backbone, 1, TEXTS[:1])
    with _swapped(backbone, {"kind": "routed_kv", "ratios": [1, 0, 0]}):
        full = _outputs(backbone, 1, TEXTS[:1])
    for key in dense:
        assert (full[key] - dense[key]).abs().max() <= DENSE_TOL, key


def test_gqa_equals_dense_attention_with_group_mean_kv_weights(models, backbones):
    """GQA's definition, checked independently: replace each group's K/V heads by their mean in the original
    nn.MultiheadAttention weights, run open_clip unchanged, and compare."""
    by_hand = copy.deepcopy(models["tiny-vit"])
    with torch.no_grad():
        for block in [*by_hand.visual.transformer.resblocks, *by_hand.transformer.resblocks]:
            attn, width = block.attn, block.attn.embed_dim
            heads, d = attn.num_heads, width // attn.num_heads
            for part in (1, 2):  # K and V rows of the packed projection
                rows = slice(part * width, (part + 1) * width)
                w = attn.in_proj_weight[rows].view(heads // 4, 4, d, width)
                attn.in_proj_weight[rows] = w.mean(1, keepdim=True).expand_as(w).reshape(width, width)
                b = attn.in_proj_bias[rows].view(heads // 4, 4, d)
                attn.in_proj_bias[rows] = b.mean(1, keepdim=True).expand_as(b).reshape(width)
    images = torch.rand(2, 3, 32, 32)
    tokens = backbones["tiny-vit"].tokenize(TEXTS)
    with torch.no_grad(), _swapped(backbones["tiny-vit"], {"kind": "gqa", "group_size": 4}) as gqa:
        assert torch.allclose(gqa.model.encode_image(images), by_hand.encode_image(images), atol=DENSE_TOL)
        assert torch.allclose(gqa.model.encode_text(tokens), by_hand.encode_text(tokens), atol=DENSE_TOL)


def test_swap_shares_the_pretrained_parameters_and_leaves_resnet_dense(models):
    model = copy.deepcopy(models["tiny"])
    before = dict(model.named_parameters())
    swap_attention(model, {"kind": "routed_kv"})
    after = dict(model.named_parameters())
    new = set(after) - set(before)
    assert new and all(".router." in n for n in new)  # the routers are the only new parameters
    assert set(before) <= set(after)
    assert all(after[n] is before[n] for n in before)  # the very same tensors, not copies
    assert all(m.tower == "text" for m in swapped_modules(model))  # the ResNet image tower has no swapped layer
    assert isinstance(model.visual, open_clip.model.ModifiedResNet)
    with pytest.raises(ConfigError, match="already"):
        swap_attention(model, {"kind": "gqa"})


def test_only_requested_towers_are_swapped(models):
    model = copy.deepcopy(models["tiny-vit"])
    swap_attention(model, {"kind": "gqa", "towers": ["vision"]})
    towers = {m.tower for m in swapped_modules(model)}
    assert towers == {"vision"} and all(isinstance(m, GroupedKVAttention) for m in swapped_modules(model))


@pytest.mark.parametrize("bad, match", [
    ({"kind": "sparse"}, "kind"),
    ({"kind": "routed_kv", "ratios": [1, 1]}, "ratios"),
    ({"kind": "routed_kv", "ratios": [0, 0, 0]}, "ratios"),
    ({"kind": "routed_kv", "group_sizes": [1, 3, 4]}, "group_sizes"),
    ({"kind": "gqa", "group_size": 3}, "group_size"),
    ({"kind": "routed_kv", "routers": "trained"}, "routers"),
    ({"kind": "gqa", "size": 2}, "unknown keys"),
])
def test_bad_attention_config_names_the_key(models, bad, match):
    with pytest.raises(ConfigError, match=match):
        swap_attention(copy.deepcopy(models["tiny-vit"]), bad)


def test_causal_mask_detection(models):
    mask = models["tiny"].attn_mask
    assert is_causal_mask(mask, mask.shape[0])
    assert is_causal_mask(torch.ones(5, 5, dtype=torch.bool).triu(1), 5)
    assert not is_causal_mask(torch.zeros(5, 5), 5)
    assert not is_causal_mask(mask, mask.shape[0] + 1)


def test_cost_accounting_by_hand(backbones):
    """tiny-vit: image tower width 64 in 4 heads of 16, L=65, 4 layers; text tower width 128 in 4 heads of 32, L=16,
    3 layers (causal); K/V in fp16."""
    width, heads, d = 64, 4, 16
    backbone = backbones["tiny-vit"]
    dense = attention_costs(backbone)
    costs = {}
    for name, attention in (("gqa", {"kind": "gqa", "group_size": 2}), ("routed", {"kind": "routed_kv"}),
                            ("low", {"kind": "routed_kv", "ratios": [1, 1, 8]})):
        with _swapped(backbone, attention):
            costs[name] = attention_costs(backbone)
    gqa, routed, low = costs["gqa"], costs["routed"], costs["low"]
    v = dense["vision"]
    assert v["kind"] == "dense" and v["seq_len"] == 65 and v["layers"] == 4
    assert v["kv_bytes_per_token_per_layer"] == 2 * heads * d * 2 == 256
    assert v["kv_proj_flops_per_token_per_layer"] == 2 * 2 * width * heads * d
    assert v["attention_flops_per_sequence"] == 4 * heads * 4 * d * 65 * 65
    assert dense["text"]["attention_flops_per_sequence"] == 3 * 4 * 4 * 32 * 16 * 17 // 2  # causal pairs
    assert dense["text"]["kv_bytes_per_token_per_layer"] == 2 * 4 * 32 * 2
    assert gqa["vision"]["kv_bytes_per_token_per_layer"] == 128 and gqa["vision"]["kv_fraction"] == 0.5
    r = routed["vision"]
    assert r["kv_fraction"] == 0.5
    assert r["kv_bytes_per_token_per_layer"] == 128 + 2 / 8  # plus the expert index: ⌈log₂ 3⌉ = 2 bits
    assert r["kv_proj_flops_per_token_per_layer"] == 2 * 2 * width * 2 * d + 2 * width * 3  # half K/V + router
    # 65 tokens at 3:1:6: capacities 20, 7, 38 -> (20*4 + 7*2 + 38*1) / 65 K/V heads per token
    assert r["kv_fraction_realised"] == pytest.approx((20 * 4 + 7 * 2 + 38) / 65 / 4, abs=1e-6)
    assert low["vision"]["kv_fraction"] == pytest.approx(0.1 + 0.05 + 0.2)
    # Attention FLOPs do not shrink with the KV budget: every query head still scores every key.
    assert r["attention_flops_per_sequence"] == v["attention_flops_per_sequence"]


def test_load_backbone_applies_attention_with_frozen_routers(tmp_path):
    base = {"name": "tiny", "pretrain": {"steps": 40, "batch_size": 64, "corpus": 2048, "warmup": 5}}
    dense = load_backbone(base)
    routed = load_backbone({**base, "attention": {"kind": "routed_kv"}})
    assert routed is not dense  # the process cache key includes the attention config
    assert load_backbone({**base, "attention": {"kind": "routed_kv"}}) is routed
    layers = swapped_modules(routed.model)
    assert len(layers) == 3 and all(isinstance(m, RoutedKVAttention) for m in layers)
    assert not swapped_modules(dense.model)
    assert all(not p.requires_grad for p in routed.parameters())
    assert routed.attention["ratios"] == [3, 1, 6] and attention_settings(None)["kind"] == "dense"
