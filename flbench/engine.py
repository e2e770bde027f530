"""The PyTorch half of federated prompt learning, with no Flower in sight: local training and evaluation.

The FL layer calls these; so does the bare-loop benchmark that measures framework overhead.

Devices and precision: a method runs where its backbone lives (`method.device`); batches (images and labels) are
moved there here, cached features stay there, predictions come back as numpy on the CPU. Forward passes run under
`torch.autocast` when `method.precision` is bf16 or fp16 (parameters stay fp32: the master prompts); fp16 adds
dynamic loss scaling (torch.amp.GradScaler), with the scale handed to `PromptMethod.backward` as `loss_scale`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import numpy as np
import torch

from flbench.algorithms.base import Encoded, PromptMethod
from flbench.algorithms.cohort import ClientState, bound, owned_by, random_stream
from flbench.algorithms.prompting import text_features_memo
from flbench.datasets.base import ImageSet, iterate_batches
from flbench.metrics import accuracy
from flbench.errors import ConfigError

# Edits the .grad of one client's trainable tensors (by name) after backward: FedProx, SCAFFOLD.
GradientHook = Callable[[Mapping[str, torch.Tensor]], None]
ROUTERS_PREFIX = "backbone_routers."  # backbone.attention.attach_routers registers trained routers here

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None = "auto") -> torch.device:
    """The `device` config key as a torch.device: auto = CUDA when this process sees a GPU, else the CPU."""
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but this process sees no CUDA GPU (torch.cuda.is_available() is "
                              "False); use device=cpu or device=auto")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(f"device={name} names no visible GPU ({torch.cuda.device_count()} visible); "
                              "use device=cuda")
        return torch.device(name)
    raise ConfigError(f"device={name!r} is unknown; choose auto, cpu or cuda (cuda:N for one GPU of several)")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse precisions that cannot run on `device` (one line naming the key)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is unknown; choose one of {sorted(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 needs device=cuda (fp16 loss scaling is a CUDA feature); use precision=fp32 "
                          "or precision=bf16 on the CPU")


def autocast(device: torch.device, precision: str) -> ContextManager[Any]:
    """Mixed precision for forward passes (bf16/fp16), or nothing at fp32 (today's exact CPU arithmetic)."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@dataclass
class LocalResult:
    num_examples: int
    steps: int
    loss: float


def _index(encoded: Encoded, *index: torch.Tensor) -> Encoded:
    """`encoded[index]` for a tensor or each tensor of a tuple, with the index moved to the tensor's device."""
    def pick(e: torch.Tensor) -> torch.Tensor:
        return e[tuple(i.to(e.device) for i in index)]
    return tuple(pick(e) for e in encoded) if isinstance(encoded, tuple) else pick(encoded)


def _concat(parts: list[Encoded]) -> Encoded:
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def num_encoded(encoded: Encoded) -> int:
    return len(encoded[0]) if isinstance(encoded, tuple) else len(encoded)


@torch.no_grad()
def encode_all(method: PromptMethod, images: ImageSet, batch_size: int, train: bool = False) -> Encoded:
    """The frozen image side of a whole set, computed once (valid only when `method.frozen_image_side`), kept on
    the method's device. `train` loads the images with the dataset's training augmentation."""
    device = method.device
    with autocast(device, method.precision):
        return _concat([method.encode(x.to(device)) for x, _ in iterate_batches(images, batch_size, train=train)])


@dataclass
class AugmentedViews:
    """k augmented views of every image of a shard, encoded once: each tensor of `encoded` is [k, N, ...].

    With `train.augment` the frozen image side changes with every augmentation draw, so plain caching is off; with
    `cache_views: k` the k views are precomputed and each training step draws one view per image (from the same
    seeded generator as the batch order). k = 1 is a fixed augmentation; larger k approaches fresh draws.
    """

    encoded: Encoded

    @property
    def count(self) -> int:
        return num_encoded(self.encoded)

    def draw(self, idx: torch.Tensor, generator: torch.Generator) -> Encoded:
        return _index(self.encoded, torch.randint(self.count, (len(idx),), generator=generator), idx)


@torch.no_grad()
def encode_views(method: PromptMethod, images: ImageSet, batch_size: int, views: int, seed: int) -> AugmentedViews:
    """`views` augmented encodings of every image; augmentation draws from torch's global generator, reseeded with
    `seed` here (and restored after), so every process computes the same views."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = [encode_all(method, images, batch_size, train=True) for _ in range(views)]
    if isinstance(parts[0], tuple):
        return AugmentedViews(tuple(torch.stack(p) for p in zip(*parts)))
    return AugmentedViews(torch.stack(parts))


def make_optimizer(params: list[torch.nn.Parameter], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    name = cfg.get("optimizer", "sgd")
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg.get("momentum", 0.9),
                               weight_decay=cfg.get("weight_decay", 0.0))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    raise ConfigError(f"train.optimizer={name!r} is unknown; choose sgd or adamw")


@dataclass
class CohortMember:
    """One client of a cohort: its own state (`ClientState`: its leaves, buffers and random stream), its data and
    its round's settings. Its batch order comes from its own `generator`, exactly as if it trained alone."""

    state: ClientState
    images: ImageSet
    generator: torch.Generator
    cached: Encoded | AugmentedViews | None = None
    gradient_hooks: tuple[GradientHook, ...] = ()
    max_steps: int | None = None


def train_local(method: PromptMethod, images: ImageSet, cfg: Mapping[str, Any], generator: torch.Generator,
                cached: Encoded | AugmentedViews | None = None, gradient_hooks: tuple[GradientHook, ...] = (),
                max_steps: int | None = None) -> LocalResult:
    """`cfg.epochs` local epochs of minibatch training of `method` itself on `images` (or on their cached
    encodings): a cohort of one, trained in place on the live random stream (see `train_cohort`)."""
    member = CohortMember(ClientState.of(method), images, generator, cached, gradient_hooks, max_steps)
    return train_cohort(method, [member], cfg)[0]


def train_cohort(method: PromptMethod, members: Sequence[CohortMember], cfg: Mapping[str, Any]) -> list[LocalResult]:
    """`cfg.epochs` local epochs for each of K clients, stepping together.

    Step s trains every client that still has an s-th batch: one `method.cohort_backward` over their states (the
    text tower run once on all their prompts; `method.backward` under `bound` when one client is left or K = 1),
    each client's gradient hooks on its own leaves, then one optimiser step over all clients' leaves. A client whose
    batches are done (a smaller shard, a straggler's budget) gets no gradient, so the optimiser skips its leaves:
    neither its parameters nor its optimiser state (moments, weight decay, step count) move. Each client draws its
    batch order from its own generator and its other random numbers (augmentation, DP noise) from its own stream,
    so every client sees exactly the batches and draws of a run that trains it alone.

    With `cached`, batches index the precomputed encodings instead of re-running the frozen image tower; the batch
    order is drawn from the same generator either way, so both paths see identical batches. With `AugmentedViews`,
    each step also draws one precomputed augmented view per image.
    """
    device, precision = method.device, method.precision
    if len(members) > 1 and (refusal := stacking_refusal(method)):
        raise ValueError(f"train_cohort: {len(members)} clients but {refusal}")
    params = [p for m in members for p in m.state.parameters().values()]
    optimizer = make_optimizer(params, cfg)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    streams = [_batches(method, m, cfg) for m in members]
    # Losses are summed on the device in float64 (exactly what a Python float sum of float(loss) gives) so that a
    # step never waits for the GPU just to report it.
    totals = [torch.zeros((), dtype=torch.float64, device=device) for _ in members]
    seen, steps = [0] * len(members), [0] * len(members)
    method.train()
    try:
        active = list(range(len(members)))
        while batches := _next_batches(members, streams, active, device):
            active = list(batches)
            optimizer.zero_grad(set_to_none=True)  # a finished client keeps grad None: the optimiser skips it
            losses = _step(method, optimizer, scaler, [members[k] for k in active], [batches[k] for k in active])
            for k, loss in zip(active, losses):
                n = len(batches[k][1])
                totals[k] += loss.double() * n
                seen[k] += n
                steps[k] += 1
    finally:
        method.loss_scale = None
    method.eval()
    return [LocalResult(num_examples=len(m.images), steps=s, loss=float(t) / max(n, 1))
            for m, s, t, n in zip(members, steps, totals, seen)]


def _next_batches(members: Sequence[CohortMember], streams: Sequence[Iterator[tuple[Encoded, torch.Tensor]]],
                  active: Sequence[int], device: torch.device) -> dict[int, tuple[Encoded, torch.Tensor]]:
    """The next batch of every active client that has one (drawn on the client's own random stream)."""
    batches = {}
    for k in active:
        with random_stream(members[k].state, device):
            batch = next(streams[k], None)
        if batch is not None:
            batches[k] = batch
    return batches


def _step(method: PromptMethod, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
          members: Sequence[CohortMember], batches: Sequence[tuple[Encoded, torch.Tensor]]) -> list[torch.Tensor]:
    """One optimiser step of the given clients: their gradients, each client's hooks on its own leaves, the step."""
    device = method.device
    with autocast(device, method.precision):
        if scaler is not None:  # fp16: PromptMethod.backward multiplies the loss by the current scale
            method.loss_scale = scaler.scale(torch.ones((), device=device))
        losses = _gradients(method, members, batches)
    if scaler is not None:
        scaler.unscale_(optimizer)  # gradient hooks and the optimizer see true gradients
    for member in members:
        params = member.state.parameters()
        with owned_by(member.state):
            for hook in member.gradient_hooks:
                hook(params)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    return losses


def _batches(method: PromptMethod, member: CohortMember, cfg: Mapping[str, Any]
             ) -> Iterator[tuple[Encoded, torch.Tensor]]:
    """A client's training batches, in the order (and with the draws) of its own local epochs."""
    device, images, cached, generator = method.device, member.images, member.cached, member.generator
    labels = torch.as_tensor(images.labels)
    batch_size, steps = int(cfg["batch_size"]), 0
    for _ in range(int(cfg.get("epochs", 1))):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            if member.max_steps is not None and steps >= member.max_steps:
                break
            idx = order[start:start + batch_size]
            with autocast(device, method.precision):
                if isinstance(cached, AugmentedViews):
                    encoded = cached.draw(idx, generator)
                elif cached is not None:
                    encoded = _index(cached, idx)
                else:
                    encoded = method.encode(images.load(idx.numpy(), True).to(device, non_blocking=True))
            yield encoded, labels[idx].to(device, non_blocking=True)
            steps += 1


def _gradients(method: PromptMethod, members: Sequence[CohortMember],
               batches: Sequence[tuple[Encoded, torch.Tensor]]) -> list[torch.Tensor]:
    if len(members) == 1:  # the method's own backward, as the client
        with bound(method, members[0].state):
            return [method.backward(*batches[0])]
    return method.cohort_backward([m.state for m in members], [b[0] for b in batches], [b[1] for b in batches])


def step_activation_bytes(method: PromptMethod, member: CohortMember, cfg: Mapping[str, Any]) -> int:
    """Bytes autograd keeps for the backward pass of one training step of `member` on its first full batch: what
    each client adds to a cohort step (the text tower's activations of its prompts). Counted by saved-tensor hooks,
    once per storage; the frozen backbone's and the method's own tensors are not counted (they exist once, whatever
    K). Runs on a copy of the member's state and draws from no random stream the run uses."""
    backbone = method.backbone
    resident = {t.untyped_storage().data_ptr() for module in (backbone, method) if isinstance(module, torch.nn.Module)
                for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    device, images, cached = method.device, member.images, member.cached
    idx = torch.arange(min(int(cfg["batch_size"]), len(images)))
    state = ClientState(member.state.tensors, member.state.trainable)  # bound without swapping random streams
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), autocast(device, method.precision):
        if isinstance(cached, AugmentedViews):
            encoded = _index(cached.encoded, torch.zeros_like(idx), idx)
        elif cached is not None:
            encoded = _index(cached, idx)
        else:
            with torch.no_grad():
                encoded = method.encode(images.load(idx.numpy(), False).to(device))
        labels = torch.as_tensor(images.labels)[idx].to(device)
        method.train()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), bound(method, state):
                method.backward(encoded, labels)
        finally:
            method.eval()
    return sum(saved.values())


def stacking_refusal(method: PromptMethod) -> str | None:
    """Why `method` cannot train several clients in one step (None: it can)."""
    if not getattr(method, "stacks", False):
        name = getattr(type(method), "name", type(method).__name__)
        return f"algorithm {name} does not say how its state stacks (PromptMethod.stacks)"
    if method.precision == "fp16":
        return "precision=fp16: loss scaling is per client"
    if any(n.startswith(ROUTERS_PREFIX) for n, p in method.named_parameters() if p.requires_grad):
        return "backbone.attention.train_routers: every client trains its own routers, so its text tower differs"
    return None


def mean_gradient(method: PromptMethod, images: ImageSet, batch_size: int, cached: Encoded | None = None
                  ) -> dict[str, torch.Tensor]:
    """Gradient of the mean training loss over all of `images` at the current parameters (SCAFFOLD's option I
    control variate), by name, on the CPU (it is client state); `.grad` is left cleared. Un-augmented images, so
    augmented views (`AugmentedViews`) are not used."""
    if isinstance(cached, AugmentedViews):
        cached = None
    params = {n: p for n, p in method.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    device = method.device
    labels = torch.as_tensor(images.labels)
    method.train()
    for start in range(0, len(images), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(images)))
        with autocast(device, method.precision):
            encoded = _index(cached, idx) if cached is not None else \
                method.encode(images.load(idx.numpy(), False).to(device))
            method.zero_grad(set_to_none=True)
            method.backward(encoded, labels[idx].to(device))
        for n, p in params.items():
            if p.grad is not None:
                total[n] += p.grad * (len(idx) / len(images))
    method.zero_grad(set_to_none=True)
    method.eval()
    return {n: t.cpu() for n, t in total.items()}


@torch.no_grad()
def predict(method: PromptMethod, images: ImageSet | None, batch_size: int, cached: Encoded | None = None
            ) -> np.ndarray:
    """Predicted class per image (argmax of logits over the method's current class names), as a CPU array."""
    method.eval()
    device = method.device
    with autocast(device, method.precision), text_features_memo():
        if cached is not None:
            n = num_encoded(cached)
            chunks = [method.logits(_index(cached, torch.arange(s, min(s + batch_size, n)))).argmax(-1)
                      for s in range(0, n, batch_size)]
        else:
            chunks = [method(x.to(device, non_blocking=True)).argmax(-1) for x, _ in iterate_batches(images, batch_size)]
    return torch.cat(chunks).cpu().numpy() if chunks else np.zeros(0, np.int64)


def evaluate_accuracy(method: PromptMethod, images: ImageSet, labels: np.ndarray, batch_size: int,
                      cached: Encoded | None = None) -> float:
    return accuracy(predict(method, images, batch_size, cached), labels)
