"""The evaluation memo of class text features (algorithms/prompting.py `text_features_memo`): within one evaluation
an unchanged context is encoded once, and predictions are exactly those of encoding it for every batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flbench.algorithms.base import build_method
from flbench.algorithms.prompting import MEMO_ENV, text_features_memo
from flbench.engine import predict
from helpers import random_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["red circle", "blue square", "green star", "pink moon"]


@pytest.fixture(scope="module")
def backbone():
    return random_tiny("tiny-vit")


def _counted(backbone, monkeypatch):
    """Counts the text-tower calls of shared-prefix prompts (CoOp's and PLOT's path)."""
    calls = [0]
    encode = backbone.encode_text_shared_prefix

    def counting(*args, **kwargs):
        calls[0] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(backbone, "encode_text_shared_prefix", counting)
    return calls


@pytest.mark.parametrize("name", ["coop", "plot"])  # the context itself, and a view of it (PLOT's ctx.unsqueeze(1))
def test_one_encoding_per_evaluation_and_the_same_predictions(backbone, monkeypatch, name):
    torch.manual_seed(0)
    method = build_method(name, backbone, CLASSES, ["a photo of a {}."], {})
    with torch.no_grad():
        encoded = method.encode(torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    calls = _counted(backbone, monkeypatch)
    monkeypatch.setenv(MEMO_ENV, "0")
    every_batch = predict(method, None, 3, encoded)
    assert calls[0] == 4, "without the memo, each of the 4 batches encodes the prompts"
    monkeypatch.setenv(MEMO_ENV, "1")
    calls[0] = 0
    assert np.array_equal(predict(method, None, 3, encoded), every_batch)
    assert calls[0] == 1, "predict encodes the unchanged context once for its 4 batches"


def test_a_changed_context_or_gradients_are_encoded_again(backbone, monkeypatch):
    torch.manual_seed(0)
    method = build_method("coop", backbone, CLASSES, ["a photo of a {}."], {})
    calls = _counted(backbone, monkeypatch)
    with text_features_memo():
        with torch.no_grad():
            first = method.text_features()
            assert torch.equal(method.text_features(), first) and calls[0] == 1
            method.ctx.add_(0.1)  # an in-place write bumps the version: the memo must not answer
            second = method.text_features()
        assert calls[0] == 2 and not torch.equal(second, first)
        with_grad = method.text_features()  # a training step inside the block still builds its graph
        assert calls[0] == 3 and with_grad.requires_grad
        with torch.no_grad():
            method.set_classnames(CLASSES[::-1])  # other class-name buffers
            assert calls[0] == 3 and not torch.equal(method.text_features(), second) and calls[0] == 4
