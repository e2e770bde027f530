"""Reference parity of PLOT (PLOT++ on ViT), FedOTP, MaPLe and VPT: each method's logits, the gradient it leaves and
what it sends and keeps, against its authors' formulation written out here independently.

The references below use only the open_clip modules of a seeded random tiny CLIP (`conv1`, embeddings, `ln_pre`,
`transformer.resblocks`, `ln_post`, `proj`, the text tower's parts) and the method's parameter *tensors*: the towers
are walked block by block by hand, OT is the authors' scaling-domain iteration in float64 with their stopping rules
(PLOT's `Sinkhorn`: stop when mean |Δr| < thresh; FedOTP's `entropic_COT_fast`: u = min(1, a/Kv), stop when
mean |Δv| < thresh), and no helper of the code under test is called. Repositories and files: each method's
`fidelity` text. DP-FPL: test_fidelity_visual_dp.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flbench.algorithms.base import build_method
from flbench.algorithms.ot import ot_similarity
from helpers import random_tiny

CLASSES = ["red circle", "blue square", "green star"]
TEMPLATES = ["a photo of a {}."]
LABELS = torch.tensor([0, 1, 2, 0])

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit():
    return random_tiny("tiny-vit")


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# --- the towers, by hand -----------------------------------------------------------------------------------------
def vit_tokens(backbone, images):
    """[CLS] + patch embeddings + positions, before ln_pre: [B, 1+P, W]."""
    v = backbone.model.visual
    x = v.conv1((images - backbone.mean) / backbone.std).flatten(2).transpose(1, 2)
    cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + v.positional_embedding


def vit_forward(backbone, images, first=None, deeper=(), all_tokens=False):
    """CLIP ViT with prompts `first` [n, W] appended before ln_pre and `deeper[i-1]` replacing the last n tokens at
    the input of block i; returns the projected [CLS] (or every token through ln_post and the projection)."""
    v = backbone.model.visual
    assert v.transformer.batch_first
    x = vit_tokens(backbone, images)
    n = 0 if first is None else first.shape[0]
    if n:
        x = torch.cat([x, first.expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i <= len(deeper):
            x = torch.cat([x[:, :x.shape[1] - n], deeper[i - 1].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    x = x[:, :x.shape[1] - n]
    return v.ln_post(x) @ v.proj if all_tokens else v.ln_post(x[:, 0]) @ v.proj


def text_prompts(backbone, names, n_ctx, fixed=""):
    """Token embeddings of "[SOS] X…X {fixed} name. [EOT]" and the EOT index."""
    words = " ".join(["X"] * n_ctx)
    tokens = backbone.tokenize([f"{words} {fixed + ' ' if fixed else ''}{name}." for name in names])
    return backbone.token_embeddings(tokens).detach(), tokens.argmax(dim=-1)


def text_forward(backbone, embeddings, eot, ctx, deeper=()):
    """Text features [C, D]: `ctx` [n, W] in slots 1..n, `deeper[j-1]` replacing them at the input of block j."""
    m = backbone.model
    n = ctx.shape[0]
    x = torch.cat([embeddings[:, :1], ctx.expand(len(embeddings), -1, -1), embeddings[:, 1 + n:]], dim=1)
    x = x + m.positional_embedding
    for j, block in enumerate(m.transformer.resblocks):
        if 1 <= j <= len(deeper):
            x = torch.cat([x[:, :1], deeper[j - 1].expand(len(x), -1, -1), x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)[torch.arange(len(x)), eot]
    proj = m.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


# --- OT, as the authors' code --------------------------------------------------------------------------------------
def plot_sinkhorn(sim, eps, max_iter, thresh):
    """PLOT's `Sinkhorn` on sim [P, M, N] (uniform marginals), float64: r = a/Kc, c = b/Kᵀr; stop on mean |Δr|."""
    K = torch.exp(-(1 - sim.double()) / eps)
    a = torch.full(K.shape[:-1], 1 / K.shape[-2], dtype=torch.float64)
    b = torch.full(K.shape[:-2] + K.shape[-1:], 1 / K.shape[-1], dtype=torch.float64)
    r, c = torch.ones_like(a), torch.ones_like(b)
    for _ in range(max_iter):
        r0 = r
        r = a / (K @ c.unsqueeze(-1)).squeeze(-1)
        c = b / (K.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean() < thresh:
            break
    return r.unsqueeze(-1) * K * c.unsqueeze(-2)


def fedotp_cot(sim, eps, max_iter, thresh, gamma):
    """FedOTP's `entropic_COT_fast`, float64: u = min(1, a/Kv), v = b/Kᵀu with b = γ/N; stop on mean |Δv|."""
    K = torch.exp(-(1 - sim.double()) / eps)
    a = torch.full(K.shape[:-1], 1 / K.shape[-2], dtype=torch.float64)
    b = torch.full(K.shape[:-2] + K.shape[-1:], gamma / K.shape[-1], dtype=torch.float64)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(max_iter):
        v0 = v
        u = torch.minimum(a / (K @ v.unsqueeze(-1)).squeeze(-1), torch.ones_like(a))
        v = b / (K.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)
        if (v - v0).abs().mean() < thresh:
            break
    return u.unsqueeze(-1) * K * v.unsqueeze(-2)


def ot_score(local, text, plan_fn, *args):
    """Σ T ⊙ sim [B, C] for local [B, M, D] and text [N, C, D], the plan held constant (no gradient through it)."""
    sim = torch.einsum("bmd,ncd->bcmn", unit(local), unit(text))
    with torch.no_grad():
        plan = plan_fn(sim.flatten(0, 1), *args).view_as(sim).to(sim.dtype)
    return (plan * sim).sum((-2, -1))


def test_plot_ot_stops_where_the_authors_sinkhorn_stops():
    """ε = 0.1, thresh 0.01: the authors stop on the row scaling's mean change, long after a 1 % marginal error."""
    g = torch.Generator().manual_seed(3)
    local, text = unit(torch.randn(2, 6, 8, generator=g)), unit(torch.randn(4, 3, 8, generator=g))
    expected = ot_score(local, text, plot_sinkhorn, 0.1, 100, 0.01)
    assert torch.allclose(ot_similarity(local, text, 0.1, 100, 0.01), expected.float(), atol=2e-6)


# --- PLOT++ on a ViT tower -----------------------------------------------------------------------------------------
PLOTPP_PHRASES = ["a photo of a", "this is a photo", "this is picture of", "one picture of a"]


def plotpp_logits(method, backbone, images, trade_off):
    local = torch.stack([vit_forward(backbone, images, first=g) for g in method.ctx_vision], dim=1)  # [B, M, D]
    embeddings, eot = text_prompts(backbone, CLASSES, 4)
    text = torch.stack([text_forward(backbone, embeddings, eot, ctx) for ctx in method.ctx])  # [N, C, D]
    logits = backbone.logit_scale * ot_score(local, text, plot_sinkhorn, 0.1, 100, 0.01)
    if trade_off:
        logits = logits + backbone.logit_scale * unit(local.mean(1)) @ unit(text.mean(0)).t()
    return logits


def test_plot_on_a_vit_is_plotpp_and_its_gradient_is_the_references(vit, images):
    plot = build_method("plot", vit, CLASSES, TEMPLATES, {})
    assert plot.ctx_vision.shape == (4, 2, vit.model.visual.transformer.width)  # M = 4 groups of N_CTX_V = 2
    assert abs(plot.ctx_vision.std().item() - 0.02) < 0.005
    for i, phrase in enumerate(PLOTPP_PHRASES):  # the text prompts start from PLOT++'s four phrases
        assert torch.equal(plot.ctx[i], vit.token_embeddings(vit.tokenize([phrase]))[0, 1:5])
    assert not plot.frozen_image_side and {n for n, p in plot.named_parameters() if p.requires_grad} == \
        {"ctx", "ctx_vision"}
    assert set(plot.shared_state()) == {"ctx", "ctx_vision"} and plot.local_state() == {}
    plot.train()
    loss = plot.backward(plot.encode(images), LABELS)
    expected = F.cross_entropy(plotpp_logits(plot, vit, images, trade_off=False), LABELS)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    grads = torch.autograd.grad(expected, [plot.ctx, plot.ctx_vision])
    for param, grad in zip((plot.ctx, plot.ctx_vision), grads):
        assert torch.allclose(param.grad, grad, atol=1e-5 * grad.abs().max().item())


def test_plotpp_first_stage_trains_the_visual_prompts_and_adds_the_global_logits(vit, images):
    plot = build_method("plot", vit, CLASSES, TEMPLATES, {"stage": "vision"})
    assert {n for n, p in plot.named_parameters() if p.requires_grad} == {"ctx_vision"}
    with torch.no_grad():
        assert torch.allclose(plot(images), plotpp_logits(plot, vit, images, trade_off=True), atol=1e-4)


def test_plot_patch_token_option_is_the_frozen_projected_patch_tokens(vit, images):
    plot = build_method("plot", vit, CLASSES, TEMPLATES, {"vit_features": "patch_tokens", "ctx_init": None})
    assert plot.frozen_image_side and not hasattr(plot, "ctx_vision")
    with torch.no_grad():
        local = vit_forward(vit, images, all_tokens=True)[:, 1:]
        embeddings, eot = text_prompts(vit, CLASSES, 4)
        text = torch.stack([text_forward(vit, embeddings, eot, ctx) for ctx in plot.ctx])
        expected = vit.logit_scale * ot_score(local, text, plot_sinkhorn, 0.1, 100, 0.01)
        assert torch.allclose(plot(images), expected.float(), atol=1e-4)


# --- FedOTP ------------------------------------------------------------------------------------------------------------
def fedotp_logits(method, backbone, images, contexts):
    local = vit_forward(backbone, images, all_tokens=True)[:, 1:]  # the authors' ViT: patch tokens, ln_post, proj
    embeddings, eot = text_prompts(backbone, CLASSES, 4)
    text = torch.stack([text_forward(backbone, embeddings, eot, ctx) for ctx in contexts])
    return backbone.logit_scale * ot_score(local, text, fedotp_cot, 0.01, 100, 1e-3, 0.8)


def test_fedotp_client_model_is_the_authors_cot_over_both_prompts(vit, images):
    fedotp = build_method("fedotp", vit, CLASSES, TEMPLATES, {})
    assert set(fedotp.shared_state()) == {"global_ctx"} and set(fedotp.local_state()) == {"local_ctx", "personalised"}
    fedotp.train()
    loss = fedotp.backward(fedotp.encode(images), LABELS)
    expected = F.cross_entropy(fedotp_logits(fedotp, vit, images, [fedotp.global_ctx, fedotp.local_ctx]), LABELS)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    grads = torch.autograd.grad(expected, [fedotp.global_ctx, fedotp.local_ctx])
    for param, grad in zip((fedotp.global_ctx, fedotp.local_ctx), grads):
        assert torch.allclose(param.grad, grad, atol=1e-4 * grad.abs().max().item())


def test_fedotp_server_evaluates_the_global_prompt_alone_and_a_client_its_own_model(vit, images):
    """The server (a fresh method loaded with the aggregate) never uses the random-init local prompt: it transports
    onto the global prompt alone (N = 1, mass γ); a client loaded with its local state uses both prompts."""
    server = build_method("fedotp", vit, CLASSES, TEMPLATES, {})
    server.eval()
    with torch.no_grad():
        global_only = fedotp_logits(server, vit, images, [server.global_ctx])
        assert torch.allclose(server(images), global_only.float(), atol=1e-4)
    client = build_method("fedotp", vit, CLASSES, TEMPLATES, {})
    with torch.no_grad():
        client.local_ctx.add_(0.05)
    client.train()
    client.backward(client.encode(images), LABELS)  # a client after local training: personalised
    kept = client.local_state()
    restored = build_method("fedotp", vit, CLASSES, TEMPLATES, {})
    restored.load_partial({**client.shared_state(), **kept})
    restored.eval()
    with torch.no_grad():
        both = fedotp_logits(restored, vit, images, [restored.global_ctx, restored.local_ctx])
        assert torch.allclose(restored(images), both.float(), atol=1e-4)


def test_fedotp_flip_preset_is_flips_balanced_sinkhorn(vit, images):
    fedotp = build_method("fedotp", vit, CLASSES, TEMPLATES, FLIP["fedotp_flip"])
    fedotp.train()
    with torch.no_grad():
        local = vit_forward(vit, images, all_tokens=True)[:, 1:]
        embeddings, eot = text_prompts(vit, CLASSES, 4)
        text = torch.stack([text_forward(vit, embeddings, eot, c) for c in (fedotp.global_ctx, fedotp.local_ctx)])
        expected = vit.logit_scale * ot_score(local, text, plot_sinkhorn, 0.1, 100, 1e-3)
        assert torch.allclose(fedotp(images), expected.float(), atol=1e-4)


# --- MaPLe ---------------------------------------------------------------------------------------------------------------
def test_maple_is_the_coupled_multimodal_prompt_of_the_reference(vit, images):
    maple = build_method("maple", vit, CLASSES, TEMPLATES, {})
    depth = len(maple.coupling)
    assert depth == min(9, len(vit.model.transformer.resblocks), len(vit.model.visual.transformer.resblocks))
    # Deeper couplings are clones of one layer (`_get_clones`): identical at initialisation, unlike the first.
    for layer in maple.coupling[2:]:
        assert torch.equal(layer.weight, maple.coupling[1].weight) and torch.equal(layer.bias, maple.coupling[1].bias)
    assert not torch.equal(maple.coupling[0].weight, maple.coupling[1].weight)
    # "a photo" learned from its word embeddings, "of a" kept as fixed words.
    assert torch.equal(maple.text.ctx, vit.token_embeddings(vit.tokenize(["a photo of a"]))[0, 1:3])
    text_prompts_ = [maple.text.ctx, *maple.text.deep]
    vision_prompts = [layer(p) for layer, p in zip(maple.coupling, text_prompts_)]  # F_i(P_i)
    embeddings, eot = text_prompts(vit, CLASSES, 2, fixed="of a")
    text = text_forward(vit, embeddings, eot, maple.text.ctx, deeper=text_prompts_[1:])
    image = vit_forward(vit, images, first=vision_prompts[0], deeper=vision_prompts[1:])
    expected = F.cross_entropy(vit.logit_scale * unit(image) @ unit(text).t(), LABELS)
    maple.train()
    loss = maple.backward(maple.encode(images), LABELS)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    params = [p for _, p in sorted(maple.named_parameters())]
    for param, grad in zip(params, torch.autograd.grad(expected, params)):
        assert torch.allclose(param.grad, grad, atol=1e-5 * max(grad.abs().max().item(), 1e-8))
    assert set(maple.shared_state()) == {n for n, _ in maple.named_parameters()} and maple.local_state() == {}


# --- VPT -------------------------------------------------------------------------------------------------------------------
def test_vpt_deep_prompts_are_the_references_on_clip(vit, images):
    vpt = build_method("vpt", vit, CLASSES, TEMPLATES, {})
    width, blocks = vit.model.visual.transformer.width, len(vit.model.visual.transformer.resblocks)
    assert vpt.prompts.shape == (blocks, 5, width)  # VPT-deep, the authors' default NUM_TOKENS = 5
    patch = vit.model.visual.conv1.kernel_size
    bound = math.sqrt(6.0 / (3 * patch[0] * patch[1] + width))  # xavier-uniform bound of the reference
    assert vpt.prompts.abs().max() <= bound and vpt.prompts.abs().max() > 0.9 * bound
    image = vit_forward(vit, images, first=vpt.prompts[0], deeper=list(vpt.prompts[1:]))
    with torch.no_grad():
        zero_shot = unit(vit.encode_text([TEMPLATES[0].format(c) for c in CLASSES]))  # the frozen classifier
    expected = F.cross_entropy(vit.logit_scale * unit(image) @ zero_shot.t(), LABELS)
    vpt.train()
    loss = vpt.backward(vpt.encode(images), LABELS)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    grad = torch.autograd.grad(expected, vpt.prompts)[0]
    assert torch.allclose(vpt.prompts.grad, grad, atol=1e-5 * grad.abs().max().item())
    assert set(vpt.shared_state()) == {"prompts"} and vpt.local_state() == {}


# --- configuration: constructor defaults = yaml defaults; FLIP presets ---------------------------------------------
VISUAL_METHODS = ["plot", "fedotp", "dpfpl", "maple", "vpt"]
FLIP = {  # what each FLIP preset changes (0-ml/flip: main.py defaults, scripts/run_batch.sh, flcore/models/clip/*.py)
    "plot_flip": {"n_prompts": 1, "ctx_init": None, "vit_features": "patch_tokens"},
    "fedotp_flip": {"transport": "balanced", "mass": 1.0, "eps": 0.1},
    "dpfpl_flip": {"rank": 8, "global_noise": "none"},
    "maple_flip": {"n_ctx": 4, "ctx_init": None, "prompt_depth": 1},
}


def _yaml(name):
    import yaml

    from flbench.cli import CONF_DIR

    return yaml.safe_load((Path(CONF_DIR) / "algorithm" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", VISUAL_METHODS)
def test_constructor_defaults_are_the_yaml_defaults(name):
    import inspect

    from flbench.algorithms.base import method_class

    signature = {}
    for klass in method_class(name).__mro__:
        if "__init__" in klass.__dict__:
            for p in inspect.signature(klass.__dict__["__init__"]).parameters.values():
                signature.setdefault(p.name, p.default)
    for key, value in _yaml(name).items():
        if key != "name" and not str(value).startswith("${"):
            assert signature[key] == value, f"{name}.{key}: yaml {value!r}, __init__ {signature[key]!r}"


def test_flip_presets_compose_over_their_method_and_change_only_flips_keys():
    """Hydra 1.3 composes `defaults: [<name>, _self_]` inside the algorithm group: the method's keys, then FLIP's."""
    from flbench.cli import compose

    for preset, changed in FLIP.items():
        base = preset.removesuffix("_flip")
        assert _yaml(preset)["defaults"] == [base, "_self_"]
        composed = compose([f"algorithm={preset}"], job_name="test")["algorithm"]
        default = compose([f"algorithm={base}"], job_name="test")["algorithm"]
        assert composed["name"] == base
        assert {k for k in composed if composed[k] != default[k]} == set(changed), preset
        assert all(composed[k] == v for k, v in changed.items()), preset
