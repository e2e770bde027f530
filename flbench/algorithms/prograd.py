"""ProGrad (Zhu et al., ICCV 2023): prompt-aligned gradient — update the prompt only in directions that do not
conflict with CLIP's general knowledge.

Two gradients are computed each step: G_d of the task cross-entropy and G_g of KL(p_zs ‖ p_prompt), the divergence of
the prompt's predictions from zero-shot CLIP's (hand-crafted template, temperature T). The update uses

    G = G_d                                  if G_d · G_g ≥ 0
    G = G_d − λ · (G_d · G_g / ‖G_g‖²) · G_g   otherwise (λ = 1: the conflicting component is removed entirely)

— the paper's projection rule, implemented in the `backward` hook; the KL is never added to the loss. The dot product
is taken over the concatenation of all trainable parameters (for ProGrad's single context tensor this is the same as
per tensor). When ‖G_g‖ = 0 (e.g. at initialisation from the hand-crafted prompt, where the KL is at its minimum)
nothing is projected. The reported training loss is the task cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from flbench.algorithms.base import cosine_logits
from flbench.algorithms.cohort import ClientState, bound
from flbench.algorithms.coop import CoOp
from flbench.backbones.clip import FrozenCLIP


def prograd_project(task: torch.Tensor, general: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """ProGrad's rule on flat gradients: remove λ times the component of `task` along `general` when they conflict."""
    dot = torch.dot(task, general)
    norm2 = torch.dot(general, general)
    if dot >= 0 or norm2 <= 0:
        return task
    return task - lam * (dot / norm2) * general


class ProGrad(CoOp):
    name = "prograd"
    paper = "ProGrad (Zhu et al., ICCV 2023)"
    extra_loss = "none added: CE gradient projected off KL(p_zs‖p) gradient when they conflict (λ = 1)"
    loss_scaling = False  # gradients come from its own autograd calls: no fp16 loss scaling
    fidelity = """\
Reference: Zhu et al., "Prompt-aligned Gradient for Prompt Tuning", ICCV 2023; BeierZhu/Prompt-align as shipped in
htyao89/KgCoOp: `KgCoOp/trainers/prograd.py` (ProGradLoss: CE, and −Σ p_zs log p at temperature T scaled by T², whose
gradient equals the KL's), `Dassl.ProGrad.pytorch/dassl/engine/trainer.py` (`prograd_backward_and_update`: per
parameter, where G_d·G_g < 0, G_d − λ (G_d·Ĝ_g) Ĝ_g), λ = T = 1.

flbench: that update rule and teacher (zero-shot CLIP with the dataset's first template); the KL form of the
distillation term has the same gradient as the reference's cross-entropy form.

Deviations: the reference initialises the context from the dataset template's prefix (`CUSTOM_TEMPLATES[dataset]`
with " {}." removed, right-aligned in n_ctx slots); flbench from "a photo of a", which is the same prompt wherever
the template is "a photo of a {}." (the synthetic suite, ImageNet, Caltech101, SUN397, Stanford Cars)."""

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",),
                 lam: float = 1.0, temperature: float = 1.0, **hparams: Any) -> None:
        super().__init__(backbone, classnames, templates, **hparams)
        self.lam, self.temperature = float(lam), float(temperature)
        self.keep_handcrafted(self.templates[:1])

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.keep_handcrafted(self.templates[:1])

    def kl_to_zeroshot(self, encoded: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """KL(p_zs ‖ p_prompt) at temperature T, scaled by T² (the usual distillation scaling)."""
        T = self.temperature
        zeroshot = cosine_logits(self.backbone, encoded, self.handcrafted).detach()
        return F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(zeroshot / T, -1), log_target=True,
                        reduction="batchmean") * T * T

    def task_and_general(self, text: torch.Tensor, encoded: torch.Tensor, labels: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(task cross-entropy, KL to zero-shot) from the class text features [C, D]."""
        logits = cosine_logits(self.backbone, encoded, text)
        return F.cross_entropy(logits, labels), self.kl_to_zeroshot(encoded, logits)

    def gradients(self, encoded: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(task loss, flat task gradient G_d, flat general-knowledge gradient G_g)."""
        params = [p for p in self.parameters() if p.requires_grad]
        ce, kl = self.task_and_general(self.text_features(), encoded, labels)
        task = torch.autograd.grad(ce, params, retain_graph=True)
        general = torch.autograd.grad(kl, params)
        return ce.detach(), torch.cat([g.reshape(-1) for g in task]), torch.cat([g.reshape(-1) for g in general])

    def project_into_grad(self, params: Sequence[torch.Tensor], task: torch.Tensor, general: torch.Tensor) -> None:
        """ProGrad's update of one client, from its flat G_d and G_g, added to its parameters' `.grad`."""
        update = prograd_project(task, general, self.lam)
        offset = 0
        for p in params:
            g = update[offset:offset + p.numel()].view_as(p)
            p.grad = g.clone() if p.grad is None else p.grad + g
            offset += p.numel()

    def backward(self, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, task, general = self.gradients(encoded, labels)
        self.project_into_grad([p for p in self.parameters() if p.requires_grad], task, general)
        return loss

    def cohort_backward(self, states: Sequence[ClientState], encoded: Sequence[torch.Tensor],
                        labels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Both gradients of every client from one text-tower call; the projection is each client's own (its G_d
        against its G_g): the two sums' gradients are separable per client."""
        text = self.cohort_text_features(states)
        ces, kls = [], []
        for state, text_k, x, y in zip(states, text, encoded, labels):
            with bound(self, state):
                ce, kl = self.task_and_general(text_k, x, y)
            ces.append(ce)
            kls.append(kl)
        leaves = [list(state.parameters().values()) for state in states]
        flat = [p for client in leaves for p in client]
        task = torch.autograd.grad(torch.stack(ces).sum(), flat, retain_graph=True)
        general = torch.autograd.grad(torch.stack(kls).sum(), flat)
        offset = 0
        for client in leaves:
            g_d, g_g = task[offset:offset + len(client)], general[offset:offset + len(client)]
            self.project_into_grad(client, torch.cat([g.reshape(-1) for g in g_d]),
                                   torch.cat([g.reshape(-1) for g in g_g]))
            offset += len(client)
        return [ce.detach() for ce in ces]
