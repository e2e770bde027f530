"""Frozen image features kept on disk between processes, so that a sweep encodes each image set once.

`Experiment.encoded` keeps a shard's or split's features for the life of a process; every new run — each job of a
sweep, each rerun of the default experiment — used to push the same images through the same frozen image tower
again (on the default experiment, about a fifth of a warm run: docs/benchmarks.md). Here a set's features are stored under
`$FLBENCH_CACHE/features/<key>.pt` the first time and read back after.

The key is everything the features are a function of, so a stored file is only ever read where encoding would have
given the same tensor bit for bit: the image tower's weights, buffers and structure (routers and swapped attention
included), the normalisation, the images' bytes in order, the batch size (batches change the kernels' blocking), the
precision, the device type, torch's version and its thread count. Only the default image side (the frozen CLIP
embedding, `PromptMethod.encode`) of in-memory image sets is stored; anything else is encoded as before. Files are
tensors read with `weights_only=True` (flbench/io.py: nothing in a cache can run code).

`FLBENCH_FEATURE_STORE=0` turns the store off (for the benchmarks' cold figures and debugging); like the text
shortcuts it is no config key: it changes no number, only where the number comes from.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from flbench.algorithms.base import Encoded, PromptMethod
from flbench.backbones.clip import FrozenCLIP
from flbench.datasets.base import ImageSet, SubsetImageSet, TensorImageSet
from flbench.engine import encode_all
from flbench.io import atomic_write, cache_dir, load_torch_data, switched_on

STORE_ENV = "FLBENCH_FEATURE_STORE"
VERSION = b"flbench-features-1"


def store_enabled() -> bool:
    return switched_on(STORE_ENV)


def image_features(method: PromptMethod, images: ImageSet, batch_size: int) -> Encoded:
    """`engine.encode_all(method, images, batch_size)`, read from the store when it holds them, stored when not."""
    key = _store_key(method, images, batch_size)
    if key is None:
        return encode_all(method, images, batch_size)
    path = cache_dir() / "features" / f"{key}.pt"
    try:
        features = load_torch_data(path, "stored image features", f"delete {path} (it is re-encoded on next use)")
    except FileNotFoundError:
        features = None
    if isinstance(features, torch.Tensor) and features.shape[0] == len(images):
        return features.to(method.device)
    features = encode_all(method, images, batch_size)
    atomic_write(path, lambda f: torch.save(features.detach().cpu().contiguous(), f))
    return features


def _store_key(method: PromptMethod, images: ImageSet, batch_size: int) -> str | None:
    if not store_enabled() or type(method).encode is not PromptMethod.encode:
        return None
    images_digest = content_digest(images)
    if images_digest is None:
        return None
    digest = hashlib.sha1(VERSION)
    for part in (tower_digest(method.backbone), images_digest, str(batch_size), str(method.precision),
                 method.device.type, torch.__version__, str(torch.get_num_threads())):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


def tower_digest(backbone: FrozenCLIP) -> str:
    """SHA-1 of the image tower: every tensor of its state (routers included), its structure and plain settings, the
    normalisation. Kept while the tower's tensors are the same objects at the same versions and its structure and
    settings read the same (frozen: hashed once per process)."""
    visual = backbone.model.visual
    tensors = [*visual.state_dict(keep_vars=True).values(), backbone.mean, backbone.std]
    settings = sorted((k, v) for k, v in vars(visual).items()  # output_tokens, pool_type, ...: not in the repr
                      if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple)))
    signature = (tuple((t.data_ptr(), t._version) for t in tensors), repr(visual), repr(settings))
    cached = backbone.__dict__.get("_tower_digest")
    if cached is None or cached[0] != signature:
        digest = hashlib.sha1((signature[1] + signature[2]).encode())
        for name, tensor in [*visual.state_dict().items(), ("mean", backbone.mean), ("std", backbone.std)]:
            digest.update(name.encode() + str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        cached = (signature, digest.hexdigest())
        backbone.__dict__["_tower_digest"] = cached
    return cached[1]


def content_digest(images: ImageSet) -> str | None:
    """SHA-1 of an in-memory set's images in order (a subset: its parent's digest and its indices); None for sets
    read from files, which are not stored."""
    if isinstance(images, SubsetImageSet):
        parent = content_digest(images.parent)
        if parent is None:
            return None
        return hashlib.sha1(parent.encode() + np.ascontiguousarray(images.indices, dtype=np.int64).tobytes()).hexdigest()
    if isinstance(images, TensorImageSet):
        if "_digest" not in images.__dict__:
            data = images.images.contiguous()
            images.__dict__["_digest"] = hashlib.sha1(str(tuple(data.shape)).encode()
                                                      + data.numpy().tobytes()).hexdigest()
        return images.__dict__["_digest"]
    return None


__all__ = ["STORE_ENV", "content_digest", "image_features", "store_enabled", "tower_digest"]
