"""`python -m flbench.calibrate`: train only the routers of a routed-KV backbone, by distilling it toward its own
dense attention, and cache them per (architecture, weights, expert layout, calibration settings).

Why: mixSGA always fine-tunes the whole model after conversion; in prompt learning the backbone stays frozen, so
the routers must learn where full K/V matters before any client sees the model. The teacher is the same model with
every swapped layer computing its original dense attention (`dense_attention`), so no second copy is held.

Data (no labels): unlabeled images from the synthetic pretraining split (never a benchmark image) and class-name
prompts ("a <domain> of a <class name>.") of both synthetic families. Loss per step:

    (1 - cos(student, teacher)) on image features and on text features
  + KL(teacher || student) of the image-to-prompt similarity logits (CLIP's own logit scale)
  + aux_weight * router cross-entropy toward the expert-choice assignment (injected by each layer, routed_kv.py)
  + oracle_weight * router cross-entropy toward an oracle routing computed from the dense layer itself: progressive
    expert-choice on the attention-weighted K/V error each token avoids at a finer granularity
    (RoutedKVAttention.oracle_benefit)

The distillation terms alone reach the router only through the straight-through factor (routed_kv.py), a weak
signal: on the tiny CLIP's text tower (3:1:6) they raised zero-shot accuracy from 32.5 to 45.5 %, the oracle term
took it to 57.9 % (dense 67.6 %, GQA g=2 61.6 %; docs/backbones.md).

Usage (same config groups as a run; the routers are cached, and a run with routers=calibrated loads them):

    python -m flbench.calibrate backbone=tiny-vit +backbone/attention=routed_kv [backbone.attention.ratios=[1,1,8]]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flbench.backbones.attention import attention_settings, dense_attention, router_parameters
from flbench.backbones.clip import FrozenCLIP, normalize
from flbench.backbones.routed_kv import RoutedKVAttention, routing_stats
from flbench.io import atomic_write, atomic_write_json, cache_dir

log = logging.getLogger("flbench")

CALIBRATION_DEFAULTS = dict(steps=150, batch_size=64, lr=3e-3, images=4096, seed=0, oracle_weight=1.0)
CALIBRATION_VERSION = 1  # bump when the objective or the data changes: old caches are then not reused


def calibration_settings(backbone_cfg: Mapping[str, Any]) -> dict[str, Any]:
    attention = dict(backbone_cfg.get("attention") or {})
    return {**CALIBRATION_DEFAULTS, **dict(attention.get("calibration") or {})}


def router_cache_path(backbone: FrozenCLIP, backbone_cfg: Mapping[str, Any]) -> Path:
    from flbench.datasets.render import RENDER_VERSION

    s = attention_settings(backbone_cfg.get("attention"))
    layout = {k: s[k] for k in ("group_sizes", "ratios", "towers", "pin_cls", "aux_weight")}
    blob = json.dumps({"layout": layout, "calibration": calibration_settings(backbone_cfg),
                       "version": CALIBRATION_VERSION, "render": RENDER_VERSION}, sort_keys=True)
    key = hashlib.sha1(blob.encode()).hexdigest()[:10]
    name = backbone.name.replace("/", "_")
    return cache_dir(backbone_cfg.get("cache")) / "routers" / f"{name}-{backbone.fingerprint()}-{key}.pt"


def _prompts() -> list[str]:
    from flbench.datasets.synthetic import DOMAIN_PHRASE, FAMILIES

    templates = [f"a {phrase} of a {{}}." for phrase in DOMAIN_PHRASE.values()]
    return [t.format(name) for fam in FAMILIES.values() for name in fam.classnames for t in templates]


def _encode(backbone: FrozenCLIP, images: torch.Tensor | None, tokens: torch.Tensor
            ) -> tuple[torch.Tensor | None, torch.Tensor]:
    image_features = normalize(backbone.encode_image(images)) if images is not None else None
    text_features = normalize(backbone.encode_text_embeddings(backbone.token_embeddings(tokens), tokens.argmax(-1)))
    return image_features, text_features


def _oracle_loss(backbone: FrozenCLIP) -> torch.Tensor | None:
    losses = [m.last_oracle_loss for m in backbone.model.modules()
              if isinstance(m, RoutedKVAttention) and m.last_oracle_loss is not None]
    return torch.stack(losses).mean() if losses else None


@contextlib.contextmanager
def _oracle_targets(backbone: FrozenCLIP, enabled: bool) -> Iterator[None]:
    layers = [m for m in backbone.model.modules() if isinstance(m, RoutedKVAttention)]
    for m in layers:
        m.oracle = "target" if enabled else None
    try:
        yield
    finally:
        for m in layers:
            m.oracle = None


def _distillation_loss(backbone: FrozenCLIP, images: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
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


def _evaluate(backbone: FrozenCLIP, images: torch.Tensor | None, tokens: torch.Tensor) -> dict[str, float]:
    """Held-out distillation loss, router CE toward the oracle routing, argmax/expert-choice agreement per tower."""
    with torch.no_grad(), _oracle_targets(backbone, True):
        loss = float(_distillation_loss(backbone, images, tokens))
        oracle = _oracle_loss(backbone)
    return {"distillation_loss": round(loss, 5), "oracle_loss": round(float(oracle), 5) if oracle is not None else None,
            **{k: round(v, 4) for k, v in routing_stats(backbone.model).items()}}


def calibrate(backbone: FrozenCLIP, backbone_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Train the routers of `backbone` in place; return settings and held-out metrics before and after."""
    from flbench.datasets.synthetic import pretraining_corpus

    settings = calibration_settings(backbone_cfg)
    params = router_parameters(backbone.model)
    if not params:
        raise RuntimeError("calibration needs a routed_kv backbone (backbone.attention.kind=routed_kv)")
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    has_vision = any(".router." in n and n.startswith("visual.") for n in params)
    images = None
    if has_vision:
        # Unlabeled: the pretraining split's images only (not one benchmark image), a different corpus seed.
        images, _ = pretraining_corpus(int(settings["images"]), suite_seed=11, image_size=backbone.image_size)
    tokens = backbone.tokenize(_prompts())
    batch = int(settings["batch_size"])

    def draw(held_out: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        # The first `batch` images/prompts are held out for the before/after evaluation.
        t_idx = torch.randint(batch if not held_out else 0, len(tokens), (batch,), generator=generator)
        t = tokens[:batch] if held_out else tokens[t_idx]
        if images is None:
            return None, t
        i_idx = torch.randint(batch, len(images), (batch,), generator=generator)
        x = images[:batch] if held_out else images[i_idx]
        return x.float().div(255.0), t

    held_images, held_tokens = draw(held_out=True)
    before = _evaluate(backbone, held_images, held_tokens)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=float(settings["lr"]), weight_decay=0.0)
    steps = int(settings["steps"])
    t0 = time.perf_counter()
    try:
        oracle_weight = float(settings.get("oracle_weight", 0.0))
        for step in range(steps):
            x, t = draw(held_out=False)
            with _oracle_targets(backbone, oracle_weight > 0):
                loss = _distillation_loss(backbone, x, t)  # + aux loss, injected by each routed layer's backward
                oracle = _oracle_loss(backbone)
            if oracle is not None:
                loss = loss + oracle_weight * oracle
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 25 == 0 or step == steps - 1:
                log.info("calibration step %d/%d  distillation loss %.4f  %s", step + 1, steps, float(loss.detach()),
                         "  ".join(f"{k} {v:.3f}" for k, v in routing_stats(backbone.model).items()))
    finally:
        for p in params.values():
            p.requires_grad_(False)
    after = _evaluate(backbone, held_images, held_tokens)
    return {"settings": settings, "before": before, "after": after, "steps": steps,
            "seconds": round(time.perf_counter() - t0, 1)}


def calibrated_routers(backbone: FrozenCLIP, backbone_cfg: Mapping[str, Any], force: bool = False
                       ) -> dict[str, torch.Tensor]:
    """Router state for this backbone and layout: from the cache, or calibrated now (first time only) and cached."""
    path = router_cache_path(backbone, backbone_cfg)
    if path.exists() and not force:
        return torch.load(path, map_location="cpu", weights_only=True)
    log.info("calibrating the routers of %s (first time only, cached at %s)", backbone.name, path)
    report = calibrate(backbone, backbone_cfg)
    attention = attention_settings(backbone_cfg.get("attention"))
    report["backbone"] = backbone.name
    report["layout"] = {k: attention[k] for k in ("group_sizes", "ratios", "towers", "pin_cls", "aux_weight")}
    state = {name: p.detach().clone() for name, p in router_parameters(backbone.model).items()}
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write_json(path.with_suffix(".json"), report)
    log.info("calibration: before %s  after %s  (%.0f s)", report["before"], report["after"], report["seconds"])
    return state


def main() -> None:
    import os
    import sys

    import hydra
    from omegaconf import DictConfig, OmegaConf

    from flbench.cli import CONF_DIR, setup_logging
    from flbench.errors import ConfigError

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _main(cfg: DictConfig) -> None:
        from flbench.backbones.clip import load_backbone

        setup_logging(bool(cfg.get("verbose", False)))
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if resolved.get("cache_dir"):
            os.environ["FLBENCH_CACHE"] = str(resolved["cache_dir"])
        backbone_cfg = dict(resolved["backbone"])
        try:
            attention = attention_settings(backbone_cfg.get("attention"))
            if attention["kind"] != "routed_kv":
                raise ConfigError("backbone.attention.kind must be routed_kv to calibrate routers "
                                  "(add +backbone/attention=routed_kv)")
            # Load with fresh routers, then calibrate (or read the cache) exactly as a run with routers=calibrated.
            backbone = load_backbone({**backbone_cfg, "attention": {**attention, "routers": "init"}})
            calibrated_routers(backbone, backbone_cfg, force=bool(resolved.get("force", False)))
        except ConfigError as error:
            print(f"flbench.calibrate: error: {error}", file=sys.stderr)
            sys.exit(2)
        path = router_cache_path(backbone, backbone_cfg)
        report = path.with_suffix(".json")
        print(f"routers: {path}")
        if report.exists():
            data = json.loads(report.read_text())
            print(f"held-out before: {data['before']}\nheld-out after:  {data['after']}\n"
                  f"({data['steps']} steps, {data['seconds']} s; report: {report})")

    _main()


if __name__ == "__main__":
    main()
