"""DP-FPL (Tran et al., ICLR 2025): differentially private personalised federated prompt learning — a global prompt
plus a local prompt that is factorised, at every step, into a low-rank part u·v and a residual r; privacy noise is
applied to the global prompt's gradient and to the two low-rank factors' gradients only.

Parts: global context G [n_ctx, width] (shared, FedAvg) and local context L [n_ctx, width] (personal, kept in the
client's Context.state). The client's prompt is G + L = G + u·v + r, where each step u [n_ctx, k] and v [k, width]
come from one power iteration on L from a random start (orthonormalised, as PowerSGD-style factorisations do) and
r = L − u·v is the residual. The gradient g of the cross-entropy with respect to the prompt gives
g_G = g, g_u = g·vᵀ, g_v = uᵀ·g; the local update is rebuilt from the factors, ∇L = g̃_u·v + u·g̃_v, so the residual
(the client's expressive, personal part) is never perturbed and noise lives in k·(n_ctx + width) coordinates instead
of n_ctx·width.

Privacy (DP-SGD on each client): per-example gradients are clipped to norm C separately for G, u and v, summed, and
Gaussian noise N(0, (z·C)²) is added to each sum before dividing by the batch size. The noise multiplier follows
the paper's calibration from the target (ε, δ) and the number of rounds R, z = √(R·ln(1/δ)) / ε
(`noise_multiplier` overrides it). The privacy actually spent is not taken from that formula: the
run record reports ε from Opacus' RDP accountant for z, each client's sampling rate B/n and its number of noisy steps
(every round, `epochs` passes), for the shared global prompt (what the server sees), the local factors, and both
together (three Gaussian releases per step compose to noise multiplier z/√3); the headline ε is the largest over
clients of the combined figure. The accountant assumes Poisson sampling at rate B/n, the usual approximation for
shuffled batches (exact when n ≤ B).

Choices, documented in docs/methods.md: the paper adds the global prompt's noise on the server to the clients'
averaged gradients; flbench's FL layer exchanges parameters after local epochs, not gradients per step, and methods
never touch the server, so the global prompt's gradient is clipped and noised on the client before every step (the
server never sees an un-noised update). Gradients are clipped per example (DP-SGD), not per batch. The factor
update is first order (Δ(u·v) ≈ Δu·v + u·Δv). Defaults: rank = n_ctx / 2 (the paper's 8 of 16), C = 10 (the
authors' release), ε = 0.4 (FLiP's default DP-FPL level), δ = 1e-5. The server, which holds no client's local
prompt, evaluates G alone (see `personal.PersonalPromptMethod`).

Measured on the default synthetic experiment (10 clients of 170–256 images, batch 32, 10 rounds, seed 0): at
ε = 0.4 the calibration gives z ≈ 26.8, the accountant reports ε ≈ 0.36 (shared prompt alone ≈ 0.20), and the noise
swamps the gradient — global test accuracy stays at zero-shot level: 70.49 ± 0.27 vs 70.51 over seeds 0–2
(experiments/synthetic_global/table.md; CoOp 72.81). With an earlier tiny CLIP build, without privacy
(`epsilon: null`) DP-FPL reached 68.5 against 67.5 private and 67.6 zero-shot (seed 0, best-by-validation).
Per-example gradients make a private step about B times dearer than a plain one (~250 s per run vs ~20 s for CoOp).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flbench.algorithms.base import cosine_logits
from flbench.algorithms.personal import PersonalPromptMethod
from flbench.algorithms.prompting import TextPrompt, context_length_of, init_context
from flbench.backbones.clip import FrozenCLIP
from flbench.errors import ConfigError


def paper_noise_multiplier(epsilon: float, delta: float, rounds: int) -> float:
    """DP-FPL's calibration of the Gaussian noise multiplier from (ε, δ) and the number of rounds."""
    return math.sqrt(rounds * math.log(1.0 / delta)) / epsilon


# Opacus' default RDP orders (1.1 … 63) plus larger ones: with heavy noise (z ≈ 27 at ε = 0.4, 10 rounds) the best
# order lies beyond 63, and stopping there overstates ε.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 96, 128, 192, 256, 384, 512, 1024]


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε spent by `steps` subsampled Gaussian steps, from Opacus' RDP accountant."""
    from opacus.accountants import RDPAccountant  # heavy import (~2 s), only when a record is written

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta, alphas=RDP_ORDERS))


@torch.no_grad()
def factorise(local: torch.Tensor, rank: int, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One power iteration from a Gaussian start: orthonormal u [n, k], orthonormal rows v [k, w], residual."""
    start = torch.randn(local.shape[1], rank, generator=generator, dtype=local.dtype).to(local.device)
    u = torch.linalg.qr(local @ start).Q
    v = torch.linalg.qr(local.t() @ u).Q.t()
    return u, v, local - u @ v


def clip_and_noise(per_example: torch.Tensor, clip_norm: float, noise_multiplier: float | None) -> torch.Tensor:
    """DP-SGD's gradient: per-example gradients [M, ...] clipped to `clip_norm`, summed, noised, averaged."""
    if noise_multiplier is None:
        return per_example.mean(0)
    norms = per_example.flatten(1).norm(dim=1).clamp_min(1e-12)
    clipped = per_example * (clip_norm / norms).clamp(max=1.0).view(-1, *[1] * (per_example.dim() - 1))
    noisy = clipped.sum(0) + torch.randn_like(clipped[0]) * noise_multiplier * clip_norm
    return noisy / len(per_example)


class DPFPL(PersonalPromptMethod):
    name = "dpfpl"
    paper = "DP-FPL (Tran et al., ICLR 2025)"
    extra_loss = "none; per-example clipping + Gaussian noise on global and low-rank local gradients (DP-SGD)"
    loss_scaling = False  # gradients come from its own autograd calls: no fp16 loss scaling
    global_keys = ("global_ctx",)

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 4, ctx_init: str | None = "a photo of a", rank: int = 2,
                 epsilon: float | None = 0.4, delta: float = 1e-5, clip_norm: float = 10.0,
                 noise_multiplier: float | None = None, rounds: int = 1, epochs: int = 1,
                 class_token_position: str = "end", init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        n_ctx = context_length_of(backbone, ctx_init, n_ctx)
        if rank < 1:
            raise ConfigError("algorithm.rank must be at least 1")
        if epsilon is not None and epsilon <= 0:
            raise ConfigError(f"algorithm.epsilon={epsilon} must be positive (null disables differential privacy)")
        if not 0 < delta < 1 or clip_norm <= 0 or rounds < 1:
            raise ConfigError("algorithm.delta must be in (0, 1), algorithm.clip_norm positive, algorithm.rounds ≥ 1")
        generator = torch.Generator().manual_seed(init_seed)
        self.global_ctx = nn.Parameter(init_context(backbone, n_ctx, ctx_init, generator))
        self.local_ctx = nn.Parameter(torch.randn(n_ctx, backbone.text_width, generator=generator) * 0.02)
        self.rank = min(rank, n_ctx, backbone.text_width)
        self.epsilon, self.delta, self.clip_norm = epsilon, float(delta), float(clip_norm)
        self.rounds, self.epochs = int(rounds), int(epochs)
        if noise_multiplier is not None:
            self.noise_multiplier: float | None = float(noise_multiplier)
        elif epsilon is not None:
            self.noise_multiplier = paper_noise_multiplier(epsilon, self.delta, self.rounds)
        else:
            self.noise_multiplier = None
        self.prompt = TextPrompt(backbone, classnames, n_ctx, class_token_position)
        self._init_personal()

    # --- forward ---------------------------------------------------------------------------------------------
    def client_context(self) -> torch.Tensor:
        return self.global_ctx + self.local_ctx if self.uses_local() else self.global_ctx

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.backbone, encoded, self.prompt.encode(self.client_context()))

    # --- private training step ----------------------------------------------------------------------------------
    def prompt_gradients(self, encoded: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean CE, per-example CE gradients w.r.t. the client's prompt [B, n_ctx, width]; without privacy, the
        gradient of the mean CE as [1, n_ctx, width])."""
        ctx = self.client_context().detach().requires_grad_(True)
        text = self.prompt.encode(ctx)
        text_leaf = text.detach().requires_grad_(True)
        logits = cosine_logits(self.backbone, encoded, text_leaf)
        losses = F.cross_entropy(logits, labels, reduction="none")
        if self.noise_multiplier is None:  # no privacy: one backward pass of the mean loss
            cotangent = torch.autograd.grad(losses.mean(), text_leaf)[0]
            return losses.mean().detach(), torch.autograd.grad(text, ctx, cotangent)[0].unsqueeze(0)
        # d loss_i / d text is cheap (a tiny graph); one vector-Jacobian product through the text encoder per example
        # turns it into d loss_i / d prompt (is_grads_batched is slower here: the encoder falls back to a loop).
        per_example = []
        for i in range(len(labels)):
            cotangent = torch.autograd.grad(losses[i], text_leaf, retain_graph=True)[0]
            per_example.append(torch.autograd.grad(text, ctx, cotangent, retain_graph=True)[0])
        return losses.mean().detach(), torch.stack(per_example)

    def backward(self, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.personalised.fill_(1.0)
        u, v, _ = factorise(self.local_ctx.detach(), self.rank)
        loss, per_example = self.prompt_gradients(encoded, labels)
        z, C = self.noise_multiplier, self.clip_norm
        global_grad = clip_and_noise(per_example, C, z)
        grad_u = clip_and_noise(per_example @ v.t(), C, z)           # [n_ctx, k]
        grad_v = clip_and_noise(u.t() @ per_example, C, z)           # [k, width]
        local_grad = grad_u @ v + u @ grad_v
        for param, grad in ((self.global_ctx, global_grad), (self.local_ctx, local_grad)):
            param.grad = grad.clone() if param.grad is None else param.grad + grad
        return loss

    def loss(self, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(encoded), labels)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)

    # --- reporting -----------------------------------------------------------------------------------------------
    def extra_metrics(self, training: Mapping[str, Any]) -> dict[str, Any]:
        if self.noise_multiplier is None:
            return {"dp": {"enabled": False}}
        rounds = int(training.get("num_rounds", self.rounds))
        epochs, batch = int(training.get("epochs", self.epochs)), int(training["batch_size"])
        z, per_client = self.noise_multiplier, []
        for n in training["client_sizes"]:
            if n == 0:
                continue
            rate, steps = min(1.0, batch / n), rounds * epochs * math.ceil(n / batch)
            per_client.append({"shared": rdp_epsilon(z, rate, steps, self.delta),
                               "local": rdp_epsilon(z / math.sqrt(2), rate, steps, self.delta),
                               "combined": rdp_epsilon(z / math.sqrt(3), rate, steps, self.delta)})
        if not per_client:
            return {"dp": {"enabled": True, "epsilon": 0.0, "note": "no client held data"}}
        return {"dp": {
            "enabled": True, "epsilon": max(c["combined"] for c in per_client),
            "epsilon_shared": max(c["shared"] for c in per_client),
            "epsilon_local": max(c["local"] for c in per_client),
            "epsilon_per_client": [round(c["combined"], 4) for c in per_client],
            "delta": self.delta, "target_epsilon": self.epsilon, "noise_multiplier": z, "clip_norm": self.clip_norm,
            "calibration": "paper: z = sqrt(R ln(1/delta)) / epsilon"
            if self.epsilon is not None else "given", "accountant": "opacus.accountants.RDPAccountant",
        }}
