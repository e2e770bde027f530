"""Entropic optimal transport between image local features and prompt text features (PLOT, FedOTP).

Both methods score a class by how cheaply the M local features of an image (patches) can be transported onto the N
prompt features of that class, with cost C = 1 − cosine similarity:

    T* = argmin_T <T, C> − ε H(T)   over  T ≥ 0,  T 1_N = a (or ≤ a),  Tᵀ 1_M = b
    score = <T*, 1 − C> = Σ T* ⊙ sim

- balanced (PLOT, Chen et al. ICLR 2023): a = 1/M, b = 1/N, Sinkhorn's alternating scaling.
- unbalanced (FedOTP, Li et al. CVPR 2024): the image side becomes an inequality T 1_N ≤ a and b = γ/N with a mass
  γ ≤ 1, so each prompt may ignore up to a fraction 1 − γ of the patches. The image-side update is the KL proximal
  step of the indicator {s ≤ a}, u = min(1, a / K v) (Chizat et al. 2018, "Scaling algorithms for unbalanced
  transport"); with γ = 1 the constraint is tight and this is Sinkhorn again.

The iterations run in the log domain (FedOTP's ε = 0.01 puts exp(−C/ε) below float32's normal range) and without
gradients: the plan is then treated as a constant, which is exactly the gradient of the entropic OT value with
respect to the cost (envelope theorem), as both papers do.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def transport_plan(cost: torch.Tensor, row_mass: torch.Tensor, col_mass: torch.Tensor, eps: float,
                   max_iter: int = 100, tol: float = 1e-3, row_inequality: bool = False) -> torch.Tensor:
    """Entropic OT plan [..., M, N] for cost [..., M, N] and marginals row_mass [..., M], col_mass [..., N].

    Column sums equal `col_mass` after every iteration. Stops once the row sums are within a relative `tol` of
    `row_mass` (with `row_inequality`: none above it, and those of rows whose bound is active on it), or after
    `max_iter` iterations.
    """
    kernel = cost.detach().float() / -eps  # log K; potentials below are in units of ε (f/ε, g/ε)
    log_a, log_b = row_mass.float().log(), col_mass.float().log()
    f = torch.zeros_like(kernel[..., :, 0])  # log u
    g = torch.zeros_like(kernel[..., 0, :])  # log v
    for iteration in range(max_iter):
        lse = torch.logsumexp(kernel + g.unsqueeze(-2), dim=-1)  # log (K v)
        if iteration:  # once the columns hold, the row sums of the current plan are u ⊙ Kv: converged yet?
            ratio = torch.exp(f + lse - log_a) - 1.0
            violation = ratio.clamp(min=0.0).maximum(ratio.abs() * (f < 0)) if row_inequality else ratio.abs()
            if violation.numel() == 0 or float(violation.max()) < tol:
                break
        f = log_a - lse
        if row_inequality:
            f = f.clamp(max=0.0)  # u = min(1, a / Kv)
        g = log_b - torch.logsumexp(kernel + f.unsqueeze(-1), dim=-2)
    return torch.exp(kernel + f.unsqueeze(-1) + g.unsqueeze(-2))


def ot_similarity(local_features: torch.Tensor, prompt_features: torch.Tensor, eps: float, max_iter: int = 100,
                  tol: float = 1e-3, mass: float = 1.0) -> torch.Tensor:
    """OT score [B, C] between normalised local features [B, M, D] and normalised prompt features [N, C, D].

    `mass` < 1 is FedOTP's unbalanced variant (γ); 1 is PLOT's balanced Sinkhorn. Gradients flow through the
    similarities only.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"transported mass must be in (0, 1], got {mass}")
    sim = torch.einsum("bmd,ncd->bcmn", local_features, prompt_features)  # [B, C, M, N]
    M, N = sim.shape[-2], sim.shape[-1]
    row = sim.new_full(sim.shape[:-1], 1.0 / M)
    col = sim.new_full(sim.shape[:-2] + (N,), mass / N)
    plan = transport_plan(1.0 - sim, row, col, eps, max_iter, tol, row_inequality=mass < 1.0)
    return (plan.to(sim.dtype) * sim).sum(dim=(-2, -1))
