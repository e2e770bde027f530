"""DP-FPL (Tran et al., ICLR 2025): differentially private personalised federated prompt learning — a global prompt
plus a local prompt that is factorised, at every step, into a low-rank part u·v and a residual r; privacy noise is
applied to the global prompt's gradient and to the two low-rank factors' gradients only.

Parts: global context G [n_ctx, width] (shared, FedAvg) and local context L [n_ctx, width] (personal, kept in the
client's Context.state). The client's prompt is G + L = G + u·v + r: each step, u [n_ctx, k] and v [k, width] come
from one power iteration on L from a Gaussian start (u = orth(L·s), v = orth(Lᵀ·u)ᵀ, Gram–Schmidt), r = L − u·v.
With g the gradient of the batch's mean cross-entropy with respect to the prompt, g_G = g, g_u = g·vᵀ, g_v = uᵀ·g.

Privacy (the reference's, per step and client): each of g_G, g_u, g_v is clipped to norm C (`clipping: batch`, the
batch-mean gradient as a whole — the reference; `clipping: example` clips every example's gradient, DP-SGD); the
factor gradients get Gaussian noise of std z·C/B on the client; the global gradient's noise is one draw of std
z·C/(B·U) on the average of the U clients' gradients. The local prompt then moves along the reference's
`compute_full_grad`: ∇L = g̃_u·v/10 + u·g̃_v/10 + u·uᵀ·(g̃_u/10)·v. The noise multiplier follows the paper's
calibration z = √(R·ln(1/δ)) / ε (`noise_multiplier` overrides it).

How the server-side draw maps onto flbench (`global_noise`): the reference exchanges gradients every step; flbench's
clients exchange parameters after their local steps, and methods never run on the server. With
`global_noise: distributed` (default) every client adds N(0, (z·C/(B·√U))²) to its clipped global gradient, U =
`cohort`: the average over U clients then carries exactly the reference's single draw of std z·C/(B·U) (a sum of
independent Gaussians is Gaussian) — the same aggregate in distribution, and with one plain-SGD step per round and
equal client weights (the reference's per-step exchange) the same aggregated prompt; the server itself now sees each
update with noise multiplier z/√U instead of the reference's un-noised gradients. `local` is local DP (z·C/B on every client, √U× the
reference's noise on the aggregate); `none` leaves the global gradient clipped but un-noised (FLIP's port).

Reported budget (run record, `method.dp`, Opacus' RDP accountant over every client's sampling rate B/n and noisy
steps): the global gradient is taken at G + L, and L depends on the data through the noisy factor releases, so no
bound on the global releases alone holds; every figure composes all three releases of a step. `epsilon` (headline)
is what the server sees — each client's update: global releases at z/√U (distributed) with both factor releases at
z; `epsilon_released` is what every client receives — the aggregated prompt; `epsilon_local` the two factor releases.
Sensitivity C/B per example: a formal bound with `clipping: example`, the reference's assumption with per-batch
clipping (a batch-mean clipped to C can move by up to 2C when one example changes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flbench.algorithms.base import cosine_logits
from flbench.algorithms.cohort import ClientState, bound
from flbench.algorithms.personal import PersonalPromptMethod
from flbench.algorithms.prompting import TextPrompt, context_length_of, init_context
from flbench.backbones.clip import FrozenCLIP
from flbench.errors import ConfigError

CLIPPINGS = ("batch", "example")
GLOBAL_NOISE = ("distributed", "local", "none")
# compute_full_grad divides both factor gradients by 10 before rebuilding the local prompt's gradient.
FACTOR_GRADIENT_SCALE = 0.1


def paper_noise_multiplier(epsilon: float, delta: float, rounds: int) -> float:
    """DP-FPL's calibration of the Gaussian noise multiplier from (ε, δ) and the number of rounds."""
    return math.sqrt(rounds * math.log(1.0 / delta)) / epsilon


# Opacus' default RDP orders (1.1 … 63) plus larger ones: with heavy noise (z ≈ 27 at ε = 0.4, 10 rounds) the best
# order lies beyond 63, and stopping there overstates ε.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 96, 128, 192, 256, 384, 512, 1024]


@functools.lru_cache(maxsize=256)
def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε spent by `steps` subsampled Gaussian steps, from Opacus' RDP accountant (about a second per call with
    subsampling: cached, clients with equal shards cost one call)."""
    from opacus.accountants import RDPAccountant  # heavy import (~2 s), only when a record is written

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta, alphas=RDP_ORDERS))


def combined_multiplier(*multipliers: float) -> float:
    """One Gaussian release equivalent to several of the same step (each clipped to C, its own noise multiplier):
    1/z² = Σ 1/z_i². A multiplier of 0 (no noise) makes the whole step non-private (0)."""
    if any(z <= 0 for z in multipliers):
        return 0.0
    return 1.0 / math.sqrt(sum(1.0 / z ** 2 for z in multipliers))


def orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    """Gram–Schmidt on the columns (the reference's `orthogonalize`): QR with R's diagonal made positive."""
    q, r = torch.linalg.qr(matrix)
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


@torch.no_grad()
def factorise(local: torch.Tensor, rank: int, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One power iteration from a Gaussian start s [width, k]: u = orth(L·s) [n, k], v = orth(Lᵀ·u)ᵀ [k, width],
    residual L − u·v (the reference's `factorize_ctx`)."""
    start = torch.randn(local.shape[1], rank, generator=generator, dtype=local.dtype).to(local.device)
    u = orthonormal_columns(local @ start)
    v = orthonormal_columns(local.t() @ u).t()
    return u, v, local - u @ v


def full_gradient(u: torch.Tensor, v: torch.Tensor, grad_u: torch.Tensor, grad_v: torch.Tensor) -> torch.Tensor:
    """The local prompt's gradient from the (noisy) factor gradients, as the reference's `compute_full_grad`:
    g_u·v/10 + u·g_v/10 + u·uᵀ·(g_u/10)·v."""
    gu, gv = grad_u * FACTOR_GRADIENT_SCALE, grad_v * FACTOR_GRADIENT_SCALE
    gu_v = gu @ v
    return gu_v + u @ gv + u @ (u.t() @ gu_v)


def clip_mean(grads: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Each of `grads` [M, ...] scaled to norm ≤ `clip_norm`, then averaged (M = 1: the batch mean, clipped)."""
    norms = grads.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (clip_norm / norms).clamp(max=1.0).view(-1, *[1] * (grads.dim() - 1))
    return (grads * scale).mean(0)


def privatise(grads: torch.Tensor, clip_norm: float, noise_std: float) -> torch.Tensor:
    """Clipped mean of `grads` plus N(0, noise_std²) (no draw when noise_std is 0)."""
    clipped = clip_mean(grads, clip_norm)
    return clipped + torch.randn_like(clipped) * noise_std if noise_std > 0 else clipped


class DPFPL(PersonalPromptMethod):
    name = "dpfpl"
    paper = "DP-FPL (Tran et al., ICLR 2025)"
    extra_loss = "none; clipped gradients, Gaussian noise on the global and low-rank local gradients"
    loss_scaling = False  # gradients come from its own autograd calls: no fp16 loss scaling
    global_keys = ("global_ctx",)
    fidelity = """\
Reference: Tran et al., "Privacy-Preserving Personalized Federated Prompt Learning for Multimodal Large Language
Models", ICLR 2025; linhhtran/DP-FPL: `trainers/DP_FPL.py` (`factorize_ctx`, `orthogonalize`, `compute_full_grad`;
`forward_pass`: per-batch clipping of the global, u and v gradients to NORM_THRESH, noise std z·C/B on u and v;
`build_model`: z = √(ROUND·ln(1/δ)) / NOISE, δ = 1e-5), `federated_main.py` (every step: the clients' clipped global
gradients averaged, one N(0, (z·C/(B·U))²) draw added on the server, then each client steps with it; global prompt
N(0, 0.02), rank 8 of n_ctx 16, NORM_THRESH 10), `configs/trainers/DP-FPL/vit_b16.yaml` (SGD).

flbench: the factorisation, per-batch clipping, noise scales, the 1/10 factor scaling with the u·uᵀ·g̃_u·v term,
the calibration and the random global-prompt initialisation are the reference's. The server-side draw is realised as
distributed noise (`global_noise: distributed`, each client N(0, (z·C/(B·√U))²), U = `cohort`): the aggregate then
has the reference's noise, with no server hook; the server sees noised updates (multiplier z/√U) where the
reference's trusted server saw clean ones.

Deviations: flbench's round is the FL layer's (local steps, then FedAvg of parameters, weighted by examples), not the
reference's per-step gradient exchange; one local step per round (a batch as large as the shard, `train.optimizer=sgd
train.momentum=0`) is the reference's protocol, with FedAvg weights instead of a plain mean. (The reference steps
every client with one shared SGD optimizer, momentum 0.9, whose buffer mixes the clients' steps; not reproduced.) B is each step's batch (the reference uses the configured batch
size; they differ on a shard's last, partial batch). n_ctx = 4 and rank = 2 (the paper's 8 of 16, scaled to the tiny
CLIP's 16-token context). The budget is reported from Opacus' RDP accountant (the headline: what the server sees,
all three releases composed), not from the calibration formula. Options: `clipping: example` (DP-SGD's per-example
clipping, a formal sensitivity bound), `global_noise: local` (local DP) or `none`.

FLIP: `dpfpl_flip` — FLIP's port (0-ml/flip `flcore/clients/client_dpfpl.py`) trains local epochs with FedAvg, never
adds the server's noise to the global prompt (`global_noise: none`: its budget is then reported as not private) and
uses rank 8 (capped here at n_ctx). Its clip-and-noise code skips the factors' noise whenever the global gradient was
clipped (an `elif`); that is not reproduced."""

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 4, ctx_init: str | None = None, rank: int = 2,
                 epsilon: float | None = 0.4, delta: float = 1e-5, clip_norm: float = 10.0,
                 noise_multiplier: float | None = None, clipping: str = "batch", global_noise: str = "distributed",
                 cohort: int = 1, rounds: int = 1, epochs: int = 1,
                 class_token_position: str = "end", init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        n_ctx = context_length_of(backbone, ctx_init, n_ctx)
        if rank < 1:
            raise ConfigError("algorithm.rank must be at least 1")
        if epsilon is not None and epsilon <= 0:
            raise ConfigError(f"algorithm.epsilon={epsilon} must be positive (null disables differential privacy)")
        if not 0 < delta < 1 or clip_norm <= 0 or rounds < 1 or cohort < 1:
            raise ConfigError("algorithm.delta must be in (0, 1), algorithm.clip_norm positive, algorithm.rounds and "
                              "algorithm.cohort ≥ 1")
        if clipping not in CLIPPINGS or global_noise not in GLOBAL_NOISE:
            raise ConfigError(f"algorithm.clipping must be one of {CLIPPINGS} and algorithm.global_noise one of "
                              f"{GLOBAL_NOISE}; got {clipping!r}, {global_noise!r}")
        generator = torch.Generator().manual_seed(init_seed)
        self.global_ctx = nn.Parameter(init_context(backbone, n_ctx, ctx_init, generator))
        self.local_ctx = nn.Parameter(torch.randn(n_ctx, backbone.text_width, generator=generator) * 0.02)
        self.rank = min(rank, n_ctx, backbone.text_width)
        self.epsilon, self.delta, self.clip_norm = epsilon, float(delta), float(clip_norm)
        self.clipping, self.global_noise, self.cohort = clipping, global_noise, int(cohort)
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
        """(mean CE, gradients w.r.t. the client's prompt): per example [B, n_ctx, width] under `clipping: example`
        with privacy, else the gradient of the batch's mean CE as [1, n_ctx, width]."""
        ctx = self.client_context().detach().requires_grad_(True)
        text = self.prompt.encode(ctx)
        text_leaf = text.detach().requires_grad_(True)
        logits = cosine_logits(self.backbone, encoded, text_leaf)
        losses = F.cross_entropy(logits, labels, reduction="none")
        if self.noise_multiplier is None or self.clipping == "batch":  # one backward pass of the mean loss
            cotangent = torch.autograd.grad(losses.mean(), text_leaf)[0]
            return losses.mean().detach(), torch.autograd.grad(text, ctx, cotangent)[0].unsqueeze(0)
        # d loss_i / d text is cheap (a tiny graph); one vector-Jacobian product through the text encoder per example
        # turns it into d loss_i / d prompt (is_grads_batched is slower here: the encoder falls back to a loop).
        per_example = []
        for i in range(len(labels)):
            cotangent = torch.autograd.grad(losses[i], text_leaf, retain_graph=True)[0]
            per_example.append(torch.autograd.grad(text, ctx, cotangent, retain_graph=True)[0])
        return losses.mean().detach(), torch.stack(per_example)

    def noise_stds(self, batch: int) -> tuple[float, float]:
        """(std of the global gradient's noise on this client, std of each factor gradient's noise) for a batch."""
        if self.noise_multiplier is None:
            return 0.0, 0.0
        factor = self.noise_multiplier * self.clip_norm / batch
        share = {"distributed": 1.0 / math.sqrt(self.cohort), "local": 1.0, "none": 0.0}[self.global_noise]
        return factor * share, factor

    def backward(self, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One private step's gradients. Random draws, in order: the factorisation's start, then the noise of the
        global gradient, of u's and of v's (each only when its std is positive)."""
        self.personalised.fill_(1.0)
        u, v, _ = factorise(self.local_ctx.detach(), self.rank)
        loss, grads = self.prompt_gradients(encoded, labels)
        self.private_step(u, v, grads, len(labels))
        return loss

    def private_step(self, u: torch.Tensor, v: torch.Tensor, grads: torch.Tensor, batch: int) -> None:
        """Clip and noise the prompt gradients [M, n_ctx, width] (per example, or M = 1) of a batch of `batch`
        examples, and add the global and local prompts' gradients to their `.grad`."""
        if self.noise_multiplier is None:  # no privacy: neither clipping nor noise
            g = grads.mean(0)
            global_grad, local_grad = g, full_gradient(u, v, g @ v.t(), u.t() @ g)
        else:
            global_std, factor_std = self.noise_stds(batch)
            global_grad = privatise(grads, self.clip_norm, global_std)
            grad_u = privatise(grads @ v.t(), self.clip_norm, factor_std)  # [n_ctx, k]
            grad_v = privatise(u.t() @ grads, self.clip_norm, factor_std)  # [k, width]
            local_grad = full_gradient(u, v, grad_u, grad_v)
        for param, grad in ((self.global_ctx, global_grad), (self.local_ctx, local_grad)):
            param.grad = grad.clone() if param.grad is None else param.grad + grad

    # --- cohort training: every client's prompt G + L through the text tower in one call; the factorisation,
    # clipping and noise stay each client's own (under `bound`: its own random stream, draws in backward's order)
    stacks = True

    def cohort_backward(self, states: Sequence[ClientState], encoded: Sequence[torch.Tensor],
                        labels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        factors, contexts = [], []
        for state in states:
            with bound(self, state):
                self.personalised.fill_(1.0)
                factors.append(factorise(self.local_ctx.detach(), self.rank))
                contexts.append(self.client_context().detach())
        ctx = torch.stack(contexts).requires_grad_(True)  # [K, n_ctx, width]
        text = self.prompt.encode(ctx.unsqueeze(1))  # [K, C, D]
        text_leaf = text.detach().requires_grad_(True)
        losses = [F.cross_entropy(cosine_logits(self.backbone, x, text_leaf[k]), y, reduction="none")
                  for k, (x, y) in enumerate(zip(encoded, labels))]
        grads = self._cohort_prompt_gradients(ctx, text, text_leaf, losses)
        for state, (u, v, _), g, y in zip(states, factors, grads, labels):
            with bound(self, state):
                self.private_step(u, v, g, len(y))
        return [loss.mean().detach() for loss in losses]

    def _cohort_prompt_gradients(self, ctx: torch.Tensor, text: torch.Tensor, text_leaf: torch.Tensor,
                                 losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`prompt_gradients` of every client from vector-Jacobian products through the one text-tower graph: per
        batch ([1, n_ctx, width] each), or per example under `clipping: example` (example i of every client in one
        product; a client with fewer examples gets a zero cotangent there, and its part is not used)."""
        if self.noise_multiplier is None or self.clipping == "batch":
            cotangent = torch.autograd.grad(torch.stack([loss.mean() for loss in losses]).sum(), text_leaf)[0]
            return list(torch.autograd.grad(text, ctx, cotangent)[0].unsqueeze(1))
        per_client: list[list[torch.Tensor]] = [[] for _ in losses]
        for i in range(max(len(loss) for loss in losses)):
            owners = [k for k, loss in enumerate(losses) if len(loss) > i]
            cotangent = torch.autograd.grad(torch.stack([losses[k][i] for k in owners]).sum(), text_leaf,
                                            retain_graph=True)[0]
            grad = torch.autograd.grad(text, ctx, cotangent, retain_graph=True)[0]
            for k in owners:
                per_client[k].append(grad[k])
        return [torch.stack(g) for g in per_client]

    def loss(self, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(encoded), labels)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)

    # --- reporting -----------------------------------------------------------------------------------------------
    def global_multiplier(self) -> float:
        """Noise multiplier of one client's global-gradient release (noise std over the per-example sensitivity
        C/B): z/√U distributed, z local, 0 without noise."""
        z = float(self.noise_multiplier)  # type: ignore[arg-type]
        return {"distributed": z / math.sqrt(self.cohort), "local": z, "none": 0.0}[self.global_noise]

    def extra_metrics(self, training: Mapping[str, Any]) -> dict[str, Any]:
        if self.noise_multiplier is None:
            return {"dp": {"enabled": False}}
        z, z_global = self.noise_multiplier, self.global_multiplier()
        rounds = int(training.get("num_rounds", self.rounds))
        epochs, batch = int(training.get("epochs", self.epochs)), int(training["batch_size"])
        sizes = [int(n) for n in training["client_sizes"] if int(n) > 0]
        if not sizes:
            return {"dp": {"enabled": True, "epsilon": 0.0, "note": "no client held data"}}
        cohorts = [int(c) for c in training.get("clients_per_round", []) if int(c) > 0]
        aggregated = min(cohorts) if cohorts else len(sizes)
        # The aggregate's noise over one client's share of it: FedAvg weights under full participation, else the
        # smallest round's cohort with equal weights (the least noise any aggregate carried).
        weights = [n / sum(sizes) for n in sizes] if aggregated >= len(sizes) else [1.0 / aggregated] * len(sizes)
        spread = math.sqrt(sum(w * w for w in weights)) if aggregated >= len(sizes) else 1.0 / math.sqrt(aggregated)
        per_client = []
        for n, w in zip(sizes, weights):
            rate, steps = min(1.0, batch / n), rounds * epochs * math.ceil(n / batch)
            views = {"server": combined_multiplier(z_global, z, z),
                     "released": combined_multiplier(z_global * spread / w, z, z), "local": combined_multiplier(z, z)}
            per_client.append({view: rdp_epsilon(m, rate, steps, self.delta) if m > 0 else None
                               for view, m in views.items()})

        def worst(view: str) -> float | None:
            values = [c[view] for c in per_client]
            return None if any(v is None for v in values) else max(values)

        return {"dp": {
            "enabled": True, "epsilon": worst("server"), "epsilon_released": worst("released"),
            "epsilon_local": worst("local"),
            "epsilon_per_client": [None if c["server"] is None else round(c["server"], 4) for c in per_client],
            "delta": self.delta, "target_epsilon": self.epsilon, "noise_multiplier": z, "clip_norm": self.clip_norm,
            "clipping": self.clipping, "global_noise": self.global_noise, "cohort": self.cohort,
            "clients_aggregated": aggregated,
            "calibration": "paper: z = sqrt(R ln(1/delta)) / epsilon" if self.epsilon is not None else "given",
            "accountant": "opacus.accountants.RDPAccountant",
            "note": ("epsilon: each client's update as the server sees it; epsilon_released: the aggregated global "
                     "prompt every client receives; both compose the global and the two local-factor releases of "
                     "every step (the global gradient is taken at G + L, and L depends on the data); null: not "
                     "private (global_noise=none). Per-example sensitivity C/B: a formal bound with "
                     "clipping=example, the reference's assumption with clipping=batch."),
        }}
