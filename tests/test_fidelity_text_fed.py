"""Reference parity of FedPGP, PromptFolio, ProDA and PromptSRC (conventions: test_fidelity_text.py): loss, gradient,
what is sent and what is kept, against the authors' formulation written out here from the backbone's public API."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flbench.backbones import prompted
from flbench.experiment import get_experiment
from helpers import compose_config, random_tiny
from test_fidelity_text import (CLASSES, TEMPLATES, assert_backward_matches, batch, build, clip_logits,
                                perturb, prompt_features, unit, word_embeddings, yaml_hparams)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone():
    return random_tiny()


@pytest.fixture(scope="module")
def vit():
    return random_tiny("tiny-vit")


def is_random_init(t: torch.Tensor, backbone) -> bool:
    """N(0, 0.02), not the word embeddings of "a photo of a"."""
    return 0.015 < float(t.detach().std()) < 0.025 and not torch.allclose(t, word_embeddings(backbone, "a photo of a"))


# --- FedPGP ---------------------------------------------------------------------------------------------------------
def test_fedpgp_matches_the_reference(backbone):
    """TianyuCuiOvO/FedPGP trainers/fedpgp.py + scripts/plot_basetonew_base.sh: σ ~ N(0, 0.02), U·V rank 8, anchor
    h_0 = CLIP("X X X X {class}."), L = CE(σ + UV) + μ·CE([cos(h_0, h_σ), cos(h_σ, h_p)]/τ, 0), μ = 0.5, τ = 0.5."""
    method = build("fedpgp", backbone)
    assert is_random_init(method.sigma, backbone)
    assert method.U.shape == (4, 8) and method.V.shape == (8, backbone.text_width)
    perturb(method)
    images, labels = batch(backbone)
    encoded = method.encode(images)
    sigma, U, V = method.sigma, method.U, method.V
    h_0 = unit(backbone.encode_text([f"X X X X {c}." for c in CLASSES]))
    h_sigma = unit(prompt_features(backbone, sigma, CLASSES))
    h_p = unit(prompt_features(backbone, sigma + U @ V, CLASSES))
    pairs = torch.stack([(h_0 * h_sigma).sum(-1), (h_sigma * h_p).sum(-1)], dim=1) / 0.5
    contrastive = F.cross_entropy(pairs, torch.zeros(len(CLASSES), dtype=torch.long))
    reference = F.cross_entropy(clip_logits(backbone, encoded, h_p), labels) + 0.5 * contrastive
    method.eval()  # the server, which holds no client's U·V, scores with σ alone
    assert torch.allclose(method.logits(encoded), clip_logits(backbone, encoded, h_sigma), atol=1e-5)
    method.train()
    assert_backward_matches(method, encoded, labels, reference)
    assert set(method.shared_state()) == {"sigma"}
    assert set(method.local_state()) == {"U", "V", "personalised"}
    method.eval()  # a personalised client (flag in its local state) scores with σ + U·V
    assert torch.allclose(method.logits(encoded), clip_logits(backbone, encoded, h_p), atol=1e-5)


# --- PromptFolio ----------------------------------------------------------------------------------------------------
def test_promptfolio_matches_the_reference(backbone):
    """PanBikang/PromptFolio trainers/PromptFolio.py: text features (1 − θ)·ĝ + θ·l̂ of the normalised global and
    local features, *not* renormalised, θ = 0.4 (federated_main.py --frac_p); both prompts N(0, 0.02)."""
    method = build("promptfolio", backbone)
    assert is_random_init(method.global_ctx, backbone) and is_random_init(method.local_ctx, backbone)
    assert not torch.allclose(method.global_ctx, method.local_ctx)
    perturb(method)
    images, labels = batch(backbone)
    encoded = method.encode(images)
    g = unit(prompt_features(backbone, method.global_ctx, CLASSES))
    loc = unit(prompt_features(backbone, method.local_ctx, CLASSES))
    mixture = 0.6 * g + 0.4 * loc
    logits = backbone.logit_scale * unit(encoded) @ mixture.t()
    assert float(mixture.detach().norm(dim=-1).max()) < 1.0 - 1e-4  # the mixture is shorter: a lower effective temperature
    method.eval()
    assert torch.allclose(method.logits(encoded), clip_logits(backbone, encoded, g), atol=1e-5)
    method.train()
    assert_backward_matches(method, encoded, labels, F.cross_entropy(logits, labels))
    assert set(method.shared_state()) == {"global_ctx"}
    assert set(method.local_state()) == {"local_ctx", "personalised"}


# --- ProDA ----------------------------------------------------------------------------------------------------------
def reference_proda_features(backbone, ctx):
    """Normalised class features [K, C, D]: the first K/4 prompts put the class name in front, the next K/4 in the
    middle, the rest at the end."""
    K = ctx.shape[0]
    positions = ["front"] * (K // 4) + ["middle"] * (K // 4) + ["end"] * (K - 2 * (K // 4))
    return torch.stack([unit(prompt_features(backbone, ctx[k], CLASSES, positions[k])) for k in range(K)])


def reference_proda_loss(backbone, ctx, encoded, labels, diversity_weight=0.1):
    """Every public ProDA implementation (FLIP flcore/models/clip/ProDA.py, the Dassl-based copies): diagonal
    covariance over prompts weighted by x², divisor K + 1; diversity = mean |cos| of the class-free prompts."""
    K = ctx.shape[0]
    feats = reference_proda_features(backbone, ctx)
    x, s = unit(encoded), backbone.logit_scale
    mean = feats.mean(0)
    dev = feats - mean                                                  # [K, C, D]
    diff = dev[:, labels].unsqueeze(2) - dev.unsqueeze(1)               # [K, B, C, D]: w_ky − w_kj, centred
    sigma = torch.einsum("bd,kbcd->bc", x ** 2, diff ** 2) / (K + 1)
    surrogate = F.cross_entropy(s * x @ mean.t() + 0.5 * s ** 2 * sigma, labels)
    tokens = backbone.tokenize(["X X X X."])
    embeds = backbone.token_embeddings(tokens).repeat(K, 1, 1)
    embeds = torch.cat([embeds[:, :1], ctx, embeds[:, 1 + ctx.shape[1]:]], dim=1)
    free = unit(backbone.encode_text_embeddings(embeds, tokens.argmax(-1).repeat(K)))
    off_diagonal = ~torch.eye(K, dtype=torch.bool)
    return surrogate + diversity_weight * (free @ free.t())[off_diagonal].abs().mean()


def test_proda_matches_the_reference(backbone):
    assert yaml_hparams("proda")["n_prompts"] == 32
    method = build("proda", backbone, n_prompts=4)
    assert method.ctx.shape == (4, 4, backbone.text_width) and 0.015 < float(method.ctx.detach().std()) < 0.025
    perturb(method, scale=0.2)  # spread the prompts so that the variance term is large
    images, labels = batch(backbone)
    encoded = method.encode(images)
    mean = reference_proda_features(backbone, method.ctx).mean(0)
    method.eval()  # prediction: the expected logit under the Gaussian (mean of normalised features, not renormalised)
    assert torch.allclose(method.logits(encoded), backbone.logit_scale * unit(encoded) @ mean.t(), atol=1e-5)
    method.train()
    assert_backward_matches(method, encoded, labels, reference_proda_loss(backbone, method.ctx, encoded, labels))
    assert set(method.shared_state()) == {"ctx"} and method.local_state() == {}


def test_proda_prompt_batches_cycle_through_a_permutation(backbone):
    """prompt_batch: the reference walks a random permutation of the K prompts in batches (every prompt once per
    cycle); with the diversity term off, exactly the batch's prompts receive a gradient."""
    method = build("proda", backbone, n_prompts=4, prompt_batch=2, diversity_weight=0.0)
    images, labels = batch(backbone)
    encoded = method.encode(images)
    used = []
    for _ in range(2):
        method.zero_grad()
        method.backward(encoded, labels)
        used.append({k for k in range(4) if method.ctx.grad[k].abs().sum() > 0})
    assert [len(u) for u in used] == [2, 2] and used[0] | used[1] == {0, 1, 2, 3}


def test_proda_each_local_training_starts_a_new_prompt_walk():
    """The walk is not in the state dict, so `Experiment.fresh()` restarts it: with the same seed a client draws the
    same first prompt batch whatever the client before it left (a resumed run or a Ray worker has none before it)."""
    experiment = get_experiment(compose_config(["algorithm=proda", "algorithm.n_prompts=4",
                                                "algorithm.prompt_batch=2"]))
    experiment.method  # noqa: B018 — built before the seed (building it reseeds torch), as the client app does
    torch.manual_seed(0)
    first = experiment.fresh().next_prompt_batch()  # the previous client stops halfway through its permutation
    torch.manual_seed(0)
    assert torch.equal(experiment.fresh().next_prompt_batch(), first)


# --- PromptSRC ------------------------------------------------------------------------------------------------------
EXCLUDED_FROM_CLIPS_80 = {  # the 20 of CLIP's 80 ImageNet templates that PromptSRC's 60 leave out
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}."}


def promptsrc_teacher(backbone):
    """muzairkhattak/PromptSRC trainers/promptsrc.py: the *unnormalised* features of the 60 ImageNet templates,
    averaged, then normalised, for every dataset."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES if t("{}") not in EXCLUDED_FROM_CLIPS_80]
    assert len(templates) == 60
    return unit(torch.stack([backbone.encode_text([t.format(c) for c in CLASSES]) for t in templates]).mean(0))


def test_promptsrc_matches_the_reference(vit):
    method = build("promptsrc", vit, num_rounds=4)
    perturb(method)
    images, labels = batch(vit, n=4)
    method.train()
    encoded = method.encode(images)
    text = method.text
    tokens = vit.tokenize([f"X X X X {c}." for c in CLASSES])
    embeds = vit.token_embeddings(tokens)
    embeds = torch.cat([embeds[:, :1], text.ctx.expand(len(CLASSES), -1, -1), embeds[:, 5:]], dim=1)
    text_features = unit(prompted.encode_text_prompted(vit, embeds, tokens.argmax(-1), list(text.deep.unbind(0))))
    image_features = unit(prompted.encode_image_prompted(vit, images, list(method.vision.unbind(0))))
    frozen = unit(vit.encode_image(images))
    teacher = promptsrc_teacher(vit)
    logits = vit.logit_scale * image_features @ text_features.t()
    zero_shot = vit.logit_scale * frozen @ teacher.t()
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(zero_shot, -1), reduction="sum",
                  log_target=True) / logits.numel()
    reference = (F.cross_entropy(logits, labels) + 25 * (text_features - teacher).abs().mean()
                 + 10 * (image_features - frozen).abs().mean() + kl)
    assert_backward_matches(method, encoded, labels, reference)
    assert set(method.shared_state()) == {n for n, _ in method.named_parameters()} and method.local_state() == {}


def test_promptsrc_without_visual_prompts_regularises_the_text_side_only(vit):
    """FLIP's PromptSRC has no image prompts (promptsrc_flip: n_ctx_vision=0): the image features are CLIP's."""
    method = build("promptsrc", vit, num_rounds=4, n_ctx_vision=0)
    images, _ = batch(vit, n=2)
    method.train()
    features, frozen = method.encode(images)
    assert torch.allclose(features, vit.encode_image(images), atol=1e-6)
    assert not any("vision" in n for n, _ in method.named_parameters())


def test_promptsrc_gaussian_prompt_aggregation_is_the_references_final_model(vit):
    """Rounds 1..R play the reference's epochs 1..N: the model after the last round is Σ_r w_r θ_r with
    w_r ∝ N(r; μ, σ) normalised over r = 1..R (μ = 0.75·R, σ = 1: the reference's 15 and 1 at 20 epochs). Round 0
    (the initial prompt) takes no weight; before round R the live aggregate is reported, as the reference's model
    is until its last epoch."""
    R = 4
    method = build("promptsrc", vit, num_rounds=R)
    keys = list(method.shared_state())
    g = torch.Generator().manual_seed(0)
    history = [{k: torch.randn(v.shape, generator=g) for k, v in method.shared_state().items()} for _ in range(R + 1)]
    for t in range(R):
        reported = method.reported_state(history[:t + 1])
        assert all(torch.equal(reported[k], history[t][k]) for k in keys), t
    rounds = torch.arange(1, R + 1, dtype=torch.float64)
    weights = torch.exp(-(rounds - 0.75 * R) ** 2 / 2)
    weights = weights / weights.sum()
    final = method.reported_state(history)
    for k in keys:
        expected = sum(float(w) * history[r][k].double() for w, r in zip(weights, range(1, R + 1)))
        assert torch.allclose(final[k].double(), expected, atol=1e-6), k
