"""A method as K clients at once: the per-client state a cohort trains, and how one module stands in for each client.

The process holds one method instance (one set of `nn.Parameter`s) over one frozen backbone. Cohort training
(`flbench.engine.train_cohort`) gives each client its own `ClientState` — copies of the method's trainable leaves and
persistent buffers, by state-dict name, and its own stream of torch's global random numbers — and `bound(method,
state)` makes the one module *be* that client for a while: its parameters and buffers swapped in, its random stream
current. So a method's own per-client code (its loss, clipping, noise, `local_state()`) runs unchanged for each
client, and draws exactly the random numbers it would draw training alone.

A method opts in (`PromptMethod.stacks = True`) by implementing `PromptMethod.cohort_backward`: the expensive part of
a step — the text tower over every client's prompts — as one call on stacked parameters (`stacked(states, name)`:
[K, ...]), then each client's own loss under `bound`. The clients' losses are separable (client k's loss reads only
client k's leaves), so the gradient of their sum with respect to client k's leaves is exactly client k's gradient
(`backward_sum`). Non-persistent buffers (prompt token embeddings, hand-crafted features) depend only on the class
names, which every client of a round shares: they are not copied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flbench.algorithms.base import backward_outside_autocast


@dataclass
class ClientState:
    """One client's copy of a method's state (or the method's own tensors, when it trains in place)."""

    tensors: dict[str, torch.Tensor]  # state-dict name → tensor; the trainable ones are leaf nn.Parameters
    trainable: list[str]  # the names the optimiser steps, in `named_parameters()` order
    rng: list[torch.Tensor] | None = None  # torch's global RNG states (CPU[, the CUDA device]); None: the live ones
    owner: int | None = None  # the client (partition id): an exception raised while it is bound carries it

    @classmethod
    def of(cls, module: nn.Module, copy: bool = False, owner: int | None = None) -> "ClientState":
        """The module's current state: its own tensors (`copy=False`, training in place on the live random stream),
        or detached copies with the random stream as it is now (`copy=True`, one client of a cohort)."""
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        tensors = dict(module.state_dict(keep_vars=True))
        if not copy:
            return cls(tensors, trainable, owner=owner)
        copies = {n: nn.Parameter(t.detach().clone()) if n in trainable else t.detach().clone()
                  for n, t in tensors.items()}
        return cls(copies, trainable, capture_rng(_device_of(module)), owner)

    def parameters(self) -> dict[str, torch.Tensor]:
        """The trainable leaves by name (what the optimiser and the protocol's gradient hooks see)."""
        return {n: self.tensors[n] for n in self.trainable}


def _device_of(module: nn.Module) -> torch.device:
    device = getattr(module, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def capture_rng(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _restore_rng(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)


@contextlib.contextmanager
def random_stream(state: ClientState, device: torch.device) -> Iterator[None]:
    """Within this block torch's global generator(s) continue `state`'s stream; the caller's stream is put back after."""
    if state.rng is None:
        with owned_by(state):
            yield
        return
    outer = capture_rng(device)
    _restore_rng(state.rng, device)
    try:
        with owned_by(state):
            yield
    finally:
        state.rng = capture_rng(device)
        _restore_rng(outer, device)


OWNER_ATTRIBUTE = "flbench_client"  # set on an exception raised while a client's state was bound


@contextlib.contextmanager
def owned_by(state: ClientState) -> Iterator[None]:
    """Exceptions raised inside carry `state.owner` (the FL layer then names the client whose part failed)."""
    try:
        yield
    except Exception as error:
        if state.owner is not None and getattr(error, OWNER_ATTRIBUTE, None) is None:
            setattr(error, OWNER_ATTRIBUTE, state.owner)
        raise


def _slots(module: nn.Module, names: Sequence[str]) -> list[tuple[dict, str]]:
    """For each state-dict name, the dict that holds it (a submodule's `_parameters` or `_buffers`) and its key;
    looked up once per module and list of names."""
    cache: dict = module.__dict__.setdefault("_cohort_slots", {})
    key = tuple(names)
    if key not in cache:
        slots = []
        for name in names:
            prefix, _, leaf = name.rpartition(".")
            owner = module.get_submodule(prefix) if prefix else module
            slots.append((owner._parameters if leaf in owner._parameters else owner._buffers, leaf))
        cache[key] = slots
    return cache[key]


@contextlib.contextmanager
def bound(module: nn.Module, state: ClientState) -> Iterator[None]:
    """Within this block `module`'s parameters and persistent buffers are `state`'s tensors and torch's global
    random stream is `state`'s: the module computes (and draws) as that client. Never reset or reload the module
    (`Experiment.fresh`) inside: that would write into the client's tensors."""
    names = list(state.tensors)
    slots = _slots(module, names)
    originals = [holder[leaf] for holder, leaf in slots]
    for (holder, leaf), name in zip(slots, names):
        holder[leaf] = state.tensors[name]
    try:
        with random_stream(state, _device_of(module)):
            yield
    finally:
        for (holder, leaf), original in zip(slots, originals):
            holder[leaf] = original


def stacked(states: Sequence[ClientState], name: str) -> torch.Tensor:
    """[K, ...]: tensor `name` of every client, stacked (differentiable: each slice's gradient reaches its leaf)."""
    return torch.stack([s.tensors[name] for s in states])


def global_local_backward(method: Any, states: Sequence[ClientState], encoded: Sequence[torch.Tensor],
                          labels: Sequence[torch.Tensor], logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                          ) -> list[torch.Tensor]:
    """`cohort_backward` of a personalised method with a global and a local prompt (FedOTP, PromptFolio): all K
    clients' 2·K prompts in one text-tower call, then each client's cross-entropy of `logits(both, x)`, where
    `both` [2, C, D] holds its global and local class features."""
    pairs = torch.stack([stacked(states, "global_ctx"), stacked(states, "local_ctx")], dim=1)  # [K, 2, n, W]
    both = method.prompt.encode(pairs.flatten(0, 1).unsqueeze(1)).unflatten(0, pairs.shape[:2])  # [K, 2, C, D]
    losses = []
    for state, both_k, x, y in zip(states, both, encoded, labels):
        with bound(method, state):
            method.personalised.fill_(1.0)  # as PersonalPromptMethod.backward: this client is personalised
            losses.append(F.cross_entropy(logits(both_k, x), y))
    return backward_sum(losses, method.loss_scale)


def backward_sum(losses: Sequence[torch.Tensor], loss_scale: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One backward pass of the clients' summed losses (each client's leaves get exactly their own gradient);
    returns the detached per-client losses."""
    total = torch.stack(list(losses)).sum()
    backward_outside_autocast(total if loss_scale is None else total * loss_scale)
    return [loss.detach() for loss in losses]
