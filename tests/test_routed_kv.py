"""Routed-KV (mixSGA) routing and attention: expert-choice bookkeeping, budgets, padding, causality, gradients, the
auxiliary loss, compact K/V projection, and the Triton dispatch inside the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flbench.algorithms.base import build_method
from flbench.backbones.attention import attention_costs, sequence_lengths, swap_attention, swapped_modules
import flbench.backbones.routed_kv as routed_kv
from flbench.backbones.routed_kv import (RoutedKVAttention, capacities, expert_choice, expert_slots, kv_fraction,
                                         routed_layers, routing_stats)
from helpers import random_tiny

CLASSES = ["red circle", "blue square", "green star"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(heads: int = 4, width: int = 64, seed: int = 0, **kwargs) -> RoutedKVAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(width, heads, batch_first=True)
    return RoutedKVAttention(mha, kwargs.pop("tower", "vision"), **kwargs)


def test_kv_fraction_of_the_default_budget_is_one_half():
    assert kv_fraction([3, 1, 6], [1, 2, 4]) == pytest.approx(0.5)
    assert kv_fraction([1, 1, 8], [1, 2, 4]) == pytest.approx(0.35)
    layer = _layer()
    assert layer.kv_heads_per_token() / layer.num_heads == pytest.approx(0.5)
    assert layer.kv_heads_per_token(20) / layer.num_heads == pytest.approx(0.5)  # capacities 6, 2, 12 exactly


@pytest.mark.parametrize("ratios", [[3, 1, 6], [1, 1, 8], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.5, 0.3]])
def test_every_token_in_exactly_one_expert_and_capacities_sum_to_length(ratios):
    generator = torch.Generator().manual_seed(0)
    batch, length = 6, 23
    lengths = torch.tensor([23, 1, 2, 10, 17, 23])
    valid = torch.arange(length)[None, :] < lengths[:, None]
    caps = capacities(lengths, ratios)
    assert torch.equal(caps.sum(1), lengths)
    scores = torch.rand(batch, length, 3, generator=generator)
    for pinned in (None, torch.zeros(batch, length, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True)):
        assign = expert_choice(scores, valid, ratios, pinned)
        assert torch.equal(assign >= 0, valid)  # padding in no expert, every real token in one
        counts = torch.stack([(assign == e).sum(1) for e in range(3)], 1)
        assert torch.equal(counts.sum(1), lengths)
        if pinned is None:
            assert torch.equal(counts, caps)
        else:
            assert (assign[:, 0] == 0).all()
        slots = [expert_slots(assign, e) for e in range(3)]
        seen = torch.zeros(batch, length, dtype=torch.long)
        for e, (index, pos) in enumerate(slots):
            seen.scatter_add_(1, index, (pos >= 0).long())
            assert (assign.gather(1, index)[pos >= 0] == e).all()  # each slot holds one of the expert's tokens
            assert ((pos == index) | (pos == -1)).all()
        assert torch.equal(seen, valid.long())


def test_progressive_expert_choice_takes_each_experts_best_tokens_in_order():
    # 10 tokens, ratios 3:1:6 -> capacities 3, 1, 6. Expert 0 prefers tokens 7, 2, 5; expert 1 prefers token 2
    # (already taken) and then token 9; the rest go to expert 2.
    scores = torch.zeros(1, 10, 3)
    scores[0, [7, 2, 5, 1], 0] = torch.tensor([0.9, 0.8, 0.7, 0.6])
    scores[0, [2, 9], 1] = torch.tensor([0.9, 0.5])
    assign = expert_choice(scores, torch.ones(1, 10, dtype=torch.bool), [3, 1, 6])[0]
    assert sorted(torch.nonzero(assign == 0).flatten().tolist()) == [2, 5, 7]
    assert torch.nonzero(assign == 1).flatten().tolist() == [9]
    # Pinning token 0 (CLS) uses one of expert 0's three places, whatever its score.
    pinned = torch.zeros(1, 10, dtype=torch.bool)
    pinned[0, 0] = True
    assign = expert_choice(scores, torch.ones(1, 10, dtype=torch.bool), [3, 1, 6], pinned)[0]
    assert sorted(torch.nonzero(assign == 0).flatten().tolist()) == [0, 2, 7]


def test_text_padding_takes_no_capacity():
    backbone = random_tiny("tiny")
    swap_attention(backbone.model, {"kind": "routed_kv"})
    tokens = backbone.tokenize(["red", "a photo of a big blue square."])
    lengths = tokens.argmax(-1) + 1
    with torch.no_grad():
        backbone.encode_text_embeddings(backbone.token_embeddings(tokens), tokens.argmax(-1))
    for layer in swapped_modules(backbone.model):
        assign = layer.last_assignment
        assert torch.equal((assign >= 0).sum(1), lengths)
        counts = torch.stack([(assign == e).sum(1) for e in range(3)], 1)
        assert torch.equal(counts, capacities(lengths, [3, 1, 6]))


def test_text_causality_given_the_routing():
    """With the routing fixed, changing a later token never changes an earlier position's output."""
    backbone = random_tiny("tiny")
    swap_attention(backbone.model, {"kind": "routed_kv", "ratios": [1, 1, 2]})
    model = backbone.model
    a = backbone.token_embeddings(backbone.tokenize(["a photo of a red circle on the grass"]))
    b = a.clone()
    b[:, 6:] = torch.randn_like(b[:, 6:])
    x_a, x_b = a + model.positional_embedding, b + model.positional_embedding
    with torch.no_grad():
        out_a = model.transformer(x_a, attn_mask=model.attn_mask)
        for layer in swapped_modules(model):
            layer.fixed_assignment = layer.last_assignment
        out_b = model.transformer(x_b, attn_mask=model.attn_mask)
    assert torch.allclose(out_a[:, :6], out_b[:, :6], atol=1e-6)
    assert not torch.allclose(out_a[:, 6:], out_b[:, 6:], atol=1e-3)
    # Bidirectional (no mask): the same change reaches the early positions.
    with torch.no_grad():
        bi_a, bi_b = model.transformer(x_a), model.transformer(x_b)
    assert not torch.allclose(bi_a[:, :6], bi_b[:, :6], atol=1e-3)


def test_gradients_reach_prompt_embeddings_and_routers():
    backbone = random_tiny("tiny")
    swap_attention(backbone.model, {"kind": "routed_kv"})
    coop = build_method("coop", backbone, CLASSES, ["a photo of a {}."], {"n_ctx": 4, "ctx_init": None})
    loss = coop.loss(coop.encode(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert coop.ctx.grad is not None and coop.ctx.grad.abs().sum() > 0

    # With trainable routers the straight-through factor gives them a task gradient; the forward is unchanged.
    routers = [m.router for m in swapped_modules(backbone.model)]
    with torch.no_grad():
        frozen_out = coop.text_features()
    for r in routers:
        r.requires_grad_(True)
        r.aux_weight = 0.0
    for m in swapped_modules(backbone.model):
        m.aux_weight = 0.0  # task gradient only
    features = coop.text_features()
    assert torch.allclose(features, frozen_out, atol=1e-6)
    features.pow(2).sum().backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)


def test_aux_loss_raises_argmax_expert_choice_agreement():
    layer = _layer(width=32, seed=1)
    for p in (layer.in_proj_weight, layer.in_proj_bias, *layer.out_proj.parameters()):
        p.requires_grad_(False)
    x = torch.randn(4, 24, 32, generator=torch.Generator().manual_seed(2))
    # Control: without the aux loss, a zero task loss gives the router no gradient at all.
    layer.aux_weight = 0.0
    out, _ = layer(x, x, x)
    (out * 0).sum().backward()
    assert layer.router.weight.grad is None or not layer.router.weight.grad.any()

    layer.aux_weight = 1.0
    optimizer = torch.optim.Adam(layer.router.parameters(), lr=0.05)
    agreement = []
    for _ in range(30):
        out, _ = layer(x, x, x)
        agreement.append(float(layer.last_agreement))
        optimizer.zero_grad()
        # A task loss of zero: the only router gradient is the aux loss the layer injects into its backward.
        (out * 0).sum().backward()
        optimizer.step()
    assert agreement[0] < 0.7 and agreement[-1] > 0.9, (agreement[0], agreement[-1])
    assert layer.last_aux_loss is not None
    assert routing_stats(nn.Sequential(layer))["vision/agreement"] == pytest.approx(agreement[-1])


def test_each_expert_projects_only_its_own_tokens(monkeypatch):
    """The K/V projection work is Σ_e C_e · (H/g_e) · d rows, matching the cost accounting — not 3 · L · H · d."""
    layer = _layer(heads=4, width=64).eval()
    length = 20
    calls = []
    real_linear = F.linear

    def counting_linear(x, weight, bias=None):
        calls.append(x.shape[:-1].numel() * weight.shape[0] * weight.shape[1] * 2)
        return real_linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", counting_linear)
    with torch.no_grad():
        layer(torch.randn(1, length, 64), None, None)
    monkeypatch.setattr(F, "linear", real_linear)
    width = 64
    router, q, out = 2 * length * width * 3, 2 * length * width * width, 2 * length * width * width
    kv = sum(calls) - router - q - out
    # capacities 6, 2, 12 over group sizes 1, 2, 4: K and V each project 6*64 + 2*32 + 12*16 = 640 features
    assert kv == 2 * 2 * width * (6 * 64 + 2 * 32 + 12 * 16)
    assert kv == pytest.approx(0.5 * 2 * 2 * width * width * length)
    assert len(calls) == 1 + 1 + 3 + 1  # router, Q, one fused K+V GEMM per expert, output projection


def test_cost_figures_match_the_model():
    backbone = random_tiny("tiny-vit")
    swap_attention(backbone.model, {"kind": "routed_kv", "ratios": [3, 1, 6]})
    costs = attention_costs(backbone)
    assert costs["text"]["kv_fraction"] == 0.5 and costs["vision"]["kv_fraction"] == 0.5
    assert costs["text"]["layers"] == 3 and costs["vision"]["layers"] == 4


def test_model_dispatches_to_the_triton_kernel(monkeypatch):
    """The routed layer's attention core through the Triton kernel (CPU interpreter) equals the PyTorch path."""
    from flbench.kernels import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3))
    layer = _layer(heads=4, width=64, backend="torch")
    with torch.no_grad():
        reference, _ = layer(x, x, x)
        layer.backend = "triton"
        fused, _ = layer(x, x, x)
    assert torch.allclose(fused, reference, atol=1e-5)


def test_sequence_lengths_must_match_the_batch():
    layer = _layer(tower="text")
    x = torch.randn(2, 5, 64)
    with sequence_lengths(torch.tensor([5, 3, 2])), pytest.raises(RuntimeError, match="rows"):
        layer(x, x, x)


def test_train_routers_makes_them_part_of_the_methods_shared_state():
    from flbench.backbones.attention import attach_routers, router_parameters
    from flbench.backbones.conversion import apply_attention

    backbone = random_tiny("tiny-vit")
    apply_attention(backbone, {"attention": {"kind": "routed_kv", "train_routers": True}})
    assert all(not p.requires_grad for p in backbone.parameters())  # frozen until a method takes them
    coop = attach_routers(build_method("coop", backbone, CLASSES, ["a photo of a {}."], {"ctx_init": None}), backbone)
    shared = coop.shared_state()
    router_keys = [k for k in shared if k.startswith("backbone_routers.")]
    # CoOp encodes images without gradients: only the text routers (3 layers x weight, bias) can learn and travel.
    assert "ctx" in shared and len(router_keys) == 3 * 2
    assert coop.num_trainable() == coop.ctx.numel() + 3 * (3 * 128 + 3)
    text_router = backbone.model.transformer.resblocks[0].attn.router.weight
    before = text_router.detach().clone()
    params = [p for p in coop.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    coop.loss(coop.encode(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    assert not torch.equal(before, text_router)  # the backbone's own router moved (same Parameter)
    coop.load_partial({k: v for k, v in shared.items()})  # the server's state puts it back
    assert torch.equal(before, text_router)
    vision = [n for n in router_parameters(backbone.model) if n.startswith("visual.")]
    assert vision and all(not router_parameters(backbone.model)[n].requires_grad for n in vision)

    # A method whose image side is trainable (VPT, MaPLe) gets the vision routers too.
    class TrainableImageSide(type(coop)):
        frozen_image_side = False

    other = random_tiny("tiny-vit")
    apply_attention(other, {"attention": {"kind": "routed_kv", "train_routers": True}})
    method = attach_routers(TrainableImageSide(other, CLASSES, ["a photo of a {}."]), other)
    assert sum(k.startswith("backbone_routers.") for k in method.shared_state()) == (3 + 4) * 2


def test_oracle_benefit_prefers_tokens_whose_pooling_error_is_attended():
    layer = _layer(heads=4, width=32, seed=4)
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(5))
    valid = torch.ones(2, 12, dtype=torch.bool)
    benefit = layer.oracle_benefit(x, valid, causal=False)
    assert benefit.shape == (2, 12, 3) and (benefit[..., -1] == 0).all()
    assert (benefit[..., 0] >= benefit[..., 1] - 1e-6).all()  # full K/V avoids at least what g=2 avoids
    # Heads that are already equal within each group pool without error: nothing to gain anywhere.
    with torch.no_grad():
        w = layer.in_proj_weight.view(3, 4, 8, 32)
        w[1:] = w[1:, :1].expand_as(w[1:]).clone()
        layer.in_proj_bias.view(3, 4, 8)[1:] = layer.in_proj_bias.view(3, 4, 8)[1:, :1].clone()
    assert layer.oracle_benefit(x, valid, causal=False).abs().max() < 1e-6
    # As a calibration target it yields a loss for the router to imitate.
    layer.oracle = "target"
    layer(x, x, x)
    assert layer.last_oracle_loss is not None and layer.last_oracle_loss.requires_grad


def _text_layer(**kwargs) -> tuple[RoutedKVAttention, torch.Tensor]:
    layer = _layer(tower="text", **kwargs)
    layer.causal_mask = True  # as the conversion sets it after checking the tower's mask
    return layer, torch.full((9, 9), float("-inf")).triu(1)


def _frozen(layer: RoutedKVAttention, train_router: bool = False) -> RoutedKVAttention:
    for p in layer.parameters():
        p.requires_grad_(False)
    layer.router.requires_grad_(train_router)
    return layer


@pytest.mark.parametrize("tower, train_router", [("vision", True), ("text", False)])
def test_layer_compiles_without_graph_breaks_and_matches_eager(tower, train_router):
    """torch.compile captures the whole layer (forward and, when the router trains, backward) as one graph: no
    data-dependent Python control flow, no dynamic-shape op — hence nothing that needs a host synchronisation.
    (fullgraph=True refuses any graph break; dynamo's own counter must stay at zero too.)"""
    from torch._dynamo.utils import counters

    if tower == "vision":
        layer, mask, lengths = _frozen(_layer(pin_cls=True), train_router), None, None
    else:
        layer, mask = _text_layer()
        layer, lengths = _frozen(layer, train_router), torch.tensor([9, 5])
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))

    def run(module):
        with sequence_lengths(lengths), torch.set_grad_enabled(train_router):
            out = module(x, attn_mask=mask)[0]
        if not train_router:
            return out, None
        out.pow(2).sum().backward()
        grad, layer.router.weight.grad = layer.router.weight.grad.clone(), None
        return out.detach(), grad

    torch._dynamo.reset()
    counters.clear()
    eager = run(layer)
    compiled = run(torch.compile(layer, backend="aot_eager", fullgraph=True))
    assert sum(counters["graph_break"].values()) == 0
    assert torch.allclose(compiled[0], eager[0], atol=1e-6)
    if train_router:
        assert torch.allclose(compiled[1], eager[1], atol=1e-6)
    torch._dynamo.reset()


def test_forward_and_backward_never_read_a_tensor_on_the_host(monkeypatch):
    """Every way Python code can pull a tensor's value to the host raises while the layer runs (the compile test
    above covers what C++ would do: boolean-mask indexing, nonzero)."""
    layer, mask = _text_layer()
    layer = _frozen(layer, train_router=True)
    x = torch.randn(2, 9, 64, requires_grad=True)
    layer(x, attn_mask=mask)  # warm the pooled-weight cache and tables outside the check

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with sequence_lengths(torch.tensor([9, 4])):
        out, _ = layer(x, attn_mask=mask)
        out.sum().backward()
    monkeypatch.undo()
    assert x.grad is not None and layer.router.weight.grad is not None


def test_pooled_weights_are_cached_while_frozen(monkeypatch):
    layer = _frozen(_layer())
    x = torch.randn(1, 12, 64)
    calls = []
    real = routed_kv.pooled_projection
    monkeypatch.setattr(routed_kv, "pooled_projection", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        first, _ = layer(x)
        assert len(calls) == 6  # K and V of 3 experts
        again, _ = layer(x)
        assert len(calls) == 6 and torch.equal(first, again)  # cached
        layer.in_proj_weight[64:].mul_(0.5)  # an in-place change (a load, an update) invalidates the cache
        changed, _ = layer(x)
    assert len(calls) == 12 and not torch.allclose(changed, first)
    layer.in_proj_weight.requires_grad_(True)  # trainable (uptraining): rebuilt on every call, for autograd
    layer(x)
    layer(x)
    assert len(calls) == 24


def test_aux_loss_is_averaged_over_the_towers_layers():
    """α/N·Σ_l: each of the text tower's 3 layers injects α/3 times its cross-entropy; checked against the CE's
    gradient written out from the layer's logits and assignment (softmax - one-hot, averaged over real tokens), on
    the last layer (an earlier router also hears the later layers' aux losses through its values' gate)."""
    backbone = random_tiny("tiny")
    swap_attention(backbone.model, {"kind": "routed_kv", "aux_weight": 0.3})
    layers = routed_layers(backbone.model, "text")
    assert len(layers) == 3 and all(m.aux_scale == pytest.approx(1 / 3) for m in layers)
    inputs = {}
    last = layers[-1]
    last.register_forward_pre_hook(lambda m, args: inputs.setdefault("x", args[0].detach()))
    for m in layers:
        m.router.requires_grad_(True)
    tokens = backbone.tokenize(["a photo of a red circle", "blue"])
    features = backbone.encode_text_embeddings(backbone.token_embeddings(tokens), tokens.argmax(-1))
    (features * 0).sum().backward()  # no task gradient: only the injected aux loss reaches the routers
    x = inputs["x"] if last.batch_first else inputs["x"].transpose(0, 1)
    logits = x @ last.router.weight.detach().T + last.router.bias.detach()
    assign = last.last_assignment
    real = assign >= 0
    residual = (torch.softmax(logits, -1) - F.one_hot(assign.clamp(min=0), 3)) * real[..., None]
    expected = 0.3 / 3 * residual.sum((0, 1)) / real.sum()
    assert torch.allclose(last.router.bias.grad, expected, atol=1e-6)
