"""What personalised prompt methods (PromptFolio, FedPGP, DP-FPL, FedOTP) share: a global part that travels and a
local part that never does, and a rule for which of them the *server* may use.

The server holds no client's personal prompt: at evaluation it has only the initial value of the local part, which
says nothing about any client. So a personalised method evaluates with its global part alone until it has been
personalised (trained, or loaded with a client's local state). The `personalised` flag is a persistent buffer that is
not shared: it travels with the local state into the client's Flower `Context.state`, so a client's own evaluation
(personalised scenarios) uses its mixture, and the server's evaluation of the aggregate uses the global part only.
"""

from __future__ import annotations

import torch

from flbench.algorithms.base import PromptMethod

PERSONALISED_KEY = "personalised"


class PersonalPromptMethod(PromptMethod):
    """A method with a shared global part and a client-local part; subclasses declare `global_keys`."""

    global_keys: tuple[str, ...] = ()

    def _init_personal(self) -> None:
        self.register_buffer(PERSONALISED_KEY, torch.zeros(1))

    def uses_local(self) -> bool:
        """True while training and once this instance holds a client's local state; False on the server."""
        return self.training or bool(self.personalised.item())

    def backward(self, encoded, labels: torch.Tensor) -> torch.Tensor:
        self.personalised.fill_(1.0)
        return super().backward(encoded, labels)

    def shared_keys(self) -> list[str]:
        return list(self.global_keys)

    def local_parameter_keys(self) -> list[str]:
        """The trainable parameters that stay on the client (what tests compare across clients and rounds)."""
        shared = set(self.shared_keys())
        return [n for n, p in self.named_parameters() if p.requires_grad and n not in shared]
