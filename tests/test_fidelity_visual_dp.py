"""Reference parity of DP-FPL (linhhtran/DP-FPL `trainers/DP_FPL.py`, `federated_main.py`): the factorisation, the
clipped and noised gradients of one private step, the local prompt's gradient (`compute_full_grad`), what travels
and what stays, and the privacy budget the record reports.

The reference is written out here: Gram–Schmidt as the authors' `orthogonalize`, the prompt's gradient by autograd
through the text tower walked by hand, and the noise drawn from the seeded global generator in the order the method
documents (factorisation start, then the global, u and v noise). Opacus' accountant is called directly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flbench.algorithms.base import build_method
from helpers import random_tiny
from test_fidelity_visual import text_forward, text_prompts, unit

CLASSES = ["red circle", "blue square", "green star", "pink moon"]
TEMPLATES = ["a photo of a {}."]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone():
    return random_tiny("tiny")


@pytest.fixture(scope="module")
def batch(backbone):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, backbone.image_size, backbone.image_size, generator=g)
    with torch.no_grad():
        encoded = backbone.encode_image(images)
    return encoded, torch.randint(0, len(CLASSES), (6,), generator=g)


def gram_schmidt(matrix):
    """The reference's `orthogonalize`: normalise column i, remove it from the columns after it."""
    m = matrix.clone()
    for i in range(m.shape[1]):
        m[:, i] /= m[:, i].norm()
        m[:, i + 1:] -= (m[:, i:i + 1] * m[:, i + 1:]).sum(0) * m[:, i:i + 1]
    return m


def reference_factors(local, rank, start):
    u = gram_schmidt(local @ start)
    v = gram_schmidt(local.t() @ u).t()
    return u, v


def prompt_loss(backbone, encoded, labels, ctx):
    embeddings, eot = text_prompts(backbone, CLASSES, ctx.shape[0])
    text = text_forward(backbone, embeddings, eot, ctx)
    return F.cross_entropy(backbone.logit_scale * unit(encoded) @ unit(text).t(), labels, reduction="none")


def clip(g, c):
    return g * min(1.0, c / g.norm().item())


def build(backbone, **overrides):
    torch.manual_seed(0)
    return build_method("dpfpl", backbone, CLASSES, TEMPLATES, {"cohort": 4, **overrides})


def test_dpfpl_defaults_the_references_initialisation_and_split(backbone):
    method = build(backbone)
    assert method.clipping == "batch" and method.global_noise == "distributed" and method.rank == 2
    words = backbone.token_embeddings(backbone.tokenize(["a photo of a"]))[0, 1:5]
    assert not torch.allclose(method.global_ctx, words), "the reference's global prompt is random N(0, 0.02)"
    assert abs(method.global_ctx.std().item() - 0.02) < 0.006
    assert set(method.shared_state()) == {"global_ctx"}
    assert set(method.local_state()) == {"local_ctx", "personalised"}


def test_dpfpl_local_gradient_is_compute_full_grad(backbone, batch):
    """Without noise: the global prompt gets g, the local one g_u·v/10 + u·g_v/10 + u·uᵀ·(g_u/10)·v."""
    encoded, labels = batch
    method = build(backbone, epsilon=None)
    with torch.no_grad():
        method.local_ctx.normal_(0, 0.05)
    ctx = (method.global_ctx + method.local_ctx).detach().requires_grad_(True)
    g = torch.autograd.grad(prompt_loss(backbone, encoded, labels, ctx).mean(), ctx)[0]
    torch.manual_seed(11)
    start = torch.randn(backbone.text_width, method.rank)
    u, v = reference_factors(method.local_ctx.detach(), method.rank, start)
    gu, gv = g @ v.t() / 10, u.t() @ g / 10
    expected_local = gu @ v + u @ gv + u @ u.t() @ gu @ v
    torch.manual_seed(11)
    method.train()
    method.backward(encoded, labels)
    assert torch.allclose(method.global_ctx.grad, g, atol=1e-5 * g.abs().max().item())
    assert torch.allclose(method.local_ctx.grad, expected_local, atol=1e-7 + 1e-5 * expected_local.abs().max())


def private_step(backbone, batch, seed, **overrides):
    """The method's gradients after one private step, and the reference's from the same draws."""
    encoded, labels = batch
    method = build(backbone, **overrides)
    with torch.no_grad():
        method.local_ctx.normal_(0, 0.05)
    z, C, B, U = method.noise_multiplier, method.clip_norm, len(labels), 4
    ctx = (method.global_ctx + method.local_ctx).detach().requires_grad_(True)
    losses = prompt_loss(backbone, encoded, labels, ctx)
    if method.clipping == "batch":
        grads = [torch.autograd.grad(losses.mean(), ctx)[0]]
    else:
        grads = [torch.autograd.grad(loss, ctx, retain_graph=True)[0] for loss in losses]
    torch.manual_seed(seed)
    start = torch.randn(backbone.text_width, method.rank)
    u, v = reference_factors(method.local_ctx.detach(), method.rank, start)
    global_std = {"distributed": z * C / (B * math.sqrt(U)), "local": z * C / B, "none": 0.0}[method.global_noise]
    noise_g = torch.randn_like(grads[0]) * global_std if global_std else 0.0
    noise_u = torch.randn(ctx.shape[0], method.rank) * z * C / B
    noise_v = torch.randn(method.rank, backbone.text_width) * z * C / B
    mean = lambda parts: torch.stack(parts).mean(0)  # noqa: E731
    expected_global = mean([clip(g, C) for g in grads]) + noise_g
    gu = (mean([clip(g @ v.t(), C) for g in grads]) + noise_u) / 10
    gv = (mean([clip(u.t() @ g, C) for g in grads]) + noise_v) / 10
    expected_local = gu @ v + u @ gv + u @ u.t() @ gu @ v
    torch.manual_seed(seed)
    method.train()
    method.backward(encoded, labels)
    return method, expected_global, expected_local, grads


@pytest.mark.parametrize("overrides", [{}, {"clipping": "example"}, {"global_noise": "local"},
                                       {"global_noise": "none"}], ids=["reference", "example", "local", "none"])
def test_dpfpl_private_step_is_the_references(backbone, batch, overrides):
    """Clip each gradient to C (the batch mean as a whole, by default), noise the factors with z·C/B and the global
    gradient with z·C/(B·√U) per client: the mean of U clients' draws is the reference's server draw z·C/(B·U)."""
    # A small C so that clipping bites and a loose ε so that the noise does not hide the clipped gradient.
    method, expected_global, expected_local, grads = private_step(backbone, batch, 7, clip_norm=0.02, epsilon=5.0,
                                                                  **overrides)
    assert max(g.norm().item() for g in grads) > 0.02, "clipping must be active in this test"
    scale = expected_global.abs().max().item()
    assert torch.allclose(method.global_ctx.grad, expected_global, atol=1e-5 * scale)
    assert torch.allclose(method.local_ctx.grad, expected_local, atol=1e-5 * expected_local.abs().max().item())


def opacus_epsilon(z, rate, steps, delta):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(z, rate, steps)]
    alphas = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 96, 128, 192, 256, 384, 512, 1024]
    return accountant.get_epsilon(delta, alphas=alphas)


def test_dpfpl_reports_what_the_server_sees_as_its_budget(backbone):
    """Every step releases the global gradient (z/√U per client) and the two factor gradients (z); the global one is
    taken at G + L, so the server's view is bounded by all three composed: 1/z_eff² = U/z² + 2/z²."""
    method = build(backbone, epsilon=1.0, rounds=5)
    sizes = [20, 32, 24, 32]  # shards no larger than a batch: sampling rate 1, Opacus' fast closed form
    training = {"num_rounds": 5, "epochs": 1, "batch_size": 32, "client_sizes": sizes, "clients_per_round": [4] * 5}
    dp = method.extra_metrics(training)["dp"]
    z = math.sqrt(5 * math.log(1 / 1e-5)) / 1.0
    assert dp["noise_multiplier"] == pytest.approx(z)
    server = z / math.sqrt(4 + 2)
    worst = max(opacus_epsilon(server, min(1, 32 / n), 5 * math.ceil(n / 32), 1e-5) for n in sizes)
    assert dp["epsilon"] == pytest.approx(worst, rel=1e-6)
    # The aggregate: client k's share w_k of it carries noise z/√U·√Σw² per unit of sensitivity.
    weights = [n / sum(sizes) for n in sizes]
    spread = math.sqrt(sum(w * w for w in weights))
    released = [1 / math.sqrt((w / (z / 2 * spread)) ** 2 + 2 / z ** 2) for w in weights]
    worst_released = max(opacus_epsilon(r, min(1, 32 / n), 5 * math.ceil(n / 32), 1e-5)
                         for r, n in zip(released, sizes))
    assert dp["epsilon_released"] == pytest.approx(worst_released, rel=1e-6)
    assert dp["epsilon_released"] < dp["epsilon"]
    none = build(backbone, epsilon=1.0, rounds=5, global_noise="none").extra_metrics(training)["dp"]
    assert none["epsilon"] is None and none["epsilon_released"] is None and none["epsilon_local"] > 0
    assert build(backbone, epsilon=None).extra_metrics(training) == {"dp": {"enabled": False}}
