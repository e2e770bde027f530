"""Real CLIP weights: checkpoints (open_clip and OpenAI formats), pretrained tags offline, RN50 with CoOp."""

from __future__ import annotations

import copy
import time

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from flbench.algorithms.base import build_method
from flbench.backbones.build import build_open_clip, load_backbone
from flbench.backbones.tiny import TINY_CONFIGS
from flbench.backbones.weights import backbone_image_size
from flbench.errors import ConfigError

ARCH = "flbench-test-tiny"  # the tiny CLIP registered as an open_clip architecture, so checkpoints stay small


@pytest.fixture
def arch(monkeypatch):
    import open_clip.factory

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, ARCH, copy.deepcopy(TINY_CONFIGS["tiny"]))
    return ARCH


def random_model(seed: int = 0, **kwargs) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.create_model(ARCH, pretrained=None, **kwargs)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_open_clip_checkpoint_loads_back_identically(tmp_path, arch):
    model = random_model(seed=1)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    backbone = build_open_clip(arch, checkpoint=str(path))
    assert same_weights(model, backbone.model) and not same_weights(random_model(seed=2), backbone.model)
    with torch.no_grad():
        assert torch.equal(backbone.model.encode_text(backbone.tokenize(["a red star"])),
                           model.eval().encode_text(backbone.tokenize(["a red star"])))
    assert not isinstance(backbone.model.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_training_checkpoint_wrappers_are_unwrapped(tmp_path, arch):
    model = random_model(seed=3)
    path = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    assert same_weights(model, build_open_clip(arch, checkpoint=str(path)).model)


def test_openai_format_state_dict_loads_in_fp16_with_quick_gelu(tmp_path, arch):
    model = random_model(seed=4, force_quick_gelu=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    path = tmp_path / "openai-state.pt"
    torch.save(state, path)
    backbone = build_open_clip(arch, checkpoint=str(path))
    assert isinstance(backbone.model.transformer.resblocks[0].mlp.gelu, QuickGELU)  # detected from the format
    loaded = backbone.model.state_dict()
    assert all(torch.equal(loaded[k], state[k].float()) for k in loaded if loaded[k].is_floating_point())
    forced = build_open_clip(arch, checkpoint=str(path), quick_gelu=False)
    assert not isinstance(forced.model.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_safetensors_checkpoint(tmp_path, arch):
    from safetensors.torch import save_file

    model = random_model(seed=5)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert same_weights(model, build_open_clip(arch, checkpoint=str(path)).model)


def test_jit_archives_are_explained_not_executed(tmp_path, arch):
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)).save(str(path))
    with pytest.raises(ConfigError, match=r"TorchScript \(JIT\) archive.*torch.jit.load.*backbone.pretrained=openai"):
        build_open_clip(arch, checkpoint=str(path))


class NotAStateDict:
    pass


def test_arbitrary_pickles_are_refused_by_weights_only(tmp_path, arch):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": NotAStateDict()}, path)
    with pytest.raises(ConfigError, match="not a plain state dict loadable with weights_only=True"):
        build_open_clip(arch, checkpoint=str(path))


def test_checkpoint_of_another_architecture_names_the_mismatch(tmp_path, arch):
    path = tmp_path / "tiny.pt"
    torch.save(random_model().state_dict(), path)
    with pytest.raises(ConfigError, match=r"does not fit backbone.arch='RN50': .*wrong shape"):
        build_open_clip("RN50", checkpoint=str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        build_open_clip(arch, checkpoint=str(tmp_path / "missing.pt"))


def test_offline_pretrained_tag_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        build_open_clip("RN50", pretrained="openai")
    assert time.perf_counter() - start < 2.0
    message = str(error.value)
    assert "backbone.pretrained='openai'" in message and "HF_HUB_OFFLINE" in message
    assert "backbone.checkpoint=PATH" in message and "\n" not in message


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch):
    from flbench.backbones import weights

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "reachable", lambda host, *a, **k: False)  # never touch the network in tests
    with pytest.raises(ConfigError, match="huggingface.co is unreachable"):
        build_open_clip("ViT-B-16", pretrained="openai")


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"not an open_clip tag of backbone.arch='RN50'; choose one of \[.*openai"):
        build_open_clip("RN50", pretrained="no-such-tag")


def test_rn50_loads_and_runs_a_text_side_method():
    torch.manual_seed(0)
    backbone = load_backbone({"name": "open_clip", "arch": "RN50", "pretrained": None, "checkpoint": None})
    assert backbone.image_size == 224 and not backbone.is_vit
    coop = build_method("coop", backbone, ["cat", "dog", "bird"], ["a photo of a {}."], {"n_ctx": 4})
    encoded = coop.encode(torch.rand(1, 3, 224, 224))
    assert coop.logits(encoded).shape == (1, 3)
    coop.backward(encoded, torch.tensor([2]))
    trainable = [p for p in coop.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in backbone.parameters())


def test_backbone_image_size_is_known_before_building():
    assert backbone_image_size({"name": "tiny"}) == 32
    assert backbone_image_size({"name": "open_clip", "arch": "ViT-B-16"}) == 224
    assert backbone_image_size({"name": "open_clip", "arch": "ViT-L-14-336"}) == 336
