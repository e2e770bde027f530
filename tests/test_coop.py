import pytest
import torch

from flbench.algorithms.base import build_method
from flbench.algorithms.prompting import handcrafted_text_features
from flbench.backbones.clip import normalize
from flbench.errors import ConfigError
from helpers import random_tiny

CLASSES = ["red circle", "blue square", "green star"]


@pytest.fixture(scope="module")
def backbone():
    return random_tiny()


def test_encode_text_embeddings_reproduces_open_clip_encode_text(backbone):
    tokens = backbone.tokenize(["a photo of a red circle.", "blue"])
    ours = backbone.encode_text_embeddings(backbone.token_embeddings(tokens), tokens.argmax(-1))
    assert torch.allclose(ours, backbone.model.encode_text(tokens), atol=1e-6)


def test_coop_initialised_from_words_equals_zero_shot(backbone):
    coop = build_method("coop", backbone, CLASSES, ["a photo of a {}."], {"ctx_init": "a photo of a"})
    zs = handcrafted_text_features(backbone, CLASSES, ["a photo of a {}."])
    assert torch.allclose(normalize(coop.text_features()), zs, atol=1e-5)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_gradients_reach_only_the_context(backbone, position, class_specific):
    coop = build_method("coop", backbone, CLASSES, ["a photo of a {}."],
                        {"n_ctx": 4, "ctx_init": None, "class_token_position": position,
                         "class_specific": class_specific})
    images = torch.rand(5, 3, 32, 32)
    loss = coop.loss(coop.encode(images), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    assert [n for n, p in coop.named_parameters() if p.requires_grad] == ["ctx"]
    assert coop.ctx.grad is not None and coop.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())
    expected = (3 if class_specific else 1) * 4 * backbone.text_width
    assert coop.num_trainable() == expected and coop.shared_bytes() == expected * 4


def test_class_position_changes_the_prompt(backbone):
    feats = {}
    for position in ("end", "front"):
        torch.manual_seed(0)
        coop = build_method("coop", backbone, CLASSES, [], {"n_ctx": 2, "ctx_init": None, "init_seed": 1,
                                                            "class_token_position": position})
        feats[position] = coop.text_features()
    assert not torch.allclose(feats["end"], feats["front"])


def test_coop_evaluates_on_new_class_names(backbone):
    coop = build_method("coop", backbone, CLASSES, [], {})
    coop.set_classnames(["pink moon", "cyan ring"])
    assert coop(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    specific = build_method("coop", backbone, CLASSES, [], {"class_specific": True})
    with pytest.raises(ConfigError, match="class_specific"):
        specific.set_classnames(["pink moon"])


def test_shared_and_local_state_partition_the_state_dict(backbone):
    coop = build_method("coop", backbone, CLASSES, [], {})
    assert set(coop.shared_state()) == {"ctx"} and coop.local_state() == {}


def test_coop_vit_b16_counts_2048_floats_at_width_512():
    import open_clip

    from flbench.backbones.clip import FrozenCLIP

    vit = FrozenCLIP(open_clip.create_model("ViT-B-16", pretrained=None), "ViT-B-16")
    coop = build_method("coop", vit, CLASSES, [], {"n_ctx": 4, "ctx_init": None})
    assert coop.num_trainable() == 2048 and coop.shared_bytes() == 2048 * 4
    assert coop(torch.rand(1, 3, 224, 224)).shape == (1, 3)
