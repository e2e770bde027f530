"""Honest budgets: K/V bytes from plain dimensions (the mixSGA paper's Table 9), the expert index at ⌈log₂ E⌉ bits,
capacities that never exceed the nominal budget under capacity=cap, and the budget measured on what was encoded."""

from __future__ import annotations

import math

import pytest
import torch

from flbench.backbones.attention import attention_costs, swap_attention
from flbench.backbones.costs import index_bits
from flbench.backbones.routed_kv import capacity_rows, kv_fraction, realised_kv_fraction, routed_layers
from flbench.errors import ConfigError
from helpers import random_tiny


@pytest.mark.parametrize("model, layers, kv_heads, head_dim, dense, mixsga", [
    ("Llama-3.2-1B", 16, 8, 64, 32_768, 32_772),
    ("OPT-125m", 12, 12, 64, 36_864, 36_867),
    ("Gemma-2-2B", 26, 4, 256, 106_496, 106_502),
])
def test_kv_bytes_per_token_reproduce_the_papers_table_9(model, layers, kv_heads, head_dim, dense, mixsga):
    """Bytes per token over all layers at bf16; mixSGA adds the index of 3 experts: 2 bits per token per layer.
    The paper prints whole bytes (Gemma-2-2B: 52 bits = 6.5 bytes, printed 106,502)."""
    plain = attention_costs(layers=layers, heads=kv_heads, head_dim=head_dim, bytes_per_element=2)
    routed = attention_costs(layers=layers, heads=kv_heads, head_dim=head_dim, bytes_per_element=2, n_experts=3)
    assert plain["kv_bytes_per_token"] == dense
    assert math.floor(routed["kv_bytes_per_token"]) == mixsga
    assert routed["kv_bytes_per_token"] == dense + layers * 2 / 8


def test_expert_index_bits():
    assert [index_bits(e) for e in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]


@pytest.mark.parametrize("ratios", [[3, 1, 6], [1, 1, 2], [1, 6, 2], [1, 1, 8], [0.2, 0.5, 0.3], [1, 0, 0]])
def test_capacity_cap_never_exceeds_the_nominal_budget(ratios):
    groups = (1, 2, 4)
    nominal = kv_fraction(ratios, groups)
    ceil, cap = capacity_rows(200, ratios, groups, "ceil"), capacity_rows(200, ratios, groups, "cap")
    for n in range(1, 201):
        assert sum(cap[n]) == n == sum(ceil[n])
        assert realised_kv_fraction(n, ratios, groups, "cap") <= nominal + 1e-12, n
        # cap only ever moves tokens from finer experts to the coarsest one
        assert all(c <= e for c, e in zip(cap[n][:-1], ceil[n][:-1])) and cap[n][-1] >= ceil[n][-1]
    # ceil (the paper's rounding) gives short rows more than nominal: 5 tokens at 3:1:6 store 12 of 20 heads
    if ratios == [3, 1, 6]:
        assert ceil[5] == (2, 1, 2) and realised_kv_fraction(5, ratios, groups) == pytest.approx(0.6)
        assert cap[5] == (1, 1, 3) and realised_kv_fraction(5, ratios, groups, "cap") == pytest.approx(0.45)


def test_cap_needs_the_coarsest_expert_last():
    with pytest.raises(ConfigError, match="capacity=cap"):
        swap_attention(random_tiny("tiny").model, {"kind": "routed_kv", "group_sizes": [1, 4, 2], "capacity": "cap"})


@pytest.mark.parametrize("capacity", ["ceil", "cap"])
def test_budget_is_measured_on_what_was_encoded(capacity):
    """Two prompts of 5 and 9 tokens (end-of-text included) through 3 text layers: the measured K/V fraction is
    the capacities' K/V over those 14 tokens, not the full-length figure."""
    backbone = random_tiny("tiny")
    swap_attention(backbone.model, {"kind": "routed_kv", "capacity": capacity})
    tokens = backbone.tokenize(["red circle now", "a photo of a big blue square"])
    lengths = (tokens.argmax(-1) + 1).tolist()
    assert lengths == [5, 9]
    with torch.no_grad():
        backbone.encode_text_embeddings(backbone.token_embeddings(tokens), tokens.argmax(-1))
    text = attention_costs(backbone)["text"]
    rows = capacity_rows(9, [3, 1, 6], (1, 2, 4), capacity)
    heads = sum(c * 4 // g for n in lengths for c, g in zip(rows[n], (1, 2, 4)))
    assert text["tokens_measured"] == 14
    assert text["kv_fraction_measured"] == pytest.approx(heads / (14 * 4))
    assert text["kv_bytes_per_token_per_layer_measured"] == pytest.approx(2 * 32 * 2 * heads / 14 + 2 / 8, abs=1e-3)
    assert text["capacity"] == capacity
    for layer in routed_layers(backbone.model):
        layer.reset_measurement()
    assert "kv_fraction_measured" not in attention_costs(backbone)["text"]
