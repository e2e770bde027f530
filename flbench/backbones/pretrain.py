"""Contrastive pretraining of the tiny CLIP on the synthetic image–caption corpus (a fixed step count, seeded).

A fixed number of steps (not a time budget) and a pinned intra-op thread count keep the cached model identical
from run to run: CPU reductions are split by thread, so the same seed trained with 1 and with 2 threads gave
different weights (zero-shot 70.55 vs 70.51 % on the default experiment). Other CPU types or library builds may
still differ in the last bits; RunRecords store the weights' SHA-1 (`FrozenCLIP.fingerprint`).

Where the time goes, and what is done about it (measured on 2 cores, docs/benchmarks.md): the text tower runs only
the positions up to the batch's last end-of-text token (`backbones/text.py`; captions end near position 10 of 16);
AdamW is PyTorch's fused CPU implementation — the same update, one pass over each tensor instead of a dozen
element-wise ops (the 49,408-token embedding table is 6.3 M of the 7.2 M parameters, and the for-each-op loop cost
~110 ms a step, a third of the step); each distinct caption is tokenised once. All three leave the procedure the
same and change only floating-point rounding, hence `TINY_BUILD_VERSION` 3.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from flbench.backbones.text import encode_tokens
from flbench.datasets.synthetic import CAPTIONS, pretraining_corpus

log = logging.getLogger(__name__)

DEFAULT_PRETRAIN = dict(steps=300, batch_size=256, lr=1e-3, weight_decay=0.1, warmup=30, corpus=16384, seed=0,
                        corpus_seed=7)
# Per-model changes to DEFAULT_PRETRAIN (part of each model's cache key). The ViT learns more slowly than the ResNet:
# at 600 steps its zero-shot 64-way accuracy is 54-67 % on the seen domains (docs/backbones.md).
MODEL_PRETRAIN: dict[str, dict] = {"tiny-vit": dict(steps=600)}
# Intra-op threads while pretraining, whatever the caller's setting (OMP_NUM_THREADS, tests' one-thread fixtures).
PRETRAIN_THREADS = 2


def _optimizer(model: open_clip.CLIP, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over every parameter; fused where PyTorch has the fused kernel for the parameters' device."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel: the same update, unfused
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


class _Tokens:
    """Token ids of captions, each distinct caption tokenised once (the corpus has a few hundred)."""

    def __init__(self, context_length: int) -> None:
        self.tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.rows]
        if new:
            self.rows.update(zip(new, self.tokenizer(new)))
        return torch.stack([self.rows[c] for c in captions])


def sample_captions(meta: list[tuple[str, str]], indices: np.ndarray, rng: np.random.Generator,
                    templates: Mapping[str, Sequence[str]] = CAPTIONS) -> list[str]:
    """A caption for each corpus image in `indices`: one of its domain's templates, drawn by `rng`, with its class."""
    captions = []
    for i in indices:
        classname, domain = meta[i]
        choices = templates[domain]
        captions.append(choices[rng.integers(len(choices))].format(classname))
    return captions


def pretrain_tiny_clip(model: open_clip.CLIP, steps: int, batch_size: int, lr: float, weight_decay: float,
                       warmup: int, corpus: int, seed: int, corpus_seed: int) -> None:
    """Train `model` in place with the CLIP loss; random horizontal flips are the only augmentation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        _pretrain(model, steps, batch_size, lr, weight_decay, warmup, corpus, seed, corpus_seed)
    finally:
        torch.set_num_threads(threads)


def _pretrain(model: open_clip.CLIP, steps: int, batch_size: int, lr: float, weight_decay: float,
              warmup: int, corpus: int, seed: int, corpus_seed: int) -> None:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    size = int(model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0])
    images, meta = pretraining_corpus(corpus, suite_seed=corpus_seed, image_size=size)
    tokens = _Tokens(model.context_length)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    optimizer = _optimizer(model, lr, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    loss_fn = ClipLoss()
    model.train()
    progress = tqdm(range(steps), desc="pretraining tiny CLIP", unit="step", mininterval=2.0)
    for _ in progress:
        idx = rng.choice(len(images), size=batch_size, replace=False)
        batch = images[torch.as_tensor(idx)].float().div_(255.0)
        flip = torch.as_tensor(rng.random(batch_size) < 0.5)
        batch[flip] = batch[flip].flip(-1)
        text = tokens(sample_captions(meta, idx, rng))
        image_features = F.normalize(model.encode_image((batch - mean) / std), dim=-1)
        text_features = F.normalize(encode_tokens(model, text), dim=-1)  # open_clip's forward, text trimmed
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
