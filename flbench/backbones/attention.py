"""Swap the attention of every transformer block of a loaded open_clip model, in place, reusing its weights.

    dense      unchanged (open_clip's nn.MultiheadAttention)
    gqa        grouped-query attention made from a multi-head checkpoint by mean-pooling K/V heads in groups of g
               (Ainslie et al. 2023) — the baseline of the mixSGA paper
    routed_kv  mixSGA (arXiv 2506.13541): each token's K/V stored at a granularity chosen by a router
               (flbench/backbones/routed_kv.py)

open_clip's ResidualAttentionBlock calls ``self.attn(q, k, v, need_weights=False, attn_mask=mask)`` on an
``nn.MultiheadAttention``; the replacements keep that call signature and hold the *same* Parameter objects
(``in_proj_weight``, ``in_proj_bias``, ``out_proj``) under the same names, so state-dict keys of the pretrained
weights do not change, and the only new parameters are the routers. ResNet image towers (open_clip's
ModifiedResNet) are left dense: their single attention-pool layer is not a transformer block.

The text tower is causal (open_clip passes its causal ``attn_mask``); the image tower is bidirectional. Routed-KV
needs to know where each text row ends (padding after the end-of-text token must not take expert capacity): the
backbone announces it with ``sequence_lengths(...)`` around the text transformer (see FrozenCLIP).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flbench.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("dense", "gqa", "routed_kv")
TOWERS = ("text", "vision")

# Valid (non-padding) length of each row of the text batch now being encoded; None = every position is a token.
_TEXT_LENGTHS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("flbench_text_lengths",
                                                                                     default=None)


@contextlib.contextmanager
def sequence_lengths(lengths: torch.Tensor | None) -> Iterator[None]:
    """Within this block, text-tower attention treats positions >= lengths[row] of each row as padding."""
    token = _TEXT_LENGTHS.set(lengths)
    try:
        yield
    finally:
        _TEXT_LENGTHS.reset(token)


def current_text_lengths() -> torch.Tensor | None:
    return _TEXT_LENGTHS.get()


def is_causal_mask(mask: torch.Tensor, length: int) -> bool:
    """True for open_clip's causal mask: [L, L], -inf (or True for bool masks) strictly above the diagonal only."""
    if mask.dim() != 2 or tuple(mask.shape) != (length, length):
        return False
    upper = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    blocked = mask if mask.dtype == torch.bool else torch.isneginf(mask) | (mask < -1e4)
    if not torch.equal(blocked, upper):
        return False
    return mask.dtype == torch.bool or bool((mask[~upper] == 0).all())


def pooled_projection(weight: torch.Tensor, bias: torch.Tensor | None, heads: int, group: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights of the K (or V) projection whose head j is the mean of original heads j*g .. j*g+g-1.

    The mean of the heads' outputs equals the output of the mean of their weights (the projection is linear), so
    pooling the weights lets a token's compact K/V be computed directly, at 1/g of the projection cost.
    """
    width = weight.shape[1]
    head_dim = weight.shape[0] // heads
    pooled_w = weight.reshape(heads // group, group, head_dim, width).mean(1).reshape(-1, width)
    pooled_b = None if bias is None else bias.reshape(heads // group, group, head_dim).mean(1).reshape(-1)
    return pooled_w, pooled_b


class SharedWeightAttention(nn.Module):
    """Base for attention variants built from an ``nn.MultiheadAttention``: same parameters, same call signature."""

    def __init__(self, mha: nn.MultiheadAttention, tower: str) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ConfigError("backbone.attention: only packed-QKV attention (open_clip's default blocks) can be "
                              "swapped; use backbone.attention.kind=dense for this model")
        if tower not in TOWERS:
            raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.tower = tower
        # The very Parameter objects of the pretrained block: no copy, same state-dict names.
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.use_dense = False  # teacher mode for router calibration: exactly the original attention
        object.__setattr__(self, "original", mha)  # not a submodule: its parameters are already ours

    # --- pieces shared by every variant -------------------------------------------------------------------
    def _split_weights(self) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
        w, b = self.in_proj_weight, self.in_proj_bias
        ws = w.chunk(3)
        bs = b.chunk(3) if b is not None else (None, None, None)
        return tuple(zip(ws, bs))

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, L, heads*d] -> [B, heads, L, d]."""
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def dense_attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """The original multi-head attention (batch-first x), for teacher mode and as a reference."""
        (wq, bq), (wk, bk), (wv, bv) = self._split_weights()
        q = self._heads(F.linear(x, wq, bq), self.num_heads)
        k = self._heads(F.linear(x, wk, bk), self.num_heads)
        v = self._heads(F.linear(x, wv, bv), self.num_heads)
        mask = _sdpa_mask(attn_mask, x.dtype)
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, **_: Any) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError(f"{type(self).__name__} supports self-attention only (key is query)")
        if key_padding_mask is not None:
            raise NotImplementedError(f"{type(self).__name__} does not take key_padding_mask")
        x = query if self.batch_first else query.transpose(0, 1)
        out = self.dense_attention(x, attn_mask) if self.use_dense else self.attend(x, attn_mask)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def kv_heads_per_token(self) -> float:
        """Average number of K (= V) heads stored per token (the nominal budget)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, tower={self.tower}"


def _sdpa_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """open_clip's float masks add to the scores; bool masks there mean "blocked" (SDPA's bool means "allowed")."""
    if attn_mask is None:
        return None
    return ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype)


class GroupedKVAttention(SharedWeightAttention):
    """GQA from a multi-head checkpoint: K/V heads mean-pooled in groups of ``group_size`` (Ainslie et al. 2023)."""

    def __init__(self, mha: nn.MultiheadAttention, tower: str, group_size: int) -> None:
        super().__init__(mha, tower)
        if group_size < 1 or self.num_heads % group_size:
            raise ConfigError(f"backbone.attention.group_size={group_size} must divide the {tower} tower's "
                              f"{self.num_heads} heads")
        self.group_size = group_size

    def attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        (wq, bq), (wk, bk), (wv, bv) = self._split_weights()
        kv_heads = self.num_heads // self.group_size
        q = self._heads(F.linear(x, wq, bq), self.num_heads)
        k = self._heads(F.linear(x, *pooled_projection(wk, bk, self.num_heads, self.group_size)), kv_heads)
        v = self._heads(F.linear(x, *pooled_projection(wv, bv, self.num_heads, self.group_size)), kv_heads)
        # Query head h reads K/V head h // g: repeat each compact head g times.
        k = k.repeat_interleave(self.group_size, dim=1)
        v = v.repeat_interleave(self.group_size, dim=1)
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(attn_mask, x.dtype)))

    def kv_heads_per_token(self) -> float:
        return self.num_heads / self.group_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


# ----------------------------------------------------------------------------------------------------------------
# Swapping
# ----------------------------------------------------------------------------------------------------------------
def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(tower, block) for every block of an open_clip CLIP whose attention can be swapped; ResNet towers give none."""
    blocks: list[tuple[str, nn.Module]] = []
    visual_transformer = getattr(getattr(model, "visual", None), "transformer", None)
    if visual_transformer is not None:
        blocks += [("vision", b) for b in visual_transformer.resblocks]
    text_transformer = getattr(model, "transformer", None)
    if text_transformer is None and hasattr(model, "text"):  # CustomTextCLIP keeps its text tower in .text
        text_transformer = getattr(model.text, "transformer", None)
    if text_transformer is not None:
        blocks += [("text", b) for b in text_transformer.resblocks]
    return blocks


DEFAULTS: dict[str, Any] = dict(kind="dense", towers=list(TOWERS), group_size=2, group_sizes=[1, 2, 4],
                                ratios=[3, 1, 6], pin_cls=True, aux_weight=0.01, backend="auto",
                                routers="init", train_routers=False)


def attention_settings(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """`backbone.attention` with defaults filled in and checked (ConfigError names the key)."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS) - {"calibration"}
    if unknown:
        raise ConfigError(f"backbone.attention has unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **cfg}
    if settings["kind"] not in KINDS:
        raise ConfigError(f"backbone.attention.kind={settings['kind']!r} is unknown; choose one of {list(KINDS)}")
    towers = list(settings["towers"])
    if not towers or any(t not in TOWERS for t in towers):
        raise ConfigError(f"backbone.attention.towers={towers} must be a non-empty subset of {list(TOWERS)}")
    settings["towers"] = towers
    if settings["kind"] == "routed_kv":
        from flbench.backbones.routed_kv import check_routing

        check_routing(settings["group_sizes"], settings["ratios"])
        if settings["routers"] not in ("init", "calibrated"):
            raise ConfigError(f"backbone.attention.routers={settings['routers']!r} must be init (fresh He-initialised "
                              "routers) or calibrated (python -m flbench.calibrate)")
    return settings


def swap_attention(model: nn.Module, cfg: Mapping[str, Any] | None) -> nn.Module:
    """Replace the attention of every transformer block of `model` (in the towers asked for), in place."""
    settings = attention_settings(cfg)
    kind = settings["kind"]
    if kind == "dense":
        return model
    swapped = 0
    for tower, block in transformer_blocks(model):
        if tower not in settings["towers"]:
            continue
        mha = block.attn
        if not isinstance(mha, nn.MultiheadAttention):
            raise ConfigError(f"backbone.attention.kind={kind}: a {tower} block's attention is already "
                              f"{type(mha).__name__}; swap a freshly loaded model")
        if kind == "gqa":
            block.attn = GroupedKVAttention(mha, tower, int(settings["group_size"]))
        else:
            from flbench.backbones.routed_kv import RoutedKVAttention

            block.attn = RoutedKVAttention(mha, tower, group_sizes=settings["group_sizes"], ratios=settings["ratios"],
                                           pin_cls=bool(settings["pin_cls"]) and tower == "vision",
                                           aux_weight=float(settings["aux_weight"]), backend=settings["backend"])
        swapped += 1
    if swapped == 0:
        log.warning("backbone.attention.kind=%s: no transformer block in towers %s (ResNet towers stay dense)", kind,
                    settings["towers"])
    if kind == "routed_kv":
        seed_routers(model)
    return model


def apply_attention(backbone: nn.Module, backbone_cfg: Mapping[str, Any]) -> nn.Module:
    """Swap `backbone.attention` into a loaded FrozenCLIP; load (or compute once) calibrated routers if asked.

    Routers come out frozen like the rest of the backbone; `train_routers` (FL) unfreezes them where the method is
    built (see `attach_routers`).
    """
    settings = attention_settings(backbone_cfg.get("attention"))
    swap_attention(backbone.model, settings)
    if settings["kind"] == "routed_kv" and settings["routers"] == "calibrated":
        from flbench.calibrate import calibrated_routers  # heavy path (data, training) only when asked

        state = calibrated_routers(backbone, backbone_cfg)
        missing = set(router_parameters(backbone.model)) ^ set(state)
        if missing:
            raise RuntimeError(f"calibrated router state does not match the model: {sorted(missing)[:3]}")
        backbone.model.load_state_dict(state, strict=False)
    for p in router_parameters(backbone.model).values():
        p.requires_grad_(False)
    backbone.attention = settings
    return backbone


class RouterBank(nn.Module):
    """The backbone's routers as a submodule of a prompt method (the same Parameter objects, not copies)."""

    def __init__(self, routers: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({name.replace(".", "_"): router for name, router in routers.items()})


def attach_routers(method: nn.Module, backbone: nn.Module) -> nn.Module:
    """`backbone.attention.train_routers`: make the routers part of `method`'s trainable (hence shared) state.

    Registered under `method.backbone_routers`, they join everything the FL layer already does with a method's
    parameters — local optimisation, `shared_state()` (FedAvg'd with the prompt unless the method's own
    `shared_keys` keeps them local), the reset in `Experiment.fresh()`, communication costs — with no change to the
    method's code. A method whose image side is frozen (`frozen_image_side`) encodes images without gradients, so
    only its text-tower routers can learn and only those are attached (its cached image features stay valid).
    """
    settings = getattr(backbone, "attention", None) or {}
    if settings.get("kind") != "routed_kv" or not settings.get("train_routers"):
        return method
    towers = {"text"} if getattr(method, "frozen_image_side", True) else set(TOWERS)
    routers = {name: module.router for name, module in backbone.model.named_modules()
               if isinstance(module, SharedWeightAttention) and hasattr(module, "router") and module.tower in towers}
    if not routers:
        log.warning("backbone.attention.train_routers: no routers in towers %s to train", sorted(towers))
        return method
    for router in routers.values():
        router.requires_grad_(True)
    method.add_module("backbone_routers", RouterBank(routers))
    log.info("training and sharing %d routers (%s towers) with the prompt", len(routers), "/".join(sorted(towers)))
    return method


def restore_attention(model: nn.Module) -> nn.Module:
    """Undo `swap_attention`: put every block's original nn.MultiheadAttention back (routers are dropped)."""
    for _, block in transformer_blocks(model):
        if isinstance(block.attn, SharedWeightAttention):
            block.attn = block.attn.original
    return model


def swapped_modules(model: nn.Module) -> list[SharedWeightAttention]:
    return [m for m in model.modules() if isinstance(m, SharedWeightAttention)]


def seed_routers(model: nn.Module, seed: int = 0) -> None:
    """Re-initialise every router from one seed, layer by layer: the same model always gets the same routers."""
    generator = torch.Generator().manual_seed(seed)
    for module in swapped_modules(model):
        router = getattr(module, "router", None)
        if router is not None:
            router.reset_parameters(generator)


@contextlib.contextmanager
def dense_attention(model: nn.Module) -> Iterator[None]:
    """Within this block every swapped layer computes the original dense attention (the calibration teacher)."""
    modules = swapped_modules(model)
    previous = [m.use_dense for m in modules]
    for m in modules:
        m.use_dense = True
    try:
        yield
    finally:
        for m, p in zip(modules, previous):
            m.use_dense = p


def router_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every router parameter of `model`, by its state-dict name (empty unless routed_kv is swapped in)."""
    return {name: p for name, p in model.named_parameters() if ".router." in f".{name}"}


# ----------------------------------------------------------------------------------------------------------------
# Cost accounting
# ----------------------------------------------------------------------------------------------------------------
def _tower_lengths(model: nn.Module) -> dict[str, int]:
    lengths = {}
    visual = getattr(model, "visual", None)
    if getattr(visual, "transformer", None) is not None:
        lengths["vision"] = int(visual.positional_embedding.shape[0])
    if getattr(model, "transformer", None) is not None:
        lengths["text"] = int(model.context_length)
    return lengths


def attention_costs(model: nn.Module, bytes_per_element: int = 2) -> dict[str, Any]:
    """KV bytes per token per layer, K/V projection FLOPs and attention FLOPs of each transformer tower, as swapped.

    Conventions (stated so the numbers can be checked by hand): a multiply-add is 2 FLOPs; K and V are stored at
    `bytes_per_element` (2 = fp16/bf16 cache); routed-KV also stores each token's expert index (1 byte). Projection
    FLOPs count K and V only (Q and the output projection never change); routed-KV adds its router. Attention FLOPs
    are QK^T plus PV for one full-length sequence over all layers (bidirectional: L^2 pairs; causal: L(L+1)/2).
    They do not depend on the KV budget: every query head still scores every key once, the compact heads are only
    re-read. "Nominal" figures use the ratio fractions; "realised" ones the integer capacities at the tower's length.
    """
    model = getattr(model, "model", model)  # FrozenCLIP or a bare open_clip model
    by_tower: dict[str, list[nn.Module]] = {}
    for tower, block in transformer_blocks(model):
        by_tower.setdefault(tower, []).append(block.attn)
    lengths = _tower_lengths(model)
    out: dict[str, Any] = {}
    for tower, layers in by_tower.items():
        length = lengths.get(tower, 0)
        first = layers[0]
        heads = first.num_heads
        head_dim = first.embed_dim // heads
        width = first.embed_dim
        kind, kv_heads, kv_heads_real, index_bytes, router_flops = "dense", float(heads), float(heads), 0.0, 0.0
        if isinstance(first, SharedWeightAttention):
            kv_heads = first.kv_heads_per_token()
            kv_heads_real = kv_heads
            kind = "gqa" if isinstance(first, GroupedKVAttention) else "routed_kv"
            if kind == "routed_kv":
                kv_heads_real = first.kv_heads_per_token(length)
                index_bytes = 1.0
                router_flops = 2.0 * width * len(first.group_sizes)
        pairs = length * length if tower == "vision" else length * (length + 1) / 2
        out[tower] = {
            "kind": kind, "layers": len(layers), "heads": heads, "head_dim": head_dim, "seq_len": length,
            "kv_fraction": round(kv_heads / heads, 6),
            "kv_fraction_realised": round(kv_heads_real / heads, 6),
            "kv_bytes_per_token_per_layer": 2 * kv_heads * head_dim * bytes_per_element + index_bytes,
            "kv_bytes_per_token_per_layer_realised": round(2 * kv_heads_real * head_dim * bytes_per_element
                                                           + index_bytes, 3),
            "kv_proj_flops_per_token_per_layer": 2 * 2 * width * kv_heads * head_dim + router_flops,
            "kv_proj_flops_per_sequence": round(len(layers) * length * (2 * 2 * width * kv_heads_real * head_dim
                                                                        + router_flops)),
            "attention_flops_per_sequence": int(len(layers) * heads * 4 * head_dim * pairs),
        }
    return out


__all__ = ["KINDS", "GroupedKVAttention", "RouterBank", "SharedWeightAttention", "apply_attention", "attach_routers",
           "attention_costs", "attention_settings", "dense_attention", "is_causal_mask", "pooled_projection",
           "restore_attention", "router_parameters", "sequence_lengths", "swap_attention", "swapped_modules",
           "transformer_blocks"]
