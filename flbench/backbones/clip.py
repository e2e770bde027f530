"""Frozen CLIP backbones: open_clip models by name/tag or checkpoint, and the package's own tiny offline CLIP.

`FrozenCLIP` is the only thing prompt methods see. It exposes image encoding and text encoding *from token
embeddings*, so a method can put learned context vectors where words used to be. One instance per process is
shared by every simulated client (`backbones/build.py`: `load_backbone`). The tiny offline CLIPs are built in
`backbones/tiny.py`, real open_clip weights are read in `backbones/weights.py`.
"""

from __future__ import annotations

import hashlib
import logging

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from flbench.backbones.text import encode_embeddings, encode_shared_prefix, text_length

log = logging.getLogger(__name__)


class FrozenCLIP(nn.Module):
    """A frozen open_clip CLIP with the hooks prompt learning needs."""

    def __init__(self, model: open_clip.CLIP, name: str, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> None:
        super().__init__()
        self.model = model.eval()
        self.name = name
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.context_length = int(model.context_length)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)

    def fingerprint(self) -> str:
        """SHA-1 (12 hex digits) of the frozen weights, routers excluded (they are trained on top of these weights):
        which backbone a record used (tiny CLIPs built from the same settings on different CPU types are different
        models: README), and the key of the routers calibrated for it. Computed once; the weights never change."""
        if "_fingerprint" not in self.__dict__:
            self.__dict__["_fingerprint"] = self._digest()
        return self.__dict__["_fingerprint"]

    def _digest(self) -> str:
        digest = hashlib.sha1()
        for name, tensor in sorted(self.model.state_dict().items()):
            if ".router." in f".{name}":
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:12]

    def remember_build(self) -> None:
        """Keep the fingerprint of the weights as built or loaded: call before a conversion changes them."""
        self.__dict__.setdefault("_build_fingerprint", self._digest())

    def build_fingerprint(self) -> str:
        """SHA-1 (12 hex digits) of the weights as built or loaded, before any conversion (GQA, routed-KV,
        uptraining) changed them: one value for every record made from one build, whatever attention it swaps in.
        It tells machines apart: the tiny CLIP built from the same settings on another CPU type is another model."""
        return self.__dict__.get("_build_fingerprint") or self.fingerprint()

    def forget_fingerprint(self) -> None:
        """The weights were changed on purpose (an uptrained conversion): the next `fingerprint()` hashes them anew."""
        self.__dict__.pop("_fingerprint", None)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        # The backbone never leaves eval mode (no dropout, no BN updates), whatever its owner does.
        return super().train(False)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def is_vit(self) -> bool:
        return hasattr(self.model.visual, "transformer")

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def device(self) -> torch.device:
        """Where the backbone lives (`Experiment` moves it there once per process; methods follow it)."""
        return self.mean.device

    def text_signature(self) -> tuple:
        """Changes whenever the text tower's output could: a weight modified in place (trained or calibrated routers
        bump the tensor's version counter) or moved, attention swapped, dense-teacher mode switched. Frozen text
        features cached under one signature (`prompting.handcrafted_text_features`) are valid while it holds."""
        m = self.model
        tensors = [*m.transformer.parameters(), *m.token_embedding.parameters(), *m.ln_final.parameters(),
                   m.positional_embedding]
        if isinstance(m.text_projection, torch.Tensor):
            tensors.append(m.text_projection)
        else:
            tensors += list(m.text_projection.parameters())
        modes = tuple(getattr(module, "use_dense", None) for module in m.transformer.modules())
        return tuple((t.data_ptr(), t._version) for t in tensors) + modes

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.model.token_embedding.weight.device)

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image features (unnormalised) from float images in [0, 1] at `image_size`."""
        return self.model.encode_image((images - self.mean) / self.std)

    def encode_text_embeddings(self, embeddings: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Text features from token embeddings [N, context_length, width]; pooled at each row's end-of-text token.

        This mirrors open_clip's `encode_text` after its embedding lookup, so with the embeddings of real tokens
        it returns `encode_text(tokens)`. Only the first `max(eot_index) + 1` positions are computed when the tower
        is causal: nothing later can reach an EOT token (exact up to rounding; flbench/backbones/text.py).
        """
        return encode_embeddings(self.model, embeddings, eot_index)

    def encode_text_shared_prefix(self, prefix: torch.Tensor, suffix: torch.Tensor, eot_index: torch.Tensor
                                  ) -> torch.Tensor:
        """Text features [G, C, D] of the rows prefix[g] ++ suffix[c]: prefix [G, P, width] shared by the C rows of
        its group, suffix [(G,) C, S, width], eot_index [C] from the start of the row. The prefix is computed once
        per group where that is exact (flbench/backbones/text.py: `encode_shared_prefix`)."""
        return encode_shared_prefix(self.model, prefix, suffix, eot_index)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        eot_index = tokens.argmax(dim=-1)
        tokens = tokens[:, :text_length(self.model, eot_index)]  # no embedding lookup for positions never computed
        return self.encode_text_embeddings(self.token_embeddings(tokens), eot_index)


def normalize(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features, dim=-1)
