"""Every method's training step gives the same gradients bit for bit when it is repeated on two threads.

A resumed run repeats the uninterrupted one only if each step does. The step is taken at a batch large enough for
PyTorch's CPU kernels to split work across threads (ProDA's surrogate once picked label rows by indexing, whose
backward accumulated with racing atomic adds from 32,768 elements on: its gradients differed run to run), with
repeated labels, on the methods' default hyper-parameters.
"""

from __future__ import annotations

import pytest
import torch

from flbench.algorithms.base import METHODS, build_method, method_class
from flbench.methods_doc import algorithm_defaults
from helpers import random_tiny

CLASSES = ["red circle", "blue square", "green star", "pink moon", "cyan ring", "white heart", "black cross",
           "orange kite"]
BATCH = 128


@pytest.fixture(scope="module")
def backbones():
    return {"tiny": random_tiny("tiny"), "tiny-vit": random_tiny("tiny-vit")}


def step_gradients(name: str, backbone) -> dict[str, torch.Tensor]:
    hparams = {k: v for k, v in algorithm_defaults(name).items() if k != "name"}
    torch.manual_seed(0)
    method = build_method(name, backbone, CLASSES, ["a photo of a {}."], hparams)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(BATCH, 3, backbone.image_size, backbone.image_size, generator=g)
    labels = torch.randint(0, len(CLASSES), (BATCH,), generator=g)
    method.train()
    method.backward(method.encode(images), labels)
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("name", [n for n in METHODS.names() if n != "zeroshot"])
def test_a_training_step_repeats_bit_for_bit(backbones, name):
    backbone = backbones["tiny-vit" if method_class(name).needs_vit else "tiny"]
    first = step_gradients(name, backbone)
    assert first, f"{name}: the step gave no gradient"
    again = step_gradients(name, backbone)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[n], again[n]) for n in first), name
