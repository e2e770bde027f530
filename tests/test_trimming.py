"""Text-length trimming (flbench/backbones/text.py) is exact: every method's logits, loss and gradients agree with
and without it on both tiny CLIPs, and those of one method per way into the text tower on a random-weight ViT-B/16;
trimming really runs fewer positions; a non-causal text tower is never trimmed.

Tolerance: max |trimmed − untrimmed| ≤ 5e-5 × the largest untrimmed magnitude of each tensor (logits, loss, each
gradient), i.e. about 400 fp32 ulps (eps = 1.2e-7) of its largest value. Trimming changes no term of any sum that
reaches an EOT output — the masked positions contribute exact zeros — but the matrix products and softmax
reductions run over arrays of another shape,
so the CPU kernels block and order the same sums differently. Measured: logits and losses ≤ 5e-6, gradients ≤ 7e-6,
except FedTPG's query gradient on ViT-B/16 at 1.2e-5 (it crosses the 12-layer text tower and the generator's
attention); a wrong trim (one position short, a mask not sliced with the input, a prompt slot cut off) is off by
1e-2 or more, or fails.
"""

import open_clip
import pytest
import torch

from flbench.algorithms.base import available_methods, build_method, method_class
from flbench.backbones.clip import FrozenCLIP
from flbench.backbones.tiny import TINY_CONFIGS
from flbench.backbones.text import (PACK_ENV, PREFIX_ENV, TRIM_ENV, is_causal_text_tower, packing_enabled,
                                    prefix_sharing, prefix_sharing_enabled, text_length, text_packing, text_trimming,
                                    trimming_enabled)
from helpers import random_tiny

CLASSES = ["red circle", "blue square with a long name", "star"]
TEMPLATES = ["a photo of a {}.", "a rough sketch of the {}."]
# ViT-B/16's untrimmed passes (77 positions, 12 layers) are the cost of this file: two classes, one template there.
VIT_CLASSES, VIT_TEMPLATES = CLASSES[:2], TEMPLATES[:1]
TOL = 5e-5
# Small settings where a method's default would only cost time (the trimming argument does not depend on them).
HPARAMS = {"proda": dict(n_prompts=2), "plot": dict(n_prompts=2), "vpt": dict(n_tokens=2), "fedtpg": dict(heads=4)}
# Context slots after the class name too: the longest row's EOT moves, and the trim must follow it.
EXTRA = [("coop", dict(class_token_position="middle")),
         ("coop", dict(class_token_position="front", n_ctx=2, ctx_init=None)), ("coop", dict(class_specific=True))]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    vit = FrozenCLIP(open_clip.create_model("ViT-B-16", pretrained=None), "ViT-B-16")
    return {"tiny": random_tiny("tiny"), "tiny-vit": random_tiny("tiny-vit", seed=1), "vit_b16": vit}


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to the largest |b| (0 for two empty tensors)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def _stand_in_features(method, backbone, batch: int, training: bool):
    """Image-side inputs of `logits`/`loss` for ViT-B/16 without running its image tower (24 passes at 224 px
    would cost most of this file's budget): random features of the shapes the method's `encode` returns. The image
    tower is never trimmed; the text side, which is, runs for real."""
    g = torch.Generator().manual_seed(5)
    if method.name in ("plot", "fedotp"):
        return torch.randn(batch, 4, backbone.embed_dim, generator=g)
    features = torch.randn(batch, backbone.embed_dim, generator=g)
    if method.name == "promptsrc" and training:
        return features, torch.randn(batch, backbone.embed_dim, generator=g)
    return features


def _pass(name, hparams, backbone, images, labels, trim: bool, switch=text_trimming, classes=None):
    """Build (hand-crafted features encoded under this setting), perturb, one training backward, eval logits.
    `switch` is the text shortcut under test (trimming here, prefix sharing and packing in tests/test_prefix.py)."""
    backbone.__dict__.pop("_handcrafted_text", None)
    real = backbone.name != "ViT-B-16"
    default, templates = (CLASSES, TEMPLATES) if real else (VIT_CLASSES, VIT_TEMPLATES)
    classes = classes or default
    with switch(trim):
        torch.manual_seed(0)
        method = build_method(name, backbone, classes, templates, {**HPARAMS.get(name, {}), **hparams})
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in method.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        method.train()
        torch.manual_seed(2)  # DP-FPL's noise, ProDA's prompt batch
        encoded = method.encode(images) if real else _stand_in_features(method, backbone, len(labels), True)
        # zero-shot: logits only; so is VPT on the stand-in features (all its parameters are on the image side)
        trainable = method.num_trainable() > 0 and (real or name != "vpt")
        loss = method.backward(encoded, labels) if trainable else torch.zeros(())
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        method.eval()
        with torch.no_grad():
            encoded = method.encode(images) if real else _stand_in_features(method, backbone, len(labels), False)
            logits = method.logits(encoded)
    return logits, loss, grads


CASES = [(name, {}) for name in available_methods()] + EXTRA
# On ViT-B/16, one method per way into the text tower (each untrimmed ViT-B/16 method costs ~1.5 s here): hand-crafted
# features (zero-shot), a shared context (CoOp, class name in the middle), per-image contexts (CoCoOp), prompt sets
# (ProDA), generated contexts (FedTPG), deep text prompts (MaPLe; PromptSRC with a template ensemble). The other
# methods reach the tower through the same TextPrompt.encode as CoOp and are checked on both tiny CLIPs.
VIT_CASES = [("zeroshot", {}), ("coop", dict(class_token_position="middle")), ("cocoop", {}), ("proda", {}),
             ("fedtpg", {}), ("maple", {}), ("promptsrc", {})]


@pytest.mark.parametrize("backbone_name", ["tiny", "tiny-vit", "vit_b16"])
def test_methods_give_the_same_logits_loss_and_gradients_trimmed(backbones, backbone_name):
    backbone = backbones[backbone_name]
    cases = VIT_CASES if backbone_name == "vit_b16" else CASES
    size = backbone.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1])
    checked = []
    for name, hparams in cases:
        if method_class(name).needs_vit and not backbone.is_vit:
            continue
        (lt, losst, gt), (lu, lossu, gu) = (_pass(name, hparams, backbone, images, labels, trim) for trim in (1, 0))
        label = f"{name}{hparams or ''} on {backbone_name}"
        assert lt.shape == lu.shape and _close(lt, lu) <= TOL, f"{label}: logits differ by {_close(lt, lu):.2e}"
        assert _close(losst, lossu) <= TOL, f"{label}: loss differs"
        assert gt.keys() == gu.keys() and (gt or name in ("zeroshot", "vpt")), f"{label}: not the same gradients"
        worst = max((_close(gt[k], gu[k]) for k in gt), default=0.0)
        assert worst <= TOL, f"{label}: a gradient differs by {worst:.2e}"
        checked.append(name)
    expected = [n for n, _ in cases if backbone.is_vit or not method_class(n).needs_vit]
    assert checked == expected


def test_a_pass_computes_only_the_positions_up_to_the_last_eot(backbones):
    backbone = backbones["vit_b16"]
    seen = []
    hook = backbone.model.transformer.resblocks[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape[1]))
    try:
        tokens = backbone.tokenize(CLASSES)
        longest = int(tokens.argmax(-1).max()) + 1
        with torch.no_grad():
            trimmed = backbone.encode_text(CLASSES)
            with text_trimming(False):
                full = backbone.encode_text(CLASSES)
    finally:
        hook.remove()
    assert seen == [longest, 77] and longest < 16
    assert _close(trimmed, full) <= TOL


@pytest.mark.parametrize("env, switch, enabled", [(TRIM_ENV, text_trimming, trimming_enabled),
                                                   (PREFIX_ENV, prefix_sharing, prefix_sharing_enabled),
                                                   (PACK_ENV, text_packing, packing_enabled)])
def test_each_text_shortcut_switch_nests_and_its_environment_variable_turns_it_off(monkeypatch, env, switch, enabled):
    monkeypatch.delenv(env, raising=False)
    assert enabled()
    with switch(False):
        assert not enabled()
        with switch(True):
            assert enabled()
        assert not enabled()
    monkeypatch.setenv(env, "0")
    assert not enabled()
    with switch(True):
        assert enabled(), "the context manager wins over the environment (tests, benchmarks)"


def test_a_non_causal_text_tower_is_never_trimmed():
    torch.manual_seed(0)
    config = dict(TINY_CONFIGS["tiny"])
    config["text_cfg"] = {**config["text_cfg"], "no_causal_mask": True}
    backbone = FrozenCLIP(open_clip.CLIP(**config), "tiny-bidirectional")
    assert backbone.model.attn_mask is None and not is_causal_text_tower(backbone.model)
    tokens = backbone.tokenize(CLASSES)
    assert text_length(backbone.model, tokens.argmax(-1)) == 16
    with torch.no_grad():
        ours = backbone.encode_text(CLASSES)
        assert torch.allclose(ours, backbone.model.encode_text(tokens), atol=1e-6)
        # the check matters: here the padding does reach the EOT token, so a trimmed pass would differ
        cut = int(tokens.argmax(-1).max()) + 1
        x = backbone.model.transformer(backbone.token_embeddings(tokens[:, :cut])
                                       + backbone.model.positional_embedding[:cut])
        cut_features = backbone.model.ln_final(x)[torch.arange(3), tokens.argmax(-1)] @ backbone.model.text_projection
    assert _close(cut_features, ours) > 1e-3

    causal = random_tiny()
    assert is_causal_text_tower(causal.model)
    causal.model.attn_mask = torch.zeros(16, 16)  # a custom mask that lets every position see every other
    assert not is_causal_text_tower(causal.model)
    assert text_length(causal.model, tokens.argmax(-1)) == 16
