"""The *calibrate* step of the conversion: train only the routers of a routed-KV backbone, training-free for the
backbone itself (its weights stay frozen), by distilling it toward its own dense attention.

Why: in prompt learning the backbone stays frozen, so the routers must learn where full K/V matters before any
client sees the model. The teacher is the same model with every swapped layer computing its original dense
attention (`dense_attention`), so no second copy is held.

Data (no labels): unlabeled images from the synthetic pretraining split (never a benchmark image) and class-name
prompts ("a <domain> of a <class name>.") of both synthetic families — with `prompts: template+captions`, also the
class names in the pretraining corpus's caption templates ("a shaded <class>.", "<class>", …), so that the routers
do not learn one template's positions. Loss per step:

    (1 - cos(student, teacher)) on image features and on text features
  + KL(teacher || student) of the image-to-prompt similarity logits (CLIP's own logit scale)
  + aux_weight * the router's argmax/expert-choice cross-entropy (α/N·Σ_l, injected by each layer, routed_kv.py)
  + oracle_weight * router cross-entropy toward an oracle routing computed from the dense layer itself: progressive
    expert-choice on the K/V pooling error each token avoids at a finer granularity, weighted by the attention it
    receives from the query rows that reach the tower's output (`oracle_rows`):

      pooled   (default) only the pooled row: end-of-text for text, [CLS] for a ViT (every row for mean pooling)
      rollout  rows by their attention-rollout relevance to the pooled row (Abnar & Zuidema 2020): the last layer's
               relevance is the pooled row; layer l's is layer l+1's pushed through ½(I + P̄_{l+1}), P̄ the head-mean
               dense attention of the teacher pass
      all      every query row (the first version: it favours attention-sink tokens — the start token always got
               full K/V and class names almost never; docs/backbones.md)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.backbones.layers import dense_attention, router_parameters, sequence_lengths
from flbench.backbones.routed_kv import RoutedKVAttention, routed_layers, routing_stats

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 2  # 2: oracle weighted by output-relevant rows; aux loss α/N·Σ_l. Bump when the objective changes


def calibration_prompts(prompts: str = "template") -> list[str]:
    """Every class name of both synthetic families in the suite's template of every domain; with
    "template+captions", also in each caption template of the pretraining corpus (each distinct prompt once)."""
    from flbench.datasets.synthetic import CAPTIONS, DOMAIN_PHRASE, FAMILIES, domain_template

    templates = [domain_template(domain) for domain in DOMAIN_PHRASE]
    if prompts == "template+captions":
        templates = list(dict.fromkeys(templates + [t for domain in CAPTIONS.values() for t in domain]))
    return [t.format(name) for fam in FAMILIES.values() for name in fam.classnames for t in templates]


def _encode(backbone: FrozenCLIP, images: torch.Tensor | None, tokens: torch.Tensor
            ) -> tuple[torch.Tensor | None, torch.Tensor]:
    image_features = normalize(backbone.encode_image(images)) if images is not None else None
    text_features = normalize(backbone.encode_text_embeddings(backbone.token_embeddings(tokens), tokens.argmax(-1)))
    return image_features, text_features


def _oracle_loss(backbone: FrozenCLIP) -> torch.Tensor | None:
    losses = [m.last_oracle_loss for m in routed_layers(backbone.model) if m.last_oracle_loss is not None]
    return torch.stack(losses).mean() if losses else None


@contextlib.contextmanager
def oracle_targets(backbone: FrozenCLIP, rows: str | None) -> Iterator[None]:
    """Within this block every routed layer computes its oracle loss (rows: ORACLE_ROWS; None: off)."""
    layers = routed_layers(backbone.model)
    for m in layers:
        m.oracle, m.oracle_rows = ("target", rows) if rows else (None, m.oracle_rows)
    try:
        yield
    finally:
        for m in layers:
            m.oracle, m.query_relevance = None, None


@contextlib.contextmanager
def _captured_inputs(layers: list[RoutedKVAttention]) -> Iterator[dict[RoutedKVAttention, torch.Tensor]]:
    """Record each layer's (batch-first) input of the passes run in this block."""
    inputs: dict[RoutedKVAttention, torch.Tensor] = {}

    def hook(module: RoutedKVAttention, args: tuple) -> None:
        x = args[0]
        inputs[module] = x if module.batch_first else x.transpose(0, 1)

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        yield inputs
    finally:
        for h in handles:
            h.remove()


def set_rollout_relevance(backbone: FrozenCLIP, images: torch.Tensor | None, tokens: torch.Tensor) -> None:
    """oracle_rows=rollout: run the dense teacher once, and give every routed layer the relevance of its query rows
    for this batch (last layer: the pooled row; layer l: layer l+1's relevance through ½(I + P̄_{l+1}))."""
    for tower, batch in (("vision", images), ("text", tokens)):
        layers = routed_layers(backbone.model, tower)
        if not layers or batch is None:
            continue
        with torch.no_grad(), dense_attention(backbone.model), _captured_inputs(layers) as inputs:
            if tower == "vision":
                backbone.encode_image(batch)
            else:
                backbone.encode_text_embeddings(backbone.token_embeddings(batch), batch.argmax(-1))
        lengths = tokens.argmax(-1) + 1 if tower == "text" else None
        last = inputs[layers[-1]]
        with torch.no_grad(), sequence_lengths(lengths):
            valid, n_tokens = layers[-1]._valid(last.shape[0], last.shape[1], last.device)
            relevance = layers[-1].oracle_relevance(valid, n_tokens, rows="pooled")
            for index in range(len(layers) - 1, -1, -1):
                layers[index].query_relevance = relevance
                if index > 0:  # how much layer `index`'s relevant rows read from each of its inputs
                    x = inputs[layers[index]]
                    probs = layers[index].attention_probs(x, valid, causal=tower == "text").mean(1)  # [B, Lq, Lk]
                    mixing = 0.5 * (torch.diag_embed(valid.float()) + probs)
                    relevance = torch.einsum("bq,bqk->bk", relevance, mixing)
                    relevance = relevance / relevance.sum(-1, keepdim=True).clamp(min=1e-12)


def distillation_loss(backbone: FrozenCLIP, images: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), dense_attention(backbone.model):
        t_img, t_txt = _encode(backbone, images, tokens)
    s_img, s_txt = _encode(backbone, images, tokens)
    loss = (1 - (s_txt * t_txt).sum(-1)).mean()
    if images is not None:
        scale = backbone.logit_scale.detach()
        loss = loss + (1 - (s_img * t_img).sum(-1)).mean()
        teacher = F.log_softmax(scale * t_img @ t_txt.t(), dim=-1)
        student = F.log_softmax(scale * s_img @ s_txt.t(), dim=-1)
        loss = loss + F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return loss


def _step_loss(backbone: FrozenCLIP, images: torch.Tensor | None, tokens: torch.Tensor, rows: str | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    with oracle_targets(backbone, rows):
        if rows == "rollout":
            set_rollout_relevance(backbone, images, tokens)
        loss = distillation_loss(backbone, images, tokens)  # + aux loss, injected by each routed layer's backward
        oracle = _oracle_loss(backbone)
    return loss, oracle


def _evaluate(backbone: FrozenCLIP, images: torch.Tensor | None, tokens: torch.Tensor, rows: str
              ) -> dict[str, float]:
    """Held-out distillation loss, router CE toward the oracle routing, argmax/expert-choice agreement per tower."""
    with torch.no_grad():
        loss, oracle = _step_loss(backbone, images, tokens, rows)
    return {"distillation_loss": round(float(loss), 5),
            "oracle_loss": round(float(oracle), 5) if oracle is not None else None,
            **{k: round(v, 4) for k, v in routing_stats(backbone.model).items()}}


def calibrate(backbone: FrozenCLIP, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Train the routers of `backbone` in place (settings: backbone.attention.calibration, checked); return the
    settings and held-out metrics before and after."""
    from flbench.datasets.synthetic import pretraining_corpus

    params = router_parameters(backbone.model)
    if not params:
        raise RuntimeError("calibration needs a routed_kv backbone (backbone.attention.kind=routed_kv)")
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    images = None
    if any(m.tower == "vision" for m in routed_layers(backbone.model)):
        # Unlabeled: the pretraining split's images only (not one benchmark image), a different corpus seed.
        images, _ = pretraining_corpus(int(settings["images"]), suite_seed=11, image_size=backbone.image_size)
    tokens = backbone.tokenize(calibration_prompts(str(settings["prompts"])))
    batch, rows = int(settings["batch_size"]), str(settings["oracle_rows"])

    def draw(held_out: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        # The first `batch` images/prompts are held out for the before/after evaluation.
        t = tokens[:batch] if held_out else tokens[torch.randint(batch, len(tokens), (batch,), generator=generator)]
        if images is None:
            return None, t
        x = images[:batch] if held_out else images[torch.randint(batch, len(images), (batch,), generator=generator)]
        return x.float().div(255.0), t

    held_images, held_tokens = draw(held_out=True)
    before = _evaluate(backbone, held_images, held_tokens, rows)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=float(settings["lr"]), weight_decay=0.0)
    steps, oracle_weight = int(settings["steps"]), float(settings["oracle_weight"])
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            x, t = draw(held_out=False)
            loss, oracle = _step_loss(backbone, x, t, rows if oracle_weight > 0 else None)
            if oracle is not None:
                loss = loss + oracle_weight * oracle
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 25 == 0 or step == steps - 1:
                log.info("calibration step %d/%d  loss %.4f  %s", step + 1, steps, float(loss.detach()),
                         "  ".join(f"{k} {v:.3f}" for k, v in routing_stats(backbone.model).items()))
    finally:
        for p in params.values():
            p.requires_grad_(False)
    after = _evaluate(backbone, held_images, held_tokens, rows)
    return {"settings": dict(settings), "before": before, "after": after, "steps": steps,
            "seconds": round(time.perf_counter() - t0, 1)}


__all__ = ["CALIBRATION_VERSION", "calibrate", "calibration_prompts", "distillation_loss", "oracle_targets",
           "set_rollout_relevance"]
