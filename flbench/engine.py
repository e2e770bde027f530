"""The PyTorch half of federated prompt learning, with no Flower in sight: local training and evaluation.

The FL layer calls these; so does the bare-loop benchmark that measures framework overhead.

Devices and precision: a method runs where its backbone lives (`method.device`); batches (images and labels) are
moved there here, cached features stay there, predictions come back as numpy on the CPU. Forward passes run under
`torch.autocast` when `method.precision` is bf16 or fp16 (parameters stay fp32: the master prompts); fp16 adds
dynamic loss scaling (torch.amp.GradScaler), with the scale handed to `PromptMethod.backward` as `loss_scale`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ContextManager

import numpy as np
import torch

from flbench.algorithms.base import Encoded, PromptMethod
from flbench.datasets.base import ImageSet, iterate_batches
from flbench.metrics import accuracy
from flbench.errors import ConfigError

GradientHook = Callable[[PromptMethod], None]  # edits .grad after backward (FedProx, SCAFFOLD)

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


def train_local(method: PromptMethod, images: ImageSet, cfg: Mapping[str, Any], generator: torch.Generator,
                cached: Encoded | AugmentedViews | None = None, gradient_hooks: tuple[GradientHook, ...] = (),
                max_steps: int | None = None) -> LocalResult:
    """`cfg.epochs` local epochs of minibatch training on `images` (or on their cached encodings).

    With `cached`, batches index the precomputed encodings instead of re-running the frozen image tower; the
    batch order is drawn from the same generator either way, so both paths see identical batches. With
    `AugmentedViews`, each step also draws one precomputed augmented view per image.
    """
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    device, precision = method.device, method.precision
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    labels = torch.as_tensor(images.labels)
    method.train()
    # The loss is summed on the device in float64 (exactly what a Python float sum of float(loss) gives) so that a
    # step never waits for the GPU just to report it.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    seen, steps = 0, 0
    try:
        for _ in range(int(cfg.get("epochs", 1))):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), int(cfg["batch_size"])):
                if max_steps is not None and steps >= max_steps:
                    break
                idx = order[start:start + int(cfg["batch_size"])]
                with autocast(device, precision):
                    if isinstance(cached, AugmentedViews):
                        encoded = cached.draw(idx, generator)
                    elif cached is not None:
                        encoded = _index(cached, idx)
                    else:
                        encoded = method.encode(images.load(idx.numpy(), True).to(device, non_blocking=True))
                    y = labels[idx].to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:  # fp16: PromptMethod.backward multiplies the loss by the current scale
                        method.loss_scale = scaler.scale(torch.ones((), device=device))
                    loss = method.backward(encoded, y)
                if scaler is not None:
                    scaler.unscale_(optimizer)  # gradient hooks and the optimizer see true gradients
                for hook in gradient_hooks:
                    hook(method)
                if scaler is not None:
                    scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                    scaler.update()
                else:
                    optimizer.step()
                total_loss += loss.double() * len(y)
                seen += len(y)
                steps += 1
    finally:
        method.loss_scale = None
    method.eval()
    return LocalResult(num_examples=len(images), steps=steps, loss=float(total_loss) / max(seen, 1))


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
    with autocast(device, method.precision):
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
