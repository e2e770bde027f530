"""Building blocks shared by the CoOp family: a text prompt with learnable context slots, and hand-crafted features."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.errors import ConfigError
from flbench.io import switched_on

CLASS_POSITIONS = ("end", "middle", "front")


@torch.no_grad()
def handcrafted_text_features(backbone: FrozenCLIP, classnames: Sequence[str], templates: Sequence[str],
                              normalise_each: bool = True) -> torch.Tensor:
    """Zero-shot class features [C, D]: per-template normalised features averaged, then renormalised (CLIP's
    prompt ensembling; one template gives exactly that template's features). With `normalise_each=False` the raw
    per-template features are averaged before the one normalisation (PromptSRC's teacher).

    Computed once per backbone, class-name list and template list, then shared (read-only) by every method
    instance and every `set_classnames` of the process: zero-shot, KgCoOp, ProGrad, FedPGP, FedTPG, VPT and
    PromptSRC targets no longer re-encode on each class switch (base→novel evaluation switches every round). The
    entry is recomputed when the text tower changes (`FrozenCLIP.text_signature`: trained routers, calibration);
    always in fp32, whatever autocast is active, since these are fixed targets.
    """
    cache: dict = backbone.__dict__.setdefault("_handcrafted_text", {})
    key, signature = (tuple(classnames), tuple(templates), normalise_each), backbone.text_signature()
    hit = cache.get(key)
    if hit is not None and hit[0] == signature:
        return hit[1]
    each = normalize if normalise_each else (lambda features: features)
    with torch.autocast(backbone.device.type, enabled=False):
        per_template = [each(backbone.encode_text([t.format(c) for c in classnames])) for t in templates]
        features = normalize(torch.stack(per_template).mean(0))
    cache[key] = (signature, features)
    return features


def init_context(backbone: FrozenCLIP, n_ctx: int, ctx_init: str | None, generator: torch.Generator | None = None,
                 ) -> torch.Tensor:
    """Initial context vectors [n_ctx, width]: the word embeddings of `ctx_init`, or N(0, 0.02) as CoOp does."""
    if ctx_init:
        ids = backbone.tokenizer.encode(ctx_init)
        tokens = backbone.tokenize([ctx_init])
        return backbone.token_embeddings(tokens)[0, 1:1 + len(ids)].detach().clone()
    return torch.randn(n_ctx, backbone.text_width, generator=generator) * 0.02


def context_generator(ctx_init: str | None, init_seed: int) -> torch.Generator:
    """The generator of random initial context vectors (`init_context`). A word initialisation draws nothing, so
    an `init_seed` other than 0 beside one would be silently ignored: it is refused (CoOp, CoCoOp; methods whose
    seed also draws other tensors do not use this)."""
    if ctx_init and init_seed != 0:
        raise ConfigError(f"algorithm.init_seed={init_seed} changes nothing: algorithm.ctx_init={ctx_init!r} "
                          "initialises the context from words; set algorithm.ctx_init=null for random vectors, or "
                          "remove init_seed")
    return torch.Generator().manual_seed(init_seed)


def context_length_of(backbone: FrozenCLIP, ctx_init: str | None, n_ctx: int) -> int:
    """Number of context vectors: the tokens of `ctx_init` when given, else `n_ctx`.

    A word initialisation fixes the context length, so an `n_ctx` that disagrees with it would be silently ignored:
    it is refused instead (set `n_ctx` to the initialisation's token count, or `ctx_init=null` for random vectors).
    """
    if not ctx_init:
        return n_ctx
    tokens = len(backbone.tokenizer.encode(ctx_init))
    if tokens != n_ctx:
        raise ConfigError(f"algorithm.n_ctx={n_ctx} but algorithm.ctx_init={ctx_init!r} is {tokens} tokens, which "
                          f"fixes the context length; set algorithm.n_ctx={tokens}, or algorithm.ctx_init=null to "
                          f"learn {n_ctx} randomly initialised vectors")
    return tokens


# Class text features already encoded in the current `text_features_memo()` block; None outside one.
MEMO_ENV = "FLBENCH_TEXT_MEMO"
_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("flbench_text_memo", default=None)


@contextlib.contextmanager
def text_features_memo() -> Iterator[None]:
    """Within this block, `TextPrompt.encode` without gradients encodes each unchanged context once: an evaluation
    asks for the same class features for every batch and split (6 splits of the default experiment, each in
    batches), and the answer cannot change while the prompt's tensors do not. A context counts as unchanged while
    it is the same memory (data pointer, shape, strides, dtype: a parameter or a view of one, as `ctx.unsqueeze(1)`)
    at the same version (in-place writes bump the version its views share) over the same class-name buffers; the
    memo holds those tensors, so no other tensor can take their memory until the block ends. A context computed
    afresh per call (stacked, generated) is new memory each time: encoded each time, as without the memo. Blocks
    nest (the outer memo serves). `FLBENCH_TEXT_MEMO=0` opens none (old-vs-new benchmarks, debugging)."""
    token = _MEMO.set({}) if switched_on(MEMO_ENV) and _MEMO.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _MEMO.reset(token)


class TextPrompt(nn.Module):
    """Frozen token embeddings of "[SOS] X…X classname. [EOT]" with the X slots replaced by learned context.

    Holds only non-persistent buffers, so it contributes nothing to a method's state dict.
    """

    def __init__(self, backbone: FrozenCLIP, classnames: Sequence[str], n_ctx: int, position: str = "end") -> None:
        super().__init__()
        if position not in CLASS_POSITIONS:
            raise ConfigError(f"algorithm.class_token_position={position!r} is unknown; choose one of {CLASS_POSITIONS}")
        object.__setattr__(self, "backbone", backbone)
        self.n_ctx, self.position = n_ctx, position
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        backbone = self.backbone
        placeholder = " ".join(["X"] * self.n_ctx)
        texts = [f"{placeholder} {name}." if self.n_ctx else f"{name}." for name in classnames]
        too_long = [n for n, t in zip(classnames, texts)
                    if len(backbone.tokenizer.encode(t)) + 2 > backbone.context_length]
        if too_long:
            raise ConfigError(f"class names do not fit the backbone's context length {backbone.context_length} "
                             f"with {self.n_ctx} context tokens (e.g. {too_long[0]!r}); lower algorithm.n_ctx")
        tokens = backbone.tokenize(texts)
        with torch.no_grad():
            embeddings = backbone.token_embeddings(tokens)
        self.register_buffer("prefix", embeddings[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embeddings[:, 1 + self.n_ctx:].clone(), persistent=False)
        self.register_buffer("eot_index", tokens.argmax(dim=-1), persistent=False)
        self.name_lengths = [len(backbone.tokenizer.encode(name)) for name in classnames]
        self.num_classes = len(classnames)

    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings [..., C, L, W] from context [n_ctx, W] (shared), [C, n_ctx, W] (class-specific),
        or [B, 1 or C, n_ctx, W] (instance-conditional, as CoCoOp)."""
        C = self.num_classes
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(C, -1, -1)
        lead = ctx.shape[:-3]
        ctx = ctx.expand(*lead, C, *ctx.shape[-2:])
        prefix = self.prefix.expand(*lead, *self.prefix.shape)
        suffix = self.suffix.expand(*lead, *self.suffix.shape)
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=-2)
        rows = []
        for i, name_len in enumerate(self.name_lengths):
            name, rest = suffix[..., i, :name_len, :], suffix[..., i, name_len:, :]
            c = ctx[..., i, :, :]
            if self.position == "front":
                parts = [prefix[..., i, :, :], name, c, rest]
            else:  # middle: half the context, the class name, the other half
                half = self.n_ctx // 2
                parts = [prefix[..., i, :, :], c[..., :half, :], name, c[..., half:, :], rest]
            rows.append(torch.cat(parts, dim=-2))
        return torch.stack(rows, dim=-3)

    def eot(self) -> torch.Tensor:
        """End-of-text index per class (the context slots come before it in every position)."""
        return self.eot_index

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """Class text features [..., C, D] for the given context (from the memo when one is open: see
        `text_features_memo`)."""
        memo = _MEMO.get()
        if memo is None or torch.is_grad_enabled():
            return self._encode(ctx)
        key = (id(self), ctx.data_ptr(), ctx.shape, ctx.stride(), ctx.dtype, ctx.device, ctx._version,
               id(self.suffix), torch.is_autocast_enabled(ctx.device.type))
        if key not in memo:
            memo[key] = (ctx, self, self.suffix, self._encode(ctx))  # the tensors whose memory and ids the key holds
        return memo[key][3]

    def _encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """A context shared by all classes ([n_ctx, W], or [..., 1, n_ctx, W]) before the class name makes
        "[SOS] context" a prefix common to the C rows: the backbone computes it once per context."""
        if self.position == "end" and (ctx.dim() == 2 or ctx.shape[-3] == 1):
            lead = ctx.shape[:-3] if ctx.dim() > 2 else ()
            ctx = ctx.reshape(-1, *ctx.shape[-2:])
            prefix = torch.cat([self.prefix[:1].expand(ctx.shape[0], -1, -1), ctx], dim=-2)
            features = self.backbone.encode_text_shared_prefix(prefix, self.suffix, self.eot_index)
            return features.reshape(*lead, *features.shape[-2:])
        prompts = self.assemble(ctx)
        lead = prompts.shape[:-2]
        flat = prompts.reshape(-1, *prompts.shape[-2:])
        eot = self.eot_index.repeat(flat.shape[0] // self.num_classes)
        return self.backbone.encode_text_embeddings(flat, eot).reshape(*lead, -1)
