"""Reference parity of the text-side methods: each method's loss, the gradient it leaves, what it sends to the server
and what it keeps, against its authors' formulation written out here independently.

Every reference below is built from the backbone's public API only (`tokenize`, `token_embeddings`,
`encode_text_embeddings`, `encode_text`, `encode_image`, `logit_scale`) and the method's parameter *tensors*: prompts
are assembled by hand, losses computed by hand; no helper of the method under test is called. Methods are built with
their `conf/algorithm/<name>.yaml` defaults, so a default that leaves the authors' setting fails here. The references
(repository, file) are named in each method's `fidelity` text. PromptSRC, ProDA, FedPGP and PromptFolio:
test_fidelity_text_fed.py.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from flbench.algorithms.base import build_method, method_class
from flbench.errors import ConfigError
from helpers import random_tiny

CONF = Path(__file__).resolve().parents[1] / "conf" / "algorithm"
CLASSES = ["red circle", "blue square", "green star", "pink moon"]
NOVEL = ["cyan ring", "white heart", "black cross"]
TEMPLATES = ["a photo of a {}, a shape.", "a drawing of a {}."]  # not "a photo of a {}.": anchors must be told apart

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone():
    return random_tiny()


@functools.lru_cache(maxsize=None)
def composed_algorithm(*overrides: str) -> dict:
    """The `algorithm` group `python -m flbench <overrides>` would run (composed once per test session)."""
    from flbench.cli import compose

    return compose(list(overrides), job_name="test")["algorithm"]


def yaml_hparams(name: str) -> dict:
    """The method's yaml defaults (interpolations such as ${num_rounds} left to the caller)."""
    data = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    return {k: v for k, v in data.items() if k not in ("name", "defaults") and not str(v).startswith("${")}


def build(name: str, backbone, classes=CLASSES, **overrides):
    torch.manual_seed(0)
    return build_method(name, backbone, classes, TEMPLATES, {**yaml_hparams(name), **overrides})


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


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# --- the reference prompt: "[SOS] X … X name. [EOT]" with the X embeddings replaced, in CoOp's three positions ----
def prompt_features(backbone, ctx: torch.Tensor, names, position: str = "end") -> torch.Tensor:
    """Unnormalised text features [C, D] of the prompts with context `ctx` ([n, W] shared or [C, n, W])."""
    n = ctx.shape[-2]
    tokens = backbone.tokenize([f"{' '.join(['X'] * n)} {name}." for name in names])
    embeddings = backbone.token_embeddings(tokens)
    rows = []
    for i, name in enumerate(names):
        c = ctx if ctx.dim() == 2 else ctx[i]
        length = len(backbone.tokenizer.encode(name))
        sos, word, rest = embeddings[i, :1], embeddings[i, 1 + n:1 + n + length], embeddings[i, 1 + n + length:]
        parts = {"end": [sos, c, word, rest], "front": [sos, word, c, rest],
                 "middle": [sos, c[:n // 2], word, c[n // 2:], rest]}[position]
        rows.append(torch.cat(parts))
    return backbone.encode_text_embeddings(torch.stack(rows), tokens.argmax(-1))


def word_embeddings(backbone, words: str) -> torch.Tensor:
    n = len(backbone.tokenizer.encode(words))
    return backbone.token_embeddings(backbone.tokenize([words]))[0, 1:1 + n]


def clip_logits(backbone, image_features, text_features):
    return backbone.logit_scale * unit(image_features) @ unit(text_features).t()


def grads_of(loss: torch.Tensor, method) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}


def assert_backward_matches(method, encoded, labels, reference_loss, atol=1e-5):
    """method.backward leaves exactly the reference gradient and returns the reference loss."""
    expected = grads_of(reference_loss, method)
    method.zero_grad()
    loss = method.backward(encoded, labels)
    assert torch.allclose(loss, reference_loss.detach(), atol=atol), (float(loss), float(reference_loss))
    for name, g in expected.items():
        got = dict(method.named_parameters())[name].grad
        assert got is not None and torch.allclose(got, g, atol=atol, rtol=1e-4), name


# --- CoOp -----------------------------------------------------------------------------------------------------------
def test_coop_matches_the_reference(backbone):
    method = build("coop", backbone)
    assert torch.allclose(method.ctx, word_embeddings(backbone, "a photo of a"))  # ctx_init (CoOp's "ctxv1")
    perturb(method)
    images, labels = batch(backbone)
    encoded = method.encode(images)
    assert torch.allclose(encoded, backbone.encode_image(images))
    reference = F.cross_entropy(clip_logits(backbone, encoded, prompt_features(backbone, method.ctx, CLASSES)), labels)
    assert_backward_matches(method, encoded, labels, reference)
    assert set(method.shared_state()) == {"ctx"} and method.local_state() == {}


def test_coop_class_specific_context_and_positions(backbone):
    method = build("coop", backbone, class_specific=True, class_token_position="middle")
    perturb(method)
    images, labels = batch(backbone)
    encoded = method.encode(images)
    features = prompt_features(backbone, method.ctx, CLASSES, "middle")
    assert method.ctx.shape == (len(CLASSES), 4, backbone.text_width)
    assert_backward_matches(method, encoded, labels, F.cross_entropy(clip_logits(backbone, encoded, features), labels))


# --- CoCoOp ---------------------------------------------------------------------------------------------------------
def test_cocoop_matches_the_reference(backbone):
    method = build("cocoop", backbone)
    perturb(method)
    images, labels = batch(backbone, n=3)
    encoded = method.encode(images)
    p = dict(method.named_parameters())
    x = unit(encoded)
    # meta-net on the normalised image feature: Linear(D, D/16) → ReLU → Linear(D/16, width), its bias on every token
    hidden = F.relu(x @ p["meta_net.linear1.weight"].t() + p["meta_net.linear1.bias"])
    bias = hidden @ p["meta_net.linear2.weight"].t() + p["meta_net.linear2.bias"]
    assert p["meta_net.linear1.weight"].shape == (backbone.embed_dim // 16, backbone.embed_dim)
    logits = torch.stack([backbone.logit_scale * x[i] @ unit(prompt_features(backbone, p["ctx"] + bias[i],
                                                                             CLASSES)).t() for i in range(len(x))])
    assert_backward_matches(method, encoded, labels, F.cross_entropy(logits, labels))
    assert set(method.shared_state()) == {n for n, _ in method.named_parameters()} and method.local_state() == {}


# --- ProGrad --------------------------------------------------------------------------------------------------------
def test_prograd_leaves_the_projected_gradient(float64):
    """CE gradient G_d, gradient G_g of the distillation to zero-shot CLIP (dataset template, T = 1); where they
    conflict, G_d − λ (G_d·Ĝ_g) Ĝ_g with λ = 1 (Dassl.ProGrad `prograd_backward_and_update`). In float64: the
    projection cancels most of G_d where the two nearly oppose, which in fp32 lifts rounding to ~2e-6 (AVX-512 CPU)."""
    backbone = random_tiny().double()
    method = build("prograd", backbone)
    zeroshot_text = backbone.encode_text([TEMPLATES[0].format(c) for c in CLASSES])
    seen = set()
    for seed in range(4):
        perturb(method, scale=0.05, seed=seed + 1)
        images, labels = batch(backbone, seed=seed)
        encoded = method.encode(images)
        logits = clip_logits(backbone, encoded, prompt_features(backbone, method.ctx, CLASSES))
        teacher = F.softmax(clip_logits(backbone, encoded, zeroshot_text), -1)
        distill = -(teacher * F.log_softmax(logits, -1)).sum(1).mean()
        g_d = torch.autograd.grad(F.cross_entropy(logits, labels), method.ctx, retain_graph=True)[0].flatten()
        g_g = torch.autograd.grad(distill, method.ctx)[0].flatten()
        conflict = bool(torch.dot(g_d, g_g) < 0)
        seen.add(conflict)
        expected = g_d - torch.dot(g_d, unit(g_g)) * unit(g_g) if conflict else g_d
        method.zero_grad()
        method.backward(encoded, labels)
        assert torch.allclose(method.ctx.grad.flatten(), expected, atol=1e-12, rtol=1e-9)
    assert seen == {True, False}, "both cases must occur for the test to mean anything"


# --- zero-shot CLIP ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ensemble", [False, True])
def test_zeroshot_is_clip_with_the_datasets_templates(backbone, ensemble):
    method = build("zeroshot", backbone, ensemble=ensemble)
    images, _ = batch(backbone)
    per_template = [unit(backbone.encode_text([t.format(c) for c in CLASSES]))
                    for t in (TEMPLATES if ensemble else TEMPLATES[:1])]
    expected = clip_logits(backbone, backbone.encode_image(images), torch.stack(per_template).mean(0))
    assert torch.allclose(method(images), expected, atol=1e-5)
    assert method.shared_state() == {} and method.local_state() == {} and method.num_trainable() == 0


# --- KgCoOp ---------------------------------------------------------------------------------------------------------
def test_kgcoop_matches_the_reference(backbone):
    """CE + w · (1 − mean_c cos(w_c, w_c^clip)), w = 8 (htyao89/KgCoOp trainers/kgcoop.py; README: weight 8.0)."""
    method = build("kgcoop", backbone)
    assert torch.allclose(method.ctx, word_embeddings(backbone, "a photo of a"))
    perturb(method, scale=0.1)
    images, labels = batch(backbone)
    encoded = method.encode(images)
    text = prompt_features(backbone, method.ctx, CLASSES)
    clip_text = backbone.encode_text([TEMPLATES[0].format(c) for c in CLASSES])
    knowledge = 1.0 - F.cosine_similarity(text, clip_text, dim=-1).mean()
    assert knowledge > 1e-3  # the term is active, so its weight shows
    reference = F.cross_entropy(clip_logits(backbone, encoded, text), labels) + 8.0 * knowledge
    assert_backward_matches(method, encoded, labels, reference)
    assert set(method.shared_state()) == {"ctx"} and method.local_state() == {}


# --- FedTPG ---------------------------------------------------------------------------------------------------------
def reference_attention(q_in, kv_in, attn, heads):
    """Multi-head attention (nn.MultiheadAttention's math) from the module's weights, written out."""
    W = q_in.shape[-1]
    if getattr(attn, "in_proj_weight", None) is not None:
        wq, wk, wv = attn.in_proj_weight.split(W)
    else:
        wq, wk, wv = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
    bq, bk, bv = attn.in_proj_bias.split(W)
    q, k, v = q_in @ wq.t() + bq, kv_in @ wk.t() + bk, kv_in @ wv.t() + bv
    split = lambda t: t.reshape(t.shape[0], heads, W // heads).transpose(0, 1)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(1, 2) / (W // heads) ** 0.5, -1)
    out = (weights @ split(v)).transpose(0, 1).reshape(q.shape[0], W)
    return out @ attn.out_proj.weight.t() + attn.out_proj.bias


def reference_fedtpg_context(method, names_features, heads=4):
    """boschresearch/FedTPG model/prompt_net.py: x = CrossAttn(LN(q), LN(E)) (no residual), x = FF(x) + x with
    FF = LN → Linear(W, 8W) → GEGLU → Linear(4W, W); no self-attention (MODEL.DEPTH = 0)."""
    g = method.generator
    layer_norm = lambda x, ln: F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)  # noqa: E731
    kv = layer_norm(names_features, g.norm_kv)
    x = reference_attention(layer_norm(g.queries, g.norm_q), kv, g.attn, heads)
    h = layer_norm(x, g.ff[0]) @ g.ff[1].weight.t() + g.ff[1].bias
    value, gate = h.chunk(2, dim=-1)
    return (value * F.gelu(gate)) @ g.ff[3].weight.t() + g.ff[3].bias + x


def test_fedtpg_matches_the_reference(backbone):
    method = build("fedtpg", backbone)
    queries = method.generator.queries
    assert queries.shape == (4, backbone.text_width) and 0.015 < float(queries.detach().std()) < 0.025  # N(0, 0.02)
    assert not torch.allclose(queries, word_embeddings(backbone, "a photo of a"))  # not word-initialised
    assert method.generator.attn.num_heads == 4 and not list(getattr(method.generator, "self_blocks", []))
    images, labels = batch(backbone)
    encoded = method.encode(images)
    names = unit(backbone.encode_text(CLASSES))  # CLIP text features of the bare class names
    ctx = reference_fedtpg_context(method, names)
    reference = F.cross_entropy(clip_logits(backbone, encoded, prompt_features(backbone, ctx, CLASSES)), labels)
    assert_backward_matches(method, encoded, labels, reference)
    assert method.local_state() == {} and set(method.shared_state()) == {n for n, _ in method.named_parameters()}
    method.set_classnames(NOVEL)  # the generator writes prompts for names it never saw
    novel_ctx = reference_fedtpg_context(method, unit(backbone.encode_text(NOVEL)))
    expected = clip_logits(backbone, encoded, prompt_features(backbone, novel_ctx, NOVEL))
    assert torch.allclose(method.logits(encoded), expected, atol=1e-5)


# --- configuration: yaml keys, presets, ctx_init vs n_ctx ---------------------------------------------------------
TEXT_METHODS = ["coop", "cocoop", "kgcoop", "prograd", "zeroshot", "fedtpg", "fedpgp", "promptfolio", "promptsrc",
                "proda"]


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_algorithm_yaml_declares_only_what_its_method_takes(path):
    data = yaml.safe_load(path.read_text())
    if "defaults" in data:  # a preset: composed over its base method inside the algorithm group
        data = composed_algorithm(f"algorithm={path.stem}")
    cls = method_class(data["name"])
    unknown = set(data) - {"name"} - set(cls.hyperparameters())
    assert not unknown, f"{path.name}: keys {sorted(unknown)} are not hyper-parameters of {cls.__name__}"


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_constructor_defaults_are_the_yaml_defaults(name):
    """A method built outside Hydra (tests, notebooks) gets the same defaults as `algorithm=<name>`."""
    signature = {}
    for klass in method_class(name).__mro__:
        if "__init__" in klass.__dict__:
            for p in inspect.signature(klass.__dict__["__init__"]).parameters.values():
                signature.setdefault(p.name, p.default)
    for key, value in yaml_hparams(name).items():
        assert signature[key] == value, f"{name}.{key}: yaml {value!r}, __init__ {signature[key]!r}"


FLIP = {  # what each FLIP preset changes, from 0-ml/flip (main.py defaults, flcore/models/clip/*.py); first key numeric
    "kgcoop_flip": {"lam": 1.0, "ctx_init": None},
    "fedpgp_flip": {"mu": 1.0, "temperature": 1.0},
    "promptfolio_flip": {"theta": 0.2},
    "proda_flip": {"diversity_weight": 1.0},
    "promptsrc_flip": {"gpa_mean": 15.0, "ctx_init": None, "depth_text": 1, "n_ctx_vision": 0},
}


@pytest.mark.parametrize("preset", sorted(FLIP))
def test_flip_presets_compose_over_their_method_and_change_only_flips_keys(preset):
    base_name = preset.removesuffix("_flip")
    composed = composed_algorithm(f"algorithm={preset}")
    base = composed_algorithm(f"algorithm={base_name}")
    assert composed["name"] == base_name
    assert {k: v for k, v in composed.items() if base.get(k) != v} == FLIP[preset]
    key = next(iter(FLIP[preset]))  # a command-line override still wins over the preset
    assert composed_algorithm(f"algorithm={preset}", f"algorithm.{key}=0.3")[key] == 0.3


@pytest.mark.parametrize("name", ["coop", "cocoop", "kgcoop", "prograd", "fedpgp", "promptfolio"])
def test_n_ctx_that_ctx_init_would_override_is_refused(backbone, name):
    with pytest.raises(ConfigError, match=r"algorithm\.n_ctx=16.*algorithm\.ctx_init.*ctx_init=null"):
        build(name, backbone, n_ctx=16, ctx_init="a photo of a")
    assert build(name, backbone, n_ctx=3, ctx_init=None).num_trainable() > 0  # random init: n_ctx is used
