"""Entropic optimal transport between image local features and prompt text features (PLOT, FedOTP).

Both methods score a class by how cheaply the M local features of an image can be transported onto the N prompt
features of that class, with cost C = 1 − cosine similarity:

    T* = argmin_T <T, C> − ε H(T)   over  T ≥ 0,  T 1_N = a (or ≤ a),  Tᵀ 1_M = b
    score = <T*, 1 − C> = Σ T* ⊙ sim

- balanced (PLOT, Chen et al. ICLR 2023): a = 1/M, b = 1/N, Sinkhorn's alternating scaling r = a / K c,
  c = b / Kᵀ r from r = c = 1.
- unbalanced (FedOTP, Li et al. CVPR 2024, its "COT"): the image side becomes an inequality T 1_N ≤ a and b = γ/N
  with a mass γ ≤ 1, so each prompt may ignore up to a fraction 1 − γ of the local features. The image-side update is
  the KL proximal step of the indicator {s ≤ a}, u = min(1, a / K v) (Chizat et al. 2018, "Scaling algorithms for
  unbalanced transport"), as the authors' `entropic_COT_fast`.

Stopping follows the references exactly: after each full iteration (image side, then prompt side), the mean absolute
change of one scaling vector over the *whole batch* of problems — the image-side one (`watch="row"`, PLOT's
`Sinkhorn`: r) or the prompt-side one (`watch="col"`, FedOTP's COT: v) — is compared with `tol`; below it, or after
`max_iter` iterations, the plan diag(r) K diag(c) is returned. The scaling vectors carry the magnitude of K⁻¹ (up to
e^{2/ε}), so with FedOTP's ε = 0.01 the rule is met only at numerical convergence and the loop usually runs all
`max_iter` iterations, as the references do.

The iterations run in the log domain (exp(−C/ε) at ε = 0.01 lies below float32's normal range), with the stopping
change computed in float64 from the log-scalings, and without gradients: the plan is then treated as a constant,
which is exactly the gradient of the entropic OT value with respect to the cost (envelope theorem), as both papers do.
"""

from __future__ import annotations

import torch

WATCHED = ("row", "col")


@torch.no_grad()
def transport_plan(cost: torch.Tensor, row_mass: torch.Tensor, col_mass: torch.Tensor, eps: float,
                   max_iter: int = 100, tol: float = 1e-3, row_inequality: bool = False, watch: str = "row",
                   ) -> torch.Tensor:
    """Entropic OT plan [..., M, N] for cost [..., M, N] and marginals row_mass [..., M], col_mass [..., N].

    Column sums equal `col_mass` after every iteration. With `row_inequality` the image-side update is
    u = min(1, a / K v) (FedOTP's COT), else Sinkhorn's u = a / K v. Stops once the mean absolute change of the
    `watch`ed scaling vector ("row": u, "col": v), taken over every entry of the batch, is below `tol`.
    """
    if watch not in WATCHED:
        raise ValueError(f"watch must be one of {WATCHED}, got {watch!r}")
    kernel = cost.detach().float() / -eps  # log K
    log_a, log_b = row_mass.float().log(), col_mass.float().log()
    f = torch.zeros_like(kernel[..., :, 0])  # log u (r = 1 at the start, as both references)
    g = torch.zeros_like(kernel[..., 0, :])  # log v (c = 1)
    for _ in range(max_iter):
        f_new = log_a - torch.logsumexp(kernel + g.unsqueeze(-2), dim=-1)
        if row_inequality:
            f_new = f_new.clamp(max=0.0)  # u = min(1, a / Kv)
        g_new = log_b - torch.logsumexp(kernel + f_new.unsqueeze(-1), dim=-2)
        before, after = (f, f_new) if watch == "row" else (g, g_new)
        f, g = f_new, g_new
        if after.numel() == 0:
            break
        change = (after.double().exp() - before.double().exp()).abs().mean()
        if float(change) < tol:
            break
    return torch.exp(kernel + f.unsqueeze(-1) + g.unsqueeze(-2))


def ot_similarity(local_features: torch.Tensor, prompt_features: torch.Tensor, eps: float, max_iter: int = 100,
                  tol: float = 1e-3, mass: float = 1.0, unbalanced: bool = False, watch: str = "row",
                  ) -> torch.Tensor:
    """OT score [B, C] between normalised local features [B, M, D] and normalised prompt features [N, C, D].

    `unbalanced` is FedOTP's COT (image side ≤ 1/M, prompt side `mass`/N each); otherwise PLOT's balanced Sinkhorn
    (`mass` must then be 1). Gradients flow through the similarities only.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"transported mass must be in (0, 1], got {mass}")
    if not unbalanced and mass != 1.0:
        raise ValueError("balanced transport moves all the mass (mass = 1); use unbalanced=True for γ < 1")
    sim = torch.einsum("bmd,ncd->bcmn", local_features, prompt_features)  # [B, C, M, N]
    M, N = sim.shape[-2], sim.shape[-1]
    row = sim.new_full(sim.shape[:-1], 1.0 / M)
    col = sim.new_full(sim.shape[:-2] + (N,), mass / N)
    plan = transport_plan(1.0 - sim, row, col, eps, max_iter, tol, row_inequality=unbalanced, watch=watch)
    return (plan.to(sim.dtype) * sim).sum(dim=(-2, -1))
