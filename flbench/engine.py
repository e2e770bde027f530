"""The PyTorch half of federated prompt learning, with no Flower in sight: local training and evaluation.

The FL layer calls these; so does the bare-loop benchmark that measures framework overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flbench.algorithms.base import Encoded, PromptMethod
from flbench.datasets.base import ImageSet, iterate_batches
from flbench.metrics import accuracy
from flbench.errors import ConfigError

GradientHook = Callable[[PromptMethod], None]  # edits .grad after backward (FedProx, SCAFFOLD)


@dataclass
class LocalResult:
    num_examples: int
    steps: int
    loss: float


def _index(encoded: Encoded, idx: torch.Tensor) -> Encoded:
    return tuple(e[idx] for e in encoded) if isinstance(encoded, tuple) else encoded[idx]


def _concat(parts: list[Encoded]) -> Encoded:
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


@torch.no_grad()
def encode_all(method: PromptMethod, images: ImageSet, batch_size: int) -> Encoded:
    """The frozen image side of a whole set, computed once (valid only when `method.frozen_image_side`)."""
    return _concat([method.encode(x) for x, _ in iterate_batches(images, batch_size)])


def make_optimizer(params: list[torch.nn.Parameter], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    name = cfg.get("optimizer", "sgd")
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg.get("momentum", 0.9),
                               weight_decay=cfg.get("weight_decay", 0.0))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    raise ConfigError(f"train.optimizer={name!r} is unknown; choose sgd or adamw")


def train_local(method: PromptMethod, images: ImageSet, cfg: Mapping[str, Any], generator: torch.Generator,
                cached: Encoded | None = None, gradient_hooks: tuple[GradientHook, ...] = (),
                max_steps: int | None = None) -> LocalResult:
    """`cfg.epochs` local epochs of minibatch training on `images` (or on their cached encodings).

    With `cached`, batches index the precomputed encodings instead of re-running the frozen image tower; the
    batch order is drawn from the same generator either way, so both paths see identical batches.
    """
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    labels = torch.as_tensor(images.labels)
    method.train()
    total_loss, seen, steps = 0.0, 0, 0
    for _ in range(int(cfg.get("epochs", 1))):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), int(cfg["batch_size"])):
            if max_steps is not None and steps >= max_steps:
                break
            idx = order[start:start + int(cfg["batch_size"])]
            encoded = _index(cached, idx) if cached is not None else method.encode(images.load(idx.numpy(), True))
            y = labels[idx]
            optimizer.zero_grad(set_to_none=True)
            loss = method.backward(encoded, y)
            for hook in gradient_hooks:
                hook(method)
            optimizer.step()
            total_loss += float(loss) * len(y)
            seen += len(y)
            steps += 1
    method.eval()
    return LocalResult(num_examples=len(images), steps=steps, loss=total_loss / max(seen, 1))


def mean_gradient(method: PromptMethod, images: ImageSet, batch_size: int, cached: Encoded | None = None
                  ) -> dict[str, torch.Tensor]:
    """Gradient of the mean training loss over all of `images` at the current parameters (SCAFFOLD's option I
    control variate), by name; `.grad` is left cleared."""
    params = {n: p for n, p in method.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    labels = torch.as_tensor(images.labels)
    method.train()
    for start in range(0, len(images), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(images)))
        encoded = _index(cached, idx) if cached is not None else method.encode(images.load(idx.numpy(), False))
        method.zero_grad(set_to_none=True)
        method.backward(encoded, labels[idx])
        for n, p in params.items():
            if p.grad is not None:
                total[n] += p.grad * (len(idx) / len(images))
    method.zero_grad(set_to_none=True)
    method.eval()
    return total


@torch.no_grad()
def predict(method: PromptMethod, images: ImageSet | None, batch_size: int, cached: Encoded | None = None
            ) -> np.ndarray:
    """Predicted class per image (argmax of logits over the method's current class names)."""
    method.eval()
    if cached is not None:
        n = len(cached[0]) if isinstance(cached, tuple) else len(cached)
        chunks = [method.logits(_index(cached, torch.arange(s, min(s + batch_size, n)))).argmax(-1)
                  for s in range(0, n, batch_size)]
    else:
        chunks = [method(x).argmax(-1) for x, _ in iterate_batches(images, batch_size)]
    return torch.cat(chunks).numpy() if chunks else np.zeros(0, np.int64)


def evaluate_accuracy(method: PromptMethod, images: ImageSet, labels: np.ndarray, batch_size: int,
                      cached: Encoded | None = None) -> float:
    return accuracy(predict(method, images, batch_size, cached), labels)
