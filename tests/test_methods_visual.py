"""PLOT, FedOTP, VPT, MaPLe, PromptSRC and the prompted CLIP passes they use: each method's defining behaviour,
parameter counts against a hand calculation (tiny CLIPs and a random ViT-B/16), and what is shared."""

import math

import pytest
import torch

import flbench.algorithms.ot as ot
from flbench.algorithms.base import build_method
from flbench.algorithms.prompting import handcrafted_text_features
from flbench.algorithms.promptsrc import gaussian_weights
from flbench.backbones import prompted
from flbench.backbones.clip import normalize
from flbench.errors import ConfigError
from helpers import random_tiny

CLASSES = ["red circle", "blue square", "green star"]
TEMPLATE = ["a photo of a {}."]
LABELS = torch.tensor([0, 1, 2, 0])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet():
    return random_tiny("tiny")


@pytest.fixture(scope="module")
def vit():
    return random_tiny("tiny-vit")


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _dims(backbone):
    """(text width, text layers, vision width, vision layers): read from the model, as tiny-vit's size may change."""
    return (backbone.text_width, prompted.text_layers(backbone), prompted.vision_width(backbone),
            prompted.vision_layers(backbone))


def _trainable(method):
    return {n for n, p in method.named_parameters() if p.requires_grad}


def _backward(method, images):
    method.train()
    loss = method.loss(method.encode(images), LABELS)
    loss.backward()
    method.eval()
    return loss


# --- prompted passes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny-vit"])
def test_prompted_passes_without_prompts_reproduce_open_clip(name, resnet, vit, images):
    backbone = resnet if name == "tiny" else vit
    pooled, local = prompted.encode_image_local(backbone, images)
    assert torch.allclose(pooled, backbone.encode_image(images), atol=1e-5)
    cells = 1 if name == "tiny" else math.prod(backbone.model.visual.grid_size)  # the ResNet's last map is 1×1
    assert local.shape == (4, cells, backbone.embed_dim)
    tokens = backbone.tokenize(["a photo of a red circle.", "blue"])
    embeddings = backbone.token_embeddings(tokens)
    assert torch.allclose(prompted.encode_text_prompted(backbone, embeddings, tokens.argmax(-1)),
                          backbone.model.encode_text(tokens), atol=1e-5)


def test_prompted_passes_call_each_block_through_its_module(vit, images):
    """Attention variants are swapped *inside* the blocks: the prompted passes must go through block.__call__."""
    calls = []
    blocks = list(vit.model.visual.transformer.resblocks) + list(vit.model.transformer.resblocks)
    handles = [b.register_forward_hook(lambda *_: calls.append(1)) for b in blocks]
    try:
        text_width, text_layers, vision_width, vision_layers = _dims(vit)
        prompted.encode_image_prompted(vit, images, [torch.zeros(2, vision_width)] * vision_layers)
        tokens = vit.tokenize(["x x red circle."])
        prompted.encode_text_prompted(vit, vit.token_embeddings(tokens), tokens.argmax(-1),
                                      [torch.zeros(2, text_width)] * (text_layers - 1))
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(blocks)


def test_deep_visual_prompts_replace_the_previous_prompt_outputs(vit, images):
    """With deep prompts, block i sees only its own prompt tokens: a block-1 prompt makes the block-0 prompt's
    *outputs* irrelevant, but not its influence on the image tokens inside block 0."""
    p0, p1 = torch.randn(2, 3, prompted.vision_width(vit)).unbind(0)
    deep = prompted.encode_image_prompted(vit, images, [p0, p1])
    # Reference: run block 0 with p0, then swap the prompt rows for p1 by hand, then the remaining blocks.
    visual = vit.model.visual
    x = visual._embeds((images - vit.mean) / vit.std)
    n = x.shape[1]
    x = visual.transformer.resblocks[0](torch.cat([x, visual.ln_pre(p0).expand(4, -1, -1)], 1))  # block 0: ln_pre
    x = torch.cat([x[:, :n], p1.expand(4, -1, -1)], 1)
    for block in visual.transformer.resblocks[1:]:
        x = block(x)
    reference = visual._pool(x[:, :n])[0] @ visual.proj
    assert torch.allclose(deep, reference, atol=1e-5)
    shallow = prompted.encode_image_prompted(vit, images, [p0])
    assert not torch.allclose(deep, shallow, atol=1e-4)


def test_prompted_passes_use_swapped_attention(images):
    """With routed-KV attention swapped into both towers, the prompted passes go through every swapped module and
    gradients still reach the prompts."""
    from flbench.backbones.attention import swapped_modules
    from flbench.backbones.conversion import apply_attention

    backbone = random_tiny("tiny-vit", seed=1)
    apply_attention(backbone, {"attention": {"kind": "routed_kv"}})
    modules = swapped_modules(backbone.model)
    assert len(modules) == prompted.vision_layers(backbone) + prompted.text_layers(backbone)
    called = set()
    handles = [m.register_forward_hook(lambda module, *_: called.add(id(module))) for m in modules]
    try:
        maple = build_method("maple", backbone, CLASSES, TEMPLATE, {})
        _backward(maple, images)
    finally:
        for h in handles:
            h.remove()
    assert called == {id(m) for m in modules}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in maple.parameters())


@pytest.mark.parametrize("name", ["vpt", "maple", "promptsrc"])
def test_visual_prompt_methods_refuse_a_resnet(name, resnet):
    with pytest.raises(ConfigError, match="tiny-vit"):
        build_method(name, resnet, CLASSES, TEMPLATE, {})


# --- PLOT ----------------------------------------------------------------------------------------------------------
def test_plot_logits_are_the_ot_score_under_a_plan_with_uniform_marginals(vit, images, monkeypatch):
    plot = build_method("plot", vit, CLASSES, TEMPLATE, {"n_prompts": 3, "n_ctx": 2, "tol": 1e-7, "max_iter": 1000})
    plans = []
    real = ot.transport_plan
    monkeypatch.setattr(ot, "transport_plan", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    local = plot.encode(images)
    logits = plot.logits(local)
    plan = plans[-1]  # [B, C, M, N]
    m = local.shape[1]
    assert plan.shape == (4, 3, m, 3)
    assert torch.allclose(plan.sum(-1), torch.full((4, 3, m), 1 / m), atol=1e-5)
    assert torch.allclose(plan.sum(-2), torch.full((4, 3, 3), 1 / 3), atol=1e-5)
    sim = torch.einsum("bmd,ncd->bcmn", normalize(local), normalize(plot.text_features()))
    assert torch.allclose(logits, vit.logit_scale * (plan * sim).sum((-2, -1)), atol=1e-4)


def test_plot_trains_only_its_prompts_and_counts(vit, images):
    """PLOT++ (the ViT default) trains text and visual prompts; with frozen patch tokens only the text prompts."""
    text_width, _, vision_width, _ = _dims(vit)
    plotpp = build_method("plot", vit, CLASSES, TEMPLATE, {"n_prompts": 4, "n_ctx": 4})
    _backward(plotpp, images)
    assert _trainable(plotpp) == {"ctx", "ctx_vision"} and plotpp.ctx_vision.grad.abs().sum() > 0
    assert plotpp.num_trainable() == 4 * 4 * text_width + 4 * 2 * vision_width and not plotpp.frozen_image_side
    plot = build_method("plot", vit, CLASSES, TEMPLATE, {"n_prompts": 4, "n_ctx": 4, "vit_features": "patch_tokens"})
    _backward(plot, images)
    assert _trainable(plot) == {"ctx"} and plot.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in vit.parameters())
    assert plot.num_trainable() == 4 * 4 * text_width and plot.shared_bytes() == 4 * 4 * text_width * 4
    assert plot.local_state() == {} and plot.frozen_image_side


def test_plot_on_the_tiny_resnet_averages_its_prompts(resnet, images):
    """One local feature (1×1 map): OT has a single row, so the score is the mean similarity over the N prompts."""
    plot = build_method("plot", resnet, CLASSES, TEMPLATE, {"n_prompts": 3})
    local = plot.encode(images)
    assert local.shape == (4, 1, resnet.embed_dim)
    sim = torch.einsum("bd,ncd->bnc", normalize(local[:, 0]), normalize(plot.text_features()))
    assert torch.allclose(plot.logits(local), resnet.logit_scale * sim.mean(1), atol=1e-4)


def test_plot_and_fedotp_evaluate_on_new_class_names(vit, images):
    for name in ("plot", "fedotp"):
        method = build_method(name, vit, CLASSES, TEMPLATE, {})
        method.set_classnames(["pink moon", "cyan ring"])
        assert method(images).shape == (4, 2)


# --- FedOTP ----------------------------------------------------------------------------------------------------------
def test_fedotp_shares_only_the_global_prompt(vit, images):
    fedotp = build_method("fedotp", vit, CLASSES, TEMPLATE, {"n_ctx": 4})
    assert set(fedotp.shared_state()) == {"global_ctx"} and set(fedotp.local_state()) == {"local_ctx", "personalised"}
    assert fedotp.num_trainable() == 2 * 4 * vit.text_width and fedotp.shared_bytes() == 4 * vit.text_width * 4
    assert not torch.equal(fedotp.global_ctx, fedotp.local_ctx), "equal prompts would stay equal under OT"
    _backward(fedotp, images)
    assert fedotp.global_ctx.grad.abs().sum() > 0 and fedotp.local_ctx.grad.abs().sum() > 0


def test_fedotp_transports_mass_gamma_with_the_patch_side_relaxed(vit, images, monkeypatch):
    fedotp = build_method("fedotp", vit, CLASSES, TEMPLATE, {"mass": 0.6, "eps": 0.01, "max_iter": 1000})
    seen = []
    real = ot.transport_plan
    monkeypatch.setattr(ot, "transport_plan", lambda *a, **k: seen.append((real(*a, **k), k)) or seen[-1][0])
    fedotp(images)
    plan, kwargs = seen[-1]
    assert kwargs["row_inequality"] is True
    assert torch.allclose(plan.sum(-2), torch.full((4, 3, 2), 0.3), atol=1e-5), "each prompt gets γ/2"
    m = plan.shape[-2]
    assert (plan.sum(-1) <= (1 + 1e-3) / m).all(), "no patch sends more than 1/M (within tol)"
    assert plan.sum(-1).min() < 0.5 / m, "γ < 1 leaves some patches (partly) untransported"


# --- VPT -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deep", [False, True])
def test_vpt_prompts_are_the_only_trained_part_and_the_text_side_is_zero_shot(vit, images, deep):
    _, _, width, layers = _dims(vit)
    vpt = build_method("vpt", vit, CLASSES, TEMPLATE, {"n_tokens": 5, "deep": deep})
    assert vpt.prompts.shape == ((layers if deep else 1), 5, width)
    assert vpt.num_trainable() == (layers if deep else 1) * 5 * width and not vpt.frozen_image_side
    patch = math.prod(vit.model.visual.patch_size)
    bound = math.sqrt(6 / (3 * patch + width))  # VPT's init: uniform in ±sqrt(6 / (3·patch² + width))
    assert vpt.prompts.abs().max() <= bound and vpt.prompts.abs().max() > 0.8 * bound
    assert torch.allclose(vpt.handcrafted, handcrafted_text_features(vit, CLASSES, TEMPLATE))
    assert not torch.allclose(vpt.encode(images), vit.encode_image(images), atol=1e-4)
    _backward(vpt, images)
    assert _trainable(vpt) == {"prompts"} and vpt.prompts.grad.abs().sum(dim=(1, 2)).min() > 0  # every layer
    assert all(p.grad is None for p in vit.parameters())


# --- MaPLe -----------------------------------------------------------------------------------------------------------
def test_maple_vision_prompts_are_coupled_to_the_language_prompts(vit, images):
    maple = build_method("maple", vit, CLASSES, TEMPLATE, {})
    text_width, text_layers, vision_width, vision_layers = _dims(vit)
    depth = min(9, text_layers, vision_layers)  # the paper's 9, capped at the shallower tiny tower
    assert len(maple.coupling) == depth and maple.text.deep.shape == (depth - 1, 2, text_width)
    for couple, text_prompt, vision_prompt in zip(maple.coupling, maple.text.layer_prompts(), maple.vision_prompts()):
        assert torch.allclose(vision_prompt, couple(text_prompt))
    # The image branch has no prompt of its own: image features move with the *text* prompts.
    features = maple.encode(images)
    grad_ctx, grad_deep = torch.autograd.grad(features.sum(), [maple.text.ctx, maple.text.deep])
    assert grad_ctx.abs().sum() > 0 and grad_deep.abs().sum() > 0
    assert maple.num_trainable() == depth * 2 * text_width + depth * (text_width * vision_width + vision_width)
    assert not maple.frozen_image_side and maple.local_state() == {}


def test_maple_learns_the_first_words_and_keeps_the_rest(vit):
    """n_ctx=2 with "a photo of a": "a photo" is learned, "of a" stays; at depth 1 that is exactly zero-shot."""
    maple = build_method("maple", vit, CLASSES, TEMPLATE, {"prompt_depth": 1})
    assert maple.text.fixed_words == "of a" and maple.text.deep is None
    assert torch.allclose(normalize(maple.text.encode()), handcrafted_text_features(vit, CLASSES, TEMPLATE),
                          atol=1e-5)
    maple.set_classnames(["pink moon"])
    assert torch.allclose(normalize(maple.text.encode()), handcrafted_text_features(vit, ["pink moon"], TEMPLATE),
                          atol=1e-5)


# --- PromptSRC -------------------------------------------------------------------------------------------------------
def test_promptsrc_self_regulation_terms(vit, images):
    templates = ["a photo of a {}.", "a sketch of a {}."]
    src = build_method("promptsrc", vit, CLASSES, templates, {"depth_text": 1, "teacher": "dataset"})
    assert torch.allclose(src.handcrafted, handcrafted_text_features(vit, CLASSES, templates)), "template ensemble"
    src.train()
    features, frozen = src.encode(images)
    assert torch.allclose(frozen, vit.encode_image(images)) and not frozen.requires_grad
    text = src.text.encode()
    logits = vit.logit_scale * normalize(features) @ normalize(text).t()
    zero_shot = vit.logit_scale * normalize(frozen) @ src.handcrafted.t()
    p, q = zero_shot.softmax(-1), logits.softmax(-1)
    kl = (p * (p.log() - q.log())).sum() / logits.numel()
    expected = (torch.nn.functional.cross_entropy(logits, LABELS)
                + 25 * (normalize(text) - src.handcrafted).abs().mean()
                + 10 * (normalize(features) - normalize(frozen)).abs().mean() + kl)
    assert torch.allclose(src.loss((features, frozen), LABELS), expected, atol=1e-5)
    src.eval()
    assert isinstance(src.encode(images), torch.Tensor), "evaluation skips the frozen pass"


def test_promptsrc_text_regulariser_is_zero_at_init_from_the_template(vit):
    # teacher=dataset: the dataset's template, which the "a photo of a" prompt reproduces at init (the default
    # teacher, the 60 ImageNet templates, is checked in test_fidelity_text_fed.py)
    src = build_method("promptsrc", vit, CLASSES, TEMPLATE, {"depth_text": 1, "teacher": "dataset"})
    assert torch.allclose(normalize(src.text.encode()), src.handcrafted, atol=1e-5)


def test_promptsrc_reports_the_gaussian_average_of_the_rounds(vit):
    """After the last round: the Gaussian average of rounds 1..R (round 0, the initial prompt, takes no weight);
    before it, the live aggregate (the full reference check is in test_fidelity_text_fed.py)."""
    src = build_method("promptsrc", vit, CLASSES, TEMPLATE, {"gpa_mean": 1.0, "gpa_std": 1.0, "num_rounds": 2})
    history = [{k: torch.full_like(v, float(r + 1)) for k, v in src.shared_state().items()} for r in range(3)]
    raw = [math.exp(-(r - 1.0) ** 2 / 2) for r in (1, 2)]
    expected = sum(w * (r + 1) for r, w in zip((1, 2), raw)) / sum(raw)
    reported = src.reported_state(history)
    assert set(reported) == set(history[-1])
    assert all(torch.allclose(v, torch.full_like(v, expected)) for v in reported.values())
    assert all(torch.equal(v, torch.full_like(v, 3.0)) for v in history[-1].values()), "history is not modified"
    assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in src.reported_state(history[:2]).values())
    # Default μ = 0.75 × num_rounds; far tails do not underflow to NaN.
    assert build_method("promptsrc", vit, CLASSES, TEMPLATE, {"num_rounds": 20}).gpa_mean == 15.0
    assert torch.isfinite(gaussian_weights(torch.arange(200), 150.0, 1.0)).all()
    assert build_method("promptsrc", vit, CLASSES, TEMPLATE, {}).reported_state(history)["vision"].eq(3).all()


def test_promptsrc_counts_and_gradients(vit, images):
    src = build_method("promptsrc", vit, CLASSES, TEMPLATE, {})
    text_width, text_layers, vision_width, vision_layers = _dims(vit)  # depth 9 capped at each tower's depth
    assert src.num_trainable() == text_layers * 4 * text_width + vision_layers * 4 * vision_width
    _backward(src, images)
    assert _trainable(src) == {"text.ctx", "text.deep", "vision"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in src.parameters())


# --- ViT-B/16 (random weights, offline) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_b16():
    import open_clip

    from flbench.backbones.clip import FrozenCLIP

    torch.manual_seed(0)
    return FrozenCLIP(open_clip.create_model("ViT-B-16", pretrained=None), "ViT-B-16")


@pytest.mark.parametrize("name, hparams, trainable, shared", [
    # PLOT++ (the ViT default): N=4 text prompts of 4 tokens + M=4 visual groups of 2 tokens
    ("plot", {}, 4 * 4 * 512 + 4 * 2 * 768, 4 * 4 * 512 + 4 * 2 * 768),
    ("plot", {"n_ctx": 16, "ctx_init": None, "vit_features": "patch_tokens"}, 4 * 16 * 512, 4 * 16 * 512),
    ("fedotp", {"n_ctx": 16}, 2 * 16 * 512, 16 * 512),  # only the global prompt travels
    ("vpt", {"n_tokens": 8, "deep": False}, 8 * 768, 8 * 768),
    ("vpt", {"n_tokens": 8, "deep": True}, 12 * 8 * 768, 12 * 8 * 768),
    ("vpt", {}, 12 * 5 * 768, 12 * 5 * 768),  # defaults: VPT-deep, 5 tokens
    # MaPLe, paper defaults: 2 tokens × 9 text layers + 9 couplings 512→768 with bias = 3.55 M
    ("maple", {}, 9 * 2 * 512 + 9 * (512 * 768 + 768), 3_555_072),
    # PromptSRC, paper defaults: 4+4 tokens over 9 layers of each tower = 46 K
    ("promptsrc", {}, 9 * 4 * 512 + 9 * 4 * 768, 46_080),
])
def test_vit_b16_counts_match_the_hand_calculation(vit_b16, name, hparams, trainable, shared):
    method = build_method(name, vit_b16, CLASSES, TEMPLATE, hparams)
    assert method.num_trainable() == trainable
    assert method.shared_bytes() == shared * 4


def test_vit_b16_maple_forward_on_one_image(vit_b16):
    maple = build_method("maple", vit_b16, CLASSES, TEMPLATE, {})
    with torch.no_grad():
        assert maple(torch.rand(1, 3, 224, 224)).shape == (1, 3)
