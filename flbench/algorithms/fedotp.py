"""FedOTP (Li et al., CVPR 2024): a global and a local prompt per client, matched to an image's local features by
unbalanced optimal transport.

Each client trains two CoOp-style contexts: a *global* one, averaged by the server, and a *local* one that never
leaves the client (it is `local_state()`, kept in the client's Flower Context between rounds). Each class gets two
text features; an image's M local features are transported onto them with the image-side marginal relaxed to an
inequality and total mass γ (`mass`), so each prompt may attend to the local features it explains best
(flbench.algorithms.ot, the authors' "COT"). Score = Σ T* ⊙ sim, logits = CLIP's logit scale × score. Local features:
the attention pool at each cell of a ResNet's last map, or a ViT's projected patch tokens (the authors' own ViT
encoder, `ModifiedVisionTransformer`).

What is evaluated where (as every personalised method, `personal.PersonalPromptMethod`): a client evaluates its own
model (global + its local prompt), as the paper does; the server, which holds no local prompt, evaluates the
*global-only FedOTP model*: the same unbalanced transport of the local features onto the global prompt alone (N = 1:
each class's single prompt receives mass γ from the local features, none more than 1/M), never the randomly
initialised local prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flbench.algorithms.base import PromptMethod
from flbench.algorithms.cohort import ClientState, global_local_backward
from flbench.algorithms.ot import ot_similarity
from flbench.algorithms.personal import PersonalPromptMethod
from flbench.algorithms.prompting import TextPrompt
from flbench.backbones import prompted
from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.errors import ConfigError

TRANSPORTS = ("unbalanced", "balanced")


class FedOTP(PersonalPromptMethod):
    name = "fedotp"
    paper = "FedOTP (Li et al., CVPR 2024)"
    extra_loss = "none (cross-entropy on unbalanced-OT logits)"
    global_keys = ("global_ctx",)
    fidelity = """\
Reference: Li et al., "Global and Local Prompts Cooperation via Optimal Transport for Federated Learning", CVPR 2024;
HongxiaLee/FedOTP: `trainers/GLP_OT.py` (prompts ctx[0] global, ctx[1] local, N(0, 0.02); `entropic_COT_fast`:
u = min(1, a / Kv), v = b / Kᵀu from u = v = 1, stop when mean |Δv| < THRESH; plan without gradient; logits = scale ×
Σ T ⊙ sim), `federated_main.py` (only ctx[0] is averaged; every client is evaluated with its own [global, local]),
`clip/model.py` (`ModifiedResNet_GLP_OT`, and `ModifiedVisionTransformer` for ViT: all tokens through ln_post and the
projection, local features = the patch tokens), `scripts/fedotp_few_shot.sh` (COT, TOP_PERCENT 0.8, EPS 0.01, THRESH
0.001, MAX_ITER 100, N_CTX 16).

flbench: the same prompts, transport, stopping rule (over the whole batch, as the reference), score and split of
what travels; clients evaluate global + local. The paper defines no model for the server: flbench's server evaluates
the global-only model (the transport onto the global prompt alone), as its other personalised methods evaluate their
global part.

Deviations: `n_ctx` = 4 (16 tokens do not fit the tiny CLIP's 16-token context; set `algorithm.n_ctx=16` on a real
backbone). On ViT towers the local features stay the authors' projected patch tokens: PLOT++'s visual-prompt groups
belong to PLOT's authors, not FedOTP's (FedOTP's CIFAR-100 script runs its own ViT-B/16 patch-token encoder).

FLIP: `fedotp_flip` — FLIP's FedOTP (0-ml/flip `flcore/models/clip/FedOTP.py`) runs balanced Sinkhorn (OT =
'Sinkhorn', top_percent 1, ε = 0.1, stop on mean |Δr| < 0.001). FLIP also averages the local prompts into its
server's global model (its FedAvg averages the whole prompt tensor and clients restore their own local part); that
sends the local prompts to the server, which FedOTP does not, and is not reproduced."""

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 n_ctx: int = 4, class_token_position: str = "end", transport: str = "unbalanced", mass: float = 0.8,
                 eps: float = 0.01, max_iter: int = 100, tol: float = 1e-3, init_seed: int = 0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        if n_ctx < 1:
            raise ConfigError("algorithm.n_ctx must be at least 1")
        if transport not in TRANSPORTS:
            raise ConfigError(f"algorithm.transport={transport!r} is unknown; choose one of {TRANSPORTS}")
        if not 0.0 < mass <= 1.0 or (transport == "balanced" and mass != 1.0):
            raise ConfigError(f"algorithm.mass={mass} must be in (0, 1] (the fraction of local-feature mass "
                              "transported), and 1.0 with algorithm.transport=balanced")
        if eps <= 0:
            raise ConfigError(f"algorithm.eps={eps} must be > 0")
        generator = torch.Generator().manual_seed(init_seed)
        self.global_ctx = nn.Parameter(torch.randn(n_ctx, backbone.text_width, generator=generator) * 0.02)
        self.local_ctx = nn.Parameter(torch.randn(n_ctx, backbone.text_width, generator=generator) * 0.02)
        self.prompt = TextPrompt(backbone, classnames, n_ctx, class_token_position)
        self.transport = transport
        self.mass, self.eps, self.max_iter, self.tol = float(mass), float(eps), int(max_iter), float(tol)
        self._init_personal()

    def shared_keys(self) -> list[str]:
        """Everything trainable but the local prompt (routers attached by `backbone.attention.train_routers` too)."""
        return [k for k in PromptMethod.shared_keys(self) if k != "local_ctx"]

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)

    def text_features(self) -> torch.Tensor:
        """[N, C, D]: the global prompt's class features, then (on a client) the local prompt's."""
        contexts = [self.global_ctx, self.local_ctx] if self.uses_local() else [self.global_ctx]
        return self.prompt.encode(torch.stack(contexts).unsqueeze(1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Local image features [B, M, D] (frozen)."""
        with torch.no_grad():
            return prompted.encode_image_local(self.backbone, images)[1]

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.text_logits(self.text_features(), encoded)

    def text_logits(self, text: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        """OT logits of local image features [B, M, D] against the prompts' class features [N, C, D]."""
        unbalanced = self.transport == "unbalanced"
        score = ot_similarity(normalize(encoded), normalize(text), self.eps, self.max_iter, self.tol,
                              mass=self.mass, unbalanced=unbalanced, watch="col" if unbalanced else "row")
        return self.backbone.logit_scale * score

    # --- cohort training: both prompts of every client in one text-tower call; each client's transport is its own
    # (the stopping rule watches one client's whole batch, as when it trains alone)
    stacks = True

    def cohort_backward(self, states: Sequence[ClientState], encoded: Sequence[torch.Tensor],
                        labels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return global_local_backward(self, states, encoded, labels, lambda both, x: self.text_logits(both, x))
