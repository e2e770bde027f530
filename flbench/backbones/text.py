"""Exact text-length trimming: a text-tower pass computes only the positions that can reach an end-of-text token.

open_clip's text tower is causal: position i attends to positions 0..i only, and a text feature is read at the
row's end-of-text (EOT) token. So no position after the last EOT of a batch can change any feature, and running the
first `max(eot_index) + 1` positions — with the positional embedding and the causal mask sliced to the same length —
gives the same features and the same gradients, up to floating-point rounding (a reduction over fewer terms, a matrix
product of another shape; measured in tests/test_trimming.py). A CoOp prompt with a short class name ends near
position 10 of CLIP's 77, so most of the text work was spent on padding nobody reads.

A text tower without open_clip's causal mask (a custom config with `no_causal_mask`, or any other mask) lets every
position see every other, padding included: it is never trimmed (`is_causal_text_tower`).

Trimming is on by default. `text_trimming(False)` (a context manager) or the environment variable
`FLBENCH_TRIM_TEXT=0` turn it off, for the exactness tests, the old-vs-new benchmarks and debugging; neither is a
config key, so records and their hashes do not depend on it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from flbench.backbones.attention import is_causal_mask, sequence_lengths

TRIM_ENV = "FLBENCH_TRIM_TEXT"
_override: list[bool] = []  # innermost text_trimming(...) last; empty = the environment decides


@contextlib.contextmanager
def text_trimming(enabled: bool) -> Iterator[None]:
    """Within this block, text-tower passes trim (True) or run every context position (False)."""
    _override.append(bool(enabled))
    try:
        yield
    finally:
        _override.pop()


def trimming_enabled() -> bool:
    if _override:
        return _override[-1]
    return os.environ.get(TRIM_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def is_causal_text_tower(model: nn.Module) -> bool:
    """True when the text tower masks every position's future (open_clip's causal mask): only then is trimming exact.

    Checked once per mask tensor (the mask is a fixed buffer; a swapped one has another identity)."""
    mask = getattr(model, "attn_mask", None)
    if mask is None:
        return False
    cached = model.__dict__.get("_flbench_causal")
    key = (mask.data_ptr(), tuple(mask.shape), mask.dtype, mask._version)
    if cached is None or cached[0] != key:
        cached = (key, is_causal_mask(mask, int(model.positional_embedding.shape[0])))
        model.__dict__["_flbench_causal"] = cached
    return cached[1]


def text_length(model: nn.Module, eot_index: torch.Tensor, minimum: int = 0) -> int:
    """Positions a pass over rows ending at `eot_index` must compute: the last EOT + 1 (at least `minimum`, e.g. where
    deep prompts are inserted), or the full context when trimming is off or the tower is not causal."""
    full = int(model.positional_embedding.shape[0])
    if eot_index.numel() == 0 or not trimming_enabled() or not is_causal_text_tower(model):
        return full
    return min(full, max(int(eot_index.max()) + 1, int(minimum)))


def text_inputs(model: nn.Module, embeddings: torch.Tensor, eot_index: torch.Tensor, minimum: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(first transformer input [N, L', W] with positions added, attention mask [L', L'] or None), L' trimmed."""
    length = text_length(model, eot_index, minimum)
    x = embeddings[:, :length] + model.positional_embedding[:length].to(embeddings.dtype)
    mask = model.attn_mask
    if mask is not None and length < mask.shape[0]:
        mask = mask[:length, :length]
    return x, mask


def project_eot(model: nn.Module, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
    """ln_final, EOT pooling and the text projection (open_clip's tail of `encode_text`)."""
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot_index]
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def encode_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `CLIP.encode_text(tokens)` (unnormalised), trimmed to the batch's last EOT (tiny-CLIP pretraining).

    Only argmax pooling (open_clip's default: the EOT token has the largest id) reads a position that trimming keeps;
    another pooling type ('last', 'first', 'eos' with its own id) goes through open_clip's own `encode_text`."""
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        return model.encode_text(tokens)
    eot_index = tokens.argmax(dim=-1)
    tokens = tokens[:, :text_length(model, eot_index)]
    cast = model.transformer.get_cast_dtype()
    x, mask = text_inputs(model, model.token_embedding(tokens).to(cast), eot_index)
    with sequence_lengths(eot_index + 1):
        x = model.transformer(x, attn_mask=mask)
    return project_eot(model, x, eot_index)
