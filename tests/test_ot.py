"""Entropic OT (flbench.algorithms.ot): marginals, optimality conditions, and gradients through the cost only.

`tol` bounds the mean change of a scaling vector per iteration (the references' stopping rule); the small values
here run the iteration to convergence. The references' own loops are in test_fidelity_visual.py.
"""

import pytest
import torch

from flbench.algorithms.ot import ot_similarity, transport_plan


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(seed=0, batch=3, m=7, n=4):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(batch, m, n, generator=g) * 2  # 1 − cosine lies in [0, 2]
    return cost, torch.full((batch, m), 1 / m), torch.full((batch, n), 1 / n)


@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_balanced_plan_has_both_marginals(eps):
    cost, a, b = _problem()
    plan = transport_plan(cost, a, b, eps, max_iter=1000, tol=1e-7)
    assert torch.allclose(plan.sum(-1), a, atol=1e-5) and torch.allclose(plan.sum(-2), b, atol=1e-5)
    assert torch.isfinite(plan).all() and (plan >= 0).all()


def test_balanced_plan_matches_a_float64_sinkhorn_and_is_additive_in_log_space():
    """Optimality of the entropic plan: T = diag(u) K diag(v), i.e. log T + C/ε = (f_i + g_j)/ε is additive; the
    log-domain iteration must agree with textbook scaling-domain Sinkhorn (u = a/Kv, v = b/Kᵀu) run in float64."""
    cost, a, b = _problem(batch=1)
    eps = 0.1
    plan = transport_plan(cost, a, b, eps, max_iter=1000, tol=1e-7)[0]
    kernel = torch.exp(-cost[0].double() / eps)
    u, v = torch.ones(7, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for _ in range(2000):
        u = a[0].double() / (kernel @ v)
        v = b[0].double() / (kernel.t() @ u)
    reference = u[:, None] * kernel * v[None, :]
    assert torch.allclose(plan.double(), reference, atol=1e-6)
    potential = plan.log() + cost[0] / eps
    additive = potential - potential[:, :1] - potential[:1, :] + potential[0, 0]
    assert additive.abs().max() < 1e-3


def test_unbalanced_plan_moves_mass_gamma_and_respects_the_patch_bound():
    cost, a, b = _problem(m=10)
    gamma, eps = 0.8, 0.2
    plan = transport_plan(cost, a, b * gamma, eps, max_iter=300, tol=1e-9, row_inequality=True, watch="col")
    assert torch.allclose(plan.sum(-2), b * gamma, atol=1e-6), "each prompt receives γ/N"
    assert (plan.sum(-1) <= a * (1 + 1e-5)).all(), "no patch sends more than 1/M"
    assert torch.allclose(plan.sum((-2, -1)), torch.full((3,), gamma), atol=1e-5)
    slack = plan.sum(-1) < a * (1 - 1e-3)
    assert slack.any(), "with γ < 1 some patches must be left (partly) untransported"
    # KKT: the row potentials are ≤ 0 and exactly 0 on rows with slack, so log T + C/ε is the same on all of them.
    potential = plan.log() + cost / eps
    for k in range(3):
        rows = potential[k][slack[k]]
        assert (rows - rows[:1]).abs().max() < 1e-3
        assert (potential[k][~slack[k]] <= rows[:1] + 1e-3).all()


def test_unbalanced_with_full_mass_is_sinkhorn():
    cost, a, b = _problem()
    balanced = transport_plan(cost, a, b, 0.1, max_iter=1000, tol=1e-7)
    relaxed = transport_plan(cost, a, b, 0.1, max_iter=1000, tol=1e-7, row_inequality=True)
    assert torch.allclose(balanced, relaxed, atol=1e-5)


def test_tiny_epsilon_stays_finite():
    """FedOTP's ε = 0.01 underflows exp(−C/ε) in float32; the log-domain iteration must not produce NaN."""
    cost, a, b = _problem()
    plan = transport_plan(cost + 1.5, a, b, 0.01, max_iter=200)
    assert torch.isfinite(plan).all() and torch.allclose(plan.sum(-2), b, atol=1e-5)


def test_gradient_flows_through_the_similarities_with_the_plan_fixed():
    g = torch.Generator().manual_seed(1)
    local = torch.nn.functional.normalize(torch.randn(2, 5, 8, generator=g), dim=-1).requires_grad_()
    prompts = torch.nn.functional.normalize(torch.randn(3, 4, 8, generator=g), dim=-1)
    score = ot_similarity(local, prompts, eps=0.1, max_iter=300, tol=1e-5)
    assert score.shape == (2, 4)
    score[0, 1].backward()
    sim = torch.einsum("bmd,ncd->bcmn", local.detach(), prompts)
    plan = transport_plan(1 - sim, torch.full((2, 4, 5), 1 / 5), torch.full((2, 4, 3), 1 / 3), 0.1, 300, 1e-5)
    expected = torch.einsum("mn,nd->md", plan[0, 1], prompts[:, 1])  # d score / d local = Σ_n T_mn · prompt_n
    assert torch.allclose(local.grad[0], expected, atol=1e-5) and local.grad[1].abs().max() == 0


def test_single_prompt_or_single_patch_have_closed_forms():
    """N = 1: the plan is uniform over patches (score = mean similarity). M = 1: uniform over prompts."""
    g = torch.Generator().manual_seed(2)
    local = torch.nn.functional.normalize(torch.randn(2, 6, 8, generator=g), dim=-1)
    prompts = torch.nn.functional.normalize(torch.randn(1, 3, 8, generator=g), dim=-1)
    sim = torch.einsum("bmd,ncd->bcmn", local, prompts)
    assert torch.allclose(ot_similarity(local, prompts, 0.1), sim.mean((-2, -1)), atol=1e-6)
    one_patch = local[:, :1]
    many_prompts = torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    sim = torch.einsum("bmd,ncd->bcmn", one_patch, many_prompts)
    assert torch.allclose(ot_similarity(one_patch, many_prompts, 0.1), sim.mean((-2, -1)), atol=1e-6)
