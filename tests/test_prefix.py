"""Shared prompt prefixes (flbench/backbones/text.py: `encode_shared_prefix`) are exact: every method's logits, loss
and gradients agree with sharing on and off, the shared path really runs the prefix once per group, a tower it cannot
split (swapped attention) falls back to full rows, and a federated record is the same either way. So are its packed
rows and pooled last block (`text_packing`): every method agrees with packing on and off, per-token ops really run
on real tokens only, block 0 projects the class-name tokens once per call, and on this CPU a cohort's features and
gradients are bit-identical either way and across thread counts.

Tolerance. Sharing computes the same attention over the same keys; only the shapes of the products change (the
prefix keys are concatenated per row instead of computed per row). To show that no term of any sum changed, the
method-by-method check runs in float64, where reassociation costs ~1e-16 per operation: agreement to 1e-10 of the
largest magnitude leaves no room for a wrong mask, a shifted position or a missing gradient path (each is off by
1e-3 or more). In float32 the same comparisons differ by up to 5e-5 of the largest magnitude (KgCoOp's gradient,
measured), the tolerance of tests/test_trimming.py.
"""

import pytest
import torch

from flbench.algorithms.base import build_method, method_class
from flbench.backbones.attention import swap_attention
from flbench.backbones.text import MIN_PACKED_ROWS, PREFIX_ENV, prefix_sharing, shares_prefix, text_packing
from helpers import random_tiny
from test_trimming import CASES, _close, _pass

TOL64 = 1e-10

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backbone_name", ["tiny", "tiny-vit"])
def test_methods_give_the_same_logits_loss_and_gradients_with_a_shared_prefix(float64, backbone_name):
    backbone = random_tiny(backbone_name, seed=1).double()
    assert shares_prefix(backbone.model)
    size = backbone.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.tensor([0, 1])
    checked = []
    for name, hparams in CASES:
        if method_class(name).needs_vit and not backbone.is_vit:
            continue
        (ls, losss, gs), (lf, lossf, gf) = (_pass(name, hparams, backbone, images, labels, share, prefix_sharing)
                                            for share in (True, False))
        label = f"{name}{hparams or ''} on {backbone_name}"
        assert ls.dtype == torch.float64 and _close(ls, lf) <= TOL64, f"{label}: logits differ by {_close(ls, lf):.1e}"
        assert _close(losss, lossf) <= TOL64, f"{label}: loss differs"
        assert gs.keys() == gf.keys() and (gs or name == "zeroshot"), f"{label}: not the same gradients"
        worst = max((_close(gs[k], gf[k]) for k in gs), default=0.0)
        assert worst <= TOL64, f"{label}: a gradient differs by {worst:.1e}"
        checked.append(name)
    assert checked == [n for n, _ in CASES if backbone.is_vit or not method_class(n).needs_vit]


# 36 classes of 2-4 words: rows of several lengths (packing drops their padding) and more EOT rows than
# MIN_PACKED_ROWS (the last block is pooled).
MANY_CLASSES = [" ".join(["red", "blue square", "star with a long name", "dot"][i % 4].split()[: 1 + i % 3])
                + f" {i}" for i in range(36)]


@pytest.mark.parametrize("backbone_name", ["tiny", "tiny-vit"])
def test_methods_give_the_same_logits_loss_and_gradients_with_packed_rows(float64, backbone_name):
    backbone = random_tiny(backbone_name, seed=1).double()
    size = backbone.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.tensor([0, 1])
    assert len(MANY_CLASSES) >= MIN_PACKED_ROWS
    for name, hparams in CASES:
        if method_class(name).needs_vit and not backbone.is_vit:
            continue
        (lp, lossp, gp), (lf, lossf, gf) = (_pass(name, hparams, backbone, images, labels, pack, text_packing,
                                                  MANY_CLASSES) for pack in (True, False))
        label = f"{name}{hparams or ''} on {backbone_name}"
        assert _close(lp, lf) <= TOL64 and _close(lossp, lossf) <= TOL64, f"{label}: logits or loss differ"
        assert gp.keys() == gf.keys(), f"{label}: not the same gradients"
        worst = max((_close(gp[k], gf[k]) for k in gp), default=0.0)
        assert worst <= TOL64, f"{label}: a gradient differs by {worst:.1e}"


def _mlp_rows(backbone, run, block=0) -> list[int]:
    """Positions the MLP of block `block` computes in each of its calls during `run()`."""
    seen = []
    hook = backbone.model.transformer.resblocks[block].mlp.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_the_prefix_is_computed_once_per_group():
    backbone = random_tiny("tiny")
    classes = ["red circle", "blue square with a long name", "star"]
    coop = build_method("coop", backbone, classes, ["a photo of a {}."], {})
    length = int(coop.prompt.eot().max()) + 1
    prefix = 1 + coop.ctx.shape[0]  # [SOS] and the 4 context tokens
    with torch.no_grad(), text_packing(False):
        shared = _mlp_rows(backbone, coop.text_features)
        cohort = _mlp_rows(backbone, lambda: coop.prompt.encode(torch.stack([coop.ctx] * 5).unsqueeze(1)))
        with prefix_sharing(False):
            full = _mlp_rows(backbone, coop.text_features)
    assert full == [3 * length]
    assert shared == [prefix + 3 * (length - prefix)], "the prefix once, then each row's own positions"
    assert cohort == [5 * prefix + 5 * 3 * (length - prefix)], "one prefix per client of a cohort"


def test_packed_rows_run_per_token_ops_on_real_tokens_and_the_last_block_on_eot_rows():
    backbone = random_tiny("tiny")
    coop = build_method("coop", backbone, MANY_CLASSES, ["a photo of a {}."], {})
    eot = coop.prompt.eot()
    prefix = 1 + coop.ctx.shape[0]
    real = int((eot - prefix + 1).sum())  # each row's positions after the prefix, up to its EOT
    assert real < len(MANY_CLASSES) * (int(eot.max()) + 1 - prefix), "the rows have padding to drop"
    contexts = torch.stack([coop.ctx] * 3).unsqueeze(1)
    with torch.no_grad():
        first, last = (_mlp_rows(backbone, lambda: coop.prompt.encode(contexts), block) for block in (0, -1))
    assert first == [3 * (prefix + real)], "the prefixes and the real tokens only"
    assert last == [3 * len(MANY_CLASSES)], "the last block's MLP on each row's EOT only"


def test_block_zero_projects_the_class_name_tokens_once_per_call():
    backbone = random_tiny("tiny")
    coop = build_method("coop", backbone, MANY_CLASSES, ["a photo of a {}."], {})
    prefix = 1 + coop.ctx.shape[0]
    real = int((coop.prompt.eot() - prefix + 1).sum())
    contexts = torch.stack([coop.ctx] * 3).unsqueeze(1)
    seen = []
    hook = backbone.model.transformer.resblocks[0].ln_1.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        coop.prompt.encode(contexts)
    finally:
        hook.remove()
    assert sorted(seen) == sorted([3 * prefix, real]), "the 3 clients' prefixes, and one client's class-name tokens"


def test_packing_leaves_a_cohorts_features_and_gradients_bit_identical():
    backbone = random_tiny("tiny")
    coop = build_method("coop", backbone, MANY_CLASSES, ["a photo of a {}."], {})
    weights = torch.randn(3, len(MANY_CLASSES), backbone.model.text_projection.shape[1],
                          generator=torch.Generator().manual_seed(0))
    runs = []
    for pack in (True, False):
        contexts = (torch.stack([coop.ctx.detach()] * 3) + torch.arange(3.0).view(3, 1, 1) / 10).requires_grad_()
        with text_packing(pack):
            features = coop.prompt.encode(contexts.unsqueeze(1))
        (features * weights).sum().backward()
        runs.append((features.detach(), contexts.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_a_tower_with_swapped_attention_falls_back_to_full_rows():
    backbone = random_tiny("tiny")
    swap_attention(backbone.model, {"kind": "gqa", "group_size": 2})
    assert not shares_prefix(backbone.model)
    coop = build_method("coop", backbone, ["red circle", "star"], ["a photo of a {}."], {})
    with torch.no_grad():
        ours = coop.text_features()
        with prefix_sharing(False):
            assert torch.equal(ours, coop.text_features())


def test_the_environment_variable_turns_sharing_off_for_a_shareable_tower(monkeypatch):
    # (the switch itself nests like trimming's: tests/test_trimming.py, one parametrised test for both)
    backbone = random_tiny("tiny")
    monkeypatch.delenv(PREFIX_ENV, raising=False)
    assert shares_prefix(backbone.model)
    monkeypatch.setenv(PREFIX_ENV, "0")
    assert not shares_prefix(backbone.model)


@pytest.mark.parametrize("groups", [1, 3], ids=["one client", "a cohort of 3"])
@pytest.mark.parametrize("classes", [[f"class {i} shape" for i in range(64)], MANY_CLASSES],
                         ids=["one length, pooled", "several lengths, packed and pooled"])
def test_shared_prefix_features_do_not_depend_on_the_thread_count(classes, groups):
    """Ray workers and the in-process backend run other thread counts and must give the same numbers: small CPU
    matrix products (one prefix alone) sum in a thread-dependent order, so prefix and rows share one product, packing
    and pooling shrink a product only where it keeps MIN_PACKED_ROWS rows, and block 0's split products are padded."""
    backbone = random_tiny("tiny")
    coop = build_method("coop", backbone, classes, ["a photo of a {}."], {})
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        contexts = (torch.stack([coop.ctx.detach()] * groups) + torch.arange(groups).view(-1, 1, 1) / 10
                    ).requires_grad_()
        features = coop.prompt.encode(contexts.unsqueeze(1))
        features.pow(2).sum().backward()
        runs.append((features.detach(), contexts.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
