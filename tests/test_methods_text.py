"""Text-side methods of the zoo, each tested for what defines it (and for the bug that would break it).

Mechanics run on an untrained tiny CLIP; parameter and byte counts are also checked on a randomly initialised
ViT-B/16 (built once per module) against hand calculations at text width 512 and embedding dimension 512.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from flbench.algorithms.base import build_method, cosine_logits
from flbench.algorithms.dpfpl import factorise
from flbench.algorithms.proda import gaussian_surrogate_loss, prompt_positions
from flbench.algorithms.prograd import prograd_project
from flbench.algorithms.prompting import handcrafted_text_features
from flbench.backbones.clip import normalize
from flbench.errors import ConfigError
from helpers import random_tiny

CLASSES = ["red circle", "blue square", "green star", "pink moon"]
NOVEL = ["cyan ring", "white heart", "black cross"]
TEMPLATE = ["a photo of a {}."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone():
    return random_tiny()


@pytest.fixture(scope="module")
def vit():
    import open_clip

    from flbench.backbones.clip import FrozenCLIP

    torch.manual_seed(0)
    return FrozenCLIP(open_clip.create_model("ViT-B-16", pretrained=None), "ViT-B-16")


def build(name, backbone, classes=CLASSES, **hparams):
    torch.manual_seed(0)
    return build_method(name, backbone, classes, TEMPLATE, hparams)


def batch(backbone, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, backbone.image_size, backbone.image_size, generator=g)
    return images, torch.randint(0, len(CLASSES), (n,), generator=g)


def perturb(method, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


# --- parameter and byte counts: tiny CLIP (width 128, embed 128) and ViT-B/16 (width 512, embed 512) ----------------
W, D = 512, 512
FFN = 4 * W
VIT_COUNTS = {  # name: (trainable parameters, shared parameters), by hand at n_ctx 4
    "cocoop": (4 * W + (D * (D // 16) + D // 16) + ((D // 16) * W + W),) * 2,
    "kgcoop": (4 * W,) * 2,
    "prograd": (4 * W,) * 2,
    "proda": (32 * 4 * W,) * 2,
    "fedtpg": ((4 * W + 2 * W + 2 * W + 2 * D + (W * W + 2 * W * D + 3 * W) + (W * W + W)
                + (W * 2 * FFN + 2 * FFN) + (FFN * W + W)),) * 2,  # GEGLU: the first layer is 2·FFN wide
    "promptfolio": (2 * 4 * W, 4 * W),
    "fedpgp": (4 * W + 4 * 8 + 8 * W, 4 * W),
    "dpfpl": (2 * 4 * W, 4 * W),
}


@pytest.mark.parametrize("name", sorted(VIT_COUNTS))
def test_vit_b16_counts_match_hand_calculation(vit, name):
    method = build(name, vit, ["red circle", "blue square", "green star"])
    trainable, shared = VIT_COUNTS[name]
    assert method.num_trainable() == trainable
    assert sum(v.numel() for v in method.shared_state().values()) == shared
    assert method.shared_bytes() == 4 * shared  # fp32 on the wire


def test_vit_b16_forward_one_image_batched_cocoop(vit):
    method = build("cocoop", vit, ["red circle", "blue square", "green star"])
    assert method(torch.rand(1, 3, 224, 224)).shape == (1, 3)


def test_tiny_counts(backbone):
    w = backbone.text_width
    assert build("cocoop", backbone).num_trainable() == 4 * w + (128 * 8 + 8) + (8 * w + w)
    assert build("proda", backbone, n_prompts=6).num_trainable() == 6 * 4 * w
    assert build("fedpgp", backbone, rank=3).num_trainable() == 4 * w + 4 * 3 + 3 * w


@pytest.mark.parametrize("name", sorted(VIT_COUNTS))
def test_every_method_trains_only_its_own_parameters_and_evaluates_new_names(backbone, name):
    method = build(name, backbone, **({"n_prompts": 4} if name == "proda" else {}))
    images, labels = batch(backbone)
    method.train()
    method.backward(method.encode(images), labels)
    assert all(p.grad is None for p in backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    method.eval()
    method.set_classnames(NOVEL)
    assert method(images).shape == (len(images), len(NOVEL))


# --- CoCoOp ------------------------------------------------------------------------------------------------------
def test_cocoop_batched_logits_equal_one_image_at_a_time(backbone):
    method = build("cocoop", backbone, instance_chunk=8)  # 8 prompts per call: chunks of 2 images
    perturb(method)
    images, _ = batch(backbone, n=5)
    encoded = method.encode(images)
    batched = method.logits(encoded)
    single = torch.cat([method.logits(encoded[i:i + 1]) for i in range(len(images))])
    assert torch.allclose(batched, single, atol=1e-5)
    ctx = method.instance_context(encoded)
    assert ctx.shape == (5, 4, backbone.text_width) and not torch.allclose(ctx[0], ctx[1])


# --- KgCoOp ------------------------------------------------------------------------------------------------------
def test_kgcoop_term_is_zero_at_the_handcrafted_init_and_weighted_by_lambda(backbone):
    method = build("kgcoop", backbone, ctx_init="a photo of a")
    images, labels = batch(backbone)
    encoded = method.encode(images)
    ce = F.cross_entropy(method.logits(encoded), labels)
    assert method.knowledge_term(method.text_features()).abs() < 1e-6
    assert torch.allclose(method.loss(encoded, labels), ce, atol=1e-6)
    perturb(method)
    text = method.text_features()
    manual = 1 - F.cosine_similarity(text, handcrafted_text_features(backbone, CLASSES, TEMPLATE), dim=-1).mean()
    ce = F.cross_entropy(cosine_logits(backbone, encoded, text), labels)
    assert manual > 1e-4
    assert torch.allclose(method.loss(encoded, labels), ce + 8.0 * manual, atol=1e-5)


# --- ProGrad ----------------------------------------------------------------------------------------------------
def test_prograd_rule_on_vectors():
    general = torch.tensor([1.0, 0.0, 0.0])
    aligned = torch.tensor([0.5, 2.0, 0.0])
    conflicting = torch.tensor([-1.0, 2.0, 0.0])
    assert torch.equal(prograd_project(aligned, general), aligned)
    projected = prograd_project(conflicting, general)
    assert torch.allclose(projected, torch.tensor([0.0, 2.0, 0.0])) and torch.dot(projected, general).abs() < 1e-7
    assert torch.allclose(prograd_project(conflicting, general, lam=0.5), torch.tensor([-0.5, 2.0, 0.0]))
    assert torch.equal(prograd_project(conflicting, torch.zeros(3)), conflicting)


def test_prograd_gradient_differs_from_the_raw_one_exactly_when_they_conflict(backbone):
    method = build("prograd", backbone)
    perturb(method, scale=0.1)
    params = [p for p in method.parameters() if p.requires_grad]
    seen = set()
    for seed in range(4):
        images, labels = batch(backbone, seed=seed)
        encoded = method.encode(images)
        _, task, general = method.gradients(encoded, labels)
        method.zero_grad()
        method.backward(encoded, labels)
        update = torch.cat([p.grad.reshape(-1) for p in params])
        conflict = bool(torch.dot(task, general) < 0)
        seen.add(conflict)
        if conflict:
            assert not torch.allclose(update, task)
            assert torch.dot(update, general).abs() < 1e-4 * task.norm() * general.norm()  # λ = 1: orthogonal
        else:
            assert torch.allclose(update, task)
    assert seen == {True, False}, "both cases must occur for this test to mean anything"


def test_prograd_kl_vanishes_at_the_zeroshot_prompt(backbone):
    method = build("prograd", backbone, ctx_init="a photo of a")
    images, labels = batch(backbone)
    encoded = method.encode(images)
    assert method.kl_to_zeroshot(encoded, method.logits(encoded)).abs() < 1e-6


# --- ProDA -------------------------------------------------------------------------------------------------------
def test_proda_positions_quarter_quarter_half():
    assert prompt_positions(8) == ["front"] * 2 + ["middle"] * 2 + ["end"] * 4


def test_proda_full_covariance_surrogate_equals_the_explicit_covariance_formula():
    g = torch.Generator().manual_seed(0)
    K, C, Dm, B = 5, 3, 4, 6
    feats, images = torch.randn(K, C, Dm, generator=g), normalize(torch.randn(B, Dm, generator=g))
    labels, scale = torch.randint(0, C, (B,), generator=g), torch.tensor(3.0)
    mean = feats.mean(0)
    centred = (feats - mean).reshape(K, C * Dm)
    cov = (centred.t() @ centred / (K + 1)).reshape(C, Dm, C, Dm)  # joint covariance, the reference's divisor
    expected = []
    for x, y in zip(images, labels):
        terms = torch.stack([scale * mean[j] @ x + 0.5 * scale ** 2 * x @ (cov[j, :, j] + cov[y, :, y] - cov[j, :, y]
                                                                          - cov[y, :, j]) @ x for j in range(C)])
        expected.append(torch.logsumexp(terms, 0) - scale * mean[y] @ x)
    assert torch.allclose(gaussian_surrogate_loss(feats, images, labels, scale, "full"), torch.stack(expected).mean(),
                          atol=1e-5)


def test_proda_surrogate_gradients_repeat_bit_for_bit_on_two_threads(two_threads):
    """Many images per label, two threads: picking the label rows by indexing made the backward add with racing
    atomics (49 of 50 backward passes differed from the first at B = 128, measured); the one-hot product does not."""
    g = torch.Generator().manual_seed(2)
    K, C, Dm, B = 32, 64, 128, 256
    feats, images = normalize(torch.randn(K, C, Dm, generator=g)), normalize(torch.randn(B, Dm, generator=g))
    labels, scale = torch.randint(0, C, (B,), generator=g), torch.tensor(50.0)

    def gradient(covariance):
        leaf = feats.clone().requires_grad_()
        gaussian_surrogate_loss(leaf, images, labels, scale, covariance).backward()
        return leaf.grad

    for covariance in ("diagonal", "full"):
        first = gradient(covariance)
        assert all(torch.equal(first, gradient(covariance)) for _ in range(10))


def test_proda_surrogate_bounds_the_expected_cross_entropy():
    """With the full covariance the loss is an upper bound of E_w[CE] for w drawn from the prompts' Gaussian (Monte
    Carlo check)."""
    g = torch.Generator().manual_seed(1)
    K, C, Dm, B = 6, 4, 5, 8
    feats, images = torch.randn(K, C, Dm, generator=g) * 0.3, normalize(torch.randn(B, Dm, generator=g))
    labels, scale = torch.randint(0, C, (B,), generator=g), torch.tensor(4.0)
    mean = feats.mean(0)
    centred = (feats - mean).reshape(K, C * Dm)
    cov = centred.t() @ centred / (K + 1) + 1e-6 * torch.eye(C * Dm)
    samples = torch.distributions.MultivariateNormal(mean.reshape(-1), cov).sample((4000,)).reshape(-1, C, Dm)
    expected_ce = torch.stack([F.cross_entropy(scale * images @ w.t(), labels) for w in samples]).mean()
    bound = gaussian_surrogate_loss(feats, images, labels, scale, "full")
    plain = F.cross_entropy(scale * images @ mean.t(), labels)
    assert plain <= expected_ce <= bound


def test_proda_identical_prompts_reduce_to_plain_ce_and_full_similarity(backbone):
    method = build("proda", backbone, n_prompts=4)
    with torch.no_grad():
        method.ctx.copy_(method.ctx[:1].expand_as(method.ctx))
        method.positions = ["end"] * 4
    images, labels = batch(backbone)
    encoded = method.encode(images)
    index = torch.arange(4)
    ce = F.cross_entropy(method.logits(encoded), labels)
    for covariance in ("diagonal", "full"):
        surrogate = gaussian_surrogate_loss(method.class_features(index), normalize(encoded), labels,
                                            backbone.logit_scale, covariance)
        assert torch.allclose(surrogate, ce, atol=1e-5)
    assert torch.allclose(method.diversity(), torch.tensor(1.0), atol=1e-5)


def test_proda_rejects_a_single_prompt(backbone):
    with pytest.raises(ConfigError, match="n_prompts"):
        build("proda", backbone, n_prompts=1)


# --- FedTPG -------------------------------------------------------------------------------------------------------
def test_fedtpg_prompt_is_generated_from_the_class_names(backbone):
    method = build("fedtpg", backbone)
    perturb(method, scale=0.2)
    seen = method.generated_context()
    method.set_classnames(NOVEL)
    novel = method.generated_context()
    assert not torch.allclose(seen, novel, atol=1e-4), "the generator must condition on the task's class names"
    method.set_classnames(CLASSES)
    assert torch.allclose(method.generated_context(), seen)
    assert method.local_state() == {} and set(method.shared_state()) == {n for n, _ in method.named_parameters()}


# --- personalised methods: PromptFolio, FedPGP, DP-FPL ---------------------------------------------------------------
def test_promptfolio_mixes_normalised_features_and_shares_only_the_global_prompt(backbone):
    method = build("promptfolio", backbone, theta=0.3)
    perturb(method)
    glob = normalize(method.prompt.encode(method.global_ctx))
    loc = normalize(method.prompt.encode(method.local_ctx))
    method.train()
    assert torch.allclose(method.text_features(), 0.7 * glob + 0.3 * loc, atol=1e-5)
    method.eval()  # the server holds no local prompt: the global one alone
    assert torch.allclose(method.text_features(), glob, atol=1e-6)
    assert set(method.shared_state()) == {"global_ctx"}
    assert set(method.local_state()) == {"local_ctx", "personalised"}


def test_fedpgp_sends_only_sigma_and_its_template_anchor_option(backbone):
    """anchor=template (non-default): the contrastive positive is the dataset's hand-crafted features (the default
    anchor, the authors' "X … X {class}.", is checked in test_fidelity_text_fed.py)."""
    method = build("fedpgp", backbone, mu=0.5, temperature=0.5, anchor="template")
    perturb(method)
    assert set(method.shared_state()) == {"sigma"}
    assert set(method.local_state()) == {"U", "V", "personalised"}
    images, labels = batch(backbone)
    encoded = method.encode(images)
    h0 = handcrafted_text_features(backbone, CLASSES, TEMPLATE)
    h_sigma = normalize(method.prompt.encode(method.sigma))
    h_p = normalize(method.prompt.encode(method.sigma + method.U @ method.V))
    pos, neg = (h0 * h_sigma).sum(-1) / 0.5, (h_sigma * h_p).sum(-1) / 0.5
    contrastive = (-(pos - torch.logaddexp(pos, neg))).mean()
    ce = F.cross_entropy(cosine_logits(backbone, encoded, h_p), labels)
    assert torch.allclose(method.loss(encoded, labels), ce + 0.5 * contrastive, atol=1e-5)
    method.zero_grad()
    method.loss(encoded, labels).backward()
    assert all(p.grad.abs().sum() > 0 for p in (method.sigma, method.U, method.V))


def test_dpfpl_factorisation_is_low_rank_plus_residual(backbone):
    g = torch.Generator().manual_seed(0)
    local = torch.randn(6, 32, generator=g)
    u, v, residual = factorise(local, 3, generator=g)
    assert u.shape == (6, 3) and v.shape == (3, 32)
    assert torch.allclose(u.t() @ u, torch.eye(3), atol=1e-5) and torch.allclose(v @ v.t(), torch.eye(3), atol=1e-5)
    assert torch.allclose(u @ v + residual, local, atol=1e-5) and residual.abs().max() > 1e-3
    assert build("dpfpl", backbone, rank=99).rank == 4  # at most n_ctx


# DP-FPL's local gradient, private step and reported budget against the reference: test_fidelity_visual_dp.py.
def test_dpfpl_noise_scale_follows_epsilon_and_delta(backbone):
    rounds, delta, clip = 10, 1e-5, 50.0
    z = {eps: build("dpfpl", backbone, epsilon=eps, delta=delta, rounds=rounds, clip_norm=clip).noise_multiplier
         for eps in (0.5, 2.0)}
    assert z[0.5] == pytest.approx(math.sqrt(rounds * math.log(1 / delta)) / 0.5)
    assert z[2.0] == pytest.approx(z[0.5] / 4)
    method = build("dpfpl", backbone, epsilon=2.0, delta=delta, rounds=rounds, clip_norm=clip)
    images, labels = batch(backbone, n=8)
    encoded = method.encode(images)
    _, per_example = method.prompt_gradients(encoded, labels)
    assert per_example.flatten(1).norm(dim=1).max() < clip, "no clipping, so the difference is the noise alone"
    clean = per_example.mean(0)
    method.train()
    method.backward(encoded, labels)
    noise = method.global_ctx.grad - clean
    expected_std = z[2.0] * clip / len(labels)
    assert noise.std().item() == pytest.approx(expected_std, rel=0.1)


# --- docs/methods.md generator ------------------------------------------------------------------------------------
def test_methods_doc_rows_come_from_the_code(backbone):
    from flbench.methods_doc import describe, render

    rows = [describe(name, backbone, CLASSES) for name in ("coop", "fedpgp", "proda")]
    fedpgp = rows[1]
    assert fedpgp["trained"] == "`sigma`, `U`, `V`" and fedpgp["shared"] == "`sigma`" and fedpgp["local"] == "`U`, `V`"
    assert fedpgp["trainable_params"] == 4 * 128 + 4 * 8 + 8 * 128
    assert fedpgp["bytes_per_round"] == 2 * 4 * (4 * 128)  # σ up and down, fp32
    text = render(rows, len(CLASSES))
    assert all(f"| `{name}` |" in text for name in ("coop", "fedpgp", "proda"))
    assert "\\|cos\\|" in text, "a | inside a cell must be escaped"
    assert "### `fedpgp`" in text and "prompt-wise contrastive term" in text  # the module docstring as notes
    fidelity = text[text.index("## Fidelity"):]
    assert "TianyuCuiOvO/FedPGP" in fidelity and "`algorithm=fedpgp_flip` sets `mu=1.0`, `temperature=1.0`" in fidelity
