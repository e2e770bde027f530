"""Real CLIP weights for open_clip architectures: pretrained tags (hub or local cache) and local checkpoint files.

- `backbone.pretrained=<tag>` (e.g. openai): the weights open_clip knows for that tag. If they are not already in
  the local cache and the hub cannot be reached (HF_HUB_OFFLINE=1, or no answer within ~1.5 s), this fails at once
  with what to do, instead of open_clip's ~46 s retry loop.
- `backbone.checkpoint=PATH`: an open_clip or OpenAI-format *state dict* (`.pt`/`.pth`/`.bin` read with
  `torch.load(weights_only=True)`, or `.safetensors`). Wrappers such as {"state_dict": ...} and DDP "module."
  prefixes are unwrapped. The file wins over `backbone.pretrained`; a tag given as well only describes the file
  (its QuickGELU and mean/std settings), so `pretrained=openai checkpoint=<hand-downloaded OpenAI weights>` is right.
  OpenAI's released `.pt` files are TorchScript archives, i.e. code plus weights: flbench does not execute them;
  convert once with `torch.jit.load` (see `JIT_HELP`) or use `backbone.pretrained=openai`, which fetches the same
  weights as a plain state dict.
- OpenAI's models use QuickGELU; open_clip's plain `ViT-B-16` config uses GELU. The activation is taken from the
  tag's config, or detected from an OpenAI-format state dict (its extra `input_resolution`/`context_length`/
  `vocab_size` entries), and can be forced with `backbone.quick_gelu`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from flbench.errors import ConfigError

log = logging.getLogger(__name__)

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
JIT_HELP = ("python -c \"import torch; torch.save(torch.jit.load('IN.pt', map_location='cpu').state_dict(), "
            "'OUT.pt')\"")
HUB_PROBE_TIMEOUT_S = 1.5


def _vision_cfg(cfg: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The image tower's config of the backbone `cfg` describes, known without building it."""
    from flbench.backbones.tiny import TINY_CONFIGS

    name = str(cfg.get("name", ""))
    if name.startswith("tiny"):
        return TINY_CONFIGS.get(name, {}).get("vision_cfg")
    return (open_clip.get_model_config(str(cfg.get("arch"))) or {}).get("vision_cfg")


def backbone_is_vit(cfg: Mapping[str, Any]) -> bool | None:
    """True for a ViT image tower, False for a ResNet one (open_clip gives ResNets a list of stage depths), None
    when the architecture is unknown."""
    vision = _vision_cfg(cfg)
    return None if not vision or "layers" not in vision else not isinstance(vision["layers"], (list, tuple))


def backbone_image_size(cfg: Mapping[str, Any]) -> int | None:
    """The input resolution of the backbone `cfg` describes, known without building it (datasets resize to it)."""
    vision = _vision_cfg(cfg)
    if not vision or "image_size" not in vision:
        return None
    size = vision["image_size"]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _offline_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def reachable(host: str, port: int = 443, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether `host` accepts a TCP connection, decided within ~`timeout` s even when DNS itself hangs (the probe runs
    in a daemon thread that is abandoned on time-out)."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="flbench-hub-probe")
    thread.start()
    thread.join(timeout + 0.25)
    return bool(answer and answer[0])


def _hub_files(tag_cfg: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(repo id, candidate file names) of a tag's weights on the hub, safetensors first (as open_clip tries them)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(tag_cfg["hf_hub"])  # "org/model/" names the default file, as in open_clip
    filename = filename or HF_WEIGHTS_NAME
    names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
    if filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return repo, list(dict.fromkeys(names + [filename]))


def cached_weights(tag_cfg: Mapping[str, Any]) -> str | None:
    """The local file of a tag's weights if some earlier run downloaded it (no network access)."""
    if tag_cfg.get("file"):
        return str(tag_cfg["file"])
    if tag_cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        repo, names = _hub_files(tag_cfg)
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if tag_cfg.get("url"):
        candidate = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        if candidate.is_file():
            return str(candidate)
    return None


def locate_tag(arch: str, tag: str) -> tuple[str | None, dict[str, Any]]:
    """(local weights file or None when they must be downloaded, tag config) for an open_clip pretrained tag.
    ConfigError, within ~1.5 s, when the weights are neither cached nor downloadable from here."""
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        known = open_clip.list_pretrained_tags_by_model(arch)
        raise ConfigError(f"backbone.pretrained={tag!r} is not an open_clip tag of backbone.arch={arch!r}; choose one "
                          f"of {known} or use backbone.checkpoint=PATH")
    local = cached_weights(tag_cfg)
    if local:
        return local, tag_cfg
    host = "huggingface.co" if tag_cfg.get("hf_hub") else urlparse(tag_cfg.get("url", "")).hostname or ""
    if tag_cfg.get("hf_hub") and os.environ.get("HF_ENDPOINT"):
        host = urlparse(os.environ["HF_ENDPOINT"]).hostname or host
    offline = _offline_env() if tag_cfg.get("hf_hub") else False
    if offline or not reachable(host):
        why = "HF_HUB_OFFLINE is set" if offline else f"{host} is unreachable"
        raise ConfigError(f"backbone.pretrained={tag!r}: the {arch} weights are not in the local cache and {why}; run "
                          f"once where the hub is reachable (they are then cached), or download them elsewhere and "
                          f"pass backbone.checkpoint=PATH")
    return None, tag_cfg


def check_weights(cfg: Mapping[str, Any]) -> None:
    """Before any data is built and any weights are read: the backbone's weights can be had (a checkpoint file that is
    a readable archive, or a tag that is cached or downloadable). Cheap — the work behind it (rendering a dataset at
    224 px, loading 600 MB) is not, so the mistake costs seconds, not minutes. Tiny CLIPs are built locally."""
    if str(cfg.get("name", "")).startswith("tiny"):
        return
    arch = str(cfg.get("arch"))
    if arch not in open_clip.list_models():
        raise ConfigError(f"backbone.arch={arch!r} is not an open_clip architecture (see open_clip.list_models())")
    if cfg.get("checkpoint"):
        check_archive(cfg["checkpoint"])
    elif cfg.get("pretrained"):
        locate_tag(arch, str(cfg["pretrained"]))


def check_archive(path: str | os.PathLike) -> None:
    """A checkpoint file exists and is a state-dict archive flbench can read (format only; nothing is unpickled)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"backbone.checkpoint={path} does not exist; give the path of a state-dict file "
                          "(.pt, .pth, .bin or .safetensors), or backbone.pretrained=<tag> instead")
    if path.suffix == ".safetensors":
        with open(path, "rb") as handle:
            header = handle.read(8)
        if len(header) < 8 or int.from_bytes(header, "little") > path.stat().st_size:
            raise ConfigError(f"backbone.checkpoint={path} is not a safetensors file (truncated or another format)")
        return
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            raise ConfigError(f"backbone.checkpoint={path} is a TorchScript (JIT) archive, like OpenAI's released "
                              f".pt files; flbench only loads state dicts. If you trust the file, convert it once: "
                              f"{JIT_HELP} — or use backbone.pretrained=openai")
        return
    with open(path, "rb") as handle:
        if handle.read(1) != b"\x80":  # torch's legacy (non-zip) format starts with a pickle protocol byte
            raise ConfigError(f"backbone.checkpoint={path} is neither a torch archive nor a safetensors file")


def resolve_tag(arch: str, tag: str) -> tuple[str, dict[str, Any]]:
    """(local weights file, tag config) for an open_clip pretrained tag; downloads only when the hub answers."""
    local, tag_cfg = locate_tag(arch, tag)
    if local:
        return local, tag_cfg
    log.info("downloading the %s/%s weights (first time only)", arch, tag)
    try:
        return open_clip.download_pretrained(tag_cfg), tag_cfg
    except Exception as error:  # noqa: BLE001 — any download failure becomes one actionable line
        raise ConfigError(f"backbone.pretrained={tag!r}: downloading the {arch} weights failed ({error}); retry, or "
                          f"pass backbone.checkpoint=PATH") from error


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """(open_clip-style state dict, whether it is in OpenAI's format) from a checkpoint file, never executing code."""
    path = Path(path).expanduser()
    check_archive(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 — unpickling errors have many types
            raise ConfigError(f"backbone.checkpoint={path} is not a plain state dict loadable with "
                              f"weights_only=True ({type(error).__name__}: {str(error).splitlines()[0][:200]})") \
                from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"backbone.checkpoint={path} does not hold a state dict (a mapping of names to tensors)")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    openai_format = any(k in state for k in OPENAI_EXTRA_KEYS)
    for key in OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return state, openai_format


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str) -> None:
    """Load strictly; a mismatch becomes one line naming the checkpoint and the architecture."""
    state = dict(state)
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor) and "logit_scale" in state and state["logit_scale"].ndim != scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(scale.shape)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise ConfigError(f"{source} does not fit backbone.arch={arch!r}: {detail}; pick the architecture the "
                          f"weights were trained with")
    model.load_state_dict(state, strict=True)


def create_model(arch: str, pretrained: str | None = None, checkpoint: str | None = None,
                 quick_gelu: bool | None = None) -> tuple[open_clip.CLIP, tuple[float, ...], tuple[float, ...]]:
    """(model, image mean, image std) for an open_clip architecture with a tag, a checkpoint, or random weights."""
    if arch not in open_clip.list_models():
        raise ConfigError(f"backbone.arch={arch!r} is not an open_clip architecture (see open_clip.list_models())")
    tag_cfg: dict[str, Any] = {}
    state, openai_format, source = None, False, ""
    if checkpoint:
        # the file wins; a tag given as well only says what the file is (QuickGELU, mean/std), nothing is fetched
        tag_cfg = dict(open_clip.get_pretrained_cfg(arch, pretrained) or {}) if pretrained else {}
        source = f"backbone.checkpoint={checkpoint}"
        state, openai_format = read_state_dict(checkpoint)
        if pretrained:
            log.info("backbone.checkpoint=%s is loaded; backbone.pretrained=%r only sets its %s", checkpoint,
                     pretrained, "QuickGELU and mean/std" if tag_cfg else "nothing (unknown tag)")
    elif pretrained:
        path, tag_cfg = resolve_tag(arch, pretrained)
        source = f"the weights of backbone.pretrained={pretrained!r} ({path})"
        state, openai_format = read_state_dict(path)
    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False)) or openai_format
    model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=bool(quick_gelu))
    if not isinstance(model, open_clip.CLIP):
        raise ConfigError(f"backbone.arch={arch!r} has a custom text tower ({type(model).__name__}); prompt methods "
                          f"need CLIP's own text transformer: choose a ViT-*/RN* CLIP architecture")
    if state is not None:
        load_weights(model, state, source, arch)
    mean = tuple(tag_cfg.get("mean") or getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN)
    std = tuple(tag_cfg.get("std") or getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD)
    return model, mean, std
