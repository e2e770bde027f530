"""Zero-shot prompt templates per dataset. The first is the single template used by default (CoOp's per-dataset
hand-crafted prompt, as in its zero-shot CLIP baseline); the rest are extra templates for methods that ensemble."""

from __future__ import annotations

# Generic extras: a small ensemble in the spirit of CLIP's ImageNet prompt engineering.
_ENSEMBLE = ["a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.", "a photo of the small {}.",
             "art of the {}.", "a {} in a video game.", "itap of a {}."]

_FIRST: dict[str, str] = {
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
    "domainnet": "a photo of a {}.",
    "cifar10": "a photo of a {}.",
    "cifar100": "a photo of a {}.",
}

_EXTRA: dict[str, list[str]] = {
    "oxford_pets": ["a photo of the {}, a type of pet.", "a photo of a {}."],
    "oxford_flowers": ["a photo of the {}, a type of flower.", "a photo of a {}."],
    "food101": ["a photo of the {}, a type of food.", "a photo of a {}."],
    "fgvc_aircraft": ["a photo of the {}, a type of aircraft.", "a photo of a {}."],
    "dtd": ["a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing."],
    "eurosat": ["a satellite photo of {}.", "a photo of {}."],
    "ucf101": ["a video frame of a person doing {}.", "a photo of a person performing {}."],
    "domainnet": ["a clipart of a {}.", "an infographic of a {}.", "a painting of a {}.", "a quickdraw sketch of a {}.",
                  "a sketch of a {}."],
    "stanford_cars": ["a photo of a {}, a type of car.", "a photo of my {}."],
}


def templates_for(dataset: str) -> list[str]:
    """Templates of `dataset`, first the default one, without duplicates."""
    ordered = [_FIRST.get(dataset, "a photo of a {}.")] + _EXTRA.get(dataset, []) + _ENSEMBLE
    return list(dict.fromkeys(ordered))


# PromptSRC's frozen text teacher, for every dataset: 60 of the 80 ImageNet prompts of CLIP's prompt-engineering
# notebook (openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb), the subset PromptSRC's
# `trainers/imagenet_templates.py` lists.
IMAGENET_TEMPLATES_60: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)
